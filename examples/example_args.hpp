// The command line the example programs share (a helper of the examples, not
// part of evmux): --backend NAME, --self-test, --help, --version and one
// number flag (--port N, or --seconds N), each number read whole and checked
// against its range, so "80abc", "" or "-1" is an error, not port 80 or 0.
#pragma once

#include <charconv>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "evmux/selector.hpp"
#include "evmux/version.hpp"

namespace example {

/// What the command line asked for.
struct Args {
    std::string backend;  ///< empty: EVMUX_BACKEND, or the best backend here
    long number = 0;      ///< the number flag's value (its default if not given)
    bool self_test = false;
};

/// What a program accepts: its name, its usage text (a line or more, ending
/// in a newline), and its number flag with its default and range.
struct Spec {
    const char* program;
    const char* usage;
    const char* number_flag = "--port";
    long number_default = 9000;
    long number_min = 1;
    long number_max = 65535;
};

/// text as a whole decimal number in [min, max]; nothing for anything else.
inline std::optional<long> parse_number(std::string_view text, long min, long max) {
    long value = 0;
    const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (error != std::errc{} || end != text.data() + text.size() || value < min || value > max)
        return std::nullopt;
    return value;
}

/// Reads argv into args. Returns nothing to go on, or the status to exit with
/// at once: 0 after --help or --version, 2 (having said why on stderr) after
/// a bad or unknown flag.
inline std::optional<int> parse_args(const Spec& spec, int argc, char** argv, Args& args) {
    args.number = spec.number_default;
    for (int i = 1; i < argc; ++i) {
        const std::string_view arg = argv[i];
        const bool has_value = i + 1 < argc;
        if (arg == "--help" || arg == "-h") {
            std::fputs(spec.usage, stdout);
            return 0;
        } else if (arg == "--version") {
            std::printf("%s, evmux headers %s, library %s\n", spec.program, EVMUX_VERSION_STRING,
                        evmux::version());
            return 0;
        } else if (arg == "--self-test") {
            args.self_test = true;
        } else if (arg == "--backend" && has_value) {
            args.backend = argv[++i];
        } else if (arg == spec.number_flag && has_value) {
            const std::optional<long> n = parse_number(argv[++i], spec.number_min, spec.number_max);
            if (!n) {
                std::fprintf(stderr, "%s: bad %s '%s': a whole number from %ld to %ld\n",
                             spec.program, spec.number_flag, argv[i], spec.number_min,
                             spec.number_max);
                return 2;
            }
            args.number = *n;
        } else {
            if (arg == "--backend" || arg == spec.number_flag)
                std::fprintf(stderr, "%s: %s needs a value\n", spec.program, argv[i]);
            else
                std::fprintf(stderr, "%s: unknown argument '%s'\n", spec.program, argv[i]);
            std::fputs(spec.usage, stderr);
            return 2;
        }
    }
    return std::nullopt;
}

/// The selector args.backend names, or the default one (EVMUX_BACKEND, or the
/// best backend here) if it names none.
inline std::unique_ptr<evmux::Selector> make_selector(const Args& args) {
    return args.backend.empty() ? evmux::make_selector() : evmux::make_selector(args.backend);
}

}  // namespace example
