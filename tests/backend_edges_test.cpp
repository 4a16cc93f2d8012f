// Edge cases that the io_uring and libevent backends handle in their own way,
// checked on every backend (EVMUX_BACKEND) so that they all agree:
//  - a remove() really lets go of the file (io_uring: a pending poll request
//    holds a reference, so close() would not close the socket otherwise);
//  - readiness is level-triggered (io_uring's multishot polls are not);
//  - after a write-only watcher sat out its peer's half-close (io_uring waits
//    that out with a multishot poll), it is level-triggered again;
//  - a server's port is free again as soon as the server is destroyed;
//  - more ready fds than io_uring's completion queue holds;
//  - io_uring refused by the kernel: backends() says why, the default skips
//    it, make_selector("io_uring") throws with the reason, and a suite run on
//    it exits 77 (skipped) with the reason.
#include <gtest/gtest.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "evmux/address.hpp"
#include "evmux/server.hpp"
#include "test_support.hpp"

using namespace evmux;
using namespace evmux::test;
using namespace std::chrono_literals;

namespace {

/// Fills `fd`'s send buffer until a write would block.
void fill(int fd) {
    static char junk[65536];
    for (int i = 0; i < 10000; ++i)
        if (::write(fd, junk, sizeof junk) < 0) return;
    FAIL() << "send buffer never filled";
}

}  // namespace

TEST(BackendEdges, RemoveThenCloseReallyCloses) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::read);
    // A wait arms the kernel-side registration (io_uring's poll request).
    EXPECT_TRUE(sel->select(0ns).empty());
    sel->remove(a.get());
    a.reset();
    // Without another wait on the selector, the peer must see end of file.
    pollfd p{b.get(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 2000), 1) << "the closed socket is still held open";
    char c;
    EXPECT_EQ(::read(b.get(), &c, 1), 0);
}

/// True if `peer` (a Unix socket) sees end of file now, i.e. the socket at the
/// other end is really closed: no kernel request still holds its file. Closing
/// a Unix socket tells its peer at once, within the close() call, so "now" is
/// exact: no waiting, no timing.
bool sees_eof(int peer) {
    pollfd p{peer, POLLIN, 0};
    if (::poll(&p, 1, 0) != 1) return false;
    char c;
    return ::read(peer, &c, 1) == 0;
}

// A modify while armed leaves an old request behind (io_uring cancels it with
// the next submission): a remove right after must still let go of the file.
TEST(BackendEdges, RemoveAfterModifyThenCloseReallyCloses) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::read);
    EXPECT_TRUE(sel->select(0ns).empty());  // armed for read
    sel->modify(a.get(), Events::read | Events::write);
    sel->remove(a.get());
    a.reset();
    EXPECT_TRUE(sees_eof(b.get())) << "the closed socket is still held open";
}

// `a` (a full socket buffer) watched for writing only while its peer `b`
// shuts down its side (not reported to a write-only watcher), then `b` reads,
// so `a` is writable again.
void write_watcher_through_half_close(Selector& sel, int a, int b) {
    ASSERT_NO_FATAL_FAILURE(fill(a));
    sel.add(a, Events::write);
    ASSERT_EQ(::shutdown(b, SHUT_WR), 0);
    EXPECT_TRUE(sel.select(20ms).empty());
    EXPECT_GT(drain(b), 0u);
}

// A write-only watcher that sat out a half-close and is writable again (on
// io_uring: a multishot poll, whose cancel waits for the next submission):
// a remove right after must still let go of the file.
TEST(BackendEdges, RemoveAfterHalfCloseWatchThenCloseReallyCloses) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    ASSERT_NO_FATAL_FAILURE(write_watcher_through_half_close(*sel, a.get(), b.get()));
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].events, Events::write);
    sel->remove(a.get());
    a.reset();
    EXPECT_TRUE(sees_eof(b.get())) << "the closed socket is still held open";
}

// Destroying a selector with fds still registered lets go of their files at
// once (io_uring: the ring's own teardown is asynchronous, so the selector
// cancels and reaps its requests first). Repeated: without that, the teardown
// sometimes wins the race (about 1 time in 30 here).
TEST(BackendEdges, DestroyedSelectorLetsGoOfItsFiles) {
    for (int i = 0; i < 20; ++i) {
        EVMUX_SELECTOR_OR_SKIP(sel);
        auto [a, b] = socket_pair();
        auto [c, d] = socket_pair();
        sel->add(a.get(), Events::read);
        sel->add(c.get(), Events::read);
        write_byte(d.get());  // c's request completes, its re-arm waits for the next wait
        EXPECT_EQ(sel->select(1s).size(), 1u);
        EXPECT_EQ(drain(c.get()), 1u);
        EXPECT_TRUE(sel->select(0ns).empty());  // both requests pending in the kernel
        sel.reset();
        a.reset();
        c.reset();
        ASSERT_TRUE(sees_eof(b.get())) << "round " << i << ": a closed socket is still held open";
        ASSERT_TRUE(sees_eof(d.get())) << "round " << i << ": a closed socket is still held open";
    }
}

// A port is free again as soon as the server on it is destroyed, on every
// backend (io_uring: no poll request may keep the listening socket alive).
// 50 rounds: create a loop and a server on port 0, echo one byte to a client,
// destroy server and loop, then bind and listen on the same port. The re-bind
// sets SO_REUSEADDR, as any server does (TcpServer too): the server closed its
// accepted connection first, so that connection waits in FIN_WAIT/TIME_WAIT
// on the port, which only SO_REUSEADDR lets a new listener bind beside. What
// SO_REUSEADDR does not allow is a second socket in LISTEN: the old listener
// must be gone.
TEST(BackendEdges, PortRebindableOnceServerDestroyed) {
    for (int round = 0; round < 50; ++round) {
        std::uint16_t port = 0;
        Fd client;
        {
            EVMUX_LOOP_OR_SKIP(loop);
            Callbacks echo;
            echo.on_message = [](const ConnectionPtr& c, Buffer& in) {
                c->send(in.data(), in.size());
                in.consume_all();
            };
            TcpServer server(loop, Address::parse("127.0.0.1:0"), echo);
            const Address& where = server.local_address();
            port = where.port();
            client = Fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
            ASSERT_EQ(::connect(client.get(), static_cast<const sockaddr*>(where.sockaddr_ptr()),
                                where.sockaddr_len()),
                      0);
            write_byte(client.get());
            pollfd p{client.get(), POLLIN, 0};
            ASSERT_TRUE(run_until(loop, [&] { return ::poll(&p, 1, 0) == 1; }))
                << "round " << round << ": no echo";
            char c = 0;
            ASSERT_EQ(::recv(client.get(), &c, 1, 0), 1);
            EXPECT_EQ(c, 'x');
        }  // server, then loop, destroyed
        Fd again(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
        const int one = 1;
        ASSERT_EQ(::setsockopt(again.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one), 0);
        const Address same = Address::ip("127.0.0.1", port);
        ASSERT_EQ(::bind(again.get(), static_cast<const sockaddr*>(same.sockaddr_ptr()),
                         same.sockaddr_len()),
                  0)
            << "round " << round << ": bind " << same.to_string() << ": " << std::strerror(errno);
        ASSERT_EQ(::listen(again.get(), 1), 0) << "round " << round;
    }
}

TEST(BackendEdges, UnreadDataIsReportedAtEveryWait) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::read);
    write_byte(b.get());
    for (int i = 0; i < 4; ++i) {
        auto ready = sel->select(1s);
        ASSERT_EQ(ready.size(), 1u) << "wait " << i;
        EXPECT_EQ(ready[0].events, Events::read);
    }
    drain(a.get());
    EXPECT_TRUE(sel->select(0ns).empty());
    // New data after the fd went quiet is reported again.
    write_byte(b.get());
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].events, Events::read);
}

TEST(BackendEdges, WriteOnlyWatcherLevelTriggeredAfterPeerHalfClose) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    ASSERT_NO_FATAL_FAILURE(write_watcher_through_half_close(*sel, a.get(), b.get()));
    // Writable now, and at every wait while it stays writable.
    for (int i = 0; i < 3; ++i) {
        auto ready = sel->select(1s);
        ASSERT_EQ(ready.size(), 1u) << "wait " << i;
        EXPECT_EQ(ready[0].events, Events::write);
    }
    // Full again: quiet again.
    ASSERT_NO_FATAL_FAILURE(fill(a.get()));
    EXPECT_TRUE(sel->select(20ms).empty());
    // Read interest added: the half-close shows as read (EOF) and hangup.
    sel->modify(a.get(), Events::read | Events::write);
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].events, Events::read | Events::hangup);
}

TEST(BackendEdges, ModifyWhileArmedTakesEffect) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    sel->add(a.get(), Events::read);
    EXPECT_TRUE(sel->select(0ns).empty());  // armed for read
    sel->modify(a.get(), Events::write);
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].events, Events::write);
    sel->modify(a.get(), Events::read);
    EXPECT_TRUE(sel->select(10ms).empty());
    write_byte(b.get());
    ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].events, Events::read);
}

// io_uring's completion queue has 4096 entries; more ready fds than that
// overflow into the kernel's backlog and must all be reported.
TEST(BackendEdges, MoreReadyFdsThanCompletionQueue) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    constexpr int n = 5000;
    if (raise_fd_limit(2 * n + 200) < 2 * n + 200) GTEST_SKIP() << "RLIMIT_NOFILE too low";
    std::vector<Fd> fds;
    fds.reserve(2 * n);
    for (int i = 0; i < n; ++i) {
        auto [a, b] = socket_pair();
        sel->add(a.get(), Events::write);
        fds.push_back(std::move(a));
        fds.push_back(std::move(b));
    }
    std::vector<char> seen(static_cast<std::size_t>(fds.back().get()) + 1, 0);
    std::size_t distinct = 0;
    // Some backends hand out a bounded batch per wait; a few waits must do.
    for (int round = 0; round < 50 && distinct < n; ++round) {
        for (const ReadyEvent& r : sel->select(1s)) {
            EXPECT_EQ(r.events, Events::write);
            if (!seen[r.key.fd]) ++distinct;
            seen[r.key.fd] = 1;
        }
    }
    EXPECT_EQ(distinct, static_cast<std::size_t>(n));
}

// ---- libevent left with no method but select ------------------------------------
// EVENT_NOEPOLL and EVENT_NOPOLL leave libevent only select, which evmux does
// not take: backends() must say libevent is unusable, and why, rather than
// list it as usable and fail on use.

TEST(LibeventWithoutMethods, ListedUnusableWithTheReason) {
    if (backend_name() != "libevent") GTEST_SKIP() << "runs once, in the libevent suite";
    struct Env {
        const char* name;
        std::optional<std::string> old;
    } env[] = {{"EVENT_NOEPOLL", {}}, {"EVENT_NOPOLL", {}}};
    for (Env& e : env) {
        if (const char* v = std::getenv(e.name)) e.old = v;
        ::setenv(e.name, "1", 1);
    }
    bool listed = false;
    for (const BackendInfo& b : backends()) {
        if (b.name != "libevent") continue;
        listed = true;
        EXPECT_FALSE(b.usable);
        EXPECT_NE(b.reason.find("no method but select"), std::string::npos) << b.reason;
    }
    EXPECT_TRUE(listed);
    try {
        make_selector("libevent");
        ADD_FAILURE() << "make_selector(\"libevent\") did not throw";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("no method but select"), std::string::npos)
            << e.what();
    }
    for (Env& e : env) {
        if (e.old)
            ::setenv(e.name, e.old->c_str(), 1);
        else
            ::unsetenv(e.name);
    }
    for (const BackendInfo& b : backends()) {
        if (b.name == "libevent") {
            EXPECT_TRUE(b.usable) << b.reason;
        }
    }
}

// ---- io_uring refused by the kernel ------------------------------------------
// A child process forbids io_uring_setup with a seccomp filter (as container
// runtimes do) and runs IoUringRefused.Child in a fresh exec of this binary, so
// that no probe result cached in this process is inherited.

TEST(IoUringRefused, Child) {
    if (!std::getenv("EVMUX_TEST_IO_URING_REFUSED")) GTEST_SKIP() << "run by IoUringRefused.Parent";
    ::unsetenv("EVMUX_BACKEND");
    bool listed = false;
    for (const BackendInfo& b : backends()) {
        if (b.name != "io_uring") continue;
        listed = true;
        EXPECT_FALSE(b.usable);
        EXPECT_EQ(b.reason, "io_uring_setup: Operation not permitted");
    }
    EXPECT_TRUE(listed);
    EXPECT_NE(default_backend_name(), "io_uring");
    EXPECT_NE(make_selector()->name(), "io_uring");
    try {
        make_selector("io_uring");
        ADD_FAILURE() << "make_selector(\"io_uring\") did not throw";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("io_uring_setup: Operation not permitted"),
                  std::string::npos)
            << e.what();
    }
}

#ifdef __NR_io_uring_setup
namespace {

struct ChildRun {
    bool finished = false;  // false: it hung and was killed
    int status = 0;         // waitpid's
    std::string output;     // stdout and stderr
};

/// Runs this binary again (a fresh exec: no probe result cached in this
/// process is inherited) under a seccomp filter that refuses io_uring_setup
/// with EPERM, as container runtimes do. `backend`: its EVMUX_BACKEND, or
/// nullptr to run it with none.
ChildRun run_self_without_io_uring(const char* gtest_filter, const char* backend) {
    ChildRun run;
    const std::string filter_arg = std::string("--gtest_filter=") + gtest_filter;
    int out[2];
    if (::pipe(out) != 0) return run;
    pid_t pid = ::fork();
    if (pid < 0) return run;
    if (pid == 0) {
        ::dup2(out[1], 1);
        ::dup2(out[1], 2);
        sock_filter filter[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        sock_fprog prog{static_cast<unsigned short>(sizeof filter / sizeof filter[0]), filter};
        if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
            ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
            ::_exit(3);
        ::setenv("EVMUX_TEST_IO_URING_REFUSED", "1", 1);
        ::unsetenv("EVMUX_IO");  // the completion suite's: no io_uring, no completion I/O
        if (backend)
            ::setenv("EVMUX_BACKEND", backend, 1);
        else
            ::unsetenv("EVMUX_BACKEND");
        ::execl("/proc/self/exe", "backend_edges_test", filter_arg.c_str(),
                static_cast<char*>(nullptr));
        ::_exit(4);
    }
    ::close(out[1]);
    char buf[4096];
    // Bounded: the child runs a handful of checks; 30 s is a hang.
    bool eof = false;
    for (int i = 0; i < 300 && !eof; ++i) {
        pollfd p{out[0], POLLIN, 0};
        if (::poll(&p, 1, 100) == 0) continue;
        ssize_t n = ::read(out[0], buf, sizeof buf);
        if (n <= 0) eof = true;
        if (n > 0) run.output.append(buf, static_cast<std::size_t>(n));
    }
    ::close(out[0]);
    if (!eof) ::kill(pid, SIGKILL);
    ::waitpid(pid, &run.status, 0);
    run.finished = eof;
    return run;
}

}  // namespace
#endif

// The checks of IoUringRefused.Child, in a process where io_uring is refused.
TEST(IoUringRefused, Parent) {
    if (backend_name() != "io_uring") GTEST_SKIP() << "runs once, in the io_uring suite";
#ifndef __NR_io_uring_setup
    GTEST_SKIP() << "no io_uring_setup system call number here";
#else
    // No EVMUX_BACKEND: an io_uring one would make the child's main skip it all.
    const ChildRun run = run_self_without_io_uring("IoUringRefused.Child", nullptr);
    ASSERT_TRUE(run.finished) << "child hung:\n" << run.output;
    ASSERT_TRUE(WIFEXITED(run.status)) << run.output;
    EXPECT_EQ(WEXITSTATUS(run.status), 0) << run.output;
    EXPECT_NE(run.output.find("[  PASSED  ] 1 test"), std::string::npos) << run.output;
    EXPECT_EQ(run.output.find("SKIPPED"), std::string::npos) << run.output;
#endif
}

// The io_uring suite where io_uring is refused: its main (test_main.cpp) exits
// 77, meson's skip code, with the reason, and runs no test.
TEST(IoUringRefused, SuiteOnItExitsSkippedWithTheReason) {
    if (backend_name() != "io_uring") GTEST_SKIP() << "runs once, in the io_uring suite";
#ifndef __NR_io_uring_setup
    GTEST_SKIP() << "no io_uring_setup system call number here";
#else
    const ChildRun run = run_self_without_io_uring("*", "io_uring");
    ASSERT_TRUE(run.finished) << "child hung:\n" << run.output;
    ASSERT_TRUE(WIFEXITED(run.status)) << run.output;
    EXPECT_EQ(WEXITSTATUS(run.status), 77) << run.output;
    EXPECT_NE(run.output.find("evmux tests: backend io_uring unusable here: io_uring_setup: "
                              "Operation not permitted; skipping the whole suite (exit 77)"),
              std::string::npos)
        << run.output;
    EXPECT_EQ(run.output.find("[ RUN"), std::string::npos) << run.output;
#endif
}
