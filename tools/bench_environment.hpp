// evmux-bench's record of the machine and build a run was measured on: kernel,
// CPU, governor, mitigations, load before and after, library and compiler
// versions, build type. Printed in the table header and as the JSON's
// "environment" object.
//
// Internal to tools/; not installed.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace evmux::bench {

/// Ordered (key, value) pairs; every value non-empty ("unknown (...)" when a
/// source could not be read).
struct Environment {
    std::vector<std::pair<std::string, std::string>> fields;
    const std::string& get(const std::string& key) const;
};

/// The environment now, with "load_before" from /proc/loadavg; call
/// record_load_after() when the run is over.
Environment gather_environment();
void record_load_after(Environment& env);

/// The one-line summary of /sys/devices/system/cpu/vulnerabilities/* in `dir`:
/// "N mitigated, N vulnerable, N not affected: name=state; ...".
std::string summarise_vulnerabilities(const std::string& dir);

}  // namespace evmux::bench
