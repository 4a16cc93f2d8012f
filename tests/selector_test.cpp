// The selector conformance suite: run once per backend (EVMUX_BACKEND).
//
// Every test uses real fds (socketpairs, pipes, TCP on 127.0.0.1) and is
// bounded in iterations and time. Timing assertions are lower bounds ("never
// early") plus generous upper bounds ("did not hang"), never speed claims.
#include <fcntl.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "test_support.hpp"

using namespace evmux;
using namespace evmux::test;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

// Generous: a loaded 2-core machine running an ASan build must never fail a
// test because a wake-up came late. The bound only catches "hung".
constexpr auto slack = 3s;

/// The events reported for `fd`, or std::nullopt if it is not in `ready`.
/// Fails the test if `fd` appears more than once.
std::optional<Events> events_of(std::span<const ReadyEvent> ready, int fd) {
    std::optional<Events> found;
    for (const ReadyEvent& r : ready) {
        if (r.key.fd != fd) continue;
        EXPECT_FALSE(found.has_value()) << "fd " << fd << " reported twice";
        found = r.events;
    }
    return found;
}

std::string describe(std::span<const ReadyEvent> ready) {
    std::string text;
    for (const ReadyEvent& r : ready)
        text += " fd " + std::to_string(r.key.fd) + "=" + to_string(r.events);
    return text.empty() ? " (nothing)" : text;
}

/// Waits at most `limit` for `fd` to be reported; returns its events (none if never).
Events wait_for(Selector& sel, int fd, Clock::duration limit = 2s) {
    const auto deadline = Clock::now() + limit;
    while (Clock::now() < deadline) {
        auto ready = sel.select(100ms);
        if (auto e = events_of(ready, fd)) return *e;
    }
    return Events::none;
}

/// Fills the send buffer of `fd` until the kernel takes no more (bounded).
void fill(int fd) {
    static char block[65536];
    for (int i = 0; i < 100000; ++i) {
        if (::write(fd, block, sizeof block) < 0) {
            ASSERT_EQ(errno, EAGAIN);
            // A Unix socket may take one more small write; keep going until
            // even one byte does not fit.
            if (::write(fd, block, 1) < 0) return;
        }
    }
    FAIL() << "send buffer never filled";
}

/// close() with SO_LINGER {on, 0}: the TCP peer gets a reset, not a FIN.
void close_with_reset(Fd& fd) {
    linger lg{1, 0};
    ASSERT_EQ(::setsockopt(fd.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
    fd.reset();
}

bool is(const std::string& backend) {
    return backend_name() == backend;
}

constexpr Events rw = Events::read | Events::write;

}  // namespace

// ---- add / modify / remove -------------------------------------------------

TEST(Selector, AddModifyRemoveBookkeeping) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    int x = 1, y = 2;
    EXPECT_EQ(sel->size(), 0u);
    EXPECT_EQ(sel->get_key(a.get()), nullptr);

    const SelectorKey& key = sel->add(a.get(), Events::read, &x);
    EXPECT_EQ(key.fd, a.get());
    EXPECT_EQ(key.interest, Events::read);
    EXPECT_EQ(key.data, &x);
    const std::uint32_t first_generation = key.generation;
    EXPECT_NE(first_generation, 0u);
    EXPECT_EQ(sel->size(), 1u);
    ASSERT_NE(sel->get_key(a.get()), nullptr);
    EXPECT_EQ(sel->get_key(a.get())->data, &x);

    // modify(fd, interest) keeps the data; the generation stays.
    sel->modify(a.get(), rw);
    EXPECT_EQ(sel->get_key(a.get())->interest, rw);
    EXPECT_EQ(sel->get_key(a.get())->data, &x);
    EXPECT_EQ(sel->get_key(a.get())->generation, first_generation);

    // modify changing the data only.
    sel->modify(a.get(), rw, &y);
    EXPECT_EQ(sel->get_key(a.get())->data, &y);
    auto ready = sel->select(0ns);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].key.data, &y);
    EXPECT_EQ(ready[0].events, Events::write);

    SelectorKey removed = sel->remove(a.get());
    EXPECT_EQ(removed.fd, a.get());
    EXPECT_EQ(removed.interest, rw);
    EXPECT_EQ(removed.data, &y);
    EXPECT_EQ(sel->size(), 0u);
    EXPECT_EQ(sel->get_key(a.get()), nullptr);
    EXPECT_TRUE(sel->select(0ns).empty());

    // A new registration of the same fd gets a new generation.
    EXPECT_NE(sel->add(a.get(), Events::read).generation, first_generation);
    EXPECT_EQ(sel->size(), 1u);
}

TEST(Selector, ArgumentErrors) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    int x = 1;
    EXPECT_THROW(sel->add(-1, Events::read), std::invalid_argument);
    EXPECT_THROW(sel->add(a.get(), Events::none), std::invalid_argument);
    EXPECT_THROW(sel->add(a.get(), Events::error), std::invalid_argument);
    EXPECT_THROW(sel->add(a.get(), Events::read | Events::hangup), std::invalid_argument);
    // Bits outside the four known flags are not an interest either.
    EXPECT_THROW(sel->add(a.get(), static_cast<Events>(1u << 4)), std::invalid_argument);
    EXPECT_THROW(sel->add(a.get(), static_cast<Events>(1u << 31 | 1u)), std::invalid_argument);
    // Nothing registered after any failed add.
    EXPECT_EQ(sel->size(), 0u);
    EXPECT_EQ(sel->get_key(a.get()), nullptr);

    EXPECT_THROW(sel->modify(a.get(), Events::read), std::out_of_range);
    EXPECT_THROW(sel->modify(-1, Events::read), std::out_of_range);
    EXPECT_THROW(sel->remove(a.get()), std::out_of_range);
    EXPECT_THROW(sel->remove(-1), std::out_of_range);
    EXPECT_THROW(sel->remove(1 << 20), std::out_of_range);

    sel->add(a.get(), Events::read, &x);
    try {
        sel->add(a.get(), Events::write);
        ADD_FAILURE() << "duplicate add did not throw";
    } catch (const std::invalid_argument&) {
        ADD_FAILURE() << "duplicate add: expected logic_error, got invalid_argument";
    } catch (const std::out_of_range&) {
        ADD_FAILURE() << "duplicate add: expected logic_error, got out_of_range";
    } catch (const std::logic_error&) {
    }
    EXPECT_EQ(sel->size(), 1u);
    EXPECT_EQ(sel->get_key(a.get())->interest, Events::read);

    // A failed modify keeps the old registration, in the table and in the kernel.
    EXPECT_THROW(sel->modify(a.get(), Events::none, nullptr), std::invalid_argument);
    EXPECT_THROW(sel->modify(a.get(), Events::write | Events::error), std::invalid_argument);
    EXPECT_THROW(sel->modify(a.get(), static_cast<Events>(1u << 5)), std::invalid_argument);
    ASSERT_NE(sel->get_key(a.get()), nullptr);
    EXPECT_EQ(sel->get_key(a.get())->interest, Events::read);
    EXPECT_EQ(sel->get_key(a.get())->data, &x);
    EXPECT_TRUE(sel->select(0ns).empty()) << "writable but only read interest";
    write_byte(b.get());
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u) << describe(ready);
    EXPECT_EQ(ready[0].events, Events::read);
    EXPECT_EQ(ready[0].key.data, &x);
}

// A modify the kernel refuses (epoll: the fd was closed) keeps the old key.
TEST(Selector, FailedKernelModifyKeepsRegistration) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    const int fd = a.get();
    int x = 1, y = 2;
    sel->add(fd, Events::read, &x);
    a.reset();
    try {
        sel->modify(fd, Events::write, &y);
        // poll and select keep no kernel state per fd: they accept it.
        EXPECT_FALSE(is("epoll")) << "epoll_ctl(MOD) on a closed fd succeeded";
        EXPECT_EQ(sel->get_key(fd)->interest, Events::write);
    } catch (const std::system_error& e) {
        EXPECT_NE(std::string(e.what()).find("fd " + std::to_string(fd)), std::string::npos)
            << e.what();
        ASSERT_NE(sel->get_key(fd), nullptr);
        EXPECT_EQ(sel->get_key(fd)->interest, Events::read);
        EXPECT_EQ(sel->get_key(fd)->data, &x);
    }
    EXPECT_EQ(sel->size(), 1u);
    EXPECT_NO_THROW(sel->remove(fd));
    EXPECT_EQ(sel->size(), 0u);
}

// ---- readiness ---------------------------------------------------------------

TEST(Selector, ReadReadiness) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    int tag = 7;
    sel->add(a.get(), Events::read, &tag);
    EXPECT_TRUE(sel->select(0ns).empty());
    write_byte(b.get());
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].key.fd, a.get());
    EXPECT_EQ(ready[0].key.data, &tag);
    EXPECT_EQ(ready[0].events, Events::read);
    // Level-triggered: still ready until read.
    ready = sel->select(0ns);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].events, Events::read);
    EXPECT_EQ(drain(a.get()), 1u);
    EXPECT_TRUE(sel->select(0ns).empty());
}

TEST(Selector, WriteReadiness) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::write);
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].events, Events::write);

    fill(a.get());
    EXPECT_TRUE(sel->select(0ns).empty()) << "full send buffer reported writable";
    EXPECT_GT(drain(b.get()), 0u);
    EXPECT_EQ(wait_for(*sel, a.get()), Events::write);
}

TEST(Selector, PipeReadAndWriteEnds) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [r, w] = make_pipe();
    sel->add(r.get(), Events::read);
    sel->add(w.get(), Events::write);
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u) << describe(ready);
    EXPECT_EQ(events_of(ready, w.get()), Events::write);
    write_byte(w.get());
    ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 2u) << describe(ready);
    EXPECT_EQ(events_of(ready, r.get()), Events::read);
    EXPECT_EQ(events_of(ready, w.get()), Events::write);
}

TEST(Selector, ReadWriteInterestAndMasking) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    sel->add(a.get(), rw);
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].events, Events::write);
    write_byte(b.get());
    ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].events, rw);

    // Ready for both, reported only for what is asked.
    sel->modify(a.get(), Events::read);
    ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].events, Events::read);
    sel->modify(a.get(), Events::write);
    ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].events, Events::write);
}

TEST(Selector, ManyFdsOnlyReadyOnesReported) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    std::vector<std::pair<Fd, Fd>> pairs;
    for (int i = 0; i < 20; ++i) {
        pairs.push_back(socket_pair());
        sel->add(pairs.back().first.get(), Events::read, &pairs.back());
    }
    for (int i : {3, 11, 19}) write_byte(pairs[i].second.get());
    auto ready = sel->select(1s);
    // A backend may return fewer than all ready fds in one wait; collect.
    std::set<int> seen;
    for (int round = 0; round < 5 && seen.size() < 3; ++round) {
        for (const ReadyEvent& r : ready) {
            EXPECT_EQ(r.events, Events::read);
            seen.insert(r.key.fd);
        }
        ready = sel->select(0ns);
    }
    EXPECT_EQ(seen,
              (std::set<int>{pairs[3].first.get(), pairs[11].first.get(), pairs[19].first.get()}));
    // Removing a ready fd: its event is never returned again.
    sel->remove(pairs[11].first.get());
    ready = sel->select(1s);
    EXPECT_FALSE(events_of(ready, pairs[11].first.get())) << describe(ready);
}

// ---- close, reset, hang-up: the normalisation contract ----------------------

TEST(Selector, PeerCloseSocketpair) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::read);
    b.reset();
    EXPECT_EQ(wait_for(*sel, a.get()), Events::read | Events::hangup);
    // With write interest too: a closed Unix peer leaves us writable (the
    // write fails at once with EPIPE).
    sel->modify(a.get(), rw);
    EXPECT_EQ(wait_for(*sel, a.get()), rw | Events::hangup);
}

TEST(Selector, PeerCloseTcp) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [client, server] = tcp_pair();
    sel->add(server.get(), Events::read);
    client.reset();
    EXPECT_EQ(wait_for(*sel, server.get()), Events::read | Events::hangup);
}

TEST(Selector, PeerShutdownWriteTcp) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [client, server] = tcp_pair();
    sel->add(server.get(), Events::read);
    ASSERT_EQ(::shutdown(client.get(), SHUT_WR), 0);
    EXPECT_EQ(wait_for(*sel, server.get()), Events::read | Events::hangup);
}

TEST(Selector, PeerResetTcp) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [client, server] = tcp_pair();
    sel->add(server.get(), Events::read);
    close_with_reset(client);
    Events first = wait_for(*sel, server.get());
    EXPECT_TRUE(any(first, Events::read)) << to_string(first);
    // Level-triggered: the state stays until the error is read.
    auto ready = sel->select(0ns);
    EXPECT_EQ(events_of(ready, server.get()), Events::read | Events::error | Events::hangup)
        << describe(ready);
    EXPECT_EQ(first, Events::read | Events::error | Events::hangup);
}

TEST(Selector, PipeHangupAndError) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    {
        // End of file on a pipe is POLLHUP without POLLIN in the kernel; it is
        // still "a read will not block", as on a socket.
        auto [r, w] = make_pipe();
        sel->add(r.get(), Events::read);
        w.reset();
        EXPECT_EQ(wait_for(*sel, r.get()), Events::read | Events::hangup);
        sel->remove(r.get());
    }
    {
        // No reader left: POLLERR, and a write fails at once (EPIPE).
        auto [r, w] = make_pipe();
        sel->add(w.get(), Events::write);
        r.reset();
        EXPECT_EQ(wait_for(*sel, w.get()), Events::write | Events::error);
        sel->remove(w.get());
    }
}

// A write-only watcher must not be woken by the peer's half-close: on a
// level-triggered backend that would be a wake-up on every wait (a spin).
TEST(Selector, WriteOnlyWatcherNotWokenByHalfClose) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto check = [&](Fd& mine, Fd& peer) {
        ASSERT_NO_FATAL_FAILURE(fill(mine.get()));
        sel->add(mine.get(), Events::write);
        ASSERT_EQ(::shutdown(peer.get(), SHUT_WR), 0);
        for (int i = 0; i < 3; ++i) {
            auto start = Clock::now();
            auto ready = sel->select(30ms);
            EXPECT_TRUE(ready.empty()) << describe(ready);
            EXPECT_GE(Clock::now() - start, 30ms);
        }
        // Still watched: once the peer reads, we are writable again.
        EXPECT_GT(drain(peer.get()), 0u);
        EXPECT_TRUE(any(wait_for(*sel, mine.get()), Events::write));
        sel->remove(mine.get());
    };
    {
        auto [a, b] = socket_pair();
        check(a, b);
    }
    {
        auto [client, server] = tcp_pair();
        check(server, client);
    }
}

// ---- timeouts ------------------------------------------------------------------

TEST(Selector, ZeroTimeoutDoesNotBlock) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::read);
    auto start = Clock::now();
    for (int i = 0; i < 100; ++i) EXPECT_TRUE(sel->select(0ns).empty());
    EXPECT_LT(Clock::now() - start, slack);
    // A negative timeout is treated as zero.
    EXPECT_TRUE(sel->select(-5ms).empty());
}

TEST(Selector, FiniteTimeoutNeverEarly) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::read);
    for (auto t : {std::chrono::nanoseconds(1ms), std::chrono::nanoseconds(20ms),
                   std::chrono::nanoseconds(1500us), std::chrono::nanoseconds(100ms)}) {
        auto start = Clock::now();
        auto ready = sel->select(t);
        auto took = Clock::now() - start;
        EXPECT_TRUE(ready.empty());
        EXPECT_GE(took, t) << "woke early for a " << t.count() << " ns wait";
        EXPECT_LT(took, t + slack);
    }
}

TEST(Selector, SubMillisecondTimeoutRoundsUp) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::read);
    for (int i = 0; i < 5; ++i) {
        auto start = Clock::now();
        EXPECT_TRUE(sel->select(300us).empty());
        EXPECT_GE(Clock::now() - start, 300us) << "a 0.3 ms wait returned early (rounded to 0?)";
    }
    // A single nanosecond is a wait too, not a poll.
    auto start = Clock::now();
    EXPECT_TRUE(sel->select(1ns).empty());
    EXPECT_GE(Clock::now() - start, 1ns);
}

TEST(Selector, InfiniteWaitWokenByAnotherThread) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::read);
    auto start = Clock::now();
    std::thread writer([fd = b.get()] {
        std::this_thread::sleep_for(50ms);
        write_byte(fd);
    });
    auto ready = sel->select(std::nullopt);
    auto took = Clock::now() - start;
    writer.join();
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].key.fd, a.get());
    EXPECT_EQ(ready[0].events, Events::read);
    EXPECT_GE(took, 50ms);
    EXPECT_LT(took, 50ms + slack);
}

// ---- EINTR ---------------------------------------------------------------------

namespace {

std::atomic<int> signals_seen{0};
extern "C" void count_signal(int) {
    signals_seen.fetch_add(1, std::memory_order_relaxed);
}

/// Installs a SIGUSR1 handler *without* SA_RESTART for its lifetime, so that
/// every blocking call the signal hits fails with EINTR.
class InterruptingSignal {
  public:
    InterruptingSignal() {
        struct sigaction sa {};
        sa.sa_handler = count_signal;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = 0;
        ::sigaction(SIGUSR1, &sa, &old_);
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGUSR1);
        ::pthread_sigmask(SIG_UNBLOCK, &set, &old_mask_);
        signals_seen = 0;
    }
    ~InterruptingSignal() {
        ::pthread_sigmask(SIG_SETMASK, &old_mask_, nullptr);
        ::sigaction(SIGUSR1, &old_, nullptr);
    }

  private:
    struct sigaction old_ {};
    sigset_t old_mask_{};
};

/// Sends SIGUSR1 to `target` `count` times, `every` apart, then runs `then`.
template <class F>
std::thread interrupter(pthread_t target, int count, std::chrono::milliseconds every, F then) {
    return std::thread([=] {
        for (int i = 0; i < count; ++i) {
            std::this_thread::sleep_for(every);
            ::pthread_kill(target, SIGUSR1);
        }
        then();
    });
}

}  // namespace

TEST(Selector, EintrDuringFiniteWaitKeepsFullTimeout) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    InterruptingSignal guard;
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::read);
    constexpr auto wait = 250ms;
    auto start = Clock::now();
    std::thread t = interrupter(::pthread_self(), 3, 40ms, [] {});
    std::span<const ReadyEvent> ready;
    EXPECT_NO_THROW(ready = sel->select(wait));
    auto took = Clock::now() - start;
    t.join();
    EXPECT_EQ(signals_seen.load(), 3) << "the signals did not arrive: the test proves nothing";
    EXPECT_TRUE(ready.empty()) << describe(ready);
    EXPECT_GE(took, wait);
    EXPECT_LT(took, wait + slack);
}

TEST(Selector, EintrDuringInfiniteWait) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    InterruptingSignal guard;
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::read);
    auto start = Clock::now();
    std::thread t = interrupter(::pthread_self(), 3, 40ms, [fd = b.get()] {
        std::this_thread::sleep_for(40ms);
        write_byte(fd);
    });
    std::span<const ReadyEvent> ready;
    EXPECT_NO_THROW(ready = sel->select(std::nullopt));
    auto took = Clock::now() - start;
    t.join();
    EXPECT_EQ(signals_seen.load(), 3);
    ASSERT_EQ(ready.size(), 1u) << describe(ready);
    EXPECT_EQ(ready[0].key.fd, a.get());
    EXPECT_EQ(ready[0].events, Events::read);
    EXPECT_GE(took, 160ms);
    EXPECT_LT(took, 160ms + slack);
}

// ---- large fd numbers and large sets ----------------------------------------------

TEST(Selector, FdsAbove1024) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    ASSERT_GE(raise_fd_limit(2100), 2100) << "cannot test fds >= 1024 here";
    auto [a0, b] = socket_pair();
    Fd a = move_above(std::move(a0), 1500);
    auto [c0, d] = socket_pair();
    Fd c = move_above(std::move(c0), 2000);
    auto [low, low_peer] = socket_pair();
    ASSERT_GE(a.get(), 1500);
    ASSERT_GE(c.get(), 2000);
    int tag = 1;
    sel->add(a.get(), Events::read, &tag);
    sel->add(c.get(), Events::write);
    sel->add(low.get(), Events::read);
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u) << describe(ready);
    EXPECT_EQ(events_of(ready, c.get()), Events::write);
    write_byte(b.get());
    write_byte(low_peer.get());
    ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 3u) << describe(ready);
    EXPECT_EQ(events_of(ready, a.get()), Events::read);
    EXPECT_EQ(events_of(ready, low.get()), Events::read);
    for (const ReadyEvent& r : ready) {
        if (r.key.fd == a.get()) {
            EXPECT_EQ(r.key.data, &tag);
        }
    }
    sel->remove(c.get());
    drain(a.get());
    ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u) << describe(ready);
    EXPECT_EQ(ready[0].key.fd, low.get());
}

TEST(Selector, TenThousandFds) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    constexpr long want_pairs = 5000;
    const long limit = raise_fd_limit(2 * want_pairs + 64);
    const long pairs_n = std::min(want_pairs, (limit - 64) / 2);
    if (pairs_n < want_pairs)
        std::printf("RLIMIT_NOFILE %ld: testing %ld socketpairs, not %ld\n", limit, pairs_n,
                    want_pairs);
    ASSERT_GE(pairs_n, 500) << "fd limit " << limit << " too low";
    std::vector<std::pair<Fd, Fd>> pairs;
    pairs.reserve(pairs_n);
    for (long i = 0; i < pairs_n; ++i) {
        pairs.push_back(socket_pair());
        sel->add(pairs.back().first.get(), Events::read);
        sel->add(pairs.back().second.get(), Events::read);
    }
    EXPECT_EQ(sel->size(), static_cast<std::size_t>(2 * pairs_n));
    EXPECT_TRUE(sel->select(0ns).empty());
    std::set<int> expected;
    for (long i : {0L, 7L, pairs_n / 2, pairs_n - 1}) {
        write_byte(pairs[i].second.get());
        expected.insert(pairs[i].first.get());
    }
    std::set<int> seen;
    for (int round = 0; round < 5 && seen.size() < expected.size(); ++round) {
        for (const ReadyEvent& r : sel->select(1s)) {
            EXPECT_EQ(r.events, Events::read);
            seen.insert(r.key.fd);
        }
    }
    EXPECT_EQ(seen, expected);
    for (int fd : expected) drain(fd);
    EXPECT_TRUE(sel->select(0ns).empty());
}

// ---- closed, reused and dup'ed fds -------------------------------------------------

TEST(Selector, RemoveAfterCloseIsNotAnError) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    const int fd = a.get();
    sel->add(fd, Events::read);
    a.reset();
    EXPECT_NO_THROW(sel->remove(fd));
    EXPECT_EQ(sel->size(), 0u);
    EXPECT_TRUE(sel->select(0ns).empty());
}

TEST(Selector, ClosedButRegisteredFdReportsNothingAndDoesNotSpin) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    auto [c, d] = socket_pair();
    const int fd = a.get();
    sel->add(fd, rw);
    sel->add(c.get(), Events::read);
    write_byte(b.get());
    a.reset();  // closed, still registered
    // poll reports POLLNVAL for it, select fails with EBADF: neither may
    // surface, spin or throw. epoll has dropped it with the file.
    for (int i = 0; i < 3; ++i) {
        auto start = Clock::now();
        std::span<const ReadyEvent> ready;
        ASSERT_NO_THROW(ready = sel->select(20ms));
        EXPECT_TRUE(ready.empty()) << describe(ready);
        EXPECT_GE(Clock::now() - start, 20ms);
    }
    // The others are still watched.
    write_byte(d.get());
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u) << describe(ready);
    EXPECT_EQ(ready[0].key.fd, c.get());
    EXPECT_NO_THROW(sel->remove(fd));
}

namespace {
/// A new socketpair whose first fd has number `fd` (which must be free).
std::pair<Fd, Fd> socket_pair_at(int fd) {
    auto p = socket_pair();
    if (p.first.get() != fd) {
        // Not the lowest free number (a lower one is free): put it there.
        EXPECT_EQ(::dup3(p.first.get(), fd, O_CLOEXEC), fd);
        p.first = Fd(fd);
    }
    return p;
}
}  // namespace

TEST(Selector, CloseAndReuseWithRemoveAdd) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    const int fd = a.get();
    int old_tag = 1, new_tag = 2;
    sel->add(fd, Events::read, &old_tag);
    write_byte(b.get());  // pending on the old socket
    a.reset();
    auto [c, d] = socket_pair_at(fd);
    ASSERT_EQ(c.get(), fd);
    sel->remove(fd);
    sel->add(fd, Events::read, &new_tag);
    auto ready = sel->select(30ms);
    EXPECT_TRUE(ready.empty()) << "event of the old socket:" << describe(ready);
    write_byte(d.get());
    ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u) << describe(ready);
    EXPECT_EQ(ready[0].key.data, &new_tag);
    EXPECT_EQ(ready[0].events, Events::read);
}

// Closing a registered fd and reusing its number *without* remove()/add() is
// a caller bug; the backends differ, and this pins down how:
//  - epoll (and libevent on epoll): the kernel registration went with the old
//    file, so the new socket is not watched at all.
//  - poll, select: they watch fd numbers, so the new socket's events arrive
//    under the old key (if no wait ran while the number was closed).
//  - io_uring: its poll requests are armed by number at the next wait, so
//    here (no wait in between) it behaves like poll.
// In every case: no crash, no exception, no spin; anything reported carries
// the old key.
TEST(Selector, CloseAndReuseWithoutRemoveAdd) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    const int fd = a.get();
    int old_tag = 1;
    sel->add(fd, Events::read, &old_tag);
    a.reset();
    auto [c, d] = socket_pair_at(fd);
    ASSERT_EQ(c.get(), fd);
    write_byte(d.get());
    std::span<const ReadyEvent> ready;
    ASSERT_NO_THROW(ready = sel->select(30ms));
    ASSERT_LE(ready.size(), 1u) << describe(ready);
    if (!ready.empty()) {
        EXPECT_EQ(ready[0].key.fd, fd);
        EXPECT_EQ(ready[0].key.data, &old_tag);
        EXPECT_EQ(ready[0].events, Events::read);
    }
    if (is("poll") || is("select") || is("io_uring")) {
        EXPECT_EQ(ready.size(), 1u) << describe(ready);
    } else if (is("epoll")) {
        EXPECT_TRUE(ready.empty()) << describe(ready);
    }
    // remove() + add() brings the new socket under watch everywhere.
    EXPECT_NO_THROW(sel->remove(fd));
    sel->add(fd, Events::read);
    ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u) << describe(ready);
    EXPECT_EQ(ready[0].key.fd, fd);
    EXPECT_EQ(ready[0].key.data, nullptr);
}

// The epoll trap: the kernel keys a registration by (file, fd number) and
// drops it only when the *file* is closed. With a dup() alive, close(fd) +
// remove(fd) leaves it in the set, and EPOLL_CTL_DEL cannot name it any more.
TEST(Selector, DupClosedBeforeRemoveGivesNoStaleEvents) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    const int fd = a.get();
    int old_tag = 1, new_tag = 2;
    sel->add(fd, Events::read, &old_tag);
    Fd dup(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
    ASSERT_TRUE(dup);
    a.reset();
    EXPECT_NO_THROW(sel->remove(fd));
    // Reuse the number before any wait, then make the old file readable.
    auto [c, d] = socket_pair_at(fd);
    ASSERT_EQ(c.get(), fd);
    sel->add(fd, Events::read, &new_tag);
    write_byte(b.get());
    for (int i = 0; i < 5; ++i) {
        auto ready = sel->select(0ns);
        EXPECT_TRUE(ready.empty()) << "stale event, wait " << i << ":" << describe(ready);
    }
    auto start = Clock::now();
    auto ready = sel->select(30ms);
    EXPECT_TRUE(ready.empty()) << describe(ready);
    EXPECT_GE(Clock::now() - start, 30ms) << "woken by a stale registration";
    // The new socket is watched; the old file (via the dup) is not.
    write_byte(d.get());
    ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u) << describe(ready);
    EXPECT_EQ(ready[0].key.data, &new_tag);
    EXPECT_EQ(ready[0].events, Events::read);
    EXPECT_EQ(drain(dup.get()), 1u);
}

// Same trap without the number being reused: only the orphan registration.
TEST(Selector, DupClosedBeforeRemoveNoReuse) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    auto [c, d] = socket_pair();
    const int fd = a.get();
    sel->add(fd, Events::read);
    sel->add(c.get(), Events::read);
    Fd dup(::fcntl(fd, F_DUPFD_CLOEXEC, 0));
    ASSERT_TRUE(dup);
    a.reset();
    sel->remove(fd);
    write_byte(b.get());
    for (int i = 0; i < 5; ++i) {
        auto start = Clock::now();
        auto ready = sel->select(10ms);
        EXPECT_TRUE(ready.empty()) << describe(ready);
        EXPECT_GE(Clock::now() - start, 10ms);
    }
    write_byte(d.get());
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u) << describe(ready);
    EXPECT_EQ(ready[0].key.fd, c.get());
}

// ---- fds add() refuses, alike on every backend -------------------------------------

namespace {

/// add(fd) must throw std::system_error with `err` and a message naming the fd
/// and containing `text`, and register nothing: the selector is as before
/// (one other fd registered, `other`, still reported).
void expect_add_refused(Selector& sel, int fd, int err, const std::string& text) {
    // Above `fd`, so that these two cannot take its number (a huge `fd`
    // is out of reach anyway).
    const int above = fd < 512 ? fd + 1 : 0;
    auto [low_other, low_peer] = socket_pair();
    Fd other = move_above(std::move(low_other), above);
    Fd peer = move_above(std::move(low_peer), above);
    sel.add(other.get(), Events::read);
    try {
        sel.add(fd, Events::read);
        ADD_FAILURE() << sel.name() << " accepted fd " << fd;
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code().value(), err) << e.what();
        EXPECT_NE(std::string(e.what()).find("fd " + std::to_string(fd)), std::string::npos)
            << e.what();
        EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
    EXPECT_EQ(sel.size(), 1u);
    EXPECT_EQ(sel.get_key(fd), nullptr);
    write_byte(peer.get());
    auto ready = sel.select(1s);
    ASSERT_EQ(ready.size(), 1u) << describe(ready);
    EXPECT_EQ(ready[0].key.fd, other.get());
    sel.remove(other.get());
}

/// An fd number that is not open: one just closed, so nothing else has it.
int closed_fd_number() {
    auto [a, b] = socket_pair();
    return a.get();  // both closed on return
}

Fd temp_file() {
    char path[] = "/tmp/evmux-selector-XXXXXX";
    Fd file(::mkstemp(path));
    if (file) ::unlink(path);
    return file;
}

const std::string not_pollable = "cannot be polled";

}  // namespace

TEST(Selector, AddOfAnFdThatIsNotOpenIsEbadf) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    const int fd = closed_fd_number();
    ASSERT_NO_FATAL_FAILURE(expect_add_refused(*sel, fd, EBADF, "not an open file descriptor"));
    // Far beyond any fd ever registered (the key table is not grown for it).
    ASSERT_NO_FATAL_FAILURE(
        expect_add_refused(*sel, 1 << 20, EBADF, "not an open file descriptor"));
    // Once the number is open, the same selector takes it.
    auto [a, b] = socket_pair();
    EXPECT_NO_THROW(sel->add(a.get(), Events::read));
}

TEST(Selector, RegularFileIsRefused) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    Fd file = temp_file();
    ASSERT_TRUE(file);
    ASSERT_NO_FATAL_FAILURE(expect_add_refused(*sel, file.get(), EPERM, not_pollable));
}

TEST(Selector, DirectoryIsRefused) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    Fd dir(::open("/tmp", O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    ASSERT_TRUE(dir);
    ASSERT_NO_FATAL_FAILURE(expect_add_refused(*sel, dir.get(), EPERM, not_pollable));
}

// A character device is refused when its driver has no poll, as epoll does.
TEST(Selector, DevNullIsRefused) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    Fd null(::open("/dev/null", O_RDWR | O_CLOEXEC));
    ASSERT_TRUE(null);
    ASSERT_NO_FATAL_FAILURE(expect_add_refused(*sel, null.get(), EPERM, not_pollable));
}

// Files that are not sockets or pipes but can be polled are taken everywhere:
// eventfd and timerfd (no file type at all) and a /proc file whose driver
// implements poll although fstat calls it a regular file.
TEST(Selector, PollableFilesAreAccepted) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    Fd event(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    Fd timer(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
    Fd mounts(::open("/proc/self/mounts", O_RDONLY | O_CLOEXEC));
    ASSERT_TRUE(event && timer && mounts);
    struct stat st {};
    ASSERT_EQ(::fstat(mounts.get(), &st), 0);
    ASSERT_TRUE(S_ISREG(st.st_mode)) << "the point of this case: a regular file that polls";
    for (int fd : {event.get(), timer.get(), mounts.get()})
        EXPECT_NO_THROW(sel->add(fd, Events::read)) << "fd " << fd;
    EXPECT_EQ(sel->size(), 3u);
    // They work: the eventfd, once written, is readable.
    const std::uint64_t one = 1;
    ASSERT_EQ(::write(event.get(), &one, sizeof one), 8);
    EXPECT_TRUE(any(wait_for(*sel, event.get()), Events::read));
    for (int fd : {event.get(), timer.get(), mounts.get()}) EXPECT_NO_THROW(sel->remove(fd));
}

// The event loop passes add()'s refusal on: nothing watched.
TEST(Selector, EventLoopWatchRefusesTheSame) {
    EVMUX_LOOP_OR_SKIP(loop);
    Fd file = temp_file();
    ASSERT_TRUE(file);
    const int closed = closed_fd_number();
    struct Case {
        int fd;
        int err;
    };
    for (Case c : {Case{closed, EBADF}, Case{file.get(), EPERM}}) {
        try {
            loop.watch(c.fd, Events::read, [](Events) {});
            ADD_FAILURE() << "watch(" << c.fd << ") accepted";
        } catch (const std::system_error& e) {
            EXPECT_EQ(e.code().value(), c.err) << e.what();
        }
        EXPECT_FALSE(loop.watching(c.fd));
    }
    // The loop still runs and watches what it can.
    auto [a, b] = socket_pair();
    bool called = false;
    loop.watch(a.get(), Events::read, [&](Events) { called = true; });
    write_byte(b.get());
    EXPECT_TRUE(run_until(loop, [&] { return called; }));
    loop.unwatch(a.get());
}

// ---- the registry ------------------------------------------------------------------

namespace {

// A comma-separated list of backend names that tests/meson.build puts in the
// environment (from backends/meson.build).
std::vector<std::string> names_from_env(const char* var) {
    std::vector<std::string> names;
    const char* value = std::getenv(var);
    if (!value) {
        ADD_FAILURE() << var << " is not set: tests/meson.build sets it (run through meson test)";
        return names;
    }
    for (std::string rest = value; !rest.empty();) {
        auto comma = rest.find(',');
        names.push_back(rest.substr(0, comma));
        rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
    }
    return names;
}

}  // namespace

TEST(Registry, UnknownBackendListsUsableOnes) {
    try {
        make_selector("nope");
        FAIL() << "no exception";
    } catch (const std::invalid_argument& e) {
        std::string what = e.what();
        EXPECT_NE(what.find("nope"), std::string::npos) << what;
        for (const BackendInfo& b : backends()) {
            if (b.usable) {
                EXPECT_NE(what.find(b.name), std::string::npos) << what;
            }
        }
    }
}

// Every backend backends/meson.build lists, compiled in or not, once each.
TEST(Registry, BackendsListed) {
    auto list = backends();
    std::multiset<std::string> got;
    for (const BackendInfo& b : list) got.insert(b.name);
    std::vector<std::string> all = names_from_env("EVMUX_TEST_BACKENDS_ALL");
    EXPECT_EQ(got, std::multiset<std::string>(all.begin(), all.end()));
    EXPECT_GE(got.size(), 5u);  // select, poll, epoll, io_uring, libevent at least
    for (const BackendInfo& b : list) {
        if (b.name == "select" || b.name == "poll" || b.name == "epoll") {
            EXPECT_TRUE(b.compiled_in) << b.name;
            EXPECT_TRUE(b.usable) << b.name << ": " << b.reason;
        }
        if (!b.compiled_in) {
            EXPECT_FALSE(b.usable) << b.name;
        }
        if (!b.usable) {
            EXPECT_FALSE(b.reason.empty()) << b.name;
            EXPECT_THROW(make_selector(b.name), std::invalid_argument) << b.name;
        } else {
            auto sel = make_selector(b.name);
            ASSERT_NE(sel, nullptr);
            EXPECT_EQ(sel->name().rfind(b.name, 0), 0u) << sel->name() << " for " << b.name;
        }
        // Completion I/O: io_uring's, on when its probe found every piece,
        // and what its reason then begins with.
        EXPECT_EQ(b.completion, b.usable && b.reason.rfind("completion I/O: ", 0) == 0)
            << b.name << ": " << b.reason;
        if (b.name != "io_uring") {
            EXPECT_FALSE(b.completion) << b.name;
        }
    }
    // The knob that acts as a kernel without completion I/O (meson test
    // selector-io_uring-completion-off): io_uring usable, its completion off.
    if (const char* off = std::getenv("EVMUX_URING_COMPLETION"); off && std::string(off) == "off") {
        for (const BackendInfo& b : list)
            if (b.name == "io_uring" && b.usable) {
                EXPECT_FALSE(b.completion);
                EXPECT_EQ(b.reason, "completion I/O off: turned off (EVMUX_URING_COMPLETION=off)");
            }
    }
    // The default is the first usable one in preference order; with
    // EVMUX_IO=completion, io_uring if it is usable (the one that has it);
    // with EVMUX_IO unset (completion, the default mode), io_uring if it is
    // usable with its completion I/O on.
    const char* env = std::getenv("EVMUX_BACKEND");
    std::string saved = env ? env : "";
    ::unsetenv("EVMUX_BACKEND");
    std::string first_usable;
    for (const BackendInfo& b : list)
        if (b.usable && first_usable.empty()) first_usable = b.name;
    const char* io = std::getenv("EVMUX_IO");
    const std::string io_saved = io ? io : "";
    bool io_uring_usable = false, io_uring_completion = false;
    for (const BackendInfo& b : list)
        if (b.name == "io_uring") {
            io_uring_usable = b.usable;
            io_uring_completion = b.completion;
        }
    ::setenv("EVMUX_IO", "completion", 1);
    EXPECT_EQ(default_backend_name(), io_uring_usable ? "io_uring" : first_usable);
    ::setenv("EVMUX_IO", "readiness", 1);
    EXPECT_EQ(default_backend_name(), first_usable);
    ::unsetenv("EVMUX_IO");
    EXPECT_EQ(default_backend_name(), io_uring_completion ? "io_uring" : first_usable);
    if (io) ::setenv("EVMUX_IO", io_saved.c_str(), 1);
    if (env) ::setenv("EVMUX_BACKEND", saved.c_str(), 1);
}

// The registry (backends/registry.cpp) and the build (backends/meson.build)
// agree on what is compiled in; the backends are in the documented preference
// order; one the build left out says what would bring it.
TEST(Registry, AgreesWithTheBuild) {
    std::vector<std::string> built = names_from_env("EVMUX_TEST_BACKENDS_BUILT");
    std::set<std::string> want(built.begin(), built.end());
    EXPECT_TRUE(want.count("select") && want.count("poll") && want.count("epoll"));
    std::set<std::string> got;
    std::vector<std::string> order;  // of the backends README names
    const std::set<std::string> documented = {"epoll", "io_uring", "poll", "select", "libevent"};
    for (const BackendInfo& b : backends()) {
        if (documented.count(b.name)) order.push_back(b.name);
        if (b.compiled_in) {
            got.insert(b.name);
            continue;
        }
        EXPECT_EQ(b.reason.rfind("not compiled in (needs ", 0), 0u) << b.name << ": " << b.reason;
        EXPECT_NE(b.reason.find("; meson -D"), std::string::npos) << b.name << ": " << b.reason;
        EXPECT_TRUE(b.reason.ends_with("=enabled)")) << b.name << ": " << b.reason;
        try {
            make_selector(b.name);
            ADD_FAILURE() << "make_selector(\"" << b.name << "\") did not throw";
        } catch (const std::invalid_argument& e) {
            EXPECT_NE(std::string(e.what()).find(b.reason), std::string::npos) << e.what();
        }
    }
    EXPECT_EQ(got, want);
    EXPECT_EQ(order, (std::vector<std::string>{"epoll", "io_uring", "poll", "select", "libevent"}));
}

TEST(Registry, EnvironmentChoosesBackend) {
    const char* env = std::getenv("EVMUX_BACKEND");
    const std::optional<std::string> saved = env ? std::optional<std::string>(env) : std::nullopt;
    for (const BackendInfo& b : backends()) {
        if (!b.usable) continue;
        ::setenv("EVMUX_BACKEND", b.name.c_str(), 1);
        EXPECT_EQ(default_backend_name(), b.name);
        EXPECT_EQ(make_selector()->name().rfind(b.name, 0), 0u);
    }
    ::setenv("EVMUX_BACKEND", "nope", 1);
    EXPECT_THROW(make_selector(), std::invalid_argument);
    ::setenv("EVMUX_BACKEND", "", 1);  // empty: the default
    EXPECT_NO_THROW(make_selector());
    if (saved)
        ::setenv("EVMUX_BACKEND", saved->c_str(), 1);
    else
        ::unsetenv("EVMUX_BACKEND");
}

TEST(Events, ToString) {
    EXPECT_EQ(to_string(Events::none), "none");
    EXPECT_EQ(to_string(Events::read | Events::hangup), "read|hangup");
    EXPECT_EQ(to_string(Events::read | Events::write | Events::error | Events::hangup),
              "read|write|error|hangup");
}

// Out of fds, making a selector (any backend, or one whose error message
// lists the usable backends, which asks libevent) throws; it used to end the
// process with exit status 1 from inside libevent, whose event_base cannot
// make its signal socketpair then and treats that as fatal (failed before:
// the test binary exited 1 before the limit was restored).
TEST(Selector, OutOfFdsThrowsInsteadOfEndingTheProcess) {
    rlimit old{};
    ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &old), 0);
    std::vector<int> filler;
    rlimit low = old;
    {
        const int probe = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        ASSERT_GE(probe, 0);
        ::close(probe);
        low.rlim_cur = static_cast<rlim_t>(probe + 2);  // room for two fds
        ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
    }
    int thrown = 0;
    for (const char* name : {"libevent", "epoll", "io_uring", "poll", "select"}) {
        for (int room = 2; room >= 0; --room) {
            while (static_cast<int>(filler.size()) < 2 - room) {
                const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
                if (fd < 0) break;
                filler.push_back(fd);
            }
            try {
                auto selector = make_selector(name);
                // Destroyed with the limit restored: UBSan's check of the
                // virtual call makes a pipe, and out of fds it would report
                // a sound object as having no valid vptr.
                ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &old), 0);
                selector.reset();
                ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
            } catch (const std::exception&) {
                ++thrown;
            }
        }
        for (int fd : filler) ::close(fd);
        filler.clear();
    }
    try {
        (void)backends();  // probes every backend
    } catch (const std::exception&) {
    }
    ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &old), 0);
    EXPECT_GT(thrown, 0);  // reached: nothing ended the process
}

// Out of fds, a backend that needs one says so (EMFILE, as the
// std::system_error it is) rather than "not usable here" with a list of
// the backends that happened to need none.
TEST(Selector, OutOfFdsIsSaidAsSuchNotAsABackendUnusableHere) {
    std::vector<std::string> wanted;
    for (const BackendInfo& b : backends())
        if (b.usable && (b.name == "epoll" || b.name == "io_uring")) wanted.push_back(b.name);
    if (wanted.empty()) GTEST_SKIP() << "neither epoll nor io_uring is usable here";
    rlimit old{};
    ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &old), 0);
    std::vector<std::string> said;
    {
        const int probe = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        ASSERT_GE(probe, 0);
        ::close(probe);
        rlimit none = old;
        none.rlim_cur = static_cast<rlim_t>(probe);  // the lowest free number is past the limit
        ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &none), 0);
        for (const std::string& name : wanted) {
            try {
                auto selector = make_selector(name);
                said.push_back(name + ": made");
                ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &old), 0);  // as above: UBSan
                selector.reset();
                ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &none), 0);
            } catch (const std::system_error& e) {
                said.push_back(name + ": system_error " + std::to_string(e.code().value()) + " " +
                               e.what());
            } catch (const std::exception& e) {
                said.push_back(name + ": " + e.what());
            }
        }
    }
    ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &old), 0);
    for (std::size_t i = 0; i < wanted.size(); ++i) {
        EXPECT_TRUE(said[i].starts_with(wanted[i] + ": system_error " + std::to_string(EMFILE)))
            << said[i];
        EXPECT_EQ(said[i].find("not usable here"), std::string::npos) << said[i];
    }
}
