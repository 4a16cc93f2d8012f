// Dispatch cost per backend, measured the way libevent's test/bench.c does:
// n socketpairs, the read end of each registered for read; `a` of them get a
// byte; every ready fd reads its byte and, while writes are left (w per
// iteration), writes one byte to the next pair. One iteration ends when all
// a + w bytes have been read. Only that loop is timed (manual time), as in
// bench.c; setup and registration are not.
//
// What it shows: the cost of one ready event as idle fds grow. select and
// poll pass every registered fd to the kernel on each wait, so their cost
// grows with n; epoll and io_uring should stay flat.
//
// Usage: evmux_bench_dispatch [--benchmark_counters_tabular=true] [google benchmark flags]
#include <benchmark/benchmark.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "evmux/selector.hpp"

#include "bench_support.hpp"
#include "fd_limit.hpp"

namespace {

constexpr int writes_per_iteration = 100;  // bench.c's default -w
constexpr int fds_kept_free = 64;          // stdio, the selector's own fds, libevent's

using evmux::bench::Pairs;

/// One benchmark: `backend` with `n` pairs, `active` of them primed.
void dispatch(benchmark::State& state, const std::string& backend, int n, int active,
              const std::string& note) {
    std::unique_ptr<evmux::Selector> sel;
    std::unique_ptr<Pairs> pairs;
    try {
        sel = evmux::make_selector(backend);
        pairs = std::make_unique<Pairs>(n);
        // The pair index travels as the key's data: no lookup in the callback.
        for (int i = 0; i < n; ++i)
            sel->add(pairs->fds[2 * i], evmux::Events::read,
                     reinterpret_cast<void*>(static_cast<std::intptr_t>(i)));
    } catch (const std::exception& e) {
        state.SkipWithError(e.what());
        return;
    }
    const int space = n / active;
    long long total_events = 0;
    double total_seconds = 0;
    long long failures = 0;
    for (auto _ : state) {
        long long fired = 0, count = 0;
        int writes = writes_per_iteration;
        auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < active; ++i, ++fired)
            if (::send(pairs->fds[2 * (i * space) + 1], "e", 1, 0) != 1) ++failures;
        while (count != fired) {
            for (const evmux::ReadyEvent& ev : sel->select(std::chrono::nanoseconds::zero())) {
                char ch;
                if (::recv(ev.key.fd, &ch, 1, 0) == 1)
                    ++count;
                else
                    ++failures;
                if (writes > 0) {
                    int next = static_cast<int>(reinterpret_cast<std::intptr_t>(ev.key.data)) + 1;
                    if (next >= n) next -= n;
                    if (::send(pairs->fds[2 * next + 1], "e", 1, 0) != 1) ++failures;
                    --writes;
                    ++fired;
                }
            }
        }
        std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
        state.SetIterationTime(took.count());
        total_seconds += took.count();
        total_events += count;
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
    const int most_pairs = static_cast<int>((limit - fds_kept_free) / 2);
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
