// Reliability at the EventLoop level, run once per backend (EVMUX_BACKEND);
// the numbers are the failure list in README.md ("Reliability"):
//  4. close, then reuse of the fd number: a late unwatch is fine, the new fd
//     gets no old callback.
//  5. a dup'ed fd and a pipe hang-up: no endless hang-up events, nothing
//     delivered to a reused number.
// 12. (loop half) errors reach read-only watchers; a closed watched fd never
//     makes the loop spin.
// 14. timers: sub-millisecond remainders round up (no spin), huge delays and
//     timeouts clamp instead of overflowing.
// 15. post() and stop() from other threads racing with the loop's shutdown.
// 18. destroying a loop with live watchers, timers and tasks whose captured
//     state touches the loop when destroyed.
//  9. an EINTR storm (1 ms SIGALRM without SA_RESTART) during waits, timers
//     and a large transfer.
// Also in `./run tsan` (suite reliability_loop).
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "evmux/event_loop.hpp"
#include "test_support.hpp"

using namespace evmux;
using namespace evmux::test;
using namespace std::chrono_literals;

namespace {

using Clock = std::chrono::steady_clock;

// `n` iterations of run_once(step); returns callbacks run and the time taken.
struct Spin {
    std::size_t callbacks = 0;
    Clock::duration took{};
};
Spin iterate(EventLoop& loop, int n, std::chrono::milliseconds step) {
    Spin s;
    const auto t0 = Clock::now();
    for (int i = 0; i < n; ++i) s.callbacks += loop.run_once(step);
    s.took = Clock::now() - t0;
    return s;
}

// A new pipe whose read end has number `fd` if that number is free (the loop
// may have taken it for an fd of its own, e.g. epoll's rebuilt set: then the
// pipe has another number, and `reused` says so).
struct PipeAt {
    Fd r, w;
    bool reused;
};
PipeAt pipe_at(int fd) {
    auto [r, w] = make_pipe();
    if (r.get() == fd) return {std::move(r), std::move(w), true};
    if (::fcntl(fd, F_GETFD) >= 0) return {std::move(r), std::move(w), false};
    EXPECT_EQ(::dup3(r.get(), fd, O_CLOEXEC), fd);
    return {Fd(fd), std::move(w), true};
}

}  // namespace

// ---- 4. close, then reuse of the fd number ------------------------------------

TEST(ReliabilityLoop, CloseReuseThenLateUnwatch) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto [a, b] = socket_pair();
    const int fd = a.get();
    int old_calls = 0, new_calls = 0;
    loop.watch(fd, Events::read, [&](Events) { ++old_calls; });
    write_byte(b.get());  // pending data on the old file when it is closed
    a.reset();
    // A new file takes the number before the (late) unwatch. Between the two,
    // poll/select/io_uring would report the new file under the old watch (they
    // ask by number; see selector_test.cpp CloseAndReuseWithoutRemoveAdd), so
    // the loop is not run in that window.
    auto p = pipe_at(fd);
    ASSERT_TRUE(p.reused);
    write_byte(p.w.get());
    EXPECT_NO_THROW(loop.unwatch(fd));
    EXPECT_FALSE(loop.watching(fd));
    EXPECT_EQ(iterate(loop, 3, 5ms).callbacks, 0u);
    // A watch of the new file sees only its own events, under its callback.
    loop.watch(fd, Events::read, [&](Events e) {
        EXPECT_EQ(e, Events::read);
        EXPECT_EQ(drain(fd), 1u);
        ++new_calls;
    });
    ASSERT_TRUE(run_until(loop, [&] { return new_calls == 1; }));
    EXPECT_EQ(iterate(loop, 3, 5ms).callbacks, 0u);
    EXPECT_EQ(old_calls, 0);
    EXPECT_EQ(new_calls, 1);
    loop.unwatch(fd);
}

// The old file outlives its number through a dup and keeps being readable;
// the number is reused by a new watched fd. Only the new fd's events arrive.
TEST(ReliabilityLoop, OldFileAliveThroughDupNeverReachesReusedNumber) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto [a, b] = socket_pair();
    const int fd = a.get();
    Fd keep(::dup(fd));  // keeps the old file (and a kernel registration) alive
    ASSERT_TRUE(keep);
    int old_calls = 0, new_calls = 0;
    loop.watch(fd, Events::read, [&](Events) { ++old_calls; });
    a.reset();            // closed before unwatch: epoll cannot delete it any more
    loop.unwatch(fd);     // late
    write_byte(b.get());  // the old file becomes readable, and stays so
    auto p = pipe_at(fd);
    ASSERT_TRUE(p.reused);
    loop.watch(fd, Events::read, [&](Events) {
        ++new_calls;
        drain(fd);
    });
    Spin s = iterate(loop, 10, 10ms);
    EXPECT_EQ(s.callbacks, 0u);
    EXPECT_EQ(new_calls, 0) << "the old file's readiness reached the new fd";
    // No spin either: the ten waits lasted (allow one early wake-up for the
    // backend to drop the stale kernel registration).
    EXPECT_GE(s.took, 80ms);
    write_byte(p.w.get());
    ASSERT_TRUE(run_until(loop, [&] { return new_calls == 1; }));
    EXPECT_EQ(old_calls, 0);
    loop.unwatch(fd);
}

// ---- 5. a dup'ed fd and a pipe hang-up ------------------------------------------

TEST(ReliabilityLoop, DupAndPipeHangupNoEndlessEvents) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto [r, w] = make_pipe();
    const int fd = r.get();
    Fd keep(::dup(fd));  // the hung-up file outlives the watched number
    ASSERT_TRUE(keep);
    int calls = 0;
    Events seen = Events::none;
    loop.watch(fd, Events::read, [&](Events e) {
        ++calls;
        seen = e;
        // The wrong order, as careless code does it: close, then unwatch.
        r.reset();
        loop.unwatch(fd);
    });
    w.reset();  // hang-up
    ASSERT_TRUE(run_until(loop, [&] { return calls == 1; }));
    EXPECT_EQ(seen, Events::read | Events::hangup);
    // Bounded: 20 waits of 10 ms. A hang-up still armed in the kernel would
    // make each return at once (level-triggered) and deliver or spin.
    Spin s = iterate(loop, 20, 10ms);
    EXPECT_EQ(calls, 1);
    EXPECT_EQ(s.callbacks, 0u);
    EXPECT_GE(s.took, 150ms) << "waits returned early: the hang-up still wakes the loop";
    // A new pipe at the same number (if the loop did not take it): silent
    // until written to, though the old file is still hung up through `keep`.
    auto p = pipe_at(fd);
    const int nfd = p.r.get();
    int new_calls = 0;
    loop.watch(nfd, Events::read, [&](Events e) {
        EXPECT_EQ(e, Events::read);
        drain(nfd);
        ++new_calls;
    });
    EXPECT_EQ(iterate(loop, 5, 10ms).callbacks, 0u);
    write_byte(p.w.get());
    ASSERT_TRUE(run_until(loop, [&] { return new_calls == 1; }));
    EXPECT_EQ(calls, 1);
    loop.unwatch(nfd);
}

// ---- 12. errors to read-only watchers; closed watched fds never spin --------------

TEST(ReliabilityLoop, ReadOnlyWatcherGetsTheError) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto [client, server] = tcp_pair();
    Events seen = Events::none;
    int calls = 0;
    loop.watch(client.get(), Events::read, [&](Events e) {
        seen = e;
        ++calls;
        loop.unwatch(client.get());
    });
    linger lg{1, 0};  // RST
    ASSERT_EQ(::setsockopt(server.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
    server.reset();
    ASSERT_TRUE(run_until(loop, [&] { return calls > 0; }));
    EXPECT_EQ(seen, Events::read | Events::error | Events::hangup);
    EXPECT_EQ(iterate(loop, 3, 5ms).callbacks, 0u);
}

TEST(ReliabilityLoop, ClosedWatchedFdNeverSpins) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto [a, b] = socket_pair();
    const int fd = a.get();
    int calls = 0;
    loop.watch(fd, Events::read | Events::write, [&](Events) { ++calls; });
    write_byte(b.get());
    a.reset();  // still watched: POLLNVAL / EBADF / dropped by epoll
    for (int i = 0; i < 100; ++i) ASSERT_EQ(loop.run_once(0ns), 0u) << "iteration " << i;
    const auto t0 = Clock::now();
    EXPECT_EQ(loop.run_once(30ms), 0u);
    EXPECT_GE(Clock::now() - t0, 30ms);
    EXPECT_EQ(calls, 0);
    loop.unwatch(fd);
}

// ---- 14. timers -------------------------------------------------------------------

// A series of timers 0.3 ms apart: each wait must be rounded up to the
// backend's resolution, so every wake-up finds a due timer. A wait rounded
// down to zero would wake with nothing to do over and over (a spin).
TEST(ReliabilityLoop, SubMillisecondTimersDoNotSpin) {
    EVMUX_LOOP_OR_SKIP(loop);
    constexpr int timer_count = 16;  // 0.3 ms .. 4.8 ms
    int fired = 0;
    std::vector<Clock::duration> late(timer_count);
    const auto start = Clock::now();
    for (int i = 1; i <= timer_count; ++i) {
        const auto delay = std::chrono::microseconds(300 * i);
        loop.call_after(delay, [&, i, delay] {
            late[i - 1] = Clock::now() - start - delay;
            ++fired;
        });
    }
    int iterations = 0, idle = 0;
    while (fired < timer_count && iterations < 10'000) {
        ++iterations;
        if (loop.run_once() == 0) ++idle;  // no timeout: the timers alone wake it
    }
    EXPECT_EQ(fired, timer_count);
    for (int i = 0; i < timer_count; ++i)
        EXPECT_GE(late[i], Clock::duration::zero()) << "timer " << i;
    // At most one wake-up per timer, plus a little slack for the wake-up fd.
    EXPECT_LE(iterations, timer_count + 2);
    EXPECT_LE(idle, 2) << iterations << " iterations";
}

TEST(ReliabilityLoop, CallEverySubMillisecondDoesNotSpin) {
    EVMUX_LOOP_OR_SKIP(loop);
    int ticks = 0;
    loop.call_every(300us, [&] { ++ticks; });
    int iterations = 0, idle = 0;
    const auto end = Clock::now() + 5ms;
    while (Clock::now() < end && iterations < 10'000) {
        ++iterations;
        if (loop.run_once() == 0) ++idle;
    }
    EXPECT_GT(ticks, 0);
    // Every wake-up runs the timer; a spin would show thousands of idle ones.
    EXPECT_LE(idle, 2) << iterations << " iterations, " << ticks << " ticks";
}

TEST(ReliabilityLoop, HugeDelaysNeverFire) {
    EVMUX_LOOP_OR_SKIP(loop);
    int fired = 0;
    loop.call_after(std::chrono::hours(24 * 365 * 1000), [&] { ++fired; });
    loop.call_after(EventLoop::Duration::max(), [&] { ++fired; });
    loop.call_every(EventLoop::Duration::max(), [&] { ++fired; });
    auto soon = loop.call_after(1ms, [&] { fired += 100; });
    (void)soon;
    // The near timer still fires; the huge ones neither fire nor make the
    // wait compute a negative or overflowed timeout (which would spin or fire).
    ASSERT_TRUE(run_until(loop, [&] { return fired >= 100; }));
    Spin s = iterate(loop, 5, 10ms);
    EXPECT_EQ(s.callbacks, 0u);
    EXPECT_EQ(fired, 100);
    EXPECT_GE(s.took, 40ms);
}

TEST(ReliabilityLoop, HugeTimeoutWokenByPost) {
    EVMUX_LOOP_OR_SKIP(loop);
    std::atomic<bool> ran{false};
    std::atomic<bool> done{false};
    loop.call_after(std::chrono::hours(24 * 365 * 1000), [] {});
    std::thread poster([&] {
        // Post until the loop has run one (bounded): the first post may come
        // before the loop waits, which must work too.
        for (int i = 0; i < 500 && !done.load(); ++i) {
            std::this_thread::sleep_for(10ms);
            loop.post([&] { ran = true; });
        }
    });
    const auto t0 = Clock::now();
    std::size_t n = 0;
    // Bounded by the poster: at most 500 posts, each wakes one wait.
    for (int i = 0; i < 500 && !ran; ++i) n += loop.run_once(std::chrono::hours(24 * 365 * 1000));
    done = true;
    poster.join();
    EXPECT_TRUE(ran);
    EXPECT_GE(n, 1u);
    EXPECT_LT(Clock::now() - t0, 5s);
}

// ---- 15. post and stop racing with shutdown -----------------------------------------

TEST(ReliabilityLoop, PostAndStopRaceWithShutdown) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    probe.reset();
    constexpr int round_count = 20, poster_count = 3, max_posts_each = 2000;
    for (int round = 0; round < round_count; ++round) {
        auto loop = std::make_unique<EventLoop>(make_selector());
        std::atomic<int> posted{0}, ran{0}, destroyed{0};
        std::atomic<bool> quit{false};
        // Counts destruction of every task object that was handed over.
        struct Token {
            std::atomic<int>* destroyed;
            explicit Token(std::atomic<int>* d) : destroyed(d) {}
            ~Token() { destroyed->fetch_add(1); }
        };
        std::vector<std::thread> posters;
        for (int p = 0; p < poster_count; ++p)
            posters.emplace_back([&, p] {
                for (int i = 0; i < max_posts_each && !quit.load(); ++i) {
                    auto token = std::make_shared<Token>(&destroyed);
                    posted.fetch_add(1);
                    loop->post([token, &ran] { ran.fetch_add(1); });
                    if (p == 0 && i == 200) loop->stop();  // stop from a poster
                    if (i % 64 == 0) std::this_thread::yield();
                }
            });
        std::thread runner([&] { loop->run(); });
        std::thread stopper([&] {
            std::this_thread::sleep_for(std::chrono::microseconds(100 * (round % 5)));
            loop->stop();
        });
        stopper.join();
        runner.join();  // run() returned: nothing runs from here on
        const int ran_at_stop = ran.load();
        quit = true;
        for (auto& t : posters) t.join();
        // Every thread that may touch the loop is joined: now it may go.
        loop.reset();
        EXPECT_EQ(ran.load(), ran_at_stop) << "a task ran after run() returned";
        EXPECT_EQ(destroyed.load(), posted.load()) << "round " << round << ": tasks leaked";
        EXPECT_LE(ran.load(), posted.load());
    }
}

// Stop from many threads at once while the loop is busy with I/O and timers;
// each run() returns, and a later run() is not pre-stopped more than once.
TEST(ReliabilityLoop, ConcurrentStopsWhileBusy) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto [a, b] = socket_pair();
    int reads = 0;
    loop.watch(a.get(), Events::read, [&](Events) {
        drain(a.get());
        ++reads;
        write_byte(b.get());  // keep it busy
    });
    write_byte(b.get());
    loop.call_every(1ms, [] {});
    for (int round = 0; round < 10; ++round) {
        std::vector<std::thread> stoppers;
        for (int i = 0; i < 4; ++i)
            stoppers.emplace_back([&] {
                std::this_thread::sleep_for(1ms);
                loop.stop();
            });
        // A watchdog in case every stop was lost: a stop the loop never sees.
        bool watchdog = false;
        auto id = loop.call_after(5s, [&] {
            watchdog = true;
            loop.stop();
        });
        loop.run();
        for (auto& t : stoppers) t.join();
        loop.cancel(id);
        EXPECT_FALSE(watchdog) << "round " << round;
    }
    // A stop that landed after its run() returned makes the next run() return
    // at once: consume it, then check the loop still works (busy fd served).
    loop.call_after(20ms, [&] { loop.stop(); });
    loop.run();
    reads = 0;
    loop.call_after(20ms, [&] { loop.stop(); });
    loop.run();
    EXPECT_GT(reads, 0);
    loop.unwatch(a.get());
}

// ---- 18. destroying a loop with live work --------------------------------------------

// Destroying the loop destroys the callbacks; what they captured may, in its
// destructor, reach for the loop (a connection unwatching its fd, a timer
// owner cancelling). It must neither crash nor leak (ASan/LSan build).
TEST(ReliabilityLoop, DestroyWithLiveWorkWhoseCapturesOutliveIt) {
    EVMUX_LOOP_OR_SKIP(loop);
    std::vector<std::pair<Fd, Fd>> pairs;
    for (int i = 0; i < 16; ++i) pairs.push_back(socket_pair());
    auto shared = std::make_shared<std::vector<char>>(1 << 16);
    int called = 0;
    for (auto& [a, b] : pairs) {
        loop.watch(a.get(), Events::read | Events::write, [shared, &called](Events) { ++called; });
        write_byte(b.get());  // ready, but never dispatched
    }
    for (int i = 0; i < 50; ++i) {
        loop.call_after(std::chrono::milliseconds(i), [shared, &called] { ++called; });
        loop.call_every(1h, [shared, &called] { ++called; });
        loop.post([shared, &called] { ++called; });
    }
    // A task that re-posts and a timer that re-arms: both pending at destruction.
    loop.post([&loop, shared] { loop.post([shared] {}); });
    loop_ptr.reset();
    EXPECT_EQ(called, 0);
    EXPECT_EQ(shared.use_count(), 1) << "callbacks not destroyed with the loop";
    // The watched fds are not the loop's: still open and usable.
    for (auto& [a, b] : pairs) EXPECT_EQ(drain(a.get()), 1u);
}

// What a callback captured may, when the loop destroys it, reach for the loop:
// an owner unwatching its fd or cancelling its timer (muduo's Channel/TimerId
// pattern, and what ~Connection does). Under ASan this must be clean.
TEST(ReliabilityLoop, CaptureDestructorsMayUseTheLoop) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto [a, b] = socket_pair();
    struct Owner {
        EventLoop* loop;
        int fd;
        EventLoop::TimerId timer = 0;
        int* destroyed;
        ~Owner() {
            loop->unwatch(fd);
            if (timer) loop->cancel(timer);
            ++*destroyed;
        }
    };
    int destroyed = 0;
    auto owner = std::make_shared<Owner>(&loop, a.get(), EventLoop::TimerId{0}, &destroyed);
    loop.watch(a.get(), Events::read, [owner](Events) {});
    owner->timer = loop.call_after(1h, [owner] {});
    loop.post([owner] {});
    owner.reset();  // the loop's callbacks hold the only references
    loop_ptr.reset();
    EXPECT_EQ(destroyed, 1);
}

// After run_once() ran some of the work, destroy with the rest pending.
TEST(ReliabilityLoop, DestroyMidWay) {
    auto shared = std::make_shared<int>(0);
    {
        EVMUX_LOOP_OR_SKIP(loop);
        auto [a, b] = socket_pair();
        int reads = 0;
        loop.watch(a.get(), Events::read, [&, shared](Events) {
            ++reads;
            drain(a.get());
            // Schedules more than one iteration can run.
            loop.post([shared] {});
            loop.call_after(1h, [shared] {});
        });
        write_byte(b.get());
        ASSERT_TRUE(run_until(loop, [&] { return reads == 1; }));
        EXPECT_GT(shared.use_count(), 2);
    }
    EXPECT_EQ(shared.use_count(), 1);
}

// ---- 9. EINTR storm -----------------------------------------------------------------

namespace {

std::atomic<int> alarms{0};
extern "C" void on_alarm(int) {
    alarms.fetch_add(1, std::memory_order_relaxed);
}

// A 1 ms SIGALRM for the scope, installed without SA_RESTART so that every
// blocking call it lands in fails with EINTR.
class AlarmStorm {
  public:
    AlarmStorm() {
        struct sigaction sa {};
        sa.sa_handler = on_alarm;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = 0;  // no SA_RESTART
        ::sigaction(SIGALRM, &sa, &old_);
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGALRM);
        ::pthread_sigmask(SIG_UNBLOCK, &set, &old_mask_);
        itimerval it{{0, 1000}, {0, 1000}};
        ::setitimer(ITIMER_REAL, &it, nullptr);
    }
    ~AlarmStorm() {
        itimerval off{};
        ::setitimer(ITIMER_REAL, &off, nullptr);
        ::pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
        ::sigaction(SIGALRM, &old_, nullptr);
    }
    AlarmStorm(const AlarmStorm&) = delete;
    AlarmStorm& operator=(const AlarmStorm&) = delete;

  private:
    struct sigaction old_ {};
    sigset_t old_mask_{};
};

}  // namespace

TEST(ReliabilityLoop, EintrStormWaitsAndTimers) {
    EVMUX_LOOP_OR_SKIP(loop);
    AlarmStorm storm;
    const int before = alarms.load();
    // A finite wait lasts its full time, without an error.
    auto t0 = Clock::now();
    EXPECT_NO_THROW(EXPECT_EQ(loop.run_once(50ms), 0u));
    EXPECT_GE(Clock::now() - t0, 50ms);
    // Timers: none early, none lost.
    const std::vector<std::chrono::milliseconds> delays = {1ms, 5ms, 20ms, 40ms};
    std::vector<Clock::duration> took(delays.size(), Clock::duration::min());
    int fired = 0;
    t0 = Clock::now();
    for (std::size_t i = 0; i < delays.size(); ++i)
        loop.call_after(delays[i], [&, i] {
            took[i] = Clock::now() - t0;
            ++fired;
        });
    ASSERT_NO_THROW(ASSERT_TRUE(run_until(loop, [&] { return fired == 4; })));
    for (std::size_t i = 0; i < delays.size(); ++i) EXPECT_GE(took[i], delays[i]) << i;
    // An infinite wait woken by a timer only.
    bool woke = false;
    loop.call_after(20ms, [&] { woke = true; });
    for (int i = 0; i < 10 && !woke; ++i) EXPECT_NO_THROW(loop.run_once());
    EXPECT_TRUE(woke);
    EXPECT_GT(alarms.load() - before, 20) << "the storm did not happen";
}

// 16 MiB (2 MiB under sanitizers) through a socketpair, both ends on the loop, the writer writing
// in large chunks: every interrupted call is retried, no byte lost or doubled.
TEST(ReliabilityLoop, EintrStormLargeTransfer) {
    EVMUX_LOOP_OR_SKIP(loop);
    AlarmStorm storm;
    const int before = alarms.load();
    auto [a, b] = socket_pair();
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    constexpr std::size_t total = 2u << 20;  // instrumented byte loops are slow
#else
    constexpr std::size_t total = 16u << 20;
#endif
    std::vector<unsigned char> chunk(1 << 20);
    for (std::size_t i = 0; i < chunk.size(); ++i)
        chunk[i] = static_cast<unsigned char>(i * 131 + 7);
    std::size_t sent = 0, received = 0;
    std::uint64_t sum_sent = 0, sum_received = 0;
    int errors = 0;
    loop.watch(a.get(), Events::write, [&](Events) {
        const std::size_t off = sent % chunk.size();
        const std::size_t len = std::min(chunk.size() - off, total - sent);
        ssize_t n = ::send(a.get(), chunk.data() + off, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EINTR && errno != EAGAIN) ++errors;
            return;
        }
        for (ssize_t i = 0; i < n; ++i) sum_sent = sum_sent * 31 + chunk[off + i];
        sent += static_cast<std::size_t>(n);
        if (sent == total) loop.unwatch(a.get());
    });
    loop.watch(b.get(), Events::read, [&](Events) {
        auto buf = loop.scratch();
        ssize_t n = ::recv(b.get(), buf.data(), buf.size(), 0);
        if (n < 0) {
            if (errno != EINTR && errno != EAGAIN) ++errors;
            return;
        }
        for (ssize_t i = 0; i < n; ++i)
            sum_received = sum_received * 31 + static_cast<unsigned char>(buf[i]);
        received += static_cast<std::size_t>(n);
    });
    ASSERT_NO_THROW(ASSERT_TRUE(run_until(
        loop, [&] { return received == total; }, 20s)));
    loop.unwatch(b.get());
    EXPECT_EQ(errors, 0);
    EXPECT_EQ(sent, total);
    EXPECT_EQ(sum_received, sum_sent);
    EXPECT_GT(alarms.load() - before, 0) << "the storm did not happen";
}
