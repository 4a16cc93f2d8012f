// The backends that must work on this machine do: with EVMUX_EXPECT_BACKENDS
// set (names separated by spaces or commas, e.g. "select poll epoll io_uring
// libevent", as .ci/run sets it), exit 1 naming each expected backend that is
// unknown, not compiled in or not usable here, with the registry's reason.
// "io_uring-completion" also requires io_uring's completion I/O to be on.
// Without it, exit 77 (meson: skipped): nothing was required, nothing checked.
//
// Without this check a backend lost on a CI machine (liburing-dev missing at
// configure time, io_uring refused by a seccomp filter) only turns its suites
// into SKIPs, and the run still passes.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "evmux/selector.hpp"

int main() {
    const char* env = std::getenv("EVMUX_EXPECT_BACKENDS");
    std::vector<std::string> expected;
    std::string name;
    for (const char* p = env ? env : "";; ++p) {
        if (*p && *p != ' ' && *p != ',' && *p != '\t') {
            name += *p;
            continue;
        }
        if (!name.empty()) expected.push_back(name);
        name.clear();
        if (!*p) break;
    }
    if (expected.empty()) {
        std::printf("EVMUX_EXPECT_BACKENDS not set: no backend required here, none checked\n");
        return 77;
    }

    const std::vector<evmux::BackendInfo> all = evmux::backends();
    std::vector<std::string> missing;
    for (const std::string& want : expected) {
        // "io_uring-completion": io_uring usable *and* its completion I/O on
        // (else the io_uring-completion suites would only skip).
        const std::string suffix = "-completion";
        const bool completion = want.size() > suffix.size() && want.ends_with(suffix);
        const std::string backend = completion ? want.substr(0, want.size() - suffix.size()) : want;
        const evmux::BackendInfo* found = nullptr;
        for (const evmux::BackendInfo& b : all)
            if (b.name == backend) found = &b;
        std::string problem;
        if (!found) {
            problem = want + ": unknown backend (known:";
            for (const evmux::BackendInfo& b : all) problem += " " + b.name;
            problem += ")";
        } else if (!found->compiled_in) {
            problem = want + ": " + found->reason;  // "not compiled in (needs ...)"
        } else if (!found->usable) {
            problem = want + ": compiled in but not usable here: " + found->reason;
        } else if (completion && !found->completion) {
            problem = want + ": usable, but " +
                      (found->reason.empty() ? "no completion I/O" : found->reason);
        }
        if (problem.empty()) {
            std::printf("expected backend %s: usable%s%s\n", want.c_str(),
                        found->reason.empty() ? "" : ", ", found->reason.c_str());
        } else {
            std::printf("expected backend %s\n", problem.c_str());
            missing.push_back(problem);
        }
    }
    if (missing.empty()) return 0;
    std::fflush(stdout);  // the list above first, then the summary
    std::fprintf(stderr, "evmux: %zu of the backends in EVMUX_EXPECT_BACKENDS missing here:\n",
                 missing.size());
    for (const std::string& m : missing) std::fprintf(stderr, "  %s\n", m.c_str());
    return 1;
}
