// See bench_instructions.hpp.
#include "bench_instructions.hpp"

#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace evmux::bench {

std::optional<std::uint64_t> callgrind_total(const std::filesystem::path& file) {
    std::ifstream in(file);
    std::string line;
    std::optional<std::uint64_t> total;
    while (std::getline(in, line)) {
        // "summary:" comes first in the header, "totals:" at the end; both
        // hold the events in the order of the "events:" line (Ir first).
        if (!line.starts_with("totals:") && !line.starts_with("summary:")) continue;
        std::istringstream fields(line.substr(line.find(':') + 1));
        std::uint64_t ir = 0;
        if (fields >> ir) total = ir;
    }
    return total;
}

double instructions_per_message(std::uint64_t a_ir, double a_msgs, std::uint64_t b_ir,
                                double b_msgs) {
    if (!(a_msgs > 0) || !(b_msgs >= instructions_min_msgs_ratio * a_msgs) || b_ir < a_ir)
        return NAN;
    return static_cast<double>(b_ir - a_ir) / (b_msgs - a_msgs);
}

std::optional<std::filesystem::path> find_valgrind(std::string& why) {
    const char* path = std::getenv("PATH");
    std::istringstream dirs(path ? path : "/usr/bin:/bin");
    std::string dir;
    while (std::getline(dirs, dir, ':')) {
        std::filesystem::path candidate =
            std::filesystem::path(dir.empty() ? "." : dir) / "valgrind";
        if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    }
    why = "valgrind not found on PATH (Debian: apt-get install valgrind)";
    return std::nullopt;
}

}  // namespace evmux::bench
