// The cost of single operations, per backend where the backend matters:
//  - selector add+remove and modify (read <-> read|write), with 0 or 1000
//    other fds registered (a backend that rebuilds its kernel arguments per
//    change, or keeps a sorted table, shows it there);
//  - EventLoop timer insert+cancel, with 0 or 10 000 other timers pending
//    (the timer queue's depth);
//  - EventLoop post(): tasks posted and run per second, from the loop's own
//    thread in batches, and from another thread while the loop runs (each
//    post may then have to wake the loop through the selector).
//
// Usage: evmux_bench_ops [google benchmark flags], e.g. --benchmark_filter=modify
#include <benchmark/benchmark.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "evmux/event_loop.hpp"
#include "evmux/selector.hpp"

#include "socket_pairs.hpp"

namespace {

using namespace std::chrono_literals;

using Pairs = evmux::support::SocketPairs;

/// Registers the first end of each of `others` pairs for read, so that the
/// measured operation happens in a populated selector.
void register_others(evmux::Selector& sel, const Pairs& others) {
    for (std::size_t i = 0; i < others.fds.size(); i += 2)
        sel.add(others.fds[i], evmux::Events::read);
}

void selector_add_remove(benchmark::State& state, std::string backend) {
    auto sel = evmux::make_selector(backend);
    Pairs others(static_cast<int>(state.range(0)));
    register_others(*sel, others);
    Pairs one(1);
    for (auto _ : state) {
        sel->add(one.fds[0], evmux::Events::read);
        sel->remove(one.fds[0]);
    }
    state.SetItemsProcessed(state.iterations());
    state.SetLabel(sel->name());
}

void selector_modify(benchmark::State& state, std::string backend) {
    auto sel = evmux::make_selector(backend);
    Pairs others(static_cast<int>(state.range(0)));
    register_others(*sel, others);
    Pairs one(1);
    sel->add(one.fds[0], evmux::Events::read);
    bool both = false;
    for (auto _ : state) {
        both = !both;
        sel->modify(one.fds[0],
                    both ? evmux::Events::read | evmux::Events::write : evmux::Events::read);
    }
    // A backend may defer the kernel call to the next wait (io_uring
    // re-arms per wait); one wait keeps the measured state honest.
    sel->select(0ns);
    state.SetItemsProcessed(state.iterations());
    state.SetLabel(sel->name());
}

void timer_insert_cancel(benchmark::State& state, std::string backend) {
    evmux::EventLoop loop(evmux::make_selector(backend));
    std::vector<evmux::EventLoop::TimerId> pending;
    for (long i = 0; i < state.range(0); ++i)
        pending.push_back(loop.call_after(1h + std::chrono::seconds(i), [] {}));
    for (auto _ : state) {
        auto id = loop.call_after(30min, [] {});
        if (!loop.cancel(id)) state.SkipWithError("cancel() found no pending timer");
    }
    for (auto id : pending) loop.cancel(id);
    state.SetItemsProcessed(state.iterations());
}

void post_same_thread(benchmark::State& state, std::string backend) {
    evmux::EventLoop loop(evmux::make_selector(backend));
    const long batch = state.range(0);
    long ran = 0;
    for (auto _ : state) {
        for (long i = 0; i < batch; ++i) loop.post([&ran] { ++ran; });
        // Run until the batch is done: one iteration may run only what was
        // queued when it started, and a bounded number of tries keeps a
        // broken loop from hanging the benchmark.
        long want = ran + batch;
        for (int tries = 0; ran < want && tries < 1000; ++tries) loop.run_once(0ns);
        if (ran < want) state.SkipWithError("posted tasks did not run");
    }
    state.SetItemsProcessed(state.iterations() * batch);
}

void post_cross_thread(benchmark::State& state, std::string backend) {
    evmux::EventLoop loop(evmux::make_selector(backend));
    const long batch = state.range(0);
    std::atomic<long> ran{0};
    for (auto _ : state) {
        long want = ran.load() + batch;
        std::thread producer([&] {
            for (long i = 0; i < batch; ++i)
                loop.post([&ran] { ran.fetch_add(1, std::memory_order_relaxed); });
        });
        // Bounded: at most ~10 s of 10 ms waits for a batch.
        for (int tries = 0; ran.load() < want && tries < 1000; ++tries) loop.run_once(10ms);
        producer.join();
        while (ran.load() < want && loop.run_once(0ns) > 0) {
        }
        if (ran.load() < want) state.SkipWithError("posted tasks did not run");
    }
    state.SetItemsProcessed(state.iterations() * batch);
}

}  // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
    for (const auto& b : evmux::backends()) {
        if (!b.usable) continue;
        benchmark::RegisterBenchmark(("selector_add_remove/" + b.name).c_str(), selector_add_remove,
                                     b.name)
            ->ArgName("others")
            ->Arg(0)
            ->Arg(1000);
        benchmark::RegisterBenchmark(("selector_modify/" + b.name).c_str(), selector_modify, b.name)
            ->ArgName("others")
            ->Arg(0)
            ->Arg(1000);
        benchmark::RegisterBenchmark(("post_cross_thread/" + b.name).c_str(), post_cross_thread,
                                     b.name)
            ->ArgName("batch")
            ->Arg(1000)
            ->UseRealTime();
    }
    // Timers and same-thread posts do not touch the selector: the default
    // backend only.
    const std::string def = evmux::default_backend_name();
    benchmark::RegisterBenchmark("timer_insert_cancel", timer_insert_cancel, def)
        ->ArgName("pending")
        ->Arg(0)
        ->Arg(10000);
    benchmark::RegisterBenchmark("post_same_thread", post_same_thread, def)
        ->ArgName("batch")
        ->Arg(1000);
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
