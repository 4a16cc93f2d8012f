// Fuzz target: a Connection's outgoing message queue against a socket whose
// send()/sendmsg() return what the input says: partial writes of any length,
// EAGAIN, EINTR, EPIPE.
//
// Connection has no writer seam, so this program interposes send() and
// sendmsg() (its definitions win over libc's for the whole executable) and
// fakes results for the one socket under test; a partial write really sends
// that many bytes, so the peer can check the stream.
//
// Checked after every step and at the end:
//  - the peer receives exactly a prefix of the bytes given to send(), in
//    order, nothing lost, doubled or reordered; bytes_out() is that count;
//  - queued_bytes() == bytes accepted by send() - bytes_out();
//  - after EPIPE the connection closes with `reset`, on_close runs exactly
//    once, and later sends are no-ops;
//  - without an error, once the fake stops interfering everything queued is
//    delivered.
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "fuzz_input.hpp"

using namespace evmux;
using namespace std::chrono_literals;

namespace {

using fuzz::Input;

[[noreturn]] void fail(const char* what, unsigned long long a = 0, unsigned long long b = 0) {
    std::fprintf(stderr, "queue_fuzz: %s (%llu, %llu)\n", what, a, b);
    std::abort();
}

// The fake's state: which fd it fakes, and the input that decides.
int g_fake_fd = -1;
Input* g_in = nullptr;
int g_eintr_run = 0;   // consecutive EINTRs: bounded, the queue retries at once
bool g_epipe = false;  // an EPIPE was returned

ssize_t real_sendmsg(int fd, const msghdr* msg, int flags) {
    return ::syscall(SYS_sendmsg, fd, msg, flags);
}

// How many of `len` bytes the fake lets through; -1 with errno for an error.
ssize_t decide(std::size_t len) {
    if (!g_in || g_in->done()) return static_cast<ssize_t>(len);
    const std::uint8_t b = g_in->next();
    switch (b % 8) {
        case 0:
            errno = EAGAIN;
            return -1;
        case 1:
            if (++g_eintr_run > 3) break;
            errno = EINTR;
            return -1;
        case 2:
            if (b < 200) break;  // rarely: the peer is gone
            g_epipe = true;
            errno = EPIPE;
            return -1;
        case 3:
        case 4:
            return static_cast<ssize_t>(len == 0 ? 0 : 1 + g_in->next() % len);
        default:
            break;
    }
    g_eintr_run = 0;
    return static_cast<ssize_t>(len);
}

// sendmsg of at most `limit` bytes of `msg`.
ssize_t sendmsg_limited(int fd, const msghdr* msg, int flags, std::size_t limit) {
    std::vector<iovec> iov;
    for (std::size_t i = 0; i < msg->msg_iovlen && limit > 0; ++i) {
        iovec v = msg->msg_iov[i];
        if (v.iov_len > limit) v.iov_len = limit;
        limit -= v.iov_len;
        iov.push_back(v);
    }
    msghdr m = *msg;
    m.msg_iov = iov.data();
    m.msg_iovlen = iov.size();
    return real_sendmsg(fd, &m, flags);
}

}  // namespace

// ---- the interposed calls -------------------------------------------------------

extern "C" ssize_t sendmsg(int fd, const msghdr* msg, int flags) {
    if (fd != g_fake_fd) return real_sendmsg(fd, msg, flags);
    std::size_t total = 0;
    for (std::size_t i = 0; i < msg->msg_iovlen; ++i) total += msg->msg_iov[i].iov_len;
    const ssize_t allow = decide(total);
    if (allow < 0) return -1;
    return sendmsg_limited(fd, msg, flags, static_cast<std::size_t>(allow));
}

extern "C" ssize_t send(int fd, const void* buf, std::size_t len, int flags) {
    iovec v{const_cast<void*>(buf), len};
    msghdr m{};
    m.msg_iov = &v;
    m.msg_iovlen = 1;
    return sendmsg(fd, &m, flags);
}

namespace {

// Byte `i` of the stream given to send(): position-dependent, so a lost,
// doubled or reordered byte shows.
char stream_byte(std::uint64_t i) {
    return static_cast<char>((i * 7 + i / 251 + 3) & 0xff);
}

struct Run {
    EventLoop loop;
    ConnectionPtr conn;
    int peer = -1;
    std::uint64_t accepted = 0;  // bytes given to send() while it could accept them
    std::uint64_t received = 0;  // bytes the peer read, all checked
    int closes = 0;
    CloseReason reason = CloseReason::local;

    Run() : loop(make_selector("epoll")) {}
    ~Run() {
        if (conn) conn->close();
        for (int i = 0; i < 4; ++i) loop.run_once(0ns);  // deliver on_close
        conn.reset();
        if (peer >= 0) ::close(peer);
    }

    void start() {
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
            fail("socketpair");
        int small = 4096;  // small buffers: the kernel takes partial writes too
        ::setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
        ::setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
        peer = sv[1];
        Callbacks cb;
        cb.on_close = [this](const ConnectionPtr&, CloseReason r, int) {
            ++closes;
            reason = r;
        };
        ConnectionOptions opt;
        opt.max_buffered = 1 << 20;
        opt.high_water = 64 * 1024;
        opt.low_water = 16 * 1024;
        g_fake_fd = sv[0];
        conn = Connection::adopt(loop, sv[0], std::move(cb), opt);
    }

    void send(std::size_t len, bool as_string) {
        std::string bytes(len, '\0');
        for (std::size_t i = 0; i < len; ++i) bytes[i] = stream_byte(accepted + i);
        // What a send added to the stream: what went out at once plus what
        // was queued. Zero for a no-op (closed, closing, shut down); after a
        // close in the call (overflow) only what went out counts, the queue
        // being dropped.
        const bool was_open = conn->is_open();
        const std::uint64_t out0 = conn->bytes_out();
        const std::uint64_t queued0 = conn->queued_bytes();
        if (as_string)
            conn->send(std::move(bytes));
        else
            conn->send(bytes.data(), bytes.size());
        std::uint64_t added = conn->bytes_out() - out0;
        if (conn->is_open()) added += conn->queued_bytes() - queued0;
        if (added != 0 && added != len && conn->is_open())
            fail("send took part of the bytes", added, len);
        if (!was_open && added != 0) fail("send on a closed connection did something");
        accepted += added;
    }

    void drain_peer() {
        char buf[8192];
        for (int i = 0; i < 256; ++i) {
            ssize_t n = ::recv(peer, buf, sizeof buf, 0);
            if (n <= 0) return;
            for (ssize_t k = 0; k < n; ++k)
                if (buf[k] != stream_byte(received + k))
                    fail("peer got a wrong byte at", received + k, accepted);
            received += static_cast<std::uint64_t>(n);
        }
    }

    void check() {
        if (received > accepted) fail("peer got more than was sent", received, accepted);
        if (conn->bytes_out() < received) fail("bytes_out below what arrived");
        if (conn->bytes_out() > accepted) fail("bytes_out above what was sent");
        if (conn->is_open() && conn->queued_bytes() != accepted - conn->bytes_out())
            fail("queued_bytes != accepted - bytes_out", conn->queued_bytes(),
                 accepted - conn->bytes_out());
        if (closes > 1) fail("on_close ran twice");
        if (closes == 1 && conn->is_open()) fail("on_close for an open connection");
    }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    Input in{data, size};
    g_in = nullptr;  // the connection's setup is not faked
    g_eintr_run = 0;
    g_epipe = false;
    Run run;
    run.start();
    g_in = &in;
    bool closed_gracefully = false;
    for (int step = 0; step < 300 && !in.done(); ++step) {
        const std::uint8_t op = in.next();
        switch (op % 8) {
            case 0:
            case 1:
            case 2: {
                // Mostly small sends; sometimes up to 64 KiB.
                std::size_t len = 1 + in.next();
                if (op & 0x80) len *= 1 + in.next() % 256;
                run.send(len, op & 0x40);
                break;
            }
            case 3:
            case 4:
                run.loop.run_once(0ns);
                break;
            case 5:
                run.drain_peer();
                break;
            case 6:
                if ((op & 0xf0) == 0xf0 && !closed_gracefully) {
                    run.conn->close(CloseMode::graceful);
                    closed_gracefully = true;
                }
                break;
            case 7:
                run.drain_peer();
                run.loop.run_once(0ns);
                break;
        }
        run.check();
    }
    // The fake stops interfering: whatever was accepted must now arrive,
    // unless the connection failed (then a prefix arrived, and on_close ran).
    g_in = nullptr;
    for (int i = 0; i < 2000 && run.received < run.accepted && run.conn->is_open(); ++i) {
        run.loop.run_once(0ns);
        run.drain_peer();
        run.check();
    }
    for (int i = 0; i < 4; ++i) run.loop.run_once(0ns);
    run.drain_peer();
    run.check();
    if (run.conn->is_open() && run.received != run.accepted)
        fail("open connection did not deliver everything", run.received, run.accepted);
    if (!run.conn->is_open() && run.closes != 1) fail("closed without exactly one on_close");
    // Nothing but the injected EPIPE, the graceful close or the cap may close it
    // (EINTR, EAGAIN and partial writes are no reason to).
    if (run.closes == 1 && !(run.reason == CloseReason::reset && g_epipe) &&
        !(run.reason == CloseReason::local && closed_gracefully) &&
        run.reason != CloseReason::overflow)
        fail("closed for no reason", static_cast<int>(run.reason), g_epipe);
    if (g_epipe && (run.closes != 1 || run.reason != CloseReason::reset))
        fail("EPIPE did not close with reason reset", run.closes, static_cast<int>(run.reason));
    if (closed_gracefully && run.closes == 1 && run.reason == CloseReason::local &&
        run.received != run.accepted)
        fail("graceful close dropped queued bytes", run.received, run.accepted);
    g_fake_fd = -1;
    return 0;
}
