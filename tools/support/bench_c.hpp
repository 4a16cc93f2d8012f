// libevent's test/bench.c, once, for both of its drivers here: the Google
// Benchmark `evmux_bench_dispatch` (on a Selector) and `evmux-bench dispatch`
// and its sweep (on an EventLoop). n socketpairs; `a` of them, evenly spaced,
// get a byte; every pair that becomes readable reads its byte and, while
// writes are left (w per iteration), writes one byte to the next pair. One
// iteration ends when every byte sent has been read.
//
// How readiness is waited for is the driver's: it registers read_end(i) of
// every pair with its own mechanism and gives run() a function that waits
// once without blocking and calls relay(i) for each ready pair i.
//
// Internal to the project (tools/support); not installed.
#pragma once

#include <sys/socket.h>

#include <chrono>

#include "socket_pairs.hpp"

namespace evmux::support {

/// Descriptors left free beside bench.c's socketpairs: stdio, the selector's
/// own, libevent's.
inline constexpr long bench_c_spare_fds = 64;

/// The descriptors bench.c with `n` socketpairs needs.
constexpr long bench_c_fds(long n) {
    return 2 * n + bench_c_spare_fds;
}

/// The most socketpairs bench.c can have under a soft fd limit of `fd_limit`.
constexpr int bench_c_most_pairs(long fd_limit) {
    return static_cast<int>((fd_limit - bench_c_spare_fds) / 2);
}

/// bench.c's socketpairs and its relay. Main thread only; not copyable.
class BenchC {
  public:
    using Clock = std::chrono::steady_clock;

    /// What one iteration took and did.
    struct Iteration {
        Clock::duration with_sends;   ///< from before the `a` first sends to the last read
        Clock::duration after_sends;  ///< from after them to the last read (bench.c's timing)
        long long events = 0;         ///< bytes read (callbacks that read one)
        long long failures = 0;       ///< send or recv calls that did not move a byte
    };

    /// `n` socketpairs. Throws std::system_error if one cannot be made.
    explicit BenchC(int n) : pairs_(n), n_(n) {}

    int pairs() const { return n_; }
    /// The end of pair i to watch for read.
    int read_end(int i) const { return pairs_.read_end(i); }

    /// Pair i is readable: reads its byte and, while writes are left, sends
    /// one into the next pair (the last one's next is the first).
    void relay(int i) {
        char ch;
        if (::recv(pairs_.read_end(i), &ch, 1, 0) == 1)
            ++read_;
        else
            ++failures_;
        if (writes_left_ > 0) {
            int next = i + 1;
            if (next >= n_) next -= n_;
            send_to(next);
            --writes_left_;
        }
    }

    /// One iteration: a byte into each of `active` evenly spaced pairs
    /// (1 <= active <= pairs()), `writes` more relayed, `wait_once()` called
    /// until every byte sent has been read.
    template <class WaitOnce>
    Iteration run(int active, int writes, WaitOnce&& wait_once) {
        sent_ = read_ = failures_ = 0;
        const int space = n_ / active;
        const auto before_sends = Clock::now();
        for (int i = 0; i < active; ++i) send_to(i * space);
        writes_left_ = writes;
        const auto start = Clock::now();
        while (read_ != sent_) wait_once();
        const auto end = Clock::now();
        return {end - before_sends, end - start, read_, failures_};
    }

  private:
    void send_to(int i) {
        if (::send(pairs_.write_end(i), "e", 1, 0) == 1)
            ++sent_;
        else
            ++failures_;
    }

    SocketPairs pairs_;
    int n_;
    int writes_left_ = 0;
    long long sent_ = 0, read_ = 0, failures_ = 0;
};

}  // namespace evmux::support
