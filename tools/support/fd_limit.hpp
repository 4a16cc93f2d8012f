// Raising RLIMIT_NOFILE, for the programs around evmux: the servers, the load
// client, the benchmarks and the tests. Header-only, no evmux code: the
// baseline servers and evmux-load include it and stay self-contained.
//
// Internal to the project (tools/support); not installed.
#pragma once

#include <sys/resource.h>

#include <cerrno>
#include <system_error>

namespace evmux::support {

/// What an RLIM_INFINITY limit counts as: Linux's default fs.nr_open, which
/// caps the descriptors of any process anyway.
inline constexpr long unlimited_fds = 1L << 20;

namespace detail {

inline long fd_count(rlim_t limit) {
    return limit == RLIM_INFINITY ? unlimited_fds : static_cast<long>(limit);
}

inline rlimit get_fd_limit() {
    rlimit rl{};
    if (::getrlimit(RLIMIT_NOFILE, &rl) != 0)
        throw std::system_error(errno, std::generic_category(), "getrlimit(RLIMIT_NOFILE)");
    return rl;
}

}  // namespace detail

/// Raises the soft RLIMIT_NOFILE to the hard limit, as any process may.
/// Children started afterwards inherit it. Returns the soft limit now in force.
inline long raise_fd_limit() {
    rlimit rl = detail::get_fd_limit();
    if (rl.rlim_cur != rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        ::setrlimit(RLIMIT_NOFILE, &rl);
        rl = detail::get_fd_limit();
    }
    return detail::fd_count(rl.rlim_cur);
}

/// Raises the soft RLIMIT_NOFILE to `wanted` descriptors, the hard limit with
/// it if it is lower and this process may (root, CAP_SYS_RESOURCE); if it may
/// not, as far as the hard limit goes. Never lowers a limit. Children started
/// afterwards inherit it. Returns the soft limit now in force, which may be
/// below `wanted`; then errno says why `wanted` was refused.
inline long raise_fd_limit(long wanted) {
    const rlimit now = detail::get_fd_limit();
    const auto want = static_cast<rlim_t>(wanted);
    if (now.rlim_cur == RLIM_INFINITY || now.rlim_cur >= want)
        return detail::fd_count(now.rlim_cur);
    rlimit raised = now;
    raised.rlim_cur = want;
    if (raised.rlim_max != RLIM_INFINITY && raised.rlim_max < want) raised.rlim_max = want;
    if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) return wanted;
    const int refused = errno;
    const long got = raise_fd_limit();
    errno = refused;
    return got;
}

}  // namespace evmux::support
