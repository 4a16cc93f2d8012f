// How often the event loop reads the clock: once per run() iteration (after
// the wait), only while timers exist; twice per run_once(). Counted by
// interposing clock_gettime(), which std::chrono::steady_clock::now() calls
// through libstdc++ (this executable's definition comes first in the lookup).
// Its own executable: nothing else here may depend on clock_gettime.
#include <dlfcn.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>

#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/server.hpp"
#include "test_support.hpp"

namespace {
std::atomic<long> monotonic_reads{0};
using clock_gettime_fn = int (*)(clockid_t, timespec*);
}  // namespace

extern "C" int clock_gettime(clockid_t id, timespec* ts) {
    static const auto real = reinterpret_cast<clock_gettime_fn>(dlsym(RTLD_NEXT, "clock_gettime"));
    if (id == CLOCK_MONOTONIC) monotonic_reads.fetch_add(1, std::memory_order_relaxed);
    return real(id, ts);
}

namespace evmux {
namespace {

using namespace std::chrono_literals;

// The interposition works (else every count below would be 0 and prove nothing).
TEST(ClockReads, InterpositionSeesSteadyClock) {
    const long before = monotonic_reads.load();
    (void)std::chrono::steady_clock::now();
    EXPECT_EQ(monotonic_reads.load() - before, 1);
}

// A watcher fired once per iteration with a timer pending: run() reads the
// clock once per iteration, plus once when it starts.
TEST(ClockReads, OncePerRunIterationWithTimers) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto [r, w] = test::socket_pair();
    const int iterations = 200;
    int calls = 0;
    loop.watch(r.get(), Events::read, [&](Events) {
        char c;
        // One byte per call: one event per iteration.
        if (::read(r.get(), &c, 1) != 1) ADD_FAILURE() << "read";
        if (++calls == iterations) loop.stop();
    });
    loop.call_after(1h, [] {});
    const std::string bytes(iterations, 'x');
    ASSERT_EQ(::write(w.get(), bytes.data(), bytes.size()), iterations);
    const long before = monotonic_reads.load();
    loop.run();
    const long reads = monotonic_reads.load() - before;
    EXPECT_EQ(calls, iterations);
    EXPECT_LE(reads, iterations + 1) << "one per iteration, and one at the start of run()";
    EXPECT_GE(reads, iterations) << "a timer exists: every iteration reads it once";
}

TEST(ClockReads, NoneWithoutTimers) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto [r, w] = test::socket_pair();
    int calls = 0;
    loop.watch(r.get(), Events::read, [&](Events) {
        char c;
        if (::read(r.get(), &c, 1) != 1) ADD_FAILURE() << "read";
        if (++calls == 100) loop.stop();
    });
    const std::string bytes(100, 'x');
    ASSERT_EQ(::write(w.get(), bytes.data(), bytes.size()), 100);
    const long before = monotonic_reads.load();
    loop.run();
    EXPECT_EQ(monotonic_reads.load() - before, 0);
}

TEST(ClockReads, TwicePerRunOnceWithTimers) {
    EVMUX_LOOP_OR_SKIP(loop);
    loop.call_after(1h, [] {});
    loop.post([] {});
    const long before = monotonic_reads.load();
    for (int i = 0; i < 50; ++i) loop.run_once(0ns);
    EXPECT_EQ(monotonic_reads.load() - before, 100);
}

// A server with an idle timeout stamps every read and write with the loop's
// iteration time: no clock read per byte, still two per run_once().
TEST(ClockReads, IdleTrackingAddsNoReadsPerMessage) {
    EVMUX_LOOP_OR_SKIP(loop);
    Callbacks cb;
    cb.on_message = [](const ConnectionPtr& c, Buffer& in) { c->send(in.take_all()); };
    ServerOptions opt;
    opt.idle_timeout = 1h;
    TcpServer server(loop, Address::ip("127.0.0.1", 0), cb, opt);
    test::Fd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    const Address& to = server.local_address();
    ASSERT_EQ(
        ::connect(client.get(), static_cast<const sockaddr*>(to.sockaddr_ptr()), to.sockaddr_len()),
        0);
    ASSERT_TRUE(test::run_until(loop, [&] { return server.connection_count() == 1; }));
    int run_onces = 0;
    const long before = monotonic_reads.load();
    for (int i = 0; i < 100; ++i) {
        ASSERT_EQ(::send(client.get(), "ping", 4, 0), 4);
        // Until the echo is back: the message is read, echoed and stamped twice.
        char buf[4];
        for (;;) {
            loop.run_once(100ms);
            ++run_onces;
            if (::recv(client.get(), buf, sizeof buf, MSG_DONTWAIT) == 4) break;
        }
    }
    const long reads = monotonic_reads.load() - before;
    EXPECT_LE(reads, 2 * run_onces) << run_onces << " run_once() calls";
}

}  // namespace
}  // namespace evmux
