// Timers, signals and cross-thread posts on one evmux::EventLoop, no sockets.
//
//  - call_every(): a ticker, which cancels itself after a number of ticks;
//  - call_after(): one-shot timers, one of them cancelled before it fires;
//  - post(): a worker thread hands results to the loop thread;
//  - on_signal(): SIGINT/SIGTERM stop the loop cleanly, SIGUSR1 prints the
//    state, all as ordinary callbacks on the loop thread (signalfd), so they
//    may touch anything the loop owns: no async-signal-safety rules apply.
//
// Usage:
//   timers_and_signals [--seconds N] [--backend NAME]   run N seconds (default 10) or until Ctrl-C
//   timers_and_signals --self-test [--backend NAME]     check every callback fired, exit 0 on
//   success
//
// Only the installed evmux headers and POSIX are used.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>

#include "evmux/event_loop.hpp"
#include "example_args.hpp"

namespace {

using namespace std::chrono_literals;
using evmux::EventLoop;

struct Counts {
    int ticks = 0;
    int posted = 0;
    int usr1 = 0;
    bool cancelled_fired = false;
    bool timed_out = false;
};

/// Sets up the loop; returns after run() returns. In self-test mode the
/// program signals itself and stops once everything has been seen.
Counts run(std::unique_ptr<evmux::Selector> selector, std::chrono::seconds duration, bool test) {
    EventLoop loop(std::move(selector));
    Counts counts;
    const auto start = EventLoop::now();
    auto elapsed_ms = [&] {
        return std::chrono::duration_cast<std::chrono::milliseconds>(EventLoop::now() - start)
            .count();
    };
    const int max_ticks = test ? 5 : 1'000'000;
    const auto tick_every = test ? 20ms : 1000ms;

    // Signals first, before any thread exists: on_signal() blocks the signal
    // in this thread, and threads started later inherit the mask, so the
    // signal can only arrive through the loop.
    auto stop = [&](int signo) {
        std::printf("[%5lld ms] signal %d: stopping\n", static_cast<long long>(elapsed_ms()),
                    signo);
        loop.stop();
    };
    loop.on_signal(SIGINT, stop);
    loop.on_signal(SIGTERM, stop);
    loop.on_signal(SIGUSR1, [&](int) {
        ++counts.usr1;
        std::printf("[%5lld ms] SIGUSR1: %d ticks so far, %d posts\n",
                    static_cast<long long>(elapsed_ms()), counts.ticks, counts.posted);
    });

    // A ticker that stops itself: cancel() is safe from the timer's own callback.
    EventLoop::TimerId ticker = 0;
    ticker = loop.call_every(tick_every, [&] {
        ++counts.ticks;
        std::printf("[%5lld ms] tick %d\n", static_cast<long long>(elapsed_ms()), counts.ticks);
        if (counts.ticks == max_ticks) loop.cancel(ticker);
    });

    // A one-shot timer cancelled before it is due never runs.
    const EventLoop::TimerId doomed = loop.call_after(10ms, [&] { counts.cancelled_fired = true; });
    loop.cancel(doomed);

    // A worker thread computes something and posts the result to the loop.
    std::jthread worker([&loop, &counts, &elapsed_ms] {
        std::this_thread::sleep_for(30ms);
        long long sum = 0;
        for (int i = 1; i <= 1000; ++i) sum += i;
        loop.post([sum, &counts, &elapsed_ms] {
            ++counts.posted;  // on the loop thread: no lock needed
            std::printf("[%5lld ms] posted from the worker: sum = %lld\n",
                        static_cast<long long>(elapsed_ms()), sum);
        });
    });

    if (test) {
        // Signal ourselves; the signal is blocked here, so it waits in the
        // signalfd until the loop reads it.
        loop.call_after(50ms, [] { ::kill(::getpid(), SIGUSR1); });
        // Stop as soon as everything expected has happened; poll for it.
        loop.call_every(10ms, [&] {
            if (counts.ticks == max_ticks && counts.posted == 1 && counts.usr1 == 1) loop.stop();
        });
    }
    // The overall bound, in both modes.
    loop.call_after(duration, [&] {
        counts.timed_out = test;
        loop.stop();
    });

    loop.run();
    worker.join();
    return counts;
}

constexpr const char* usage =
    "usage: timers_and_signals [--seconds N] [--backend NAME] [--self-test] [--version]\n"
    "  Timers, a worker thread posting to the loop, and signals as callbacks.\n"
    "  Send SIGUSR1 (kill -USR1 <pid>) to print the state, Ctrl-C to stop.\n";

}  // namespace

int main(int argc, char** argv) {
    example::Args args;
    const example::Spec spec{"timers_and_signals", usage, "--seconds", 10, 1, 24 * 3600};
    if (const auto status = example::parse_args(spec, argc, argv, args)) return *status;
    try {
        auto sel = example::make_selector(args);
        std::printf("timers_and_signals: backend %s, pid %d\n", sel->name().c_str(),
                    static_cast<int>(::getpid()));
        const Counts c =
            run(std::move(sel), std::chrono::seconds(args.self_test ? 10 : args.number),
                args.self_test);
        if (!args.self_test) return 0;
        const bool ok =
            c.ticks == 5 && c.posted == 1 && c.usr1 == 1 && !c.cancelled_fired && !c.timed_out;
        std::printf(
            "timers_and_signals self-test: %d ticks, %d posts, %d SIGUSR1, cancelled "
            "timer %s: %s\n",
            c.ticks, c.posted, c.usr1, c.cancelled_fired ? "FIRED" : "silent",
            ok ? "OK" : "FAILED");
        return ok ? 0 : 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "timers_and_signals: %s\n", e.what());
        return 1;
    }
}
