// evmux-bench --instructions: user-space instructions per echoed message, a
// figure that other work on the machine does not move. Each server runs under
// valgrind's callgrind twice, for a short and a longer load; the difference
// of the two instruction totals over the difference of the two message counts
// cancels start-up and shut-down.
//
// Internal to tools/; not installed.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

namespace evmux::bench {

/// The program total of a callgrind output file (its "totals:" or
/// "summary:" line, the first event: Ir); nullopt if there is none.
std::optional<std::uint64_t> callgrind_total(const std::filesystem::path& file);

/// How many times the shorter run's messages the longer run must have for
/// the difference to be a figure: it is meant to have three times as many
/// (3 s of load against 1 s); a host too busy to give the longer run even
/// half more leaves a difference that start-up and shut-down still sway.
constexpr double instructions_min_msgs_ratio = 1.5;

/// (b_ir - a_ir) / (b_msgs - a_msgs); NaN unless b has at least
/// instructions_min_msgs_ratio times a's messages and at least as many
/// instructions.
double instructions_per_message(std::uint64_t a_ir, double a_msgs, std::uint64_t b_ir,
                                double b_msgs);

/// The valgrind executable on PATH, or nullopt with `why` saying so.
std::optional<std::filesystem::path> find_valgrind(std::string& why);

}  // namespace evmux::bench
