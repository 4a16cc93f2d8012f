#include "bench_environment.hpp"

#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>

#if __has_include(<event2/event-config.h>)
#include <event2/event-config.h>
#endif
#if __has_include(<liburing/io_uring_version.h>)
#include <liburing/io_uring_version.h>
#endif

namespace evmux::bench {
namespace {

std::string first_line(const std::string& path) {
    std::ifstream in(path);
    std::string line;
    std::getline(in, line);
    return line;
}

std::string cpu_model() {
    std::ifstream in("/proc/cpuinfo");
    std::string line;
    while (std::getline(in, line))
        if (line.starts_with("model name")) {
            auto at = line.find(':');
            if (at != std::string::npos) {
                auto start = line.find_first_not_of(" \t", at + 1);
                if (start != std::string::npos) return line.substr(start);
            }
        }
    return "unknown (no model name in /proc/cpuinfo)";
}

std::string load_average() {
    std::string line = first_line("/proc/loadavg");
    if (line.empty()) return "unknown (no /proc/loadavg)";
    // "0.52 0.58 0.59 1/123 4567": the three averages.
    std::size_t at = 0;
    for (int i = 0; i < 3 && at != std::string::npos; ++i) at = line.find(' ', at + 1);
    return line.substr(0, at);
}

std::string libevent_version() {
#ifdef EVENT__VERSION
    return EVENT__VERSION;
#else
    return "n/a";
#endif
}

std::string liburing_version() {
#if defined(IO_URING_VERSION_MAJOR) && defined(IO_URING_VERSION_MINOR)
    return std::to_string(IO_URING_VERSION_MAJOR) + "." + std::to_string(IO_URING_VERSION_MINOR);
#elif defined(EVMUX_LIBURING_VERSION)
    return EVMUX_LIBURING_VERSION " (pkg-config)";
#else
    return "n/a";
#endif
}

std::string build_type() {
#ifdef EVMUX_BUILDTYPE
    std::string s = EVMUX_BUILDTYPE;
#else
    std::string s = "unknown";
#endif
#ifdef NDEBUG
    s += ", NDEBUG";
#else
    s += ", assertions on";
#endif
#ifdef __OPTIMIZE__
    s += ", optimized";
#else
    s += ", not optimized";
#endif
    return s;
}

std::string compiler() {
#if defined(__clang__)
    return __VERSION__;  // "Clang 16.0.6 ..." already
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#else
    return __VERSION__;
#endif
}

}  // namespace

const std::string& Environment::get(const std::string& key) const {
    static const std::string none;
    for (const auto& [k, v] : fields)
        if (k == key) return v;
    return none;
}

std::string summarise_vulnerabilities(const std::string& dir) {
    std::vector<std::pair<std::string, std::string>> entries;
    std::error_code ec;
    for (const auto& e : std::filesystem::directory_iterator(dir, ec))
        entries.emplace_back(e.path().filename().string(), first_line(e.path().string()));
    if (ec || entries.empty()) return "unknown (no " + dir + ")";
    std::sort(entries.begin(), entries.end());
    int mitigated = 0, vulnerable = 0, unaffected = 0, other = 0;
    std::string list;
    for (const auto& [name, state] : entries) {
        if (state.starts_with("Mitigation"))
            ++mitigated;
        else if (state.starts_with("Vulnerable"))
            ++vulnerable;
        else if (state.starts_with("Not affected"))
            ++unaffected;
        else
            ++other;
        // The state's first word or two: "Mitigation", "Vulnerable", "Not affected".
        std::string brief = state.substr(0, state.find(';'));
        brief = brief.substr(0, brief.find(':'));
        list += (list.empty() ? "" : "; ") + name + "=" + (brief.empty() ? "?" : brief);
    }
    std::string s = std::to_string(mitigated) + " mitigated, " + std::to_string(vulnerable) +
                    " vulnerable, " + std::to_string(unaffected) + " not affected";
    if (other) s += ", " + std::to_string(other) + " other";
    return s + ": " + list;
}

Environment gather_environment() {
    Environment env;
    utsname u{};
    std::string kernel = ::uname(&u) == 0 ? u.release : "unknown (uname failed)";
    std::string governor = first_line("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor");
    long cores = ::sysconf(_SC_NPROCESSORS_ONLN);
    env.fields = {
        {"kernel", kernel},
        {"cpu_model", cpu_model()},
        {"cores_online", cores > 0 ? std::to_string(cores) : "unknown"},
        {"governor", governor.empty() ? "unknown (no cpufreq)" : governor},
        {"mitigations", summarise_vulnerabilities("/sys/devices/system/cpu/vulnerabilities")},
        {"load_before", load_average()},
        {"load_after", "unknown (run not finished)"},
        {"libevent", libevent_version()},
        {"liburing", liburing_version()},
        {"compiler", compiler()},
        {"build_type", build_type()},
    };
    return env;
}

void record_load_after(Environment& env) {
    for (auto& [k, v] : env.fields)
        if (k == "load_after") v = load_average();
}

}  // namespace evmux::bench
