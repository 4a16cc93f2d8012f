// TLS connections, once per backend (EVMUX_BACKEND): an evmux server against
// evmux clients, `openssl s_client` and Python's ssl module (programs no one
// in this project wrote), every byte checked; bad peers (plain bytes, a cut or
// stalled handshake, a wrong name, an expired or unknown certificate) closed
// with a clear reason while a bystander stream is still served byte for byte;
// the connection contract (water marks in plaintext, max_buffered, half-close
// with close_notify, on_close once) over TLS. Certificates are made at run
// time (tools/support/test_certs.cpp).
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <functional>
#include <memory>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "evmux/connection.hpp"
#include "evmux/coro.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/resolver.hpp"
#include "evmux/server.hpp"
#include "evmux/tls.hpp"
#include "test_certs.hpp"
#include "test_support.hpp"

extern char** environ;

// Allocations of a message's size or more, counted by this binary's operator
// new (the library's std::strings come here too): a steady stream of large
// messages must not allocate per message
// (Tls.ManyConnectionsOfLargeMessagesAllocateNothingInSteadyState).
namespace {
constexpr std::size_t large_allocation = 16 * 1024;
std::atomic<std::size_t> large_allocations{0};
}  // namespace

// Neither inlined: where GCC sees malloc() or free() against a new-expression
// it warns (-Wmismatched-new-delete).
[[gnu::noinline]] void* operator new(std::size_t n) {
    if (n >= large_allocation) large_allocations.fetch_add(1, std::memory_order_relaxed);
    if (void* p = std::malloc(n ? n : 1)) return p;
    throw std::bad_alloc();
}
[[gnu::noinline]] void operator delete(void* p) noexcept {
    std::free(p);
}
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept {
    std::free(p);
}

namespace evmux {
namespace {

using namespace std::chrono_literals;
using support::tls_files;
using test::Fd;
using test::pump_for;
using test::run_until;

using test::pattern;

std::shared_ptr<TlsContext> server_context(const std::string& cert, const std::string& key,
                                           std::vector<std::string> alpn = {}) {
    TlsServerOptions o;
    o.cert_chain_file = cert;
    o.key_file = key;
    o.alpn = std::move(alpn);
    return TlsContext::server(o);
}

std::shared_ptr<TlsContext> server_context() {
    return server_context(tls_files().server_cert, tls_files().server_key);
}

/// A TLS server's options with these water marks.
ServerOptions tls_water_marks(std::size_t high, std::size_t low) {
    ServerOptions opt;
    opt.connection.tls = server_context();
    opt.connection.high_water = high;
    opt.connection.low_water = low;
    return opt;
}

std::shared_ptr<TlsContext> client_context(const std::string& name = "localhost",
                                           const std::string& ca = tls_files().ca) {
    TlsClientOptions o;
    o.ca_file = ca;
    o.server_name = name;
    return TlsContext::client(o);
}

/// What one side saw: on_connect, the bytes, each on_close (and a client's
/// on_error, recorded as reason `error`, its message and its code).
struct Record {
    int connects = 0;
    int peer_shutdowns = 0;
    int on_closes = 0;  // on_close itself
    std::string got;
    std::vector<CloseReason> reasons;
    std::vector<std::string> messages;
    std::vector<std::error_code> errors;  // on_error's
    std::string alpn, version, subject;
    TlsRecords records = TlsRecords::openssl;
    ConnectionPtr conn;  // the last one connected (a client's own)

    bool closed(std::size_t n = 1) const { return reasons.size() >= n; }
};

/// Who protects TLS 1.3 records in this run (the suite runs twice).
TlsRecords expected_records() {
    const char* env = std::getenv("EVMUX_TLS_RECORDS");
    return env && std::string(env) == "openssl" ? TlsRecords::openssl : TlsRecords::evmux;
}

/// Callbacks that record into `r`; `echo`: send every byte back.
Callbacks recording(Record& r, bool echo) {
    Callbacks cb;
    cb.on_connect = [&r](const ConnectionPtr& c) {
        ++r.connects;
        r.conn = c;
        r.alpn = c->tls_alpn();
        r.version = c->tls_version();
        r.subject = c->tls_peer_subject();
        r.records = c->tls_records();
    };
    cb.on_message = [&r, echo](const ConnectionPtr& c, Buffer& in) {
        r.got.append(in.data(), in.size());
        if (echo) c->send(in.data(), in.size());
        in.consume_all();
    };
    cb.on_close = [&r](const ConnectionPtr& c, CloseReason reason, int) {
        ++r.on_closes;
        r.reasons.push_back(reason);
        r.messages.push_back(c->close_message());
    };
    return cb;
}

/// As recording(), and on_error recorded as reason `error` (so closed()
/// covers it), with its message and code.
Callbacks recording_client(Record& r) {
    Callbacks cb = recording(r, false);
    cb.on_error = [&r](std::error_code ec, const std::string& m) {
        r.reasons.push_back(CloseReason::error);
        r.messages.push_back(m);
        r.errors.push_back(ec);
    };
    return cb;
}

/// A TLS echo server on 127.0.0.1 on the loop under test, recording every
/// connection into one Record.
struct EchoServer {
    Record rec;
    std::unique_ptr<TcpServer> server;
    EchoServer(EventLoop& loop, std::shared_ptr<TlsContext> ctx, ServerOptions opt = {}) {
        opt.connection.tls = std::move(ctx);
        server = std::make_unique<TcpServer>(loop, Address::ip("127.0.0.1", 0),
                                             recording(rec, true), opt);
    }
    std::uint16_t port() const { return server->local_address().port(); }
    const Address& address() const { return server->local_address(); }
};

/// A connected evmux TLS client that sends `data` once connected.
void start_client(EventLoop& loop, const Address& to, std::shared_ptr<TlsContext> ctx, Record& r,
                  ConnectionOptions copt = {}) {
    ConnectOptions o;
    o.connection = std::move(copt);
    o.connection.tls = std::move(ctx);
    connect(loop, to, recording_client(r), o);
}

/// A second, well-behaved client kept connected while a bad peer misbehaves:
/// its stream must still be echoed byte for byte afterwards.
struct Bystander {
    Record& rec;
    Bystander(EventLoop& loop, const Address& to, Record& r) : rec(r) {
        start_client(loop, to, client_context(), rec);
        EXPECT_TRUE(run_until(loop, [&] { return rec.connects == 1 || rec.closed(); }));
        EXPECT_EQ(rec.connects, 1);
    }
    void check_served(EventLoop& loop) {
        ASSERT_TRUE(rec.conn);
        const std::string data = pattern(64 * 1024, 3);
        rec.conn->send(data);
        ASSERT_TRUE(run_until(loop, [&] { return rec.got.size() >= data.size() || rec.closed(); }));
        EXPECT_EQ(rec.got, data);
        EXPECT_FALSE(rec.closed());
    }
};

/// A raw TCP client (no TLS at all).
Fd dial_raw(const Address& a) {
    Fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
    if (!fd) throw std::system_error(errno, std::generic_category(), "socket");
    if (::connect(fd.get(), static_cast<const sockaddr*>(a.sockaddr_ptr()), a.sockaddr_len()) < 0 &&
        errno != EINPROGRESS)
        throw std::system_error(errno, std::generic_category(), "connect");
    return fd;
}

/// True once the raw socket has been closed by the server (EOF or reset).
bool peer_gone(int fd) {
    char buf[4096];
    for (;;) {
        ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n > 0) continue;  // an alert, perhaps
        return n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
    }
}

void write_all(int fd, std::string_view data) {
    while (!data.empty()) {
        ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
        if (n <= 0) throw std::system_error(errno, std::generic_category(), "send");
        data.remove_prefix(static_cast<std::size_t>(n));
    }
}

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

/// Another program, stdin from a file, stdout and stderr to files.
class Child {
  public:
    Child(std::vector<std::string> args, const std::string& in, const std::string& out,
          const std::string& err) {
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_addopen(&fa, 0, in.c_str(), O_RDONLY, 0);
        posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        int rc = ::posix_spawnp(&pid_, argv[0], &fa, nullptr, argv.data(), environ);
        posix_spawn_file_actions_destroy(&fa);
        if (rc != 0) throw std::system_error(rc, std::generic_category(), "posix_spawn " + args[0]);
    }
    ~Child() {
        if (pid_ > 0) {
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, nullptr, 0);
        }
    }
    /// Pumps `loop` until the child exits (true, status in exit_code()) or
    /// `limit` passes (false; it is killed).
    bool wait(EventLoop& loop, std::chrono::milliseconds limit) {
        return run_until(
            loop,
            [&] {
                int status = 0;
                if (::waitpid(pid_, &status, WNOHANG) != pid_) return false;
                pid_ = -1;
                code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                return true;
            },
            limit);
    }
    int exit_code() const { return code_; }

  private:
    pid_t pid_ = -1;
    int code_ = -1;
};

class Tls : public ::testing::Test {
  protected:
    void SetUp() override {
        std::string why;
        auto sel = test::selector_or_null(&why);
        if (!sel) GTEST_SKIP() << why;
        loop_ = std::make_unique<EventLoop>(std::move(sel));
        dir_ = tls_files().dir;
    }
    EventLoop& loop() { return *loop_; }
    /// A Record that outlives the loop: a client connection still open at
    /// the end of a test closes (on_close) when the loop is destroyed.
    Record& record() { return records_.emplace_back(); }
    std::string path(const std::string& name) {
        return dir_ + "/" + ::testing::UnitTest::GetInstance()->current_test_info()->name() + "." +
               name;
    }
    std::deque<Record> records_;  // before loop_: destroyed after it
    std::unique_ptr<EventLoop> loop_;
    std::string dir_;
};

// ---- evmux to evmux -------------------------------------------------------------------

TEST_F(Tls, EvmuxClientAndServerEchoWithAlpnAndCloseNotify) {
    EchoServer server(loop(), server_context(tls_files().server_cert, tls_files().server_key,
                                             {"evmux/1", "other/2"}));
    TlsClientOptions co;
    co.ca_file = tls_files().ca;
    co.server_name = "localhost";
    co.alpn = {"other/2", "evmux/1"};
    Record& client = record();
    start_client(loop(), server.address(), TlsContext::client(co), client);
    ASSERT_TRUE(run_until(loop(), [&] { return client.connects == 1 || client.closed(); }));
    ASSERT_EQ(client.connects, 1) << (client.messages.empty() ? "" : client.messages[0]);
    EXPECT_TRUE(client.conn->is_tls());
    EXPECT_EQ(client.version, "TLSv1.3");
    EXPECT_EQ(client.alpn, "evmux/1");  // the server's preference wins
    // TLS 1.3: evmux's record layer on both sides unless told otherwise.
    EXPECT_EQ(client.records, expected_records());
    // On a completion loop, over completion I/O once the handshake is done
    // (evmux's record layer only).
    EXPECT_EQ(client.conn->io_mode(),
              expected_records() == TlsRecords::evmux ? loop().io_mode() : IoMode::readiness);
    const std::string data = pattern(300 * 1024);
    client.conn->send(data);
    ASSERT_TRUE(run_until(loop(), [&] { return client.got.size() >= data.size(); }));
    EXPECT_EQ(client.got, data);
    client.conn->shutdown_write();  // close_notify; the server answers with its own
    ASSERT_TRUE(run_until(loop(), [&] { return client.closed() && server.rec.closed(); }));
    ASSERT_EQ(client.reasons.size(), 1u);
    EXPECT_EQ(client.reasons[0], CloseReason::peer_closed);
    ASSERT_EQ(server.rec.reasons.size(), 1u);
    EXPECT_EQ(server.rec.reasons[0], CloseReason::peer_closed);
    EXPECT_EQ(server.rec.connects, 1);
    EXPECT_EQ(server.rec.alpn, "evmux/1");
    EXPECT_EQ(server.rec.records, expected_records());
    EXPECT_EQ(server.rec.got, data);
    // Byte counts are plaintext.
    EXPECT_EQ(server.server->stats().bytes_in, data.size());
    EXPECT_EQ(server.server->stats().bytes_out, data.size());
    EXPECT_EQ(client.conn->bytes_out(), data.size());
    EXPECT_EQ(client.conn->bytes_in(), data.size());
    pump_for(loop(), 50ms);
    EXPECT_EQ(client.reasons.size(), 1u);  // on_close once
    EXPECT_EQ(server.rec.reasons.size(), 1u);
}

// A steady stream of large TLS messages over many connections allocates no
// message-sized buffers: the ones a message needs are reused. (On completion
// I/O a send's plaintext and its sealed records are pooled strings; with the
// pool capped at 1 MiB per loop, 100 connections' 16 KiB messages overflowed
// it, the strings were freed and allocated again, and in evmux-echo glibc gave
// the heap's top back and faulted it in again: 0.2-2 page faults and up to
// 2.8x the server's CPU per message.)
TEST_F(Tls, ManyConnectionsOfLargeMessagesAllocateNothingInSteadyState) {
    // An echo that keeps nothing (EchoServer records every byte).
    Callbacks echo;
    echo.on_message = [](const ConnectionPtr& c, Buffer& in) {
        c->send(in.data(), in.size());
        in.consume_all();
    };
    ServerOptions so;
    so.connection.tls = server_context(tls_files().server_cert, tls_files().server_key);
    TcpServer server(loop(), Address::ip("127.0.0.1", 0), echo, so);
    TlsClientOptions co;
    co.ca_file = tls_files().ca;
    co.server_name = "localhost";
    const std::shared_ptr<TlsContext> client_ctx = TlsContext::client(co);
    constexpr int conns = 40;
    constexpr std::size_t size = 16 * 1024;
    const std::string message = pattern(size);
    std::size_t round_trips = 0;
    int connected = 0, closed = 0;
    for (int i = 0; i < conns; ++i) {
        Callbacks cb;
        auto got = std::make_shared<std::size_t>(0);
        cb.on_connect = [&](const ConnectionPtr& c) {
            ++connected;
            c->send(message);
        };
        cb.on_message = [&, got](const ConnectionPtr& c, Buffer& in) {
            *got += in.size();
            in.consume_all();
            if (*got < size) return;
            *got -= size;
            ++round_trips;
            c->send(message);
        };
        cb.on_close = [&](const ConnectionPtr&, CloseReason, int) { ++closed; };
        cb.on_error = [&](std::error_code, const std::string&) { ++closed; };
        ConnectOptions o;
        o.connection.tls = client_ctx;
        connect(loop(), server.local_address(), std::move(cb), o);
    }
    ASSERT_TRUE(run_until(loop(), [&] { return connected == conns || closed > 0; }));
    ASSERT_EQ(connected, conns);
    // Warm: every connection's buffers made once.
    ASSERT_TRUE(run_until(
        loop(), [&] { return round_trips >= 20u * conns || closed > 0; }, 30s));
    const std::size_t from = round_trips;
    const std::size_t before = large_allocations.load();
    ASSERT_TRUE(run_until(
        loop(), [&] { return round_trips >= from + 50u * conns || closed > 0; }, 60s));
    const std::size_t after = large_allocations.load();
    EXPECT_EQ(closed, 0);
    const double per_message = double(after - before) / double(round_trips - from);
    // Both ends of every message are in this process: one allocation for
    // every 20 round trips is the bound (a send the kernel took in part
    // copies its rest on readiness; a pool too small allocates about two per
    // message at each end).
    EXPECT_LT(per_message, 0.05) << (after - before) << " allocations of " << large_allocation
                                 << " bytes or more in " << (round_trips - from)
                                 << " round trips of " << size << " bytes over " << conns
                                 << " connections on " << loop().backend_name()
                                 << ", io=" << to_string(loop().io_mode());
}

TEST_F(Tls, ClientCertificateRequiredAndShown) {
    TlsServerOptions so;
    so.cert_chain_file = tls_files().server_cert;
    so.key_file = tls_files().server_key;
    so.client_ca_file = tls_files().ca;
    EchoServer server(loop(), TlsContext::server(so));
    TlsClientOptions co;
    co.ca_file = tls_files().ca;
    co.server_name = "localhost";
    co.cert_chain_file = tls_files().client_cert;
    co.key_file = tls_files().client_key;
    Record& with_cert = record();
    Record& without_cert = record();
    start_client(loop(), server.address(), TlsContext::client(co), with_cert);
    start_client(loop(), server.address(), client_context(), without_cert);
    ASSERT_TRUE(run_until(loop(), [&] {
        return with_cert.connects == 1 && server.rec.connects == 1 && without_cert.closed() &&
               server.rec.closed();
    }));
    EXPECT_EQ(server.rec.subject, "CN=evmux test client,O=evmux tests");
    EXPECT_EQ(with_cert.subject, "CN=localhost,O=evmux tests");
    ASSERT_EQ(server.rec.reasons.size(), 1u);
    EXPECT_EQ(server.rec.reasons[0], CloseReason::tls);
    EXPECT_NE(server.rec.messages[0].find("peer did not return a certificate"), std::string::npos)
        << server.rec.messages[0];
    EXPECT_EQ(without_cert.reasons[0], CloseReason::tls);
    with_cert.conn->send("still served");
    ASSERT_TRUE(run_until(loop(), [&] { return with_cert.got == "still served"; }));
}

TEST_F(Tls, AlpnWithNoCommonProtocolIsRefused) {
    EchoServer server(loop(),
                      server_context(tls_files().server_cert, tls_files().server_key, {"evmux/1"}));
    TlsClientOptions co;
    co.ca_file = tls_files().ca;
    co.server_name = "localhost";
    co.alpn = {"nope/9"};
    Record& client = record();
    start_client(loop(), server.address(), TlsContext::client(co), client);
    ASSERT_TRUE(run_until(loop(), [&] { return client.closed() && server.rec.closed(); }));
    EXPECT_EQ(client.connects, 0);
    EXPECT_EQ(server.rec.connects, 0);
    EXPECT_EQ(server.rec.reasons[0], CloseReason::tls);
    EXPECT_NE(server.rec.messages[0].find("no application protocol"), std::string::npos)
        << server.rec.messages[0];
    // A failed handshake of connect() is its on_error, not an on_close.
    ASSERT_EQ(client.errors.size(), 1u);
    EXPECT_EQ(client.errors[0], std::errc::protocol_error);
    EXPECT_EQ(client.on_closes, 0);
    EXPECT_NE(client.messages[0].find("no application protocol"), std::string::npos)
        << client.messages[0];
}

TEST_F(Tls, PlainConnectionsSayTheyAreNotTls) {
    Record& r = record();
    auto [a, b] = test::socket_pair();
    auto conn = Connection::adopt(loop(), a.release(), recording(r, false));
    EXPECT_FALSE(conn->is_tls());
    EXPECT_EQ(conn->tls_alpn(), "");
    EXPECT_EQ(conn->tls_version(), "");
    EXPECT_EQ(conn->tls_peer_subject(), "");
    conn->close();
    ASSERT_TRUE(run_until(loop(), [&] { return r.closed(); }));
    EXPECT_EQ(r.messages[0], "");
}

// ---- other programs as clients -----------------------------------------------------

// openssl s_client: verifies the chain and the name, sends stdin, prints what
// it receives; the server ends the stream (close_notify) once it has echoed
// everything, and s_client exits.
TEST_F(Tls, OpensslSClientEchoedByteForByte) {
    const std::size_t total = 100 * 1024;
    const std::string data = pattern(total, 11);
    Record& srv = record();
    Callbacks cb = recording(srv, false);
    cb.on_message = [&](const ConnectionPtr& c, Buffer& in) {
        srv.got.append(in.data(), in.size());
        c->send(in.data(), in.size());
        in.consume_all();
        if (srv.got.size() == total) c->shutdown_write();
    };
    ServerOptions opt;
    opt.connection.tls =
        server_context(tls_files().server_cert, tls_files().server_key, {"evmux/1"});
    TcpServer server(loop(), Address::ip("127.0.0.1", 0), cb, opt);
    { std::ofstream(path("in"), std::ios::binary) << data; }
    const std::string port = std::to_string(server.local_address().port());
    Child s_client({"openssl", "s_client", "-connect", "127.0.0.1:" + port, "-servername",
                    "localhost", "-verify_hostname", "localhost", "-CAfile", tls_files().ca,
                    "-verify_return_error", "-alpn", "evmux/1", "-quiet", "-nocommands"},
                   path("in"), path("out"), path("err"));
    ASSERT_TRUE(s_client.wait(loop(), 20s)) << read_file(path("err"));
    EXPECT_EQ(s_client.exit_code(), 0) << read_file(path("err"));
    const std::string out = read_file(path("out"));
    EXPECT_EQ(out.size(), total) << read_file(path("err"));
    EXPECT_TRUE(out == data) << "s_client received other bytes than it sent";
    EXPECT_TRUE(srv.got == data);
    ASSERT_TRUE(run_until(loop(), [&] { return srv.closed(); }));
    EXPECT_EQ(srv.connects, 1);
    EXPECT_EQ(srv.alpn, "evmux/1");
    ASSERT_EQ(srv.reasons.size(), 1u);
    // s_client answers our close_notify with its own.
    EXPECT_EQ(srv.reasons[0], CloseReason::peer_closed) << srv.messages[0];
}

// Python's ssl module: sends in chunks, checks each echo, then unwrap()s
// (close_notify both ways).
TEST_F(Tls, PythonSslEchoedByteForByte) {
    const char* script = std::getenv("EVMUX_TLS_CLIENT_PY");
    ASSERT_TRUE(script) << "EVMUX_TLS_CLIENT_PY not set (tests/meson.build sets it)";
    EchoServer server(loop(),
                      server_context(tls_files().server_cert, tls_files().server_key, {"evmux/1"}));
    { std::ofstream(path("in")) << ""; }
    Child py({"/usr/bin/python3", script, std::to_string(server.port()), tls_files().ca,
              "localhost", "200000", "evmux/1"},
             path("in"), path("out"), path("err"));
    ASSERT_TRUE(py.wait(loop(), 30s)) << read_file(path("err"));
    EXPECT_EQ(py.exit_code(), 0) << read_file(path("out")) << read_file(path("err"));
    EXPECT_EQ(read_file(path("out")), "ok 200000 TLSv1.3 evmux/1\n") << read_file(path("err"));
    ASSERT_TRUE(run_until(loop(), [&] { return server.rec.closed(); }));
    EXPECT_EQ(server.rec.got.size(), 200000u);
    ASSERT_EQ(server.rec.reasons.size(), 1u);
    EXPECT_EQ(server.rec.reasons[0], CloseReason::peer_closed) << server.rec.messages[0];
}

// ---- bad peers: a clear reason, that connection closed, the others served ---------

TEST_F(Tls, PlainBytesToATlsPort) {
    EchoServer server(loop(), server_context());
    Bystander by(loop(), server.address(), record());
    Fd raw = dial_raw(server.address());
    pump_for(loop(), 20ms);
    write_all(raw.get(), "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    ASSERT_TRUE(run_until(loop(), [&] { return server.rec.closed(); }));
    EXPECT_EQ(server.rec.reasons[0], CloseReason::tls);
    EXPECT_EQ(server.rec.messages[0].rfind("TLS handshake: ", 0), 0u) << server.rec.messages[0];
    EXPECT_NE(server.rec.messages[0].find("http request"), std::string::npos)
        << server.rec.messages[0];
    EXPECT_TRUE(run_until(loop(), [&] { return peer_gone(raw.get()); }));
    EXPECT_EQ(server.rec.connects, 1);  // the bystander only
    by.check_served(loop());
}

TEST_F(Tls, TruncatedHandshake) {
    EchoServer server(loop(), server_context());
    Bystander by(loop(), server.address(), record());
    Fd raw = dial_raw(server.address());
    pump_for(loop(), 20ms);
    // The start of a ClientHello record announcing 512 bytes, then FIN.
    const char hello[] =
        "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
        "0123456789abcdef0123";
    write_all(raw.get(), std::string_view(hello, sizeof hello - 1));
    ::shutdown(raw.get(), SHUT_WR);
    ASSERT_TRUE(run_until(loop(), [&] { return server.rec.closed(); }));
    EXPECT_EQ(server.rec.reasons[0], CloseReason::tls);
    EXPECT_NE(server.rec.messages[0].find("TLS handshake: unexpected eof"), std::string::npos)
        << server.rec.messages[0];
    EXPECT_TRUE(run_until(loop(), [&] { return peer_gone(raw.get()); }));
    by.check_served(loop());
}

TEST_F(Tls, StalledHandshakeTimesOut) {
    TlsServerOptions so;
    so.cert_chain_file = tls_files().server_cert;
    so.key_file = tls_files().server_key;
    so.handshake_timeout = 300ms;
    EchoServer server(loop(), TlsContext::server(so));
    Bystander by(loop(), server.address(), record());
    Fd raw = dial_raw(server.address());
    pump_for(loop(), 20ms);
    write_all(raw.get(), std::string_view("\x16\x03\x01\x02", 4));  // and nothing more
    const auto start = std::chrono::steady_clock::now();
    ASSERT_TRUE(run_until(
        loop(), [&] { return server.rec.closed(); }, 5s));
    EXPECT_GE(std::chrono::steady_clock::now() - start, 250ms);
    EXPECT_EQ(server.rec.reasons[0], CloseReason::timeout);
    EXPECT_EQ(server.rec.messages[0], "TLS handshake timed out after 300 ms");
    EXPECT_TRUE(run_until(loop(), [&] { return peer_gone(raw.get()); }));
    // The bystander finished its handshake long before: no timeout for it.
    pump_for(loop(), 400ms);
    by.check_served(loop());
    EXPECT_EQ(server.rec.reasons.size(), 1u);
}

TEST_F(Tls, WrongHostnameFailsOnBothSides) {
    EchoServer server(loop(), server_context());
    Bystander by(loop(), server.address(), record());
    Record& client = record();
    start_client(loop(), server.address(), client_context("wrong.example"), client);
    ASSERT_TRUE(run_until(loop(), [&] { return client.closed() && server.rec.closed(); }));
    EXPECT_EQ(client.connects, 0);
    ASSERT_EQ(client.errors.size(), 1u);
    EXPECT_EQ(client.errors[0], std::errc::protocol_error);
    EXPECT_EQ(client.on_closes, 0);
    EXPECT_EQ(client.messages[0], "connect " + server.address().to_string() +
                                      ": TLS handshake: certificate verify failed (hostname "
                                      "mismatch)");
    EXPECT_EQ(server.rec.reasons[0], CloseReason::tls);
    EXPECT_NE(server.rec.messages[0].find("alert"), std::string::npos) << server.rec.messages[0];
    by.check_served(loop());
}

TEST_F(Tls, ExpiredCertificate) {
    EchoServer server(loop(), server_context(tls_files().expired_cert, tls_files().expired_key));
    Record& client = record();
    start_client(loop(), server.address(), client_context(), client);
    ASSERT_TRUE(run_until(loop(), [&] { return client.closed() && server.rec.closed(); }));
    EXPECT_EQ(client.connects, 0);
    ASSERT_EQ(client.errors.size(), 1u);
    EXPECT_EQ(client.errors[0], std::errc::protocol_error);
    EXPECT_NE(client.messages[0].find("(certificate has expired)"), std::string::npos)
        << client.messages[0];
    EXPECT_EQ(server.rec.reasons[0], CloseReason::tls);
    // The listener keeps accepting: the next client is refused the same way.
    Record& again = record();
    start_client(loop(), server.address(), client_context(), again);
    ASSERT_TRUE(run_until(loop(), [&] { return again.closed(); }));
    EXPECT_EQ(again.errors.size(), 1u);
}

TEST_F(Tls, CertificateOfAnotherCaOrNameIsRefused) {
    EchoServer other(loop(), server_context(tls_files().other_cert, tls_files().other_key));
    Record& by_name = record();
    Record& by_ca = record();
    start_client(loop(), other.address(), client_context("localhost"), by_name);
    start_client(loop(), other.address(), client_context("other.example", tls_files().other_ca),
                 by_ca);
    ASSERT_TRUE(run_until(loop(), [&] { return by_name.closed() && by_ca.closed(); }));
    EXPECT_NE(by_name.messages[0].find("hostname mismatch"), std::string::npos)
        << by_name.messages[0];
    EXPECT_NE(by_ca.messages[0].find("unable to get local issuer certificate"), std::string::npos)
        << by_ca.messages[0];
    // The right name and CA: accepted.
    Record& good = record();
    start_client(loop(), other.address(), client_context("other.example"), good);
    ASSERT_TRUE(run_until(loop(), [&] { return good.connects == 1 || good.closed(); }));
    EXPECT_EQ(good.connects, 1) << (good.messages.empty() ? "" : good.messages[0]);
}

TEST_F(Tls, ClientChecksThePeerIpWhenGivenNoName) {
    EchoServer server(loop(), server_context());
    TlsClientOptions co;
    co.ca_file = tls_files().ca;  // no server_name: 127.0.0.1 is checked (an IP SAN)
    Record& client = record();
    start_client(loop(), server.address(), TlsContext::client(co), client);
    ASSERT_TRUE(run_until(loop(), [&] { return client.connects == 1 || client.closed(); }));
    EXPECT_EQ(client.connects, 1) << (client.messages.empty() ? "" : client.messages[0]);
    // A name, when given, is checked instead.
    co.server_name = "other.example";
    Record& named = record();
    start_client(loop(), server.address(), TlsContext::client(co), named);
    ASSERT_TRUE(run_until(loop(), [&] { return named.closed(); }));
    EXPECT_NE(named.messages[0].find("hostname mismatch"), std::string::npos) << named.messages[0];
}

/// Starts an evmux TLS client to "host:port" text (connect() by name when
/// the host is a name), recording into `r` as start_client() does.
void start_client_to(EventLoop& loop, const std::string& target, std::shared_ptr<TlsContext> ctx,
                     Record& r) {
    ConnectOptions o;
    o.connection.tls = std::move(ctx);
    connect(loop, target, recording_client(r), o);
}

/// Each SNI name a server context's handshakes received ("" for none), in order.
void record_sni(const TlsContext& server_ctx, std::vector<std::string>& names) {
    SSL_CTX* ctx = server_ctx.native_handle();
    SSL_CTX_set_tlsext_servername_arg(ctx, &names);
    SSL_CTX_set_tlsext_servername_callback(
        ctx, +[](SSL* ssl, int*, void* arg) -> int {
            const char* name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
            static_cast<std::vector<std::string>*>(arg)->push_back(name ? name : "");
            return SSL_TLSEXT_ERR_OK;
        });
}

// A client context that names no server, connecting by "host:port" text:
// a host name is sent as SNI and checked (as curl, Python and Go do), so a
// certificate for DNS:localhost alone verifies for "localhost:PORT"; a
// numeric host is checked as an address, and fails against it; a
// server_name given explicitly wins over the host connected to.
TEST_F(Tls, ConnectByNameSendsAndChecksTheHostName) {
    const std::string no_resolver = resolver_unavailable_reason();
    if (!no_resolver.empty()) GTEST_SKIP() << "names do not resolve: " << no_resolver;
    auto server_ctx = server_context(tls_files().name_only_cert, tls_files().name_only_key);
    std::vector<std::string> sni;
    record_sni(*server_ctx, sni);
    EchoServer server(loop(), server_ctx);
    const std::string port = std::to_string(server.port());
    TlsClientOptions co;
    co.ca_file = tls_files().ca;  // no server_name
    auto unnamed = TlsContext::client(co);

    Record& by_name = record();
    start_client_to(loop(), "localhost:" + port, unnamed, by_name);
    ASSERT_TRUE(run_until(loop(), [&] { return by_name.connects == 1 || by_name.closed(); }));
    EXPECT_EQ(by_name.connects, 1) << (by_name.messages.empty() ? "" : by_name.messages[0]);
    EXPECT_EQ(sni, std::vector<std::string>{"localhost"});
    if (by_name.conn) {
        by_name.conn->send("hi");
        ASSERT_TRUE(run_until(loop(), [&] { return by_name.got == "hi" || by_name.closed(); }));
        EXPECT_EQ(by_name.got, "hi");
    }

    Record& by_ip = record();
    start_client_to(loop(), "127.0.0.1:" + port, unnamed, by_ip);
    ASSERT_TRUE(run_until(loop(), [&] { return by_ip.connects == 1 || by_ip.closed(); }));
    EXPECT_EQ(by_ip.connects, 0);
    ASSERT_FALSE(by_ip.messages.empty());
    EXPECT_EQ(by_ip.errors.size(), 1u);
    EXPECT_NE(by_ip.messages[0].find("certificate verify failed (IP address mismatch)"),
              std::string::npos)
        << by_ip.messages[0];

    co.server_name = "other.example";  // explicit: checked whatever the host
    Record& named = record();
    start_client_to(loop(), "localhost:" + port, TlsContext::client(co), named);
    ASSERT_TRUE(run_until(loop(), [&] { return named.connects == 1 || named.closed(); }));
    EXPECT_EQ(named.connects, 0);
    ASSERT_FALSE(named.messages.empty());
    EXPECT_NE(named.messages[0].find("hostname mismatch"), std::string::npos) << named.messages[0];
    co.server_name = "localhost";  // explicit, to a numeric host: the name is checked
    Record& named_ip = record();
    start_client_to(loop(), "127.0.0.1:" + port, TlsContext::client(co), named_ip);
    ASSERT_TRUE(run_until(loop(), [&] { return named_ip.connects == 1 || named_ip.closed(); }));
    EXPECT_EQ(named_ip.connects, 1) << (named_ip.messages.empty() ? "" : named_ip.messages[0]);
    ASSERT_TRUE(run_until(loop(), [&] { return sni.size() >= 4; }));
    EXPECT_EQ(sni, (std::vector<std::string>{"localhost", "", "other.example", "localhost"}));
}

// ---- the connection contract over TLS --------------------------------------------------

// The server sends far more than the client reads: the queue (plaintext)
// passes high water once, everything arrives in order once the client reads,
// and queued + written plaintext always adds up to what was sent.
TEST_F(Tls, WaterMarksCountPlaintext) {
    std::size_t high_events = 0, high_queued = 0, drains = 0;
    const std::string data = pattern(2 * 1024 * 1024, 5);
    ConnectionPtr served;
    Callbacks cb;
    cb.on_connect = [&](const ConnectionPtr& c) {
        served = c;
        // A small send buffer: the kernel must not take it all (autotuning would).
        const int sndbuf = 32 * 1024;
        ::setsockopt(c->fd(), SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
        for (std::size_t off = 0; off < data.size(); off += 16 * 1024)
            c->send(data.substr(off, 16 * 1024));
        EXPECT_EQ(c->queued_bytes() + c->bytes_out(), data.size());
    };
    cb.on_high_water = [&](const ConnectionPtr&, std::size_t q) {
        ++high_events;
        high_queued = q;
    };
    cb.on_drain = [&](const ConnectionPtr&) { ++drains; };
    const ServerOptions opt = tls_water_marks(256 * 1024, 64 * 1024);
    TcpServer server(loop(), Address::ip("127.0.0.1", 0), cb, opt);
    Record& client = record();
    ConnectionOptions copt;
    start_client(loop(), server.local_address(), client_context(), client, copt);
    ASSERT_TRUE(run_until(loop(), [&] { return client.connects == 1 && served; }));
    client.conn->pause_reading();
    pump_for(loop(), 100ms);
    EXPECT_EQ(high_events, 1u);
    EXPECT_GE(high_queued, 256u * 1024);
    EXPECT_TRUE(served->above_high_water());
    EXPECT_EQ(served->queued_bytes() + served->bytes_out(), data.size());
    EXPECT_LT(client.got.size(), data.size());
    client.conn->resume_reading();
    ASSERT_TRUE(run_until(loop(), [&] { return client.got.size() >= data.size(); }));
    EXPECT_TRUE(client.got == data)
        << "got " << client.got.size() << " bytes, first difference at "
        << std::mismatch(data.begin(), data.end(), client.got.begin(), client.got.end()).first -
               data.begin();
    ASSERT_TRUE(run_until(loop(), [&] { return drains >= 1; }));
    EXPECT_EQ(served->queued_bytes(), 0u);
    EXPECT_FALSE(served->above_high_water());
}

// High water means "the kernel takes no more" over TLS too, on every path:
// one send() of 4x high water that a roomy socket buffer takes is written at
// once (readiness: through the record layer in send(); completion I/O:
// records sealed and sent right away, not left for the next request), so
// the connection is not above high water and on_high_water is not called.
TEST_F(Tls, ASendTheKernelTakesIsNotAboveHighWater) {
    const std::string data = pattern(256 * 1024, 9);
    std::size_t high_events = 0;
    bool above_after_send = true;
    std::size_t queued_after_send = 0;
    Callbacks cb;
    cb.on_connect = [&](const ConnectionPtr& c) {
        const int sndbuf = 4 * 1024 * 1024;  // fixed, and roomy: it takes 256 KiB of records
        ::setsockopt(c->fd(), SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
        c->send(data);
        above_after_send = c->above_high_water();
        queued_after_send = c->queued_bytes();
    };
    cb.on_high_water = [&](const ConnectionPtr&, std::size_t) { ++high_events; };
    const ServerOptions opt = tls_water_marks(64 * 1024, 16 * 1024);
    TcpServer server(loop(), Address::ip("127.0.0.1", 0), cb, opt);
    Record& client = record();
    start_client(loop(), server.local_address(), client_context(), client, ConnectionOptions{});
    ASSERT_TRUE(run_until(loop(), [&] { return client.got.size() >= data.size(); }));
    EXPECT_TRUE(client.got == data) << client.got.size();
    EXPECT_FALSE(above_after_send);
    EXPECT_LT(queued_after_send, opt.connection.high_water);
    EXPECT_EQ(high_events, 0u);
}

TEST_F(Tls, MaxBufferedClosesWithOverflow) {
    // "flood": 16 MB at once to a client that does not read; anything else: echo.
    Record& srv = record();
    Callbacks cb = recording(srv, true);
    cb.on_message = [&](const ConnectionPtr& c, Buffer& in) {
        if (in.view() != "flood") {
            c->send(in.data(), in.size());
            in.consume_all();
            return;
        }
        in.consume_all();
        const std::string chunk = pattern(64 * 1024);
        for (int i = 0; i < 256 && c->is_open(); ++i) c->send(chunk);
    };
    ServerOptions opt;
    opt.connection.tls = server_context();
    opt.connection.max_buffered = 512 * 1024;
    TcpServer server(loop(), Address::ip("127.0.0.1", 0), cb, opt);
    Bystander by(loop(), server.local_address(), record());
    Record& stalled = record();
    start_client(loop(), server.local_address(), client_context(), stalled);
    ASSERT_TRUE(run_until(loop(), [&] { return stalled.connects == 1; }));
    stalled.conn->pause_reading();
    stalled.conn->send("flood");
    ASSERT_TRUE(run_until(loop(), [&] { return srv.closed(); }));
    EXPECT_EQ(srv.reasons[0], CloseReason::overflow);
    by.check_served(loop());
    pump_for(loop(), 50ms);
    EXPECT_EQ(srv.reasons.size(), 1u);
}

// Records OpenSSL has read ahead are delivered although no readiness event
// announces them (the socket is empty by then): past a read budget smaller
// than a record, and after a pause.
TEST_F(Tls, BufferedRecordsArriveDespiteTheReadBudget) {
    const std::string data = pattern(64 * 1000, 9);
    Callbacks cb;
    cb.on_connect = [&](const ConnectionPtr& c) {
        for (std::size_t off = 0; off < data.size(); off += 1000)
            c->send(std::string_view(data).substr(off, 1000));
    };
    ServerOptions opt;
    opt.connection.tls = server_context();
    TcpServer server(loop(), Address::ip("127.0.0.1", 0), cb, opt);
    Record& client = record();
    ConnectionOptions copt;
    copt.read_budget = 100;  // a tenth of a record per wake-up
    start_client(loop(), server.local_address(), client_context(), client, copt);
    ASSERT_TRUE(run_until(
        loop(), [&] { return client.got.size() >= data.size(); }, 20s))
        << client.got.size() << " of " << data.size() << " bytes";
    EXPECT_TRUE(client.got == data);
}

TEST_F(Tls, BufferedRecordsArriveAfterResume) {
    // Ten small records sent at once while the client does not read: its
    // first read takes them all into OpenSSL's buffer; it pauses after each
    // message and resumes from a timer, so nine times the rest sits there.
    Callbacks cb;
    cb.on_message = [&](const ConnectionPtr& c, Buffer& in) {
        in.consume_all();
        for (int i = 0; i < 10; ++i) c->send(std::string(100, static_cast<char>('a' + i)));
    };
    ServerOptions opt;
    opt.connection.tls = server_context();
    TcpServer server(loop(), Address::ip("127.0.0.1", 0), cb, opt);
    // The client pauses inside on_message, after each record, and resumes
    // from a timer.
    Record& client = record();
    Callbacks ccb = recording(client, false);
    int messages = 0;
    ccb.on_message = [&](const ConnectionPtr& c, Buffer& in) {
        client.got.append(in.data(), in.size());
        in.consume_all();
        ++messages;
        c->pause_reading();
        loop().call_after(2ms, [c] { c->resume_reading(); });
    };
    ConnectOptions co;
    co.connection.tls = client_context();
    // A record per read: evmux's record layer would decrypt all ten at once
    // into a larger buffer (OpenSSL's SSL_read gives one record per call).
    co.connection.read_budget = 100;
    connect(loop(), server.local_address(), ccb, co);
    ASSERT_TRUE(run_until(loop(), [&] { return client.connects == 1; }));
    client.conn->pause_reading();
    client.conn->send("go");
    pump_for(loop(), 50ms);  // the ten records wait in the client's socket
    client.conn->resume_reading();
    ASSERT_TRUE(run_until(
        loop(), [&] { return client.got.size() >= 1000; }, 10s))
        << client.got.size() << " of 1000 bytes after " << messages << " messages";
    for (int i = 0; i < 10; ++i)
        EXPECT_EQ(client.got.substr(static_cast<std::size_t>(i) * 100, 100),
                  std::string(100, static_cast<char>('a' + i)));
    if (client.conn->io_mode() == IoMode::completion)
        EXPECT_GE(messages, 1);  // what came while paused is one message on resume
    else
        EXPECT_EQ(messages, 10);  // one record each: the rest waited in TLS's buffer
}

TEST_F(Tls, HalfCloseBothWays) {
    Record& srv = record();
    Callbacks cb = recording(srv, false);
    cb.on_peer_shutdown = [&](const ConnectionPtr& c) {
        ++srv.peer_shutdowns;
        c->send("reply after your close_notify: " + std::to_string(srv.got.size()));
        c->shutdown_write();
    };
    ServerOptions opt;
    opt.connection.tls = server_context();
    TcpServer server(loop(), Address::ip("127.0.0.1", 0), cb, opt);
    Record& client = record();
    start_client(loop(), server.local_address(), client_context(), client);
    ASSERT_TRUE(run_until(loop(), [&] { return client.connects == 1; }));
    const std::string data = pattern(50000);
    client.conn->send(data);
    client.conn->shutdown_write();
    client.conn->send("ignored after shutdown_write");
    ASSERT_TRUE(run_until(loop(), [&] { return client.closed() && srv.closed(); }));
    EXPECT_EQ(srv.got, data);
    EXPECT_EQ(srv.peer_shutdowns, 1);
    EXPECT_EQ(client.got, "reply after your close_notify: 50000");
    EXPECT_EQ(client.reasons[0], CloseReason::peer_closed);
    EXPECT_EQ(srv.reasons[0], CloseReason::peer_closed);
    pump_for(loop(), 30ms);
    EXPECT_EQ(client.reasons.size(), 1u);
    EXPECT_EQ(srv.reasons.size(), 1u);
}

// close(graceful) sends the queue, then close_notify: the peer sees a
// complete stream (peer_closed, not a TLS error).
TEST_F(Tls, GracefulCloseEndsWithCloseNotify) {
    const std::string data = pattern(300 * 1024, 2);
    Callbacks cb;
    cb.on_connect = [&](const ConnectionPtr& c) {
        c->send(data);
        c->close(CloseMode::graceful);
    };
    ServerOptions opt;
    opt.connection.tls = server_context();
    TcpServer server(loop(), Address::ip("127.0.0.1", 0), cb, opt);
    Record& client = record();
    start_client(loop(), server.local_address(), client_context(), client);
    ASSERT_TRUE(run_until(loop(), [&] { return client.closed(); }));
    EXPECT_TRUE(client.got == data);
    EXPECT_EQ(client.reasons[0], CloseReason::peer_closed) << client.messages[0];
}

// The same with input the server never read (the client sent more after the
// close began) and a slow client: the close lingers (see
// Connection.GracefulCloseWithInputUnreadStillDeliversEverything) instead of
// resetting, which cut the stream before the end of the data and its
// close_notify (seen here on io_uring-completion: reason `reset`).
TEST_F(Tls, GracefulCloseWithInputUnreadIsNotCut) {
    const std::string data = pattern(1024 * 1024, 4);
    Callbacks cb;
    cb.on_connect = [&](const ConnectionPtr& c) {
        int small = 4096;
        ::setsockopt(c->fd(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
        c->send(data);
        c->close(CloseMode::graceful);
    };
    ServerOptions opt;
    opt.connection.tls = server_context();
    TcpServer server(loop(), Address::ip("127.0.0.1", 0), cb, opt);
    Record client;
    ConnectOptions o;
    o.connection.tls = client_context();
    Callbacks ccb = recording(client, false);
    auto recorded_connect = ccb.on_connect;
    ccb.on_connect = [&, recorded_connect](const ConnectionPtr& c) {
        recorded_connect(c);
        int tiny = 32 * 1024;
        ::setsockopt(c->fd(), SOL_SOCKET, SO_RCVBUF, &tiny, sizeof tiny);
        // After the server's close began: bytes it will never read.
        loop().call_after(20ms, [c] { c->send("GET /next HTTP/1.1\r\n\r\n"); });
    };
    auto recorded_message = ccb.on_message;
    ccb.on_message = [&, recorded_message](const ConnectionPtr& c, Buffer& in) {
        recorded_message(c, in);
        c->pause_reading();  // a slow reader
        loop().call_after(1ms, [c] { c->resume_reading(); });
    };
    ccb.on_error = [&](std::error_code, const std::string& m) { client.messages.push_back(m); };
    connect(loop(), server.local_address(), std::move(ccb), o);
    ASSERT_TRUE(run_until(
        loop(), [&] { return client.closed(); }, 20000ms));
    EXPECT_EQ(client.got.size(), data.size());
    EXPECT_TRUE(client.got == data);
    EXPECT_EQ(client.reasons[0], CloseReason::peer_closed) << client.messages[0];
}

// close() with nothing queued ends the stream with close_notify, from
// either side and on either I/O path (on completion I/O it once waited for a
// send request a closing connection never makes): the peer sees peer_closed,
// not a cut stream.
TEST_F(Tls, CloseWithNothingQueuedSendsCloseNotify) {
    for (const bool server_closes : {true, false}) {
        SCOPED_TRACE(server_closes ? "the server closes" : "the client closes");
        EchoServer server(loop(), server_context());
        Record& client = record();
        start_client(loop(), server.address(), client_context(), client);
        ASSERT_TRUE(
            run_until(loop(), [&] { return client.connects == 1 && server.rec.connects == 1; }));
        Record& closer = server_closes ? server.rec : client;
        Record& peer = server_closes ? client : server.rec;
        closer.conn->close();
        ASSERT_TRUE(run_until(loop(), [&] { return peer.closed(); }));
        EXPECT_EQ(peer.reasons[0], CloseReason::peer_closed) << peer.messages[0];
        ASSERT_TRUE(closer.closed());
        EXPECT_EQ(closer.reasons[0], CloseReason::local);
    }
}

// A client that closes right in on_connect (close_notify, then its socket,
// with the server's session tickets unread: the kernel resets) ended its
// stream in order: the server sees peer_closed on every I/O path. On
// completion I/O its close_notify answer, refused (EPIPE), made it `reset:
// Broken pipe`; readiness ignored the same refusal.
TEST_F(Tls, AClientClosingInOnConnectIsPeerClosedForTheServer) {
    EchoServer server(loop(), server_context());
    for (int i = 0; i < 3; ++i) {
        Record& client = record();
        ConnectOptions o;
        o.connection.tls = client_context();
        Callbacks cb = recording_client(client);
        cb.on_connect = [&client](const ConnectionPtr& c) {
            ++client.connects;
            c->close();
        };
        connect(loop(), server.address(), cb, o);
        ASSERT_TRUE(run_until(loop(), [&] { return server.rec.closed(i + 1) && client.closed(); }));
        EXPECT_EQ(client.reasons[0], CloseReason::local);
        EXPECT_EQ(server.rec.reasons[i], CloseReason::peer_closed)
            << to_string(server.rec.reasons[i]) << ": " << server.rec.messages[i];
    }
}

// A peer that closes TCP without close_notify has cut the stream: a TLS error
// (a truncation attack looks the same), not an orderly close.
TEST_F(Tls, EofWithoutCloseNotifyIsATlsError) {
    EchoServer server(loop(), server_context());
    Record& client = record();
    start_client(loop(), server.address(), client_context(), client);
    ASSERT_TRUE(
        run_until(loop(), [&] { return client.connects == 1 && server.rec.connects == 1; }));
    ::shutdown(client.conn->fd(), SHUT_WR);  // a FIN under TLS's feet
    ASSERT_TRUE(run_until(loop(), [&] { return server.rec.closed(); }));
    EXPECT_EQ(server.rec.reasons[0], CloseReason::tls);
    EXPECT_NE(server.rec.messages[0].find("unexpected eof"), std::string::npos)
        << server.rec.messages[0];
}

// close(CloseMode::reset) over TLS sends no close_notify: the peer sees a
// reset, not a clean end (nor the "unexpected eof" of a cut stream).
TEST_F(Tls, ResetCloseSendsNoCloseNotify) {
    EchoServer server(loop(), server_context());
    Record& client = record();
    start_client(loop(), server.address(), client_context(), client);
    ASSERT_TRUE(
        run_until(loop(), [&] { return client.connects == 1 && server.rec.connects == 1; }));
    client.conn->close(CloseMode::reset);
    ASSERT_TRUE(run_until(loop(), [&] { return server.rec.closed() && client.closed(); }));
    EXPECT_EQ(client.reasons[0], CloseReason::local);
    EXPECT_EQ(server.rec.reasons[0], CloseReason::reset) << server.rec.messages[0];
    EXPECT_EQ(server.rec.peer_shutdowns, 0) << "a close_notify arrived";
}

// The same seen by a coroutine: its read's ConnectionClosed says OpenSSL's
// reason, not only the errno's "Protocol error".
TEST_F(Tls, ACoroutinesReadSaysOpensslsReason) {
    std::string seen;
    auto handler = [&seen](coro::Stream s) -> coro::Task<void> {
        try {
            co_await s.read_line();
            co_await s.read_line();
        } catch (const coro::ConnectionClosed& e) {
            seen = e.what();
        }
    };
    ServerOptions opt;
    opt.connection.tls = server_context();
    auto server = coro::serve(loop(), Address::ip("127.0.0.1", 0), handler, opt);
    Record& client = record();
    start_client(loop(), server->local_address(), client_context(), client);
    ASSERT_TRUE(run_until(loop(), [&] { return client.connects == 1; }));
    client.conn->send("one line\n");
    pump_for(loop(), 20ms);
    ::shutdown(client.conn->fd(), SHUT_WR);  // a FIN under TLS's feet
    ASSERT_TRUE(run_until(loop(), [&] { return !seen.empty(); }));
    EXPECT_EQ(seen.rfind("read_line: connection closed (tls): ", 0), 0u) << seen;
    EXPECT_NE(seen.find("unexpected eof"), std::string::npos) << seen;
}

namespace {
// co_await coro::connect(...) with a TLS context; what it threw, if anything.
coro::Task<void> tls_connect(EventLoop* loop, Address to, ConnectOptions options, std::string* seen,
                             int* code, bool* done) {
    try {
        coro::Stream s = co_await coro::connect(*loop, to, options);
        *seen = "connected";
    } catch (const coro::ConnectionClosed& e) {
        *seen = std::string("ConnectionClosed: ") + e.what();
    } catch (const std::system_error& e) {
        *seen = e.what();
        *code = e.code().value();
    } catch (const std::exception& e) {
        *seen = std::string("another exception: ") + e.what();
    }
    *done = true;
}
}  // namespace

// A coroutine's connect() whose TLS handshake fails (a wrong name) or does
// not finish in time throws, as a failed TCP connect does (it waited forever:
// the connection closed without on_connect, and nothing resumed it): the
// std::system_error of connect()'s on_error, not a ConnectionClosed (no
// connection was ever open to it).
TEST_F(Tls, ACoroutinesConnectThrowsWhenTheHandshakeFails) {
    EchoServer server(loop(), server_context());
    ConnectOptions wrong;
    wrong.connection.tls = client_context("wrong.example");
    std::string seen;
    int code = 0;
    bool done = false;
    coro::spawn(loop(), tls_connect(&loop(), server.address(), wrong, &seen, &code, &done));
    ASSERT_TRUE(run_until(
        loop(), [&] { return done; }, 5s))
        << "connect() never returned";
    EXPECT_EQ(seen, "connect " + server.address().to_string() +
                        ": TLS handshake: certificate verify failed (hostname mismatch): "
                        "Protocol error");
    EXPECT_EQ(code, EPROTO);

    // A server that never answers the ClientHello: the handshake's time limit.
    TcpServer mute(loop(), Address::ip("127.0.0.1", 0), Callbacks{});
    TlsClientOptions co;
    co.ca_file = tls_files().ca;
    co.server_name = "localhost";
    co.handshake_timeout = 200ms;
    ConnectOptions slow;
    slow.connection.tls = TlsContext::client(co);
    done = false;
    coro::spawn(loop(), tls_connect(&loop(), mute.local_address(), slow, &seen, &code, &done));
    ASSERT_TRUE(run_until(
        loop(), [&] { return done; }, 5s))
        << "connect() never returned";
    EXPECT_EQ(seen, "connect " + mute.local_address().to_string() +
                        ": TLS handshake timed out after 200 ms: Connection timed out");
    EXPECT_EQ(code, ETIMEDOUT);

    // The right name: a stream, and the server still serves.
    ConnectOptions good;
    good.connection.tls = client_context();
    done = false;
    coro::spawn(loop(), tls_connect(&loop(), server.address(), good, &seen, &code, &done));
    ASSERT_TRUE(run_until(
        loop(), [&] { return done; }, 5s));
    EXPECT_EQ(seen, "connected");
}

/// A plain TCP server that never answers a ClientHello, counting the
/// connections it accepted and those their clients ended.
struct MuteServer {
    int accepted = 0;
    int ended = 0;
    std::unique_ptr<TcpServer> server;
    explicit MuteServer(EventLoop& loop) {
        Callbacks cb;
        cb.on_connect = [this](const ConnectionPtr&) { ++accepted; };
        cb.on_close = [this](const ConnectionPtr&, CloseReason, int) { ++ended; };
        server = std::make_unique<TcpServer>(loop, Address::ip("127.0.0.1", 0), cb);
    }
    const Address& address() const { return server->local_address(); }
};

/// A client context whose handshake_timeout is `limit`.
std::shared_ptr<TlsContext> client_context_timing_out(std::chrono::milliseconds limit) {
    TlsClientOptions co;
    co.ca_file = tls_files().ca;
    co.server_name = "localhost";
    co.handshake_timeout = limit;
    return TlsContext::client(co);
}

// connect()'s timeout covers the TLS handshake too (asyncio's
// wait_for(open_connection(ssl=...), t)): a server that never answers the
// ClientHello ends the attempt at options.timeout, not at the context's
// handshake_timeout (10 s), with on_error (ETIMEDOUT) saying where it was,
// no on_close, and the connection closed. A shorter handshake_timeout still
// ends it first.
TEST_F(Tls, ConnectTimeoutCoversTheHandshake) {
    MuteServer mute(loop());
    Record& client = record();
    ConnectOptions o;
    o.timeout = 300ms;
    o.connection.tls = client_context();  // handshake_timeout 10 s
    const auto start = std::chrono::steady_clock::now();
    auto handle = connect(loop(), mute.address(), recording_client(client), o);
    ASSERT_TRUE(run_until(
        loop(), [&] { return client.closed() && mute.ended == 1; }, 5s))
        << "still connecting after 5 s: the connect timeout did not cover the handshake";
    EXPECT_GE(std::chrono::steady_clock::now() - start, 250ms);
    EXPECT_EQ(mute.accepted, 1);
    EXPECT_EQ(client.connects, 0);
    EXPECT_EQ(client.on_closes, 0);
    ASSERT_EQ(client.errors.size(), 1u);
    EXPECT_EQ(client.errors[0], std::errc::timed_out);
    EXPECT_EQ(client.messages[0],
              "connect " + mute.address().to_string() + ": timed out during the TLS handshake");
    EXPECT_FALSE(handle->connecting());

    // The handshake's own limit, shorter: it ends the attempt, in its words.
    Record& quick = record();
    o.timeout = 5s;
    o.connection.tls = client_context_timing_out(200ms);
    connect(loop(), mute.address(), recording_client(quick), o);
    ASSERT_TRUE(run_until(
        loop(), [&] { return quick.closed() && mute.ended == 2; }, 3s));
    EXPECT_EQ(quick.on_closes, 0);
    ASSERT_EQ(quick.errors.size(), 1u);
    EXPECT_EQ(quick.errors[0], std::errc::timed_out);
    EXPECT_EQ(quick.messages[0],
              "connect " + mute.address().to_string() + ": TLS handshake timed out after 200 ms");
}

// A connect() whose handshake fails ends in on_error (EPROTO, OpenSSL's
// reason), never on_connect nor on_close; the server's side of the same
// handshake still ends in on_close (tls). A server that does not speak TLS
// at all fails the same way.
TEST_F(Tls, AFailedHandshakeOfConnectIsOnErrorNotOnClose) {
    EchoServer server(loop(), server_context());
    Record& client = record();
    start_client(loop(), server.address(), client_context("wrong.example"), client);
    ASSERT_TRUE(run_until(loop(), [&] { return client.closed() && server.rec.closed(); }));
    pump_for(loop(), 50ms);  // an on_close, if one came after on_error
    EXPECT_EQ(client.connects, 0);
    EXPECT_EQ(client.on_closes, 0);
    ASSERT_EQ(client.errors.size(), 1u);
    EXPECT_EQ(client.errors[0], std::errc::protocol_error);
    EXPECT_EQ(client.messages[0], "connect " + server.address().to_string() +
                                      ": TLS handshake: certificate verify failed (hostname "
                                      "mismatch)");
    ASSERT_EQ(server.rec.reasons.size(), 1u);
    EXPECT_EQ(server.rec.reasons[0], CloseReason::tls);
    EXPECT_EQ(server.rec.on_closes, 1);

    // A plain HTTP server answering the ClientHello with a 400 and closing.
    Callbacks http;
    http.on_message = [](const ConnectionPtr& c, Buffer& in) {
        in.consume_all();
        c->send("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        c->close(CloseMode::graceful);
    };
    TcpServer plain(loop(), Address::ip("127.0.0.1", 0), http);
    Record& to_plain = record();
    start_client(loop(), plain.local_address(), client_context(), to_plain);
    ASSERT_TRUE(run_until(loop(), [&] { return to_plain.closed(); }));
    pump_for(loop(), 50ms);
    EXPECT_EQ(to_plain.connects, 0);
    EXPECT_EQ(to_plain.on_closes, 0);
    ASSERT_EQ(to_plain.errors.size(), 1u);
    EXPECT_EQ(to_plain.errors[0], std::errc::protocol_error);
    EXPECT_EQ(to_plain.messages[0].rfind(
                  "connect " + plain.local_address().to_string() + ": TLS handshake: ", 0),
              0u)
        << to_plain.messages[0];
}

// cancel() while the handshake runs: on_error (ECANCELED) from the loop,
// and the connection closed at once, not at the handshake's time limit.
TEST_F(Tls, CancelDuringTheHandshakeClosesTheConnection) {
    MuteServer mute(loop());
    Record& client = record();
    ConnectOptions o;
    o.connection.tls = client_context();  // handshake_timeout 10 s
    auto handle = connect(loop(), mute.address(), recording_client(client), o);
    ASSERT_TRUE(run_until(loop(), [&] { return mute.accepted == 1; }));
    pump_for(loop(), 50ms);  // the ClientHello sent, the handshake waiting
    EXPECT_TRUE(handle->connecting()) << "the attempt ended before the handshake did";
    handle->cancel();
    EXPECT_EQ(client.errors.size(), 0u) << "on_error inside cancel()";
    ASSERT_TRUE(run_until(
        loop(), [&] { return client.closed() && mute.ended == 1; }, 2s))
        << "the connection outlived cancel()";
    EXPECT_EQ(client.connects, 0);
    EXPECT_EQ(client.on_closes, 0);
    ASSERT_EQ(client.errors.size(), 1u);
    EXPECT_EQ(client.errors[0], std::errc::operation_canceled);
    EXPECT_EQ(client.messages[0], "connect " + mute.address().to_string() + ": Operation canceled");
}

namespace {
coro::Task<coro::Stream> connect_task(EventLoop* loop, Address to, ConnectOptions options) {
    co_return co_await coro::connect(*loop, to, options);
}

// with_timeout(limit, coro::connect(...)); what it threw, if anything.
coro::Task<void> tls_connect_within(EventLoop* loop, Address to, ConnectOptions options,
                                    std::chrono::milliseconds limit, std::string* seen) {
    try {
        coro::Stream s = co_await coro::with_timeout(*loop, limit, connect_task(loop, to, options));
        *seen = "connected";
    } catch (const coro::TimedOut&) {
        *seen = "timed out";
    } catch (const std::exception& e) {
        *seen = std::string("another exception: ") + e.what();
    }
}
}  // namespace

// A coroutine's connect() abandoned by with_timeout() during the handshake
// closes that connection at once (it kept it until handshake_timeout).
TEST_F(Tls, ACoroutinesConnectAbandonedDuringTheHandshakeClosesIt) {
    MuteServer mute(loop());
    ConnectOptions o;
    o.connection.tls = client_context();  // handshake_timeout 10 s
    std::string seen;
    coro::spawn(loop(), tls_connect_within(&loop(), mute.address(), o, 200ms, &seen));
    ASSERT_TRUE(run_until(
        loop(), [&] { return !seen.empty(); }, 5s));
    EXPECT_EQ(seen, "timed out");
    EXPECT_EQ(mute.accepted, 1);
    EXPECT_TRUE(run_until(
        loop(), [&] { return mute.ended == 1; }, 2s))
        << "the abandoned connection is still open";
}

TEST_F(Tls, ThrowingCallbackClosesOnlyItsConnection) {
    Record& srv = record();
    Callbacks cb = recording(srv, true);
    cb.on_message = [&](const ConnectionPtr& c, Buffer& in) {
        if (in.view().find("boom") != std::string_view::npos) throw std::runtime_error("boom");
        c->send(in.data(), in.size());
        in.consume_all();
    };
    ServerOptions opt;
    opt.connection.tls = server_context();
    TcpServer server(loop(), Address::ip("127.0.0.1", 0), cb, opt);
    int handled = 0;
    loop().set_exception_handler([&](std::exception_ptr) { ++handled; });
    Bystander by(loop(), server.local_address(), record());
    Record& bad = record();
    start_client(loop(), server.local_address(), client_context(), bad);
    ASSERT_TRUE(run_until(loop(), [&] { return bad.connects == 1; }));
    bad.conn->send("boom");
    ASSERT_TRUE(run_until(loop(), [&] { return srv.closed() && bad.closed(); }));
    EXPECT_EQ(srv.reasons[0], CloseReason::exception);
    EXPECT_EQ(handled, 1);
    by.check_served(loop());
}

// OpenSSL's error queue is per thread: errors other code left there must not
// be taken for this connection's (SSL_get_error() reads the queue).
TEST_F(Tls, StaleOpenSslErrorsOfOtherCodeAreNotOurs) {
    // The server's on_message leaves an error each time, as a user's failed
    // OpenSSL call would; its next SSL_read, which finds nothing more, must
    // still say "wait", not "failed".
    Record& srv = record();
    Callbacks cb = recording(srv, true);
    cb.on_message = [&](const ConnectionPtr& c, Buffer& in) {
        c->send(in.data(), in.size());
        in.consume_all();
        ERR_raise(ERR_LIB_USER, 42);
    };
    ServerOptions opt;
    opt.connection.tls = server_context();
    TcpServer server(loop(), Address::ip("127.0.0.1", 0), cb, opt);
    Record& client = record();
    start_client(loop(), server.local_address(), client_context(), client);
    ASSERT_TRUE(run_until(loop(), [&] { return client.connects == 1 || client.closed(); }));
    ASSERT_EQ(client.connects, 1);
    const std::string data = pattern(1024 * 1024, 4);
    client.conn->send(data);
    ASSERT_TRUE(
        run_until(loop(), [&] { return client.got.size() >= data.size() || srv.closed(); }));
    EXPECT_FALSE(srv.closed()) << srv.messages[0];
    EXPECT_TRUE(client.got == data);
    ERR_clear_error();
}

// ---- contexts: clear errors for bad files -----------------------------------------------

std::string context_error(const TlsServerOptions& o) {
    try {
        TlsContext::server(o);
    } catch (const std::exception& e) {
        return e.what();
    }
    return "no error";
}

TEST_F(Tls, BadPemFilesGiveClearErrors) {
    TlsServerOptions o;
    o.cert_chain_file = dir_ + "/no-such.crt";
    o.key_file = tls_files().server_key;
    std::string e = context_error(o);
    EXPECT_EQ(e.rfind("TLS: certificate chain file " + o.cert_chain_file + ": ", 0), 0u) << e;
    EXPECT_NE(e.find("No such file"), std::string::npos) << e;

    o.cert_chain_file = tls_files().garbage;
    e = context_error(o);
    EXPECT_EQ(e, "TLS: certificate chain file " + o.cert_chain_file + ": no start line") << e;

    o.cert_chain_file = tls_files().server_cert;
    o.key_file = tls_files().other_key;
    e = context_error(o);
    EXPECT_EQ(e.rfind("TLS: key file " + o.key_file + " does not match the certificate: ", 0), 0u)
        << e;
    EXPECT_NE(e.find("key values mismatch"), std::string::npos) << e;

    // An encrypted key is refused at once, never a prompt on the terminal.
    o.key_file = path("encrypted.key");
    {
        FILE* in = std::fopen(tls_files().server_key.c_str(), "r");
        ASSERT_TRUE(in);
        EVP_PKEY* key = PEM_read_PrivateKey(in, nullptr, nullptr, nullptr);
        std::fclose(in);
        ASSERT_TRUE(key);
        FILE* out = std::fopen(o.key_file.c_str(), "w");
        ASSERT_TRUE(out);
        char pass[] = "secret";
        const int ok = PEM_write_PrivateKey(out, key, EVP_aes_128_cbc(), nullptr, 0, nullptr, pass);
        std::fclose(out);
        EVP_PKEY_free(key);
        ASSERT_EQ(ok, 1);
    }
    e = context_error(o);
    EXPECT_EQ(e, "TLS: key file " + o.key_file +
                     ": encrypted, and evmux takes no passphrase (decrypt it first: openssl pkey "
                     "-in ENCRYPTED -out PLAIN)");

    o.key_file = tls_files().server_key;
    o.alpn = {std::string(300, 'x')};
    e = context_error(o);
    EXPECT_EQ(e, "TLS: ALPN protocol names must be 1 to 255 bytes long");

    TlsClientOptions c;
    c.ca_file = dir_ + "/no-such-ca.crt";
    try {
        TlsContext::client(c);
        ADD_FAILURE() << "no error for a missing CA file";
    } catch (const std::runtime_error& err) {
        EXPECT_EQ(std::string(err.what()).rfind("TLS: CA file " + c.ca_file + ": ", 0), 0u)
            << err.what();
    }
    EXPECT_THROW(TlsContext::server(TlsServerOptions{}), std::invalid_argument);
}

// ---- evmux's record layer against OpenSSL's ----------------------------------------------
// The peer here is OpenSSL itself (SSL_connect/SSL_read/SSL_write on a
// blocking socket, on a thread of its own): each record evmux makes must open
// there and each of OpenSSL's here, KeyUpdates included. The suite runs with
// both record layers (EVMUX_TLS_RECORDS=openssl the second time).

/// An OpenSSL TLS client on a blocking socket, for a thread of its own.
class OpensslPeer {
  public:
    /// `suites`: the TLS 1.3 cipher suites offered (OpenSSL's default if null).
    explicit OpensslPeer(const Address& to, int max_version = 0, const char* suites = nullptr) {
        ctx_ = SSL_CTX_new(TLS_client_method());
        if (max_version != 0) SSL_CTX_set_max_proto_version(ctx_, max_version);
        if (suites && SSL_CTX_set_ciphersuites(ctx_, suites) != 1)
            throw std::invalid_argument(std::string("cipher suites ") + suites);
        fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        timeval tv{10, 0};  // nothing here waits for ever
        ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        int one = 1;
        ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        // On a thread with io_uring rings a blocking connect() with a timeout
        // can return EINTR while it goes on: wait for it then.
        if (::connect(fd_, static_cast<const sockaddr*>(to.sockaddr_ptr()), to.sockaddr_len()) <
            0) {
            pollfd p{fd_, POLLOUT, 0};
            int err = errno;
            socklen_t len = sizeof err;
            if (err != EINTR || ::poll(&p, 1, 10000) != 1 ||
                ::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0)
                throw std::system_error(err, std::generic_category(), "connect");
        }
        ssl_ = SSL_new(ctx_);
        SSL_set_fd(ssl_, fd_);
        SSL_set_msg_callback(ssl_, count_key_updates);
        SSL_set_msg_callback_arg(ssl_, this);
    }
    ~OpensslPeer() {
        SSL_free(ssl_);
        SSL_CTX_free(ctx_);
        ::close(fd_);
    }
    bool handshake() { return SSL_connect(ssl_) == 1; }
    bool write(const std::string& data) {
        return SSL_write(ssl_, data.data(), static_cast<int>(data.size())) ==
               static_cast<int>(data.size());
    }
    /// Exactly n bytes, or fewer if the stream ends or fails.
    std::string read(std::size_t n) {
        std::string got;
        char buf[16384];
        while (got.size() < n) {
            int r = SSL_read(ssl_, buf, static_cast<int>(std::min(sizeof buf, n - got.size())));
            if (r <= 0) break;
            got.append(buf, static_cast<std::size_t>(r));
        }
        return got;
    }
    /// Reads until the stream ends: OpenSSL's reason for the end (for an
    /// alert from the server, e.g. "sslv3 alert bad record mac"; "unexpected
    /// eof while reading" if the server only closed), or "no error".
    std::string end_reason() {
        char buf[4096];
        ERR_clear_error();
        while (SSL_read(ssl_, buf, sizeof buf) > 0) {
        }
        const char* why = ERR_reason_error_string(ERR_peek_last_error());
        return why ? why : "no error";
    }
    bool key_update(bool request_peer) {
        return SSL_key_update(ssl_, request_peer ? SSL_KEY_UPDATE_REQUESTED
                                                 : SSL_KEY_UPDATE_NOT_REQUESTED) == 1;
    }
    /// Bytes straight onto the socket, under TLS's feet; `one_by_one`: a
    /// send() per byte, so the other side gets records in pieces.
    void raw_send(std::string_view bytes, bool one_by_one = false) {
        if (!one_by_one) return write_all(fd_, bytes);
        for (char c : bytes) write_all(fd_, std::string_view(&c, 1));
    }
    /// A record of `data` as OpenSSL makes it, not sent.
    std::string sealed(const std::string& data) {
        BIO* mem = BIO_new(BIO_s_mem());
        BIO* sock = SSL_get_wbio(ssl_);
        BIO_up_ref(sock);
        SSL_set0_wbio(ssl_, mem);
        SSL_write(ssl_, data.data(), static_cast<int>(data.size()));
        char* p = nullptr;
        long len = BIO_get_mem_data(mem, &p);
        std::string out(p, static_cast<std::size_t>(len));
        SSL_set0_wbio(ssl_, sock);  // frees mem
        return out;
    }
    int fd() const { return fd_; }
    const char* version() const { return SSL_get_version(ssl_); }
    const char* cipher() const { return SSL_get_cipher_name(ssl_); }
    /// KeyUpdate messages received from the server.
    int key_updates_seen() const { return key_updates_.load(); }

  private:
    static void count_key_updates(int write_p, int, int type, const void* buf, std::size_t len,
                                  SSL*, void* arg) {
        if (!write_p && type == SSL3_RT_HANDSHAKE && len > 0 &&
            static_cast<const unsigned char*>(buf)[0] == SSL3_MT_KEY_UPDATE)
            ++static_cast<OpensslPeer*>(arg)->key_updates_;
    }
    SSL_CTX* ctx_;
    SSL* ssl_;
    int fd_;
    std::atomic<int> key_updates_{0};
};

/// Runs `body` on a thread while `loop` is pumped; its failures come back
/// as the returned text ("" when it went through).
std::string run_peer(EventLoop& loop, const std::function<std::string()>& body) {
    std::atomic<bool> done{false};
    std::string result;
    std::thread t([&] {
        result = body();
        done = true;
    });
    bool finished = run_until(
        loop, [&] { return done.load(); }, 30s);
    t.join();
    return finished ? result : "the peer did not finish in 30 s";
}

// In each TLS 1.3 suite (the AEAD each names, evmux's record layer against
// OpenSSL's), in sizes from one byte to several records.
TEST_F(Tls, KeyUpdatesFromThePeerAreAnsweredInEachSuite) {
    for (const char* suite :
         {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}) {
        SCOPED_TRACE(suite);
        EchoServer server(loop(), server_context());
        OpensslPeer peer(server.address(), 0, suite);
        std::string err = run_peer(loop(), [&]() -> std::string {
            if (!peer.handshake()) return "handshake failed";
            if (std::string(peer.cipher()) != suite)
                return std::string("negotiated ") + peer.cipher();
            const std::size_t sizes[] = {1, 3000, 16384, 40000, 1024, 3000};
            for (int round = 0; round < 6; ++round) {
                // Requested, not requested, in turn: each time new keys both
                // ways or one way, and the echo must still open on both sides.
                if (round > 0 && !peer.key_update(round % 2 == 1)) return "SSL_key_update failed";
                const std::string data = pattern(sizes[round], round);
                if (!peer.write(data)) return "write failed in round " + std::to_string(round);
                if (peer.read(data.size()) != data)
                    return "echo differs in round " + std::to_string(round);
            }
            return "";
        });
        EXPECT_EQ(err, "");
        // The three requested updates were answered with the server's own.
        EXPECT_GE(peer.key_updates_seen(), 3);
        ASSERT_EQ(server.rec.connects, 1);
        EXPECT_EQ(server.rec.records, expected_records());
        EXPECT_FALSE(server.rec.closed()) << server.rec.messages[0];
    }
}

// The KeyUpdate the server owes comes while its socket is full: it must wait
// for the socket, go out before more data, and nothing may stall.
TEST_F(Tls, KeyUpdateAnsweredIntoAFullSocket) {
    EchoServer server(loop(), server_context());
    OpensslPeer peer(server.address());
    const std::string bulk = pattern(1024 * 1024, 5);
    const std::string tail = pattern(2000, 6);
    std::string err = run_peer(loop(), [&]() -> std::string {
        if (!peer.handshake()) return "handshake failed";
        // Not reading: the server's replies fill both sockets and its queue.
        if (!peer.write(bulk)) return "bulk write failed";
        if (!peer.key_update(true)) return "SSL_key_update failed";
        if (!peer.write(tail)) return "tail write failed";
        std::string got = peer.read(bulk.size() + tail.size());
        if (got != bulk + tail) return "echo differs: " + std::to_string(got.size()) + " bytes";
        return "";
    });
    EXPECT_EQ(err, "");
    EXPECT_GE(peer.key_updates_seen(), 1);
    EXPECT_FALSE(server.rec.closed());
}

// evmux's record layer sends a KeyUpdate of its own every N records (2^23 by
// default; EVMUX_TLS_KEY_UPDATE_RECORDS lowers it here to 3).
TEST_F(Tls, OwnKeyUpdatesEveryNRecords) {
    ::setenv("EVMUX_TLS_KEY_UPDATE_RECORDS", "3", 1);
    auto sctx = server_context();
    auto cctx = client_context();
    ::unsetenv("EVMUX_TLS_KEY_UPDATE_RECORDS");
    EXPECT_EQ(sctx->key_update_records(), 3u);
    EchoServer server(loop(), sctx);
    OpensslPeer peer(server.address());
    std::string err = run_peer(loop(), [&]() -> std::string {
        if (!peer.handshake()) return "handshake failed";
        for (int i = 0; i < 20; ++i) {
            const std::string data = pattern(5000, i);
            if (!peer.write(data)) return "write failed";
            if (peer.read(data.size()) != data) return "echo differs at " + std::to_string(i);
        }
        return "";
    });
    EXPECT_EQ(err, "");
    // 20 echoes, a record or more each: 6 KeyUpdates at least from evmux's
    // record layer; OpenSSL's makes none of its own.
    if (expected_records() == TlsRecords::evmux)
        EXPECT_GE(peer.key_updates_seen(), 6);
    else
        EXPECT_EQ(peer.key_updates_seen(), 0);
    // evmux to evmux, both sides updating their keys.
    Record& client = record();
    start_client(loop(), server.address(), cctx, client);
    ASSERT_TRUE(run_until(loop(), [&] { return client.connects == 1 || client.closed(); }));
    const std::string data = pattern(200 * 1024, 9);
    client.conn->send(data);
    ASSERT_TRUE(
        run_until(loop(), [&] { return client.got.size() >= data.size() || client.closed(); }));
    EXPECT_TRUE(client.got == data);
}

// Records cut into one-byte sends arrive whole (evmux's layer keeps the
// pieces until a record is complete).
TEST_F(Tls, RecordsInPiecesArriveWhole) {
    EchoServer server(loop(), server_context());
    OpensslPeer peer(server.address());
    std::string err = run_peer(loop(), [&]() -> std::string {
        if (!peer.handshake()) return "handshake failed";
        const std::string data = pattern(1500, 7);
        std::string records = peer.sealed(data);
        records += peer.sealed(data);  // in this order: each has its sequence number
        try {
            peer.raw_send(records, true);
        } catch (const std::system_error& e) {
            return e.what();
        }
        if (peer.read(2 * data.size()) != data + data) return "echo differs";
        return "";
    });
    EXPECT_EQ(err, "");
    EXPECT_FALSE(server.rec.closed()) << server.rec.messages[0];
}

// Garbage where a record should be: that connection closes with reason `tls`
// and the reason in words; the others are served.
TEST_F(Tls, BadRecordsCloseOnlyTheirConnection) {
    struct Case {
        std::string bytes;
        std::string reason;  // in evmux's record layer's words
    };
    std::string bad_mac = {0x17, 0x03, 0x03, 0x00, 0x20};
    bad_mac += std::string(32, '\x55');
    std::string too_long = {0x17, 0x03, 0x03, 0x4f, 0x00};  // 20 224 bytes
    too_long += std::string(100, '\x01');
    std::string plain_alert = {0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28};
    const Case cases[] = {{bad_mac, "bad record mac"},
                          {too_long, "record overflow"},
                          {plain_alert, "unexpected record type"}};
    EchoServer server(loop(), server_context());
    Bystander by(loop(), server.address(), record());
    std::size_t closed = 0;
    for (const Case& c : cases) {
        OpensslPeer peer(server.address());
        std::string err = run_peer(loop(), [&]() -> std::string {
            if (!peer.handshake()) return "handshake failed";
            if (!peer.write("fine")) return "write failed";
            if (peer.read(4) != "fine") return "no echo";
            peer.raw_send(c.bytes);
            // The server's fatal alert comes before its FIN, on either I/O
            // path (on completion I/O it once waited for a send request
            // that a closing connection never makes).
            const std::string end = peer.end_reason();
            if (end.find("alert") == std::string::npos) return "no alert before the end: " + end;
            return "";
        });
        ASSERT_EQ(err, "") << c.reason;
        ASSERT_TRUE(run_until(loop(), [&] { return server.rec.closed(closed + 1); }))
            << "no close for " << c.reason;
        EXPECT_EQ(server.rec.reasons[closed], CloseReason::tls);
        if (expected_records() == TlsRecords::evmux)
            EXPECT_NE(server.rec.messages[closed].find(c.reason), std::string::npos)
                << server.rec.messages[closed];
        else
            EXPECT_FALSE(server.rec.messages[closed].empty());
        ++closed;
    }
    by.check_served(loop());
}

// TLS 1.2 has no evmux record layer: OpenSSL's goes on, and the stream is the same.
TEST_F(Tls, Tls12StaysWithOpensslRecords) {
    EchoServer server(loop(), server_context());
    OpensslPeer peer(server.address(), TLS1_2_VERSION);
    const std::string data = pattern(100 * 1024, 4);
    std::string err = run_peer(loop(), [&]() -> std::string {
        if (!peer.handshake()) return "handshake failed";
        if (!peer.write(data)) return "write failed";
        if (peer.read(data.size()) != data) return "echo differs";
        return "";
    });
    EXPECT_EQ(err, "");
    EXPECT_STREQ(peer.version(), "TLSv1.2");
    ASSERT_EQ(server.rec.connects, 1);
    EXPECT_EQ(server.rec.version, "TLSv1.2");
    EXPECT_EQ(server.rec.records, TlsRecords::openssl);
}

TEST_F(Tls, BadRecordLayerNameIsAClearError) {
    ::setenv("EVMUX_TLS_RECORDS", "kernel", 1);
    try {
        client_context();
        ADD_FAILURE() << "no error for EVMUX_TLS_RECORDS=kernel";
    } catch (const std::invalid_argument& e) {
        EXPECT_STREQ(e.what(), "EVMUX_TLS_RECORDS must be evmux or openssl, not 'kernel'");
    }
    ::setenv("EVMUX_TLS_RECORDS", expected_records() == TlsRecords::evmux ? "evmux" : "openssl", 1);
}

TEST_F(Tls, BadKeyUpdateCountIsAClearError) {
    for (const char* bad : {"0", "many", "12x", "-1", " 5"}) {
        ::setenv("EVMUX_TLS_KEY_UPDATE_RECORDS", bad, 1);
        try {
            server_context();
            ADD_FAILURE() << "no error for EVMUX_TLS_KEY_UPDATE_RECORDS=" << bad;
        } catch (const std::invalid_argument& e) {
            EXPECT_EQ(
                std::string(e.what()),
                std::string("EVMUX_TLS_KEY_UPDATE_RECORDS must be a count > 0, not '") + bad + "'");
        }
    }
    ::unsetenv("EVMUX_TLS_KEY_UPDATE_RECORDS");
    EXPECT_EQ(server_context()->key_update_records(), std::uint64_t{1} << 23);
}

}  // namespace
}  // namespace evmux
