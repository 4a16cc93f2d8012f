// See bench_dispatch.hpp. The structure follows libevent's test/bench.c:
// re-arm every watcher (not timed), send one byte into `a` evenly spaced
// pairs, then run the loop without blocking until every byte sent has been
// read; each read callback forwards the byte to the next pair while writes
// are left.
#include "bench_dispatch.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <system_error>

#include "evmux/event_loop.hpp"

namespace evmux::bench {
namespace {

struct Pairs {
    std::vector<int> fds;  // 2 per pair: [2i] is read, [2i+1] is written
    explicit Pairs(int n) {
        fds.reserve(2 * static_cast<std::size_t>(n));
        for (int i = 0; i < n; ++i) {
            int sv[2];
            if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) {
                int saved = errno;
                close_all();
                throw std::system_error(saved, std::generic_category(), "socketpair");
            }
            fds.push_back(sv[0]);
            fds.push_back(sv[1]);
        }
    }
    ~Pairs() { close_all(); }
    void close_all() {
        for (int fd : fds) ::close(fd);
        fds.clear();
    }
};

}  // namespace

std::vector<double> dispatch_iterations(const std::string& backend, int n, int a, int w,
                                        int iterations) {
    EventLoop loop(make_selector(backend));
    Pairs pairs(n);
    int count = 0, fired = 0, writes = 0;
    auto on_read = [&](int idx) {
        char ch;
        (void)!::recv(pairs.fds[2 * idx], &ch, 1, 0);
        if (writes > 0) {
            int widx = idx + 1;
            if (widx >= n) widx -= n;
            (void)!::send(pairs.fds[2 * widx + 1], "e", 1, 0);
            --writes;
            ++fired;
        }
        ++count;
    };

    std::vector<double> times;
    for (int it = 0; it < iterations; ++it) {
        // Re-arm every watcher, as bench.c does with event_del/event_add.
        for (int i = 0; i < n; ++i) {
            loop.unwatch(pairs.fds[2 * i]);
            loop.watch(pairs.fds[2 * i], Events::read, [&on_read, i](Events) { on_read(i); });
        }
        loop.run_once(std::chrono::nanoseconds::zero());

        fired = 0;
        int space = n / a;
        for (int i = 0; i < a; ++i, ++fired)
            (void)!::send(pairs.fds[2 * (i * space) + 1], "e", 1, 0);
        count = 0;
        writes = w;
        auto start = std::chrono::steady_clock::now();
        do {
            loop.run_once(std::chrono::nanoseconds::zero());
        } while (count != fired);
        auto end = std::chrono::steady_clock::now();
        times.push_back(std::chrono::duration<double, std::micro>(end - start).count());
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
