// A number flag's check for the tools' CLI11 command lines: the whole text a
// number in [min, max]. CLI11's own Range says "Value 80abc not in range 0 to
// 65535" of text that is no number at all; this says what the flag takes:
// "--port: '80abc' is not a whole number from 0 to 65535". Header-only; the
// program that includes it depends on CLI11.
#pragma once

#include <CLI/CLI.hpp>
#include <charconv>
#include <cstdio>
#include <string>
#include <type_traits>

namespace evmux::support {

/// A CLI11 validator taking only the whole text of a number of T's kind
/// (integral: whole numbers) from min to max.
template <typename T>
CLI::Validator number_in(T min, T max) {
    static_assert(std::is_arithmetic_v<T>);
    auto text = [](T v) {
        if constexpr (std::is_integral_v<T>) {
            return std::to_string(v);
        } else {
            char buf[32];
            std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
            return std::string(buf);
        }
    };
    const std::string range = text(min) + " to " + text(max);
    const std::string what =
        (std::is_integral_v<T> ? "a whole number from " : "a number from ") + range;
    CLI::Validator check(
        [=](std::string& s) -> std::string {
            T v{};
            const char* end = s.data() + s.size();
            const auto [stop, error] = std::from_chars(s.data(), end, v);
            // Written so that a NaN is refused too.
            if (s.empty() || error != std::errc{} || stop != end || !(v >= min && v <= max))
                return "'" + s + "' is not " + what;
            return std::string();
        },
        std::string(std::is_integral_v<T> ? "INT" : "FLOAT") + " in [" + text(min) + " - " +
            text(max) + "]");
    return check;
}

}  // namespace evmux::support
