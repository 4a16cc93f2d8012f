// See bench_dispatch.hpp. bench.c itself is tools/support/bench_c.hpp; this
// is its EventLoop driver, as bench.c drives an event_base: re-arm every
// watcher (not timed), then run the loop without blocking until every byte
// sent has been read, each watcher's callback relaying its pair's byte.
#include "bench_dispatch.hpp"

#include <algorithm>
#include <chrono>

#include "bench_c.hpp"
#include "evmux/event_loop.hpp"

namespace evmux::bench {

std::vector<double> dispatch_iterations(const std::string& backend, int n, int a, int w,
                                        int iterations) {
    EventLoop loop(make_selector(backend));
    support::BenchC bench(n);
    std::vector<double> times;
    for (int it = 0; it < iterations; ++it) {
        // Re-arm every watcher, as bench.c does with event_del/event_add.
        for (int i = 0; i < n; ++i) {
            loop.unwatch(bench.read_end(i));
            loop.watch(bench.read_end(i), Events::read, [&bench, i](Events) { bench.relay(i); });
        }
        loop.run_once(std::chrono::nanoseconds::zero());
        support::BenchC::Iteration run =
            bench.run(a, w, [&loop] { loop.run_once(std::chrono::nanoseconds::zero()); });
        times.push_back(std::chrono::duration<double, std::micro>(run.after_sends).count());
    }
    return times;
}

DispatchSweep dispatch_sweep(const std::string& backend, int n, int iterations) {
    constexpr int active = 10, writes = 1000;
    int a = std::min(active, n);
    auto times = dispatch_iterations(backend, n, a, writes, iterations);
    std::sort(times.begin(), times.end());
    DispatchSweep s{backend, n, a, writes, times[times.size() / 2], 0};
    s.us_per_event = s.median_us / (a + writes);
    return s;
}

}  // namespace evmux::bench
