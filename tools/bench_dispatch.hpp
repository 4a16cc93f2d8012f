// evmux-bench's in-process dispatch benchmark: libevent's test/bench.c
// (tools/support/bench_c.hpp: n socketpairs, a active chains passing one byte
// along until w writes) on an EventLoop, so that its figures line up with
// libevent's published ones.
//
// Internal to tools/; not installed.
#pragma once

#include <string>
#include <vector>

namespace evmux::bench {

/// The times, in microseconds, of `iterations` runs of bench.c on an EventLoop over `backend`
/// with `n` socketpairs, `a` active chains and `w` writes: bench.c's timing, from
/// after the first `a` sends. Needs support::bench_c_fds(n) fds. Main thread. Throws
/// std::invalid_argument for an unusable backend, std::system_error if a socketpair cannot be made.
std::vector<double> dispatch_iterations(const std::string& backend, int n, int a, int w,
                                        int iterations);

/// One point of the "dispatch cost vs registered fds" curve.
struct DispatchSweep {
    std::string backend;
    int fds = 0;     ///< socketpairs watched (each adds one registered fd)
    int active = 0;  ///< chains in flight
    int writes = 0;
    double median_us = 0;     ///< median time of one bench.c iteration
    double us_per_event = 0;  ///< median_us / callbacks run in it
};

/// bench.c with `n` pairs, 10 active chains and 1000 writes, `iterations`
/// times; the median. Throws as dispatch_iterations() does.
DispatchSweep dispatch_sweep(const std::string& backend, int n, int iterations);

}  // namespace evmux::bench
