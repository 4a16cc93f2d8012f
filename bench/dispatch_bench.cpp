// Dispatch cost per backend, measured the way libevent's test/bench.c does
// (tools/support/bench_c.hpp): n socketpairs, the read end of each registered
// for read; `a` of them get a byte; every ready fd reads its byte and, while
// writes are left (w per iteration), writes one byte to the next pair. One
// iteration ends when all a + w bytes have been read. Only that loop is timed
// (manual time), as in bench.c, here with the first `a` sends; setup and
// registration are not. The selector is driven directly: no EventLoop
// (`evmux-bench dispatch` is the same benchmark on an EventLoop).
//
// What it shows: the cost of one ready event as idle fds grow. select and
// poll pass every registered fd to the kernel on each wait, so their cost
// grows with n; epoll and io_uring should stay flat.
//
// Usage: evmux_bench_dispatch [--benchmark_counters_tabular=true] [google benchmark flags]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "bench_c.hpp"
#include "evmux/selector.hpp"
#include "fd_limit.hpp"

namespace {

constexpr int writes_per_iteration = 100;  // bench.c's default -w

using evmux::support::BenchC;

/// One benchmark: `backend` with `n` pairs, `active` of them primed.
void dispatch(benchmark::State& state, const std::string& backend, int n, int active,
              const std::string& note) {
    std::unique_ptr<evmux::Selector> sel;
    std::unique_ptr<BenchC> bench;
    try {
        sel = evmux::make_selector(backend);
        bench = std::make_unique<BenchC>(n);
        // The pair index travels as the key's data: no lookup in the callback.
        for (int i = 0; i < n; ++i)
            sel->add(bench->read_end(i), evmux::Events::read,
                     reinterpret_cast<void*>(static_cast<std::intptr_t>(i)));
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return;
    }
    auto wait_once = [&] {
        for (const evmux::ReadyEvent& ev : sel->select(std::chrono::nanoseconds::zero()))
            bench->relay(static_cast<int>(reinterpret_cast<std::intptr_t>(ev.key.data)));
    };
    long long total_events = 0;
    double total_seconds = 0;
    long long failures = 0;
    for (auto _ : state) {
        BenchC::Iteration it = bench->run(active, writes_per_iteration, wait_once);
        const double took = std::chrono::duration<double>(it.with_sends).count();
        state.SetIterationTime(took);
        total_seconds += took;
        total_events += it.events;
        failures += it.failures;
    }
    if (failures) state.SkipWithError(("send/recv failures: " + std::to_string(failures)).c_str());
    state.counters["events"] = benchmark::Counter(static_cast<double>(total_events) /
                                                  std::max<double>(1, state.iterations()));
    state.counters["ns/event"] =
        benchmark::Counter(total_events ? total_seconds * 1e9 / total_events : 0);
    state.SetLabel(note.empty() ? sel->name() : sel->name() + "; " + note);
}

}  // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
    const long limit = evmux::support::raise_fd_limit();
    const int most_pairs = evmux::support::bench_c_most_pairs(limit);
    for (const evmux::BackendInfo& b : evmux::backends()) {
        if (!b.usable) {
            std::fprintf(stderr, "dispatch: skipping %s: %s\n", b.name.c_str(), b.reason.c_str());
            continue;
        }
        for (int wanted : {100, 1000, 10000}) {
            // 10 000 pairs are 20 000 fds; where the fd limit is lower, run as
            // many as fit, and say so in the name.
            const int n = std::min(wanted, most_pairs);
            for (int active : {1, 100}) {
                std::string name = "dispatch/" + b.name + "/n:" + std::to_string(n) +
                                   "/a:" + std::to_string(active);
                std::string note;
                if (n != wanted)
                    note = "n " + std::to_string(n) + " of " + std::to_string(wanted) +
                           ": fd limit " + std::to_string(limit);
                benchmark::RegisterBenchmark(name.c_str(), dispatch, b.name, n, active, note)
                    ->UseManualTime()
                    ->Unit(benchmark::kMicrosecond)
                    ->MinTime(0.25);
            }
        }
    }
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
