// LoopGroup and TcpServer over a LoopGroup on real loopback and Unix sockets, run once per
// backend (EVMUX_BACKEND). The group's loops run on their own threads; the
// clients are blocking sockets on the test thread, each read bounded by
// SO_RCVTIMEO so a broken server fails the test instead of hanging it.
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <future>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "evmux/address.hpp"
#include "evmux/connection.hpp"
#include "evmux/loop_group.hpp"
#include "test_support.hpp"

namespace evmux {
namespace {

using namespace std::chrono_literals;
using test::Fd;

constexpr std::size_t reply_chunk = 64 * 1024;

// A blocking client socket connected to `address`, reads bounded by 5 s.
Fd connect_blocking(const Address& address, int rcvbuf = 0) {
    Fd fd(::socket(address.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) throw std::system_error(errno, std::generic_category(), "socket");
    // Before connect, so the window is small from the start.
    if (rcvbuf > 0) ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    // The timeouts only after connect: a connect with SO_SNDTIMEO fails with
    // EINTR when kernel task work interrupts it, where an untimed connect is
    // restarted. Seen with io_uring only, after an earlier group (whose rings
    // are closed on this thread by ~LoopGroup) was destroyed.
    if (::connect(fd.get(), static_cast<const sockaddr*>(address.sockaddr_ptr()),
                  address.sockaddr_len()) < 0)
        throw std::system_error(errno, std::generic_category(), "connect");
    timeval tv{5, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

void send_all(int fd, const std::string& s) {
    std::size_t off = 0;
    while (off < s.size()) {
        ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        ASSERT_GT(n, 0) << std::strerror(errno);
        off += static_cast<std::size_t>(n);
    }
}

// Read exactly `n` bytes (fewer on EOF, error or the 5 s receive timeout).
std::string read_n(int fd, std::size_t n) {
    std::string out;
    char buf[4096];
    while (out.size() < n) {
        ssize_t r = ::recv(fd, buf, std::min(sizeof buf, n - out.size()), 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        out.append(buf, static_cast<std::size_t>(r));
    }
    return out;
}

// Read until EOF, an error or `limit` bytes; *err gets errno of a failed read.
std::string read_to_eof(int fd, std::size_t limit, int* err) {
    std::string out;
    char buf[16384];
    *err = 0;
    while (out.size() < limit) {
        ssize_t r = ::recv(fd, buf, sizeof buf, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) *err = errno;
        if (r <= 0) break;
        out.append(buf, static_cast<std::size_t>(r));
    }
    return out;
}

// Echo server callbacks that also record which loop thread served each message.
struct EchoRecorder {
    std::mutex mutex;
    std::set<std::thread::id> threads;
    std::atomic<int> wrong_thread{0};
    std::atomic<int> closed{0};

    Callbacks callbacks() {
        Callbacks cb;
        cb.on_message = [this](const ConnectionPtr& conn, Buffer& in) {
            if (!conn->loop().in_loop_thread()) ++wrong_thread;
            {
                std::lock_guard lock(mutex);
                threads.insert(std::this_thread::get_id());
            }
            conn->send(in.data(), in.size());
            in.consume_all();
        };
        cb.on_close = [this](const ConnectionPtr&, CloseReason, int) { ++closed; };
        return cb;
    }
};

class LoopGroupTest : public ::testing::TestWithParam<Distribution> {};

}  // namespace

// Test names and failure messages show "round_robin", not the enum's bytes.
void PrintTo(Distribution d, std::ostream* os) {
    *os << to_string(d);
}

namespace {

// Every connection is served, and more than one loop serves: with
// round_robin exactly evenly, with reuse_port as the kernel's hash spreads
// them (32 connections all hashed to one of 2 listeners: odds 2^-31).
TEST_P(LoopGroupTest, ServesEveryConnectionOnSeveralLoops) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    EchoRecorder rec;  // outlives the group: its loops call into it until joined
    LoopGroup group(2, test::backend_name());
    ServerOptions opt;
    opt.distribution = GetParam();
    TcpServer& server = group.listen(Address::ip("127.0.0.1", 0), rec.callbacks(), opt);
    ASSERT_EQ(server.distribution(), GetParam());
    ASSERT_NE(server.local_address().port(), 0);

    constexpr int n = 32;
    std::vector<Fd> clients;
    for (int i = 0; i < n; ++i) {
        clients.push_back(connect_blocking(server.local_address()));
        std::string msg = "hello " + std::to_string(i) + "\n";
        send_all(clients.back().get(), msg);
        ASSERT_EQ(read_n(clients.back().get(), msg.size()), msg) << "connection " << i;
    }
    // Every connection is registered before its first message is served.
    EXPECT_EQ(server.connections_total(), static_cast<std::uint64_t>(n));
    EXPECT_EQ(server.connections_now(), static_cast<std::size_t>(n));
    std::vector<std::uint64_t> per_loop = server.connections_per_loop();
    ASSERT_EQ(per_loop.size(), 2u);
    EXPECT_EQ(per_loop[0] + per_loop[1], static_cast<std::uint64_t>(n));
    if (GetParam() == Distribution::round_robin) {
        EXPECT_EQ(per_loop[0], static_cast<std::uint64_t>(n / 2));
        EXPECT_EQ(per_loop[1], static_cast<std::uint64_t>(n / 2));
    } else {
        EXPECT_GT(per_loop[0], 0u);
        EXPECT_GT(per_loop[1], 0u);
    }
    EXPECT_EQ(rec.wrong_thread.load(), 0);
    {
        std::lock_guard lock(rec.mutex);
        EXPECT_EQ(rec.threads.size(), 2u);
        EXPECT_EQ(rec.threads.count(std::this_thread::get_id()), 0u);
    }
    group.stop();
    // Idle connections are closed by stop(), each on_close run once.
    EXPECT_EQ(rec.closed.load(), n);
    EXPECT_EQ(server.connections_now(), 0u);
    for (auto& c : clients) {
        int err = 0;
        EXPECT_EQ(read_to_eof(c.get(), 1, &err), "");
        EXPECT_EQ(err, 0) << std::strerror(err);
    }
}

// The graceful stop: replies already queued (behind a small SO_SNDBUF and a
// client that has not read yet) all reach the client before the close.
TEST_P(LoopGroupTest, GracefulStopDeliversQueuedReplies) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    LoopGroup group(2, test::backend_name());
    std::atomic<std::size_t> queued{0};
    std::atomic<int> requests{0};
    Callbacks cb;
    cb.on_connect = [](const ConnectionPtr& conn) {
        int small = 4096;
        ::setsockopt(conn->fd(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    };
    // Each request byte asks for a 64 KiB reply, so the server's input is
    // fully read (no unread input to turn the close into a reset) while its
    // queue grows far beyond what the socket buffers hold.
    cb.on_message = [&](const ConnectionPtr& conn, Buffer& in) {
        for (std::size_t i = 0; i < in.size(); ++i) {
            conn->send(std::string(reply_chunk, static_cast<char>('a' + requests.load() % 26)));
            ++requests;
        }
        in.consume_all();
        queued.store(conn->queued_bytes());
    };
    ServerOptions opt;
    opt.distribution = GetParam();
    opt.connection.high_water = 8 * 1024 * 1024;
    TcpServer& server = group.listen(Address::ip("127.0.0.1", 0), cb, opt);

    constexpr int n_requests = 8;
    Fd client = connect_blocking(server.local_address(), 4096);
    send_all(client.get(), std::string(n_requests, 'r'));
    auto until = std::chrono::steady_clock::now() + 5s;
    while ((requests.load() < n_requests || queued.load() == 0) &&
           std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(1ms);
    ASSERT_EQ(requests.load(), n_requests);
    ASSERT_GT(queued.load(), 0u) << "the replies were not queued: the test proves nothing";

    std::thread stopper([&] { group.stop(10s); });
    int err = 0;
    std::string got = read_to_eof(client.get(), 2 * n_requests * reply_chunk, &err);
    stopper.join();
    EXPECT_EQ(err, 0) << std::strerror(err);
    ASSERT_EQ(got.size(), n_requests * reply_chunk);
    for (int i = 0; i < n_requests; ++i)
        EXPECT_EQ(got.find_first_not_of(static_cast<char>('a' + i % 26), i * reply_chunk),
                  i + 1 == n_requests ? std::string::npos : (i + 1) * reply_chunk)
            << "reply " << i;
    EXPECT_EQ(server.connections_now(), 0u);
}

// A graceful stop waits for the lingering closes too (see
// ConnectionOptions::linger), not only for the queues: when stop() returns
// the client has been sent everything, so input that comes after (the
// server's loops no longer read it) cannot make the group's destruction reset
// the socket and drop the end of the reply a slow client has not read yet.
TEST_P(LoopGroupTest, GracefulStopWaitsForLingeringCloses) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    auto group = std::make_unique<LoopGroup>(2, test::backend_name());
    std::atomic<bool> replied{false};
    Callbacks cb;
    cb.on_connect = [](const ConnectionPtr& conn) {  // the whole reply fits in the kernel
        int big = 1 << 20;
        ::setsockopt(conn->fd(), SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    };
    cb.on_message = [&](const ConnectionPtr& conn, Buffer& in) {
        in.consume_all();
        conn->send(std::string(2 * reply_chunk, 'q'));
        replied.store(true);
    };
    ServerOptions opt;
    opt.distribution = GetParam();
    TcpServer& server = group->listen(Address::ip("127.0.0.1", 0), cb, opt);
    Fd client = connect_blocking(server.local_address(), 4096);
    send_all(client.get(), "r");
    auto until = std::chrono::steady_clock::now() + 5s;
    while (!replied.load() && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(1ms);
    ASSERT_TRUE(replied.load());

    std::atomic<bool> stopped{false};
    std::atomic<bool> sent_more{false};
    std::thread stopper([&] {
        group->stop(10s);
        stopped.store(true);
        while (!sent_more.load()) std::this_thread::sleep_for(1ms);
        group.reset();  // the loops, and what they still hold, go
    });
    std::string got;
    int err = 0;
    char buf[4096];
    for (;;) {  // a slow reader: the end of the reply waits in the server's socket
        std::this_thread::sleep_for(3ms);
        if (stopped.load() && !sent_more.load()) {
            send_all(client.get(), "another request");
            sent_more.store(true);
        }
        const ssize_t n = ::recv(client.get(), buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) err = errno;
        if (n <= 0) break;
        got.append(buf, static_cast<std::size_t>(n));
    }
    sent_more.store(true);
    stopper.join();
    EXPECT_EQ(err, 0) << std::strerror(err);
    EXPECT_EQ(got.size(), 2 * reply_chunk) << "a reset dropped the end of the reply";
    EXPECT_EQ(got.find_first_not_of('q'), std::string::npos);
}

// A peer that never reads cannot hold stop() past its grace: the rest is
// closed at once and stop() returns.
TEST_P(LoopGroupTest, StopIsBoundedByGrace) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    LoopGroup group(2, test::backend_name());
    std::atomic<std::size_t> queued{0};
    std::atomic<int> closes{0};
    Callbacks cb;
    cb.on_message = [&](const ConnectionPtr& conn, Buffer& in) {
        in.consume_all();
        conn->send(std::string(4 * 1024 * 1024, 'z'));  // more than any socket buffer
        queued.store(conn->queued_bytes());
    };
    cb.on_close = [&](const ConnectionPtr&, CloseReason reason, int) {
        if (reason == CloseReason::local) ++closes;
    };
    ServerOptions opt;
    opt.distribution = GetParam();
    opt.connection.high_water = 8 * 1024 * 1024;
    TcpServer& server = group.listen(Address::ip("127.0.0.1", 0), cb, opt);
    Fd client = connect_blocking(server.local_address(), 4096);
    send_all(client.get(), "x");
    auto until = std::chrono::steady_clock::now() + 5s;
    while (queued.load() == 0 && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(1ms);
    ASSERT_GT(queued.load(), 0u);
    group.stop(50ms);  // would hang here (and the test time out) without the bound
    EXPECT_EQ(closes.load(), 1);
    EXPECT_EQ(server.connections_now(), 0u);
}

// Polls `done` every millisecond for up to 5 s; true once it holds.
template <class F>
bool eventually(F done) {
    const auto until = std::chrono::steady_clock::now() + 5s;
    while (!done()) {
        if (std::chrono::steady_clock::now() >= until) return false;
        std::this_thread::sleep_for(1ms);
    }
    return true;
}

// max_connections limits the whole group, not each loop: of n + k clients
// exactly n are served and k see EOF (and are counted as rejected); once some
// served ones close, new ones are served again.
// stop_accepting() from another thread: every loop closes its listener
// (after it, a task posted to each loop has run, so a connect is refused),
// and every connection already open is still served.
TEST_P(LoopGroupTest, StopAcceptingClosesEveryListenerAndKeepsServing) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    EchoRecorder rec;  // outlives the group: its loops call into it until joined
    LoopGroup group(2, test::backend_name());
    ServerOptions opt;
    opt.distribution = GetParam();
    TcpServer& server = group.listen(Address::ip("127.0.0.1", 0), rec.callbacks(), opt);
    constexpr int n = 8;
    std::vector<Fd> clients;
    for (int i = 0; i < n; ++i) {
        clients.push_back(connect_blocking(server.local_address()));
        send_all(clients.back().get(), "a");
        ASSERT_EQ(read_n(clients.back().get(), 1), "a");
    }
    EXPECT_TRUE(server.accepting());
    server.stop_accepting();
    EXPECT_FALSE(server.accepting());
    for (std::size_t i = 0; i < group.size(); ++i) {
        std::promise<void> ran;
        group.post(i, [&ran] { ran.set_value(); });
        ASSERT_EQ(ran.get_future().wait_for(5s), std::future_status::ready);
    }
    try {
        Fd late = connect_blocking(server.local_address());
        ADD_FAILURE() << "a client was accepted after stop_accepting()";
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code(), std::errc::connection_refused) << e.what();
    }
    for (int i = 0; i < n; ++i) {
        const std::string msg = "still served " + std::to_string(i);
        send_all(clients[i].get(), msg);
        EXPECT_EQ(read_n(clients[i].get(), msg.size()), msg);
    }
    EXPECT_EQ(server.connections_now(), static_cast<std::size_t>(n));
    clients.clear();
    const auto until = std::chrono::steady_clock::now() + 5s;
    while (server.connections_now() != 0 && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(1ms);
    EXPECT_EQ(server.connections_now(), 0u) << "the connections did not end with their clients";
    EXPECT_EQ(rec.closed.load(), n);
    EXPECT_EQ(server.connections_total(), static_cast<std::uint64_t>(n));
    group.stop();
}

TEST_P(LoopGroupTest, MaxConnectionsLimitsTheWholeGroup) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    EchoRecorder rec;  // outlives the group: its loops call into it until joined
    LoopGroup group(2, test::backend_name());
    ServerOptions opt;
    opt.distribution = GetParam();
    constexpr std::size_t n = 6, k = 3;
    opt.max_connections = n;
    TcpServer& server = group.listen(Address::ip("127.0.0.1", 0), rec.callbacks(), opt);

    auto served = [&](const Fd& c, const std::string& msg) {
        send_all(c.get(), msg);
        return read_n(c.get(), msg.size()) == msg;
    };
    auto sees_eof = [](const Fd& c) {
        int err = 0;
        return read_to_eof(c.get(), 1, &err).empty() && err == 0;
    };
    std::vector<Fd> clients;
    for (std::size_t i = 0; i < n; ++i) {
        clients.push_back(connect_blocking(server.local_address()));
        ASSERT_TRUE(served(clients.back(), "hi " + std::to_string(i))) << "client " << i;
    }
    EXPECT_EQ(server.connections_now(), n);
    if (GetParam() == Distribution::round_robin) {  // reuse_port: as the kernel hashes
        EXPECT_EQ(server.connections_per_loop(), (std::vector<std::uint64_t>{n / 2, n / 2}));
    }
    for (std::size_t i = 0; i < k; ++i) {
        // Nothing sent: the server closes an unread socket, so EOF, not a reset.
        Fd extra = connect_blocking(server.local_address());
        EXPECT_TRUE(sees_eof(extra)) << "extra client " << i << " was served";
    }
    // Counted just after the close the client saw.
    EXPECT_TRUE(eventually([&] { return server.stats().rejected == k; }))
        << server.stats().rejected;
    EXPECT_EQ(server.connections_now(), n);
    EXPECT_EQ(server.connections_total(), n);

    // Close two served clients: two new ones are served, the next is refused.
    clients[0].reset();
    clients[1].reset();
    ASSERT_TRUE(eventually([&] { return server.connections_now() == n - 2; }))
        << server.connections_now();
    for (int i = 0; i < 2; ++i) {
        clients.push_back(connect_blocking(server.local_address()));
        EXPECT_TRUE(served(clients.back(), "again " + std::to_string(i))) << "new client " << i;
    }
    Fd extra = connect_blocking(server.local_address());
    EXPECT_TRUE(sees_eof(extra));
    EXPECT_TRUE(eventually([&] { return server.stats().rejected == k + 1; }))
        << server.stats().rejected;
    ServerStats st = server.stats();
    EXPECT_EQ(st.connections_now, n);
    EXPECT_EQ(st.connections_total, n + 2);
    EXPECT_EQ(st.accept_errors, 0u);
    EXPECT_GE(st.accept_calls, n + 2 + k + 1);
    group.stop();
    EXPECT_EQ(rec.closed.load(), static_cast<int>(n + 2));
    EXPECT_EQ(server.connections_now(), 0u);
}

// The idle sweep runs on every loop: idle connections on both loops close
// with reason timeout, while one that keeps talking stays open.
TEST_P(LoopGroupTest, IdleTimeoutClosesIdleConnectionsOnEveryLoop) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    LoopGroup group(2, test::backend_name());
    std::mutex mutex;
    std::set<std::thread::id> timeout_threads;
    std::atomic<int> timeouts{0}, other_closes{0};
    Callbacks cb;
    cb.on_message = [](const ConnectionPtr& conn, Buffer& in) {
        conn->send(in.data(), in.size());
        in.consume_all();
    };
    cb.on_close = [&](const ConnectionPtr&, CloseReason reason, int) {
        if (reason != CloseReason::timeout) {
            ++other_closes;
            return;
        }
        std::lock_guard lock(mutex);
        timeout_threads.insert(std::this_thread::get_id());
        ++timeouts;
    };
    ServerOptions opt;
    opt.distribution = GetParam();
    opt.idle_timeout = 200ms;
    TcpServer& server = group.listen(Address::ip("127.0.0.1", 0), cb, opt);

    // round_robin puts the idle ones on both loops; the odds that reuse_port
    // hashes all 16 to one listener: 2^-15.
    const auto start = std::chrono::steady_clock::now();
    constexpr int idle_n = 16;
    std::vector<Fd> idle;
    for (int i = 0; i < idle_n; ++i) idle.push_back(connect_blocking(server.local_address()));
    Fd active = connect_blocking(server.local_address());
    // Talk every 20 ms until the idle ones are gone, and 300 ms more (longer
    // than the timeout since they went).
    auto until = std::chrono::steady_clock::now() + 10s;
    std::optional<std::chrono::steady_clock::time_point> all_closed;
    int pings = 0;
    while (std::chrono::steady_clock::now() < until) {
        send_all(active.get(), "p");
        ASSERT_EQ(read_n(active.get(), 1), "p") << "the active connection was closed";
        ++pings;
        if (!all_closed && timeouts.load() == idle_n) {
            all_closed = std::chrono::steady_clock::now();
            until = *all_closed + 300ms;
        }
        std::this_thread::sleep_for(20ms);
    }
    ASSERT_TRUE(all_closed) << timeouts.load() << " of " << idle_n << " closed for idleness";
    EXPECT_GE(*all_closed - start, 200ms) << "closed before the timeout";
    EXPECT_EQ(other_closes.load(), 0);
    {
        std::lock_guard lock(mutex);
        EXPECT_EQ(timeout_threads.size(), 2u) << "not every loop swept";
    }
    for (auto& c : idle) {
        int err = 0;
        EXPECT_EQ(read_to_eof(c.get(), 1, &err), "");
        EXPECT_EQ(err, 0) << std::strerror(err);
    }
    EXPECT_EQ(server.connections_now(), 1u);
    send_all(active.get(), "still here");
    EXPECT_EQ(read_n(active.get(), 10), "still here");
    group.stop();
    EXPECT_EQ(other_closes.load(), 1);  // the active one, by stop()
    EXPECT_EQ(timeouts.load(), idle_n);
}

// stats() from the test thread: the bytes of open and closed connections,
// equal to what the clients sent and received.
TEST_P(LoopGroupTest, StatsCountTheBytesOfOpenAndClosedConnections) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    LoopGroup group(2, test::backend_name());
    Callbacks cb;
    cb.on_message = [](const ConnectionPtr& conn, Buffer& in) {
        conn->send(in.data(), in.size());  // twice: bytes_out = 2 * bytes_in
        conn->send(in.data(), in.size());
        in.consume_all();
    };
    ServerOptions opt;
    opt.distribution = GetParam();
    TcpServer& server = group.listen(Address::ip("127.0.0.1", 0), cb, opt);

    constexpr int n = 8;
    std::uint64_t sent = 0, received = 0;
    std::vector<Fd> clients;
    for (int i = 0; i < n; ++i) {
        clients.push_back(connect_blocking(server.local_address()));
        std::string msg(1000 * static_cast<std::size_t>(i + 1), static_cast<char>('a' + i));
        send_all(clients.back().get(), msg);
        sent += msg.size();
        std::string got = read_n(clients.back().get(), 2 * msg.size());
        ASSERT_EQ(got, msg + msg) << "client " << i;
        received += got.size();
    }
    ServerStats open = server.stats();
    EXPECT_EQ(open.connections_now, static_cast<std::size_t>(n));
    EXPECT_EQ(open.connections_total, static_cast<std::uint64_t>(n));
    // The server counts a byte just after its send() or recv() returns, which
    // may be just after the client has it.
    EXPECT_TRUE(eventually([&] {
        const ServerStats s = server.stats();
        return s.bytes_in == sent && s.bytes_out == received;
    })) << "open connections' bytes count: "
        << server.stats().bytes_in << " of " << sent;
    clients.clear();
    ASSERT_TRUE(eventually([&] { return server.connections_now() == 0; }));
    ServerStats st = server.stats();
    EXPECT_EQ(st.bytes_in, sent);
    EXPECT_EQ(st.bytes_out, received);
    EXPECT_EQ(st.connections_total, static_cast<std::uint64_t>(n));
    EXPECT_EQ(st.rejected, 0u);
    EXPECT_EQ(st.accept_errors, 0u);
    EXPECT_GE(st.accept_calls, static_cast<std::uint64_t>(n));
    group.stop();
    EXPECT_EQ(server.stats().bytes_in, sent);
}

// Out of fds, every loop of a group sheds its pending connections (each
// client sees the end) as one loop does, and serving resumes once fds are
// back. With reuse_port every loop has its own listener and spare fd; while
// one gave its spare up for a moment another loop's accept4() could take the
// number, and that listener's clients then hung in its backlog as long as
// fds stayed short (failed before on the readiness backends, reuse_port:
// dozens of 110 clients hung in a round, in about half the runs).
// On completion I/O the kernel's accept requests take fds outside that
// lock, so a loop sheds there without an fd number (a direct descriptor of
// its ring); with the spare, another loop's request took its number and its
// clients hung (failed before with three busy CPU loops beside it: 3 of 60
// runs, 5-33 of 150 clients hung).
TEST_P(LoopGroupTest, OutOfFdsEveryLoopShedsItsPendingClients) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    LoopGroup group(2, test::backend_name());
    ServerOptions opt;
    opt.distribution = GetParam();
    // The second loop starts its acceptor (posted by listen()) only once the
    // first has taken every fd there is, as a busy machine can make it: its
    // spare fd must have been reserved by listen() already. (It was reserved
    // by the start; that loop had none and its clients hung.)
    std::atomic<bool> go[2] = {false, false};
    struct Release {  // whatever happens below: the group can stop
        std::atomic<bool>* go;
        ~Release() { go[0] = go[1] = true; }
    } release{go};
    for (std::size_t i = 0; i < 2; ++i)
        group.post(i, [flag = &go[i]] {
            while (!flag->load()) std::this_thread::sleep_for(1ms);
        });
    TcpServer& server = group.listen(Address::ip("127.0.0.1", 0), test::echo_callbacks(), opt);
    const Address addr = server.local_address();
    rlimit old{};
    ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &old), 0);
    constexpr int rounds = 4;
    constexpr int n = 150;
    for (int round = 0; round < rounds; ++round) {
        SCOPED_TRACE("round " + std::to_string(round));
        std::vector<Fd> clients;  // made before the limit falls
        std::vector<Fd> holes_taken;
        for (int i = 0; i < n; ++i)
            clients.emplace_back(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
        {
            // Room for about 40 connections of the server: the rest are shed.
            // Above every fd open (the loops' spares included: one above the
            // limit could not be given up and taken back, which never
            // happens unless the limit falls under it).
            int highest = 0;
            if (DIR* dir = ::opendir("/proc/self/fd")) {
                while (const dirent* e = ::readdir(dir))
                    highest = std::max(highest, std::atoi(e->d_name));
                ::closedir(dir);
            }
            for (;;) {
                Fd p(::open("/dev/null", O_RDONLY | O_CLOEXEC));
                if (!p || p.get() > highest) break;
                holes_taken.push_back(std::move(p));
            }
            rlimit low = old;
            low.rlim_cur = static_cast<rlim_t>(highest + 1 + 40);
            ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
        }
        go[0] = true;
        for (auto& c : clients)
            ::connect(c.get(), static_cast<const sockaddr*>(addr.sockaddr_ptr()),
                      addr.sockaddr_len());
        if (round == 0) {
            EXPECT_TRUE(eventually([&] { return server.stats().accept_errors > 0; }));
            go[1] = true;
        }
        // Each client either is served (its byte echoed) or sees the end;
        // none is left waiting.
        std::vector<int> state(n, 0);  // 0 waiting, 1 sent, 2 settled
        int served = 0;
        int ended = 0;
        const auto deadline = std::chrono::steady_clock::now() + 3s;
        while (served + ended < n && std::chrono::steady_clock::now() < deadline) {
            for (int i = 0; i < n; ++i) {
                const int fd = clients[static_cast<std::size_t>(i)].get();
                int& st = state[static_cast<std::size_t>(i)];
                if (st == 0 && ::send(fd, "x", 1, MSG_NOSIGNAL) == 1) st = 1;
                if (st == 2) continue;
                char b;
                const ssize_t r = ::recv(fd, &b, 1, MSG_DONTWAIT);
                if (r == 1) {
                    ++served;
                    st = 2;
                } else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK &&
                                      errno != ENOTCONN && errno != EINTR)) {
                    ++ended;
                    st = 2;
                }
            }
            std::this_thread::sleep_for(10ms);
        }
        EXPECT_EQ(n - served - ended, 0)
            << "clients neither served nor closed (served " << served << ", ended " << ended << ")";
        EXPECT_GT(ended, 0) << "nothing was shed: the limit was not reached";
        clients.clear();
        holes_taken.clear();
        ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &old), 0);
        ASSERT_TRUE(eventually([&] { return server.connections_now() == 0; }));
    }
    // Recovered: a new client is served.
    Fd fresh = connect_blocking(addr);
    send_all(fresh.get(), "ok");
    EXPECT_EQ(read_n(fresh.get(), 2), "ok");
    group.stop();
}

INSTANTIATE_TEST_SUITE_P(Distributions, LoopGroupTest,
                         ::testing::Values(Distribution::reuse_port, Distribution::round_robin),
                         [](const auto& info) { return std::string(to_string(info.param)); });

// A group's loop may be stopped from any thread (EventLoop::stop(), which the
// thread rule of loop() allows), or from its own callbacks, as a one-loop
// program stops its loop; the group's threads still run until the group's
// stop(). Such a stop used to end that loop's thread for good: tasks posted
// to it were never run, and the connections handed to it (round_robin)
// hung, neither served nor closed (failed before on every backend).
TEST(LoopGroup, ALoopStoppedByItselfKeepsServingUntilTheGroupStops) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    EchoRecorder rec;  // outlives the group
    LoopGroup group(2, test::backend_name());
    ServerOptions opt;
    opt.distribution = Distribution::round_robin;
    TcpServer& server = group.listen(Address::ip("127.0.0.1", 0), rec.callbacks(), opt);
    group.loop(0).stop();                          // from another thread
    group.post(1, [&] { group.loop(1).stop(); });  // from its own thread
    std::this_thread::sleep_for(50ms);
    for (std::size_t i = 0; i < 2; ++i) {
        std::promise<void> ran;
        group.post(i, [&] { ran.set_value(); });
        EXPECT_EQ(ran.get_future().wait_for(2s), std::future_status::ready) << "loop " << i;
    }
    for (int i = 0; i < 4; ++i) {  // two on each loop
        Fd c = connect_blocking(server.local_address());
        send_all(c.get(), "ping");
        EXPECT_EQ(read_n(c.get(), 4), "ping") << "connection " << i;
    }
    group.stop();
    EXPECT_EQ(rec.closed.load(), 4);
    EXPECT_EQ(server.connections_now(), 0u);
}

TEST(LoopGroup, PostRunsOnTheChosenLoopThread) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    LoopGroup group(3, test::backend_name());
    ASSERT_EQ(group.size(), 3u);
    // libevent names its method too: "libevent (epoll)".
    EXPECT_EQ(group.backend_name().rfind(test::backend_name(), 0), 0u) << group.backend_name();
    std::vector<std::thread::id> ids(3);
    for (std::size_t i = 0; i < 3; ++i) {
        std::promise<std::pair<std::thread::id, bool>> where;
        group.post(i, [&, i] {
            where.set_value({std::this_thread::get_id(), group.loop(i).in_loop_thread()});
        });
        auto f = where.get_future();
        ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
        auto [id, in_loop] = f.get();
        EXPECT_TRUE(in_loop) << "loop " << i;
        EXPECT_NE(id, std::this_thread::get_id());
        ids[i] = id;
    }
    EXPECT_EQ(std::set<std::thread::id>(ids.begin(), ids.end()).size(), 3u);
    // Round-robin: indexes cycle, and each task runs on the loop it names.
    for (std::size_t k = 0; k < 6; ++k) {
        std::promise<std::thread::id> where;
        std::size_t index = group.post([&] { where.set_value(std::this_thread::get_id()); });
        EXPECT_EQ(index, k % 3);
        auto f = where.get_future();
        ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
        EXPECT_EQ(f.get(), ids[index]);
    }
    EXPECT_THROW(group.post(3, [] {}), std::out_of_range);
    group.stop();
    group.stop();  // idempotent
}

TEST(LoopGroup, UnixSocketIsSpreadRoundRobin) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    std::string path = "/tmp/evmux-loop-group-" + std::to_string(::getpid()) + ".sock";
    {
        EchoRecorder rec;  // outlives the group: its loops call into it until joined
        LoopGroup group(2, test::backend_name());
        TcpServer& server = group.listen(Address::unix_path(path), rec.callbacks());
        EXPECT_EQ(server.distribution(), Distribution::round_robin);
        std::vector<Fd> clients;
        for (int i = 0; i < 8; ++i) {
            clients.push_back(connect_blocking(Address::unix_path(path)));
            send_all(clients.back().get(), "ping");
            ASSERT_EQ(read_n(clients.back().get(), 4), "ping");
        }
        EXPECT_EQ(server.connections_per_loop(), (std::vector<std::uint64_t>{4, 4}));
    }
    struct stat st {};
    EXPECT_NE(::lstat(path.c_str(), &st), 0) << "socket file left behind";
}

TEST(LoopGroup, Errors) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    EXPECT_THROW(LoopGroup(0, test::backend_name()), std::invalid_argument);
    EXPECT_THROW(LoopGroup(1, "no-such-backend"), std::invalid_argument);
    LoopGroup group(2, test::backend_name());
    TcpServer& first = group.listen(Address::ip("127.0.0.1", 0), Callbacks{});
    // The port is held by our SO_REUSEPORT listeners: a plain bind is refused.
    ServerOptions rr;
    rr.distribution = Distribution::round_robin;
    try {
        group.listen(first.local_address(), Callbacks{}, rr);
        ADD_FAILURE() << "bind to a port in use succeeded";
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code().value(), EADDRINUSE);
        EXPECT_NE(std::string(e.what()).find("bind 127.0.0.1:"), std::string::npos) << e.what();
    }
    // A second reuse_port server is refused too: its SO_REUSEPORT listeners
    // would join the first's, and take a share of its connections (another
    // process of the same user, alike), unless the user asks to share.
    try {
        group.listen(first.local_address(), Callbacks{});
        ADD_FAILURE() << "a second reuse_port server joined the port";
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code().value(), EADDRINUSE);
        EXPECT_NE(std::string(e.what()).find("bind 127.0.0.1:"), std::string::npos) << e.what();
    }
    ServerOptions share;
    share.reuse_port = true;
    LoopGroup other(2, test::backend_name());
    TcpServer& shared = other.listen(Address::ip("127.0.0.1", 0), Callbacks{}, share);
    EXPECT_NO_THROW(other.listen(shared.local_address(), Callbacks{}, share));
    other.stop();
    // stop() from a loop thread would join itself.
    std::promise<bool> threw;
    group.post(1, [&] {
        try {
            group.stop();
            threw.set_value(false);
        } catch (const std::logic_error&) {
            threw.set_value(true);
        }
    });
    auto f = threw.get_future();
    ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
    EXPECT_TRUE(f.get());
    group.stop();
    EXPECT_TRUE(group.stopping());
    EXPECT_THROW(group.listen(Address::ip("127.0.0.1", 0), Callbacks{}), std::logic_error);
}

// The destructor on one of the group's own loop threads would join that
// thread: it says so and aborts (it ended in std::terminate, with no word of
// why, before).
TEST(LoopGroupDeathTest, DestroyedOnItsOwnLoopThreadSaysSoAndAborts) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    testing::FLAGS_gtest_death_test_style = "threadsafe";  // threads in the child
    EXPECT_DEATH(
        {
            auto* group = new LoopGroup(2, test::backend_name());
            group->post(0, [group] { delete group; });
            std::this_thread::sleep_for(5s);  // the abort comes long before
        },
        "evmux: ~LoopGroup on one of its own loop threads \\(it joins them\\): aborting");
}

// A task that throws does not end its loop; stop() reports it.
TEST(LoopGroup, ExceptionInATaskIsReportedByStop) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    LoopGroup group(2, test::backend_name());
    group.post(0, [] { throw std::runtime_error("task failed"); });
    std::promise<void> after;
    group.post(0, [&] { after.set_value(); });
    auto f = after.get_future();
    ASSERT_EQ(f.wait_for(5s), std::future_status::ready) << "the loop died with the exception";
    try {
        group.stop();
        ADD_FAILURE() << "stop() did not rethrow";
    } catch (const std::runtime_error& e) {
        EXPECT_STREQ(e.what(), "task failed");
    }
    group.stop();  // reported once
}

// ---- signals ------------------------------------------------------------------

// Whether `signo` is blocked in the calling thread.
bool blocked_here(int signo) {
    sigset_t mask;
    ::pthread_sigmask(SIG_BLOCK, nullptr, &mask);
    return sigismember(&mask, signo) == 1;
}

// Gives the calling thread its signal mask back at the end of a test,
// however it ends.
class MaskRestorer {
  public:
    MaskRestorer() { ::pthread_sigmask(SIG_BLOCK, nullptr, &saved_); }
    ~MaskRestorer() { ::pthread_sigmask(SIG_SETMASK, &saved_, nullptr); }
    MaskRestorer(const MaskRestorer&) = delete;
    MaskRestorer& operator=(const MaskRestorer&) = delete;

  private:
    sigset_t saved_{};
};

// The signals a group's threads must leave to the others, and the faults they
// must keep (a fault is delivered to the thread that caused it; blocked, the
// kernel kills the process anyway).
const int async_signals[] = {SIGINT,  SIGTERM, SIGHUP,  SIGQUIT, SIGUSR1,
                             SIGUSR2, SIGALRM, SIGCHLD, SIGPIPE, SIGWINCH};
const int fault_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS};

// Loop `index`'s answer to blocked_here() for each of `signals`.
std::vector<bool> blocked_on_loop(LoopGroup& group, std::size_t index,
                                  const std::vector<int>& signals) {
    // Shared: a loop that answers late must not touch a promise gone with us.
    auto answer = std::make_shared<std::promise<std::vector<bool>>>();
    group.post(index, [answer, signals] {
        std::vector<bool> out;
        for (int s : signals) out.push_back(blocked_here(s));
        answer->set_value(out);
    });
    auto f = answer->get_future();
    if (f.wait_for(5s) != std::future_status::ready) return {};
    return f.get();
}

// The natural order: the group, its server, and only then the signal handling
// on a loop of the main thread. The group's threads block the asynchronous
// signals from their start, so a process-directed signal cannot land on one of
// them (and take its default action there: SIGUSR1, SIGTERM terminate the
// process) but waits for the one thread that left it unblocked, or, blocked
// there too by on_signal(), for the main loop's signalfd.
TEST(LoopGroup, ProcessSignalsReachAMainLoopSetUpAfterTheGroup) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    const MaskRestorer restore;
    ASSERT_FALSE(blocked_here(SIGUSR1)) << "the test needs SIGUSR1 unblocked to start";

    EchoRecorder rec;  // outlives the group: its loops call into it until joined
    LoopGroup group(2, test::backend_name());
    TcpServer& server = group.listen(Address::ip("127.0.0.1", 0), rec.callbacks());

    const std::vector<int> asyncs(std::begin(async_signals), std::end(async_signals));
    const std::vector<int> faults(std::begin(fault_signals), std::end(fault_signals));
    for (std::size_t i = 0; i < group.size(); ++i) {
        const std::vector<bool> blocked = blocked_on_loop(group, i, asyncs);
        ASSERT_EQ(blocked.size(), asyncs.size()) << "loop " << i << " did not answer";
        for (std::size_t k = 0; k < asyncs.size(); ++k)
            EXPECT_TRUE(blocked[k]) << "signal " << asyncs[k] << " unblocked on loop " << i;
        const std::vector<bool> faulted = blocked_on_loop(group, i, faults);
        ASSERT_EQ(faulted.size(), faults.size()) << "loop " << i << " did not answer";
        for (std::size_t k = 0; k < faults.size(); ++k)
            EXPECT_FALSE(faulted[k]) << "fault " << faults[k] << " blocked on loop " << i;
    }
    // Before any kill(): an unblocked group thread would take SIGUSR1's
    // default action and end the whole test program.
    ASSERT_FALSE(::testing::Test::HasFailure())
        << "a process-directed signal could reach a group thread";

    EVMUX_SELECTOR_OR_SKIP(sel);
    EventLoop main_loop(std::move(sel));
    int seen = 0;
    bool on_main_loop = true;
    main_loop.on_signal(SIGUSR1, [&](int signo) {
        on_main_loop = on_main_loop && main_loop.in_loop_thread() && signo == SIGUSR1;
        ++seen;
    });
    EXPECT_TRUE(blocked_here(SIGUSR1));
    // One at a time (standard signals do not queue: two sent before the
    // first is read would be one).
    for (int k = 1; k <= 20; ++k) {
        ASSERT_EQ(::kill(::getpid(), SIGUSR1), 0);
        ASSERT_TRUE(test::run_until(main_loop, [&] { return seen == k; }))
            << "signal " << k << " not delivered to the main loop";
    }
    EXPECT_TRUE(on_main_loop);

    // The group served on through them.
    Fd client = connect_blocking(server.local_address());
    send_all(client.get(), "ping");
    EXPECT_EQ(read_n(client.get(), 4), "ping");
    client = Fd();

    main_loop.remove_signal(SIGUSR1);
    group.stop();
    EXPECT_EQ(rec.closed.load(), 1);
    EXPECT_EQ(rec.wrong_thread.load(), 0);
}

// on_signal() on one of the group's own loops: its thread blocks the signal
// already, as do the others of the group; the main thread (and every thread
// the user made) must block it too, as on_signal() says, or the kernel hands
// it to that thread instead of leaving it to the loop's signalfd.
TEST(LoopGroup, SignalOnAGroupLoopWhenTheMainThreadBlocksIt) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    const MaskRestorer restore;
    ASSERT_FALSE(blocked_here(SIGUSR2)) << "the test needs SIGUSR2 unblocked to start";
    std::atomic<int> seen{0};  // before the group: its loop 0 counts here until joined
    std::atomic<bool> on_loop_0{true};
    LoopGroup group(2, test::backend_name());
    // The documented rule, after the group: no thread inherits this.
    sigset_t usr2;
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    ::pthread_sigmask(SIG_BLOCK, &usr2, nullptr);

    std::promise<void> set_up;
    group.post(0, [&] {
        group.loop(0).on_signal(SIGUSR2, [&](int) {
            if (!group.loop(0).in_loop_thread()) on_loop_0 = false;
            ++seen;
        });
        set_up.set_value();
    });
    ASSERT_EQ(set_up.get_future().wait_for(5s), std::future_status::ready);
    // Before any kill(): loop 1's thread, had it SIGUSR2 unblocked, would
    // take its default action and end the whole test program.
    ASSERT_EQ(blocked_on_loop(group, 1, {SIGUSR2}), std::vector<bool>{true})
        << "a process-directed signal could reach loop 1's thread";
    for (int k = 1; k <= 20; ++k) {
        ASSERT_EQ(::kill(::getpid(), SIGUSR2), 0);
        const auto end = std::chrono::steady_clock::now() + 10s;
        while (seen.load() < k && std::chrono::steady_clock::now() < end)
            std::this_thread::sleep_for(1ms);
        ASSERT_EQ(seen.load(), k) << "signal " << k << " not delivered to loop 0";
    }
    EXPECT_TRUE(on_loop_0.load());

    // remove_signal() leaves the mask as on_signal() found it: blocked, as a
    // group thread has it from its start (unblocked, a later kill() could
    // land on loop 0's thread and take its default action there).
    std::promise<bool> removed;
    group.post(0, [&] {
        group.loop(0).remove_signal(SIGUSR2);
        removed.set_value(blocked_here(SIGUSR2));
    });
    auto f = removed.get_future();
    ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
    EXPECT_TRUE(f.get());
    EXPECT_EQ(blocked_on_loop(group, 1, {SIGUSR2}), std::vector<bool>{true});
    group.stop();
}

}  // namespace
}  // namespace evmux
