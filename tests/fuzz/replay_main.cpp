// Runs a fuzz target over stored inputs, for builds without libFuzzer: each
// argument is a file or a directory of files (the corpus), each file one input.
// This makes the corpus a regression test in every ordinary build.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

void run_file(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
}

}  // namespace

int main(int argc, char** argv) {
    std::size_t inputs = 0;
    for (int i = 1; i < argc; ++i) {
        std::filesystem::path arg(argv[i]);
        if (std::filesystem::is_directory(arg)) {
            for (const auto& entry : std::filesystem::directory_iterator(arg)) {
                if (!entry.is_regular_file()) continue;
                run_file(entry.path());
                ++inputs;
            }
        } else {
            run_file(arg);
            ++inputs;
        }
    }
    std::printf("replayed %zu inputs\n", inputs);
    // An empty corpus proves nothing: fail rather than pass vacuously.
    return inputs > 0 ? 0 : 1;
}
