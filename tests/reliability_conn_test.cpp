// Reliability of Connection and TcpServer, run once per backend
// (EVMUX_BACKEND), on real loopback sockets. The numbers are the failure list
// in README.md ("Reliability"); the cases connection_test.cpp already covers
// (EMFILE on accept, same-batch close and reuse, reset with queued data,
// half-close, max_connections, idle timeout, cancel while connecting) are not
// repeated here.
//  3. fd churn: RLIMIT_NOFILE 64 and 5 000 sequential 1-byte echo connections.
//  7. a callback closes its own connection while a write or error event of the
//     same wake-up is pending: no further callback, on_close once.
// 13. fairness: one flooding connection beside 100 ping-pong ones.
// 17. write-queue order across many sends, and 100 MB through one connection
//     (byte count and checksum). EVMUX_RELIABILITY_MB overrides the size;
//     sanitizer builds default to 16 MB.
// 18. (connection half) a loop destroyed with open connections: no leak.
// Everything is pumped on the test thread (run_once), except the churn test's
// blocking client thread.
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "evmux/address.hpp"
#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/server.hpp"
#include "test_support.hpp"

using namespace evmux;
using namespace evmux::test;
using namespace std::chrono_literals;

namespace {

using Clock = std::chrono::steady_clock;

// A blocking client socket connected to `a`, 10 s timeouts so a broken server
// fails the test instead of hanging it.
Fd dial(const Address& a) {
    Fd fd(::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) return fd;
    timeval tv{10, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (::connect(fd.get(), static_cast<const sockaddr*>(a.sockaddr_ptr()), a.sockaddr_len()) == 0)
        return fd;
    // EINTR without any signal happens on the io_uring backend's thread (its
    // task work interrupts a blocking connect that has a timeout); the connect
    // goes on in the background: wait for it (bounded).
    if (errno != EINTR) return Fd();
    for (int i = 0; i < 100; ++i) {
        pollfd p{fd.get(), POLLOUT, 0};
        int n = ::poll(&p, 1, 100);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) continue;
        int err = 0;
        socklen_t len = sizeof err;
        ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) {
            errno = err;
            return Fd();
        }
        return fd;
    }
    return Fd();
}

Callbacks echo() {
    Callbacks cb;
    cb.on_message = [](const ConnectionPtr& c, Buffer& in) {
        c->send(in.data(), in.size());
        in.consume_all();
    };
    return cb;
}

// Sets RLIMIT_NOFILE's soft limit for the scope.
class FdLimit {
  public:
    explicit FdLimit(rlim_t soft) {
        ::getrlimit(RLIMIT_NOFILE, &old_);
        rlimit rl = old_;
        rl.rlim_cur = soft;
        ok_ = ::setrlimit(RLIMIT_NOFILE, &rl) == 0;
    }
    ~FdLimit() { ::setrlimit(RLIMIT_NOFILE, &old_); }
    bool ok() const { return ok_; }

  private:
    rlimit old_{};
    bool ok_ = false;
};

bool sanitized() {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    return true;
#else
    return false;
#endif
}

}  // namespace

// ---- 3. fd churn under a low fd limit ------------------------------------------

TEST(ReliabilityConn, FdChurnUnderLowLimit) {
    EVMUX_LOOP_OR_SKIP(loop);
    constexpr int connection_count = 5000;
    TcpServer server(loop, Address::ip("127.0.0.1", 0), echo());
    const Address addr = server.local_address();
    // Only now the limit: the test binary and the loop already hold their fds.
    if (open_fds() > 40) GTEST_SKIP() << "too many fds open already for a limit of 64";
    const std::size_t fds_before = open_fds();
    FdLimit limit(64);
    ASSERT_TRUE(limit.ok());
    std::atomic<int> done{0}, failures{0};
    std::thread client([&] {
        for (int i = 0; i < connection_count && failures < 10; ++i) {
            Fd fd = dial(addr);
            char c = static_cast<char>('a' + i % 26), back = 0;
            if (!fd || ::send(fd.get(), &c, 1, MSG_NOSIGNAL) != 1 ||
                ::recv(fd.get(), &back, 1, 0) != 1 || back != c) {
                ++failures;
                continue;
            }
            ++done;
        }
    });
    const bool finished = run_until(
        loop, [&] { return done + failures >= connection_count || failures >= 10; }, 120s);
    client.join();
    EXPECT_TRUE(finished);
    EXPECT_EQ(failures.load(), 0);
    EXPECT_EQ(done.load(), connection_count);
    // Every server-side connection goes away once its client has closed.
    EXPECT_TRUE(run_until(
        loop, [&] { return server.stats().connections_now == 0; }, 10s))
        << server.stats().connections_now << " still open";
    EXPECT_EQ(server.stats().connections_total, static_cast<std::uint64_t>(connection_count));
    EXPECT_EQ(server.stats().rejected, 0u);
    // (Under completion I/O the last sockets' close requests go out with the
    // next wait.)
    EXPECT_TRUE(run_until(
        loop, [&] { return open_fds() <= fds_before; }, 5s))
        << open_fds() << " fds open, " << fds_before << " before: fds leaked";
}

// ---- 7. closing one's own connection with another event pending ---------------------

namespace {

// A server on the test thread with one accepted connection, and its raw client.
struct OnePair {
    std::unique_ptr<TcpServer> server;
    ConnectionPtr conn;
    Fd client;
};

OnePair one_pair(EventLoop& loop, Callbacks cb, ServerOptions opt = {}) {
    OnePair p;
    auto user_connect = cb.on_connect;
    cb.on_connect = [&p, user_connect](const ConnectionPtr& c) {
        p.conn = c;
        if (user_connect) user_connect(c);
    };
    p.server = std::make_unique<TcpServer>(loop, Address::ip("127.0.0.1", 0), std::move(cb), opt);
    p.client = dial(p.server->local_address());
    EXPECT_TRUE(p.client);
    EXPECT_TRUE(run_until(loop, [&] { return p.conn != nullptr; }));
    return p;
}

// Fixed, small socket buffers between the server's connection and the
// client: with loopback autotuning (up to 4 MiB send + 6 MiB receive) the
// kernel could take a whole multi-MiB reply, and the queue would drain.
bool small_socket_buffers(const OnePair& p) {
    const int small = 64 << 10;
    return ::setsockopt(p.conn->fd(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small) == 0 &&
           ::setsockopt(p.client.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small) == 0;
}

// Counts every callback of a connection, and those after on_close.
struct Recorder {
    int messages = 0, drains = 0, closes = 0, after_close = 0;
    CloseReason reason = CloseReason::local;
    void note() {
        if (closes) ++after_close;
    }
};

// The two CloseSelf tests' start: a server connection that answers the
// client's first byte with `big` (queued: small socket buffers, and water
// marks too high for reading to pause, so a later read and write can arrive
// in one wake-up) and closes itself on the next message. `rec` counts its
// callbacks; `rec` and `big` must outlive the connection.
OnePair queued_reply_then_close_self(EventLoop& loop, Recorder& rec, const std::string& big) {
    Callbacks cb;
    cb.on_message = [&](const ConnectionPtr& c, Buffer& in) {
        rec.note();
        ++rec.messages;
        in.consume_all();
        if (rec.messages == 1)
            c->send(big);  // more than the socket buffers take: queued
        else
            c->close();
    };
    cb.on_drain = [&](const ConnectionPtr&) {
        rec.note();
        ++rec.drains;
    };
    cb.on_close = [&](const ConnectionPtr&, CloseReason r, int) {
        rec.note();
        ++rec.closes;
        rec.reason = r;
    };
    ServerOptions opt;
    opt.connection.high_water = 32u << 20;
    opt.connection.low_water = 16u << 20;
    opt.connection.max_buffered = 64u << 20;
    OnePair p = one_pair(loop, cb, opt);
    if (!p.conn) return p;
    EXPECT_TRUE(small_socket_buffers(p));
    EXPECT_EQ(::send(p.client.get(), "a", 1, MSG_NOSIGNAL), 1);
    EXPECT_TRUE(run_until(loop, [&] { return rec.messages == 1; }));
    // Completion I/O: the reply's send request goes out with the next wait
    // (readiness wrote what the kernel took inside send()).
    if (loop.io_mode() == IoMode::completion) loop.run_once(0ms);
    return p;
}

}  // namespace

// The server's connection has a queue (the client is not reading) and write
// interest. In one wake-up the socket becomes readable (new data) and
// writable (the client drained); on_message closes the connection. The
// pending write must not be handled, on_drain must not run, on_close once.
TEST(ReliabilityConn, CloseSelfWithWritePending) {
    EVMUX_LOOP_OR_SKIP(loop);
    Recorder rec;
    const std::string big(4 << 20, 'x');
    auto p = queued_reply_then_close_self(loop, rec, big);
    ASSERT_TRUE(p.conn);
    ASSERT_EQ(rec.messages, 1);
    ASSERT_GT(p.conn->queued_bytes(), 0u) << "the queue must be non-empty for this test";
    // Without running the loop: free some socket space (not all 4 MiB), then
    // send more data.
    char buf[65536];
    std::size_t got = 0;
    for (int i = 0; i < 4; ++i) {
        ssize_t n = ::recv(p.client.get(), buf, sizeof buf, MSG_DONTWAIT);
        if (n <= 0) break;
        got += static_cast<std::size_t>(n);
    }
    ASSERT_GT(got, 0u);
    ASSERT_EQ(::send(p.client.get(), "b", 1, MSG_NOSIGNAL), 1);
    std::this_thread::sleep_for(5ms);  // loopback: both are already visible
    ASSERT_GT(p.conn->queued_bytes(), 0u);
    ASSERT_TRUE(run_until(loop, [&] { return rec.closes > 0; }));
    for (int i = 0; i < 5; ++i) loop.run_once(5ms);
    EXPECT_EQ(rec.messages, 2);
    EXPECT_EQ(rec.drains, 0);
    EXPECT_EQ(rec.closes, 1);
    EXPECT_EQ(rec.reason, CloseReason::local);
    EXPECT_EQ(rec.after_close, 0);
    EXPECT_FALSE(p.conn->is_open());
    EXPECT_EQ(p.conn->fd(), -1);
    p.conn->send("ignored");  // a no-op now
    EXPECT_EQ(p.conn->queued_bytes(), 0u);
}

// The same with an error pending: the client sends data and resets, so one
// wake-up carries read|error|hangup (and write: the queue is non-empty).
// on_message closes; the error must not produce a second on_close.
TEST(ReliabilityConn, CloseSelfWithErrorPending) {
    EVMUX_LOOP_OR_SKIP(loop);
    Recorder rec;
    const std::string big(4 << 20, 'y');
    auto p = queued_reply_then_close_self(loop, rec, big);
    ASSERT_TRUE(p.conn);
    ASSERT_EQ(rec.messages, 1);
    ASSERT_GT(p.conn->queued_bytes(), 0u);
    ASSERT_EQ(::send(p.client.get(), "b", 1, MSG_NOSIGNAL), 1);
    linger lg{1, 0};
    ASSERT_EQ(::setsockopt(p.client.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
    p.client.reset();  // RST (unread data pending on the client too)
    std::this_thread::sleep_for(5ms);
    ASSERT_TRUE(run_until(loop, [&] { return rec.closes > 0; }));
    for (int i = 0; i < 5; ++i) loop.run_once(5ms);
    EXPECT_EQ(rec.closes, 1);
    EXPECT_EQ(rec.after_close, 0);
    EXPECT_EQ(rec.drains, 0);
    // Either the data was read first (then our close() wins: local) or the
    // reset was seen first (reset, and no second message).
    if (rec.messages == 2)
        EXPECT_EQ(rec.reason, CloseReason::local);
    else
        EXPECT_EQ(rec.reason, CloseReason::reset);
    EXPECT_EQ(p.conn->queued_bytes(), 0u);
}

// ---- 13. fairness ------------------------------------------------------------------

// One client floods the echo server as fast as it can; 100 others play
// ping-pong, 20 rounds each. All of them finish while the flood goes on, and
// soon: see fair_within_ms.
TEST(ReliabilityConn, FloodDoesNotStarvePingPong) {
    EVMUX_LOOP_OR_SKIP(loop);
    TcpServer server(loop, Address::ip("127.0.0.1", 0), echo());
    const Address addr = server.local_address();
    constexpr int pinger_count = 100, round_count = 20;
    const std::size_t flood_chunk = 64 * 1024;
    const std::string chunk(flood_chunk, 'f');
    std::uint64_t flood_back = 0;
    bool flood_on = true;

    Callbacks flood;
    // Send until something is queued, so on_drain (which fires only for a
    // queue that was non-empty) keeps the flood going.
    auto more = [&](const ConnectionPtr& c) {
        for (int i = 0; i < 64 && flood_on && c->is_open() && c->queued_bytes() == 0; ++i)
            c->send(chunk);
    };
    ConnectionPtr flood_conn;
    flood.on_connect = [&](const ConnectionPtr& c) {
        flood_conn = c;
        more(c);
    };
    flood.on_drain = more;
    flood.on_message = [&](const ConnectionPtr&, Buffer& in) {
        flood_back += in.size();
        in.consume_all();
    };
    auto flooder = connect(loop, addr, flood);

    std::vector<int> rounds(pinger_count, 0);
    std::vector<ConnectionPtr> pinger_conns;
    int finished = 0;
    std::vector<std::shared_ptr<Connector>> pingers;
    for (int i = 0; i < pinger_count; ++i) {
        Callbacks cb;
        cb.on_connect = [&](const ConnectionPtr& c) {
            pinger_conns.push_back(c);
            c->send("p");
        };
        cb.on_message = [&, i](const ConnectionPtr& c, Buffer& in) {
            in.consume_all();
            if (++rounds[i] == round_count) {
                ++finished;
                c->close();
            } else {
                c->send("p");
            }
        };
        pingers.push_back(connect(loop, addr, cb));
    }
    // The 100 connects and 2 000 round trips beside the flood, measured on a
    // 2-core VM shared with other builds (load average 3-5), every backend,
    // 2-3 runs each: 28-114 ms one test at a time, 71-129 ms with two runs
    // side by side (as `meson test --num-processes 2`); ASan+UBSan debug
    // build: 37-107 ms alone, 46-168 ms side by side, 90-153 ms in
    // `./run sanitize --suite reliability_conn ...`. A 5x regression of the
    // loaded figures (~100 ms) fails; the worst seen has 2.4x headroom. (It
    // was 30 s.)
    constexpr double fair_within_ms = 400;
    const auto t0 = Clock::now();
    const bool all_done = run_until(
        loop, [&] { return finished == pinger_count; }, 30s);
    const auto took = std::chrono::duration<double, std::milli>(Clock::now() - t0);
    std::printf("flood: %d of %d pingers x %d rounds in %.1f ms beside %.1f MiB of flood (%s)\n",
                finished, pinger_count, round_count, took.count(),
                static_cast<double>(flood_back) / (1 << 20), backend_name().c_str());
    EXPECT_TRUE(all_done) << finished << " of " << pinger_count << " finished in 30 s";
    EXPECT_LE(took.count(), fair_within_ms) << "the ping-pong clients were slowed by the flood";
    EXPECT_GT(flood_back, 4 * flood_chunk) << "the flood did not flow";
    flood_on = false;
    // Close the clients before the loop goes, so their on_close runs.
    if (flood_conn) flood_conn->close();
    for (auto& c : pinger_conns) c->close();
    for (int i = 0; i < 3; ++i) loop.run_once(0ns);
}

// ---- 17. order across many sends; a large transfer ------------------------------------

// Many sends of varied sizes (1 B .. 1 MiB, both send() overloads) through one
// connection to a server that checks every byte's position and counts.
TEST(ReliabilityConn, LargeTransferOrderCountAndChecksum) {
    EVMUX_LOOP_OR_SKIP(loop);
    std::uint64_t total_mb = sanitized() ? 16 : 100;
    if (const char* env = std::getenv("EVMUX_RELIABILITY_MB"))
        total_mb = std::strtoull(env, nullptr, 10);
    const std::uint64_t total = total_mb << 20;

    // The stream repeats a pseudo-random block of prime length, so a byte's
    // value depends on its position (loss, doubling, reordering show) and
    // neither side generates bytes one at a time.
    constexpr std::size_t period = 65521;
    constexpr std::size_t max_send = 1 << 20;
    std::string block(period + max_send, '\0');
    std::uint32_t x = 12345;
    for (std::size_t i = 0; i < period; ++i) {
        x = x * 1103515245u + 12345u;
        block[i] = static_cast<char>(x >> 24);
    }
    for (std::size_t i = period; i < block.size(); ++i) block[i] = block[i - period];
    auto fnv = [](std::uint64_t h, const char* p, std::size_t n) {
        for (std::size_t i = 0; i < n; ++i)
            h = (h ^ static_cast<unsigned char>(p[i])) * 1099511628211ull;
        return h;
    };

    std::uint64_t received = 0, sum_in = 14695981039346656037ull, sum_out = sum_in, bad = 0;
    Callbacks server_cb;
    server_cb.on_message = [&](const ConnectionPtr&, Buffer& in) {
        const char* d = in.data();
        std::size_t n = in.size();
        sum_in = fnv(sum_in, d, n);
        while (n > 0) {
            const std::size_t k = std::min(n, max_send);
            if (std::memcmp(d, block.data() + received % period, k) != 0) ++bad;
            d += k;
            n -= k;
            received += k;
        }
        in.consume_all();
    };
    TcpServer server(loop, Address::ip("127.0.0.1", 0), server_cb);

    std::uint64_t sent = 0;
    std::size_t which = 0;
    const std::size_t sizes[] = {1, 7, 100, 1500, 4096, 65536, 3, max_send, 17, 250000};
    ConnectionPtr client;
    auto fill = [&](const ConnectionPtr& c) {
        // Keep about 2 MiB queued: many sends, queue order matters.
        while (sent < total && c->queued_bytes() < (2u << 20) && c->is_open()) {
            const std::size_t n = static_cast<std::size_t>(
                std::min<std::uint64_t>(sizes[which++ % std::size(sizes)], total - sent));
            const char* p = block.data() + sent % period;
            sum_out = fnv(sum_out, p, n);
            if (which % 2)
                c->send(std::string(p, n));
            else
                c->send(p, n);
            sent += n;
        }
    };
    Callbacks cb;
    cb.on_connect = [&](const ConnectionPtr& c) {
        client = c;
        fill(c);
    };
    cb.on_drain = fill;
    ConnectOptions copt;
    copt.connection.max_buffered = 64u << 20;
    connect(loop, server.local_address(), cb, copt);
    ASSERT_TRUE(run_until(
        loop, [&] { return received >= total; }, 120s))
        << received << " of " << total;
    EXPECT_EQ(received, total);
    EXPECT_EQ(sent, total);
    EXPECT_EQ(bad, 0u);
    EXPECT_EQ(sum_in, sum_out);
    ASSERT_TRUE(client);
    EXPECT_EQ(client->bytes_out(), total);
    EXPECT_EQ(client->queued_bytes(), 0u);
    client->close();
    for (int i = 0; i < 3; ++i) loop.run_once(0ns);
}

// ---- 18. a loop destroyed with open connections ----------------------------------------

// Nobody but the loop holds the connections (as with a server's accepted
// ones after the server object is gone). Destroying the loop must free them
// and their fds: no leak (and LSan in the ASan build). The loop's watcher owns
// an open connection's reference, so ~EventLoop releases it.
TEST(ReliabilityConn, LoopDestroyedWithOpenConnections) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    std::vector<std::weak_ptr<Connection>> weak;
    std::vector<Fd> peers;
    int closes = 0;
    const std::size_t fds_before = open_fds();
    {
        EventLoop loop(std::move(sel));
        for (int i = 0; i < 8; ++i) {
            auto [a, b] = socket_pair();
            Callbacks cb;
            cb.on_close = [&](const ConnectionPtr&, CloseReason, int) { ++closes; };
            auto c = Connection::adopt(loop, a.release(), cb);
            c->send(std::string(1 << 20, 'q'));  // a queue too
            weak.push_back(c);
            peers.push_back(std::move(b));
        }
        loop.run_once(0ns);
    }
    int alive = 0;
    for (auto& w : weak) alive += !w.expired();
    EXPECT_EQ(alive, 0) << "connections outlived their loop (leaked)";
    peers.clear();
    EXPECT_LE(open_fds(), fds_before) << "connection fds leaked";
    (void)closes;  // on_close need not run: the loop is gone
}

// A connection open with nothing to watch (the peer shut down its side, the
// user keeps ours open, nothing queued) has no watcher to own it: the loop
// holds it instead, so destroying the loop frees it too.
TEST(ReliabilityConn, LoopDestroyedWithHalfOpenUnwatchedConnection) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    std::weak_ptr<Connection> weak;
    Fd peer;
    const std::size_t fds_before = open_fds();
    {
        EventLoop loop(std::move(sel));
        auto [a, b] = socket_pair();
        bool peer_shut = false;
        Callbacks cb;
        cb.on_peer_shutdown = [&](const ConnectionPtr&) { peer_shut = true; };  // stay half-open
        auto c = Connection::adopt(loop, a.release(), cb);
        weak = c;
        c.reset();
        peer = std::move(b);
        ASSERT_EQ(::shutdown(peer.get(), SHUT_WR), 0);
        ASSERT_TRUE(run_until(loop, [&] { return peer_shut; }));
        auto open = weak.lock();
        ASSERT_TRUE(open && open->is_open());
        EXPECT_FALSE(loop.watching(open->fd())) << "nothing to wait for, yet watched";
        open.reset();
        EXPECT_FALSE(weak.expired()) << "the loop must keep the open connection alive";
    }
    EXPECT_TRUE(weak.expired()) << "the half-open connection outlived its loop (leaked)";
    peer = Fd();
    EXPECT_LE(open_fds(), fds_before) << "connection fd leaked";
}

// ---- 10. a slow reader beside ping-pong clients -------------------------------------

namespace {

struct Latency {
    std::size_t n = 0;
    double p50 = 0, p90 = 0, p99 = 0, max = 0;  // ms
};

Latency latency_ms(std::vector<double> v) {
    Latency l;
    if (v.empty()) return l;
    std::sort(v.begin(), v.end());
    auto at = [&](std::size_t pct) { return v[std::min(v.size() - 1, v.size() * pct / 100)]; };
    l.n = v.size();
    l.p50 = at(50);
    l.p90 = at(90);
    l.p99 = at(99);
    l.max = v.back();
    return l;
}

}  // namespace

// Two clients that write a lot: one never reads, one reads 1 byte a second.
// The server's queue for each stays bounded (reading pauses at the high-water
// mark, once per connection), and 20 ping-pong clients on the same loop keep
// their round-trip p90 within 3x of what it was before, their p99 under
// 25 ms (see the bounds for why two).
TEST(ReliabilityConn, SlowReaderBoundedAndOthersUnaffected) {
    EVMUX_LOOP_OR_SKIP(loop);
    ServerOptions opt;  // default water marks: 64 KiB high, 16 KiB low, 16 MiB cap
    std::size_t max_queued = 0;
    int high_water = 0, closes = 0;
    Callbacks scb = echo();
    std::vector<ConnectionPtr> server_conns;
    scb.on_connect = [&](const ConnectionPtr& c) { server_conns.push_back(c); };
    scb.on_high_water = [&](const ConnectionPtr&, std::size_t) { ++high_water; };
    scb.on_close = [&](const ConnectionPtr&, CloseReason, int) { ++closes; };
    TcpServer server(loop, Address::ip("127.0.0.1", 0), scb, opt);
    const Address addr = server.local_address();

    constexpr int pinger_count = 20;
    std::vector<double> rtts;
    bool measuring = false;
    std::vector<Clock::time_point> sent_at(pinger_count);
    std::vector<ConnectionPtr> pingers;
    for (int i = 0; i < pinger_count; ++i) {
        Callbacks cb;
        cb.on_connect = [&, i](const ConnectionPtr& c) {
            pingers.push_back(c);
            sent_at[i] = Clock::now();
            c->send("p");
        };
        cb.on_message = [&, i](const ConnectionPtr& c, Buffer& in) {
            in.consume_all();
            const auto now = Clock::now();
            if (measuring)
                rtts.push_back(std::chrono::duration<double, std::milli>(now - sent_at[i]).count());
            sent_at[i] = now;
            c->send("p");
        };
        connect(loop, addr, cb);
    }
    ASSERT_TRUE(run_until(loop, [&] { return pingers.size() == pinger_count; }));
    auto phase = [&](std::chrono::milliseconds span, auto&& tick) {
        rtts.clear();
        measuring = true;
        const auto end = Clock::now() + span;
        auto next_tick = Clock::now();
        while (Clock::now() < end) {
            loop.run_once(1ms);
            if (Clock::now() >= next_tick) {
                tick();
                next_tick += 10ms;
            }
        }
        measuring = false;
        return latency_ms(rtts);
    };
    const Latency before = phase(300ms, [] {});
    ASSERT_GT(before.n, 100u);

    Fd never = dial(addr);
    ASSERT_TRUE(never) << "connect: " << std::strerror(errno);
    Fd slow = dial(addr);
    ASSERT_TRUE(slow) << "connect: " << std::strerror(errno);
    int small = 4096;
    for (int fd : {never.get(), slow.get()})
        ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    std::uint64_t pushed = 0;
    int slow_reads = 0;
    auto next_read = Clock::now() + 1s;
    const std::string blob(64 * 1024, 's');
    const Latency during = phase(2500ms, [&] {
        for (int fd : {never.get(), slow.get()}) {
            for (int i = 0; i < 16; ++i) {
                ssize_t n = ::send(fd, blob.data(), blob.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
                if (n <= 0) break;
                pushed += static_cast<std::uint64_t>(n);
            }
        }
        if (Clock::now() >= next_read) {  // 1 byte a second
            char b;
            if (::recv(slow.get(), &b, 1, MSG_DONTWAIT) == 1) ++slow_reads;
            next_read += 1s;
        }
        for (auto& c : server_conns) max_queued = std::max(max_queued, c->queued_bytes());
    });
    // Memory: whatever the two pushed, the server's queue for each stays near
    // the high-water mark (one read's worth above it at most).
    EXPECT_LE(max_queued, opt.connection.high_water + opt.connection.read_budget);
    EXPECT_GT(max_queued, opt.connection.high_water / 2) << "the queue never filled";
    EXPECT_GT(pushed, 1u << 20) << "the two clients did not push enough to matter";
    EXPECT_GE(slow_reads, 2) << "the slow client should have read a byte a second";
    EXPECT_EQ(high_water, 2) << "high water should fire once per slow client";
    EXPECT_EQ(closes, 0) << "backpressure, not overflow, should hold it";
    EXPECT_GT(during.n, 100u) << "ping-pong stalled";
    for (const auto& [name, l] : {std::pair{"before", before}, std::pair{"during", during}})
        std::printf(
            "slow reader: %s: %zu round trips, p50 %.3f p90 %.3f p99 %.3f max %.3f ms (%s)\n", name,
            l.n, l.p50, l.p90, l.p99, l.max, backend_name().c_str());
    // Measured on a 2-core VM shared with other builds (load average 3-5),
    // every backend, 2-3 runs each, plain and ASan+UBSan debug builds, one
    // run at a time and two side by side: p50 0.19-0.28 ms and p90 0.20-0.39
    // ms in both phases, the p90 during at most 1.3x the p90 before. The p99
    // is the scheduler's, not evmux's: 0.25-0.9 ms on a quiet machine, else
    // one or two 4 ms timer ticks (CONFIG_HZ 250) of being preempted: 4.3 or
    // 8.3 ms, at most 9.5 ms during (in `./run sanitize`; 16 ms once before,
    // ASan). So the p90 ratio is what a slowdown by the slow readers moves
    // (5x fails, 2.3x headroom), and the p99 bound is tick-sized: a 5x
    // regression of the loaded 8.3 ms fails, 2.6x headroom over the worst
    // seen. (It was p99
    // within 10x of the p99 before with a 5 ms floor: any p99 under 50 ms.)
    EXPECT_LE(during.p90, 3 * before.p90)
        << "p90 before " << before.p90 << " ms, during " << during.p90 << " ms";
    EXPECT_LE(during.p99, 25.0) << "p99 before " << before.p99 << " ms, during " << during.p99
                                << " ms";
    for (auto& c : pingers) c->close();
    for (int i = 0; i < 3; ++i) loop.run_once(0ns);
}

// ---- 19. max_connections and the idle timeout against slow-loris clients ----------------

// Five clients each trickle one byte every 50 ms: they are not idle, so the
// idle timeout (300 ms) keeps them, and with max_connections 5 a sixth client
// is turned away (it sees the close at once, and is counted). When the
// trickle stops, the idle timeout frees the slots and a new client is served.
TEST(ReliabilityConn, SlowLorisHoldsSlotsUntilIdle) {
    EVMUX_LOOP_OR_SKIP(loop);
    ServerOptions opt;
    opt.max_connections = 5;
    opt.idle_timeout = 300ms;
    int timeouts = 0;
    Callbacks cb = echo();
    cb.on_close = [&](const ConnectionPtr&, CloseReason r, int) {
        timeouts += r == CloseReason::timeout;
    };
    TcpServer server(loop, Address::ip("127.0.0.1", 0), cb, opt);
    const Address addr = server.local_address();
    std::vector<Fd> loris;
    for (int i = 0; i < 5; ++i) {
        loris.push_back(dial(addr));
        ASSERT_TRUE(loris.back());
    }
    ASSERT_TRUE(run_until(loop, [&] { return server.stats().connections_now == 5; }));
    auto trickle_for = [&](std::chrono::milliseconds span) {
        const auto end = Clock::now() + span;
        auto next = Clock::now();
        while (Clock::now() < end) {
            loop.run_once(5ms);
            if (Clock::now() < next) continue;
            next += 50ms;
            char buf[64];
            for (auto& l : loris) {
                (void)::send(l.get(), "x", 1, MSG_NOSIGNAL | MSG_DONTWAIT);
                (void)::recv(l.get(), buf, sizeof buf, MSG_DONTWAIT);
            }
        }
    };
    trickle_for(200ms);
    Fd sixth = dial(addr);
    ASSERT_TRUE(sixth);
    // The sixth is accepted and closed: EOF (or reset) within the trickle.
    bool turned_away = false;
    for (int i = 0; i < 40 && !turned_away; ++i) {
        trickle_for(25ms);
        char b;
        ssize_t n = ::recv(sixth.get(), &b, 1, MSG_DONTWAIT);
        turned_away = n == 0 || (n < 0 && errno == ECONNRESET);
    }
    EXPECT_TRUE(turned_away);
    EXPECT_GE(server.stats().rejected, 1u);
    trickle_for(400ms);  // longer than the idle timeout: still held, being active
    EXPECT_EQ(server.stats().connections_now, 5u);
    EXPECT_EQ(timeouts, 0);
    // The trickle stops: all five time out (within 300 ms + a quarter + slack).
    EXPECT_TRUE(run_until(
        loop, [&] { return timeouts == 5; }, 3s))
        << timeouts << " timed out";
    EXPECT_EQ(server.stats().connections_now, 0u);
    Fd fresh = dial(addr);
    ASSERT_TRUE(fresh);
    ASSERT_EQ(::send(fresh.get(), "ok", 2, MSG_NOSIGNAL), 2);
    std::string got;
    EXPECT_TRUE(run_until(loop, [&] {
        char b[8];
        ssize_t n = ::recv(fresh.get(), b, sizeof b, MSG_DONTWAIT);
        if (n > 0) got.append(b, static_cast<std::size_t>(n));
        return got == "ok";
    }));
}
