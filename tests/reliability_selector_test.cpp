// Reliability at the selector level, run once per backend (EVMUX_BACKEND):
//  1. fds >= FD_SETSIZE (1024) work on every backend, select included, and do
//     not abort or corrupt memory under -D_FORTIFY_SOURCE=2 (`./run fortify`)
//     or ASan (`./run sanitize`).
// 12. error, hang-up and closed fds are reported with the same exact flags on
//     every backend; a closed registered fd (POLLNVAL) never makes a wait spin.
// The EventLoop-level halves of these live in reliability_loop_test.cpp.
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <vector>

#include "test_support.hpp"

using namespace evmux;
using namespace evmux::test;
using namespace std::chrono_literals;

namespace {

using Clock = std::chrono::steady_clock;

// What one select() reported, by fd (a backend must not report an fd twice).
std::map<int, Events> collect(Selector& sel, Timeout timeout) {
    std::map<int, Events> out;
    for (const ReadyEvent& ev : sel.select(timeout)) {
        EXPECT_EQ(out.count(ev.key.fd), 0u) << "fd " << ev.key.fd << " reported twice";
        out[ev.key.fd] = ev.events;
    }
    return out;
}

// Waits up to ~1 s (bounded iterations) until `fd` is reported; returns its events.
Events wait_for(Selector& sel, int fd) {
    for (int i = 0; i < 100; ++i) {
        auto got = collect(sel, 10ms);
        if (auto it = got.find(fd); it != got.end()) return it->second;
    }
    return Events::none;
}

constexpr int fd_setsize = 1024;  // FD_SETSIZE on glibc

}  // namespace

// ---- 1. fds above FD_SETSIZE ------------------------------------------------

TEST(ReliabilityHighFd, ReadAndWriteAboveFdSetSize) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    if (raise_fd_limit(4200) < 4200) GTEST_SKIP() << "RLIMIT_NOFILE hard limit below 4200";
    // One pair just below the boundary, pairs straddling word boundaries above it.
    auto [lo_a, lo_b] = socket_pair();
    std::vector<std::pair<Fd, Fd>> pairs;
    for (int base : {fd_setsize - 2, fd_setsize, fd_setsize + 63, 2047, 4100}) {
        auto [a, b] = socket_pair();
        Fd ha = move_above(std::move(a), base);
        Fd hb = move_above(std::move(b), base + 1);
        ASSERT_GE(ha.get(), base);
        pairs.emplace_back(std::move(ha), std::move(hb));
    }
    sel->add(lo_a.get(), Events::read);
    for (auto& [a, b] : pairs) sel->add(a.get(), Events::read);
    EXPECT_TRUE(collect(*sel, 0ns).empty());

    // Each high fd becomes readable on its own, and only it is reported.
    for (auto& [a, b] : pairs) {
        write_byte(b.get());
        auto got = collect(*sel, 1s);
        ASSERT_EQ(got.size(), 1u) << "fd " << a.get();
        EXPECT_EQ(got.begin()->first, a.get());
        EXPECT_EQ(got.begin()->second, Events::read);
        EXPECT_EQ(drain(a.get()), 1u);
    }
    // All at once, the low one included.
    write_byte(lo_b.get());
    for (auto& [a, b] : pairs) write_byte(b.get());
    auto all = collect(*sel, 1s);
    // A backend may return them over more than one wait; gather a bounded few.
    for (int i = 0; i < 10 && all.size() < pairs.size() + 1; ++i)
        for (auto& [fd, ev] : collect(*sel, 10ms)) all[fd] = ev;
    EXPECT_EQ(all.size(), pairs.size() + 1);
    for (auto& [a, b] : pairs) EXPECT_EQ(all[a.get()], Events::read) << a.get();

    // Write interest on the highest, then remove: no more reports for it.
    int top = pairs.back().first.get();
    sel->modify(top, Events::write);
    EXPECT_EQ(wait_for(*sel, top), Events::write);
    sel->remove(top);
    for (int i = 0; i < 3; ++i) EXPECT_EQ(collect(*sel, 0ns).count(top), 0u);
}

TEST(ReliabilityHighFd, OnlyHighFdsAndClosedHighFd) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    if (raise_fd_limit(3000) < 3000) GTEST_SKIP() << "RLIMIT_NOFILE hard limit below 3000";
    auto [a0, b0] = socket_pair();
    auto [a1, b1] = socket_pair();
    Fd a = move_above(std::move(a0), 2900);
    Fd b = move_above(std::move(b0), 2901);
    Fd c = move_above(std::move(a1), 1500);
    Fd d = move_above(std::move(b1), 1501);
    sel->add(a.get(), Events::read);
    sel->add(c.get(), Events::read);
    // Close a registered high fd without removing it: the others still work.
    int closed = a.get();
    a.reset();
    write_byte(d.get());
    EXPECT_EQ(wait_for(*sel, c.get()), Events::read);
    EXPECT_EQ(collect(*sel, 0ns).count(closed), 0u);
    sel->remove(closed);  // already closed: not an error
    EXPECT_EQ(sel->size(), 1u);
}

// ---- 12. the same flags for the same situation on every backend -------------
// The expected masks are what Linux's poll reports, normalised by the
// documented mapping; the point is that no backend differs. The plain cases
// (peer close, reset with read interest, pipe ends) are in selector_test.cpp;
// these are the ones it does not cover.

TEST(ReliabilityFlags, PipeWriterClosedWithDataPending) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [r, w] = make_pipe();
    sel->add(r.get(), Events::read);
    write_byte(w.get());
    w.reset();
    EXPECT_EQ(wait_for(*sel, r.get()), Events::read | Events::hangup);
}

TEST(ReliabilityFlags, ReadOnlyInterestStillSeesErrors) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [r, w] = make_pipe();
    // A write end watched for read only: nothing to read, ever, but the error
    // when the reader goes must still be reported.
    sel->add(w.get(), Events::read);
    EXPECT_TRUE(collect(*sel, 0ns).empty());
    r.reset();
    // POLLERR alone; error implies read (masked to the interest: no write).
    EXPECT_EQ(wait_for(*sel, w.get()), Events::read | Events::error);
}

TEST(ReliabilityFlags, SocketPairPeerCloseWriteOnlyInterest) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::write);
    EXPECT_EQ(wait_for(*sel, a.get()), Events::write);
    b.reset();
    // POLLHUP is reported whatever the interest; the read it implies is masked.
    EXPECT_EQ(wait_for(*sel, a.get()), Events::write | Events::hangup);
}

TEST(ReliabilityFlags, TcpReset) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [client, server] = tcp_pair();
    sel->add(client.get(), Events::read);
    linger lg{1, 0};  // close with RST
    ASSERT_EQ(::setsockopt(server.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
    server.reset();
    EXPECT_EQ(wait_for(*sel, client.get()), Events::read | Events::error | Events::hangup);
    // Both interests: write as well.
    sel->modify(client.get(), Events::read | Events::write);
    EXPECT_EQ(wait_for(*sel, client.get()),
              Events::read | Events::write | Events::error | Events::hangup);
}

TEST(ReliabilityFlags, ClosedRegisteredFdNeverSpins) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    auto [c, d] = socket_pair();
    sel->add(a.get(), Events::read);
    sel->add(c.get(), Events::read | Events::write);
    int closed = a.get();
    a.reset();  // closed while registered: POLLNVAL on poll, EBADF on select
    // Write interest on c makes every wait return at once; a is never reported.
    for (int i = 0; i < 50; ++i) {
        auto got = collect(*sel, 0ns);
        EXPECT_EQ(got.count(closed), 0u);
        EXPECT_EQ(got.size(), 1u);
    }
    sel->modify(c.get(), Events::read);
    for (int i = 0; i < 50; ++i) EXPECT_TRUE(collect(*sel, 0ns).empty()) << "iteration " << i;
    // A finite wait lasts its time instead of returning at once.
    auto t0 = Clock::now();
    EXPECT_TRUE(collect(*sel, 30ms).empty());
    EXPECT_GE(Clock::now() - t0, 30ms);
    // The others still work.
    write_byte(d.get());
    EXPECT_EQ(wait_for(*sel, c.get()), Events::read);
    sel->remove(closed);
}
