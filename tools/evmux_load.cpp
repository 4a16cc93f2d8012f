// evmux-load: a closed-loop TCP echo load client, the measuring instrument of
// the benchmarks (with --udp, the UDP one in load_udp.cpp).
//
// It is deliberately written against raw epoll with no evmux code in it: an
// instrument that shared the code under test could hide the very bug or cost
// it is meant to show. It runs on the same (small) machine as the server, so it
// must stay cheap: every buffer is allocated before the clock starts, nothing
// is allocated per message, and replies are read with one large buffer.
//
// Model: C connections are opened (non-blocking connects, a bounded number in
// flight so the server's accept backlog does not overflow), all before the
// clock starts. A of them ping-pong: send one S-byte message, wait for all S
// bytes back, verify them byte for byte, record the round-trip time, repeat
// until the duration ends. One unrecorded warm-up round trip per active
// connection precedes the clock, so it starts with every active connection
// accepted by the server. The other C-A stay idle and must still be connected
// at the end. Each round's message is S bytes of a pool of random bytes (made
// once, 1 MiB more than S) from an offset drawn from the connection's own
// seeded stream: other bytes every round at no cost per round, so a reply
// routed to the wrong connection, or a stale or repeated reply, is a mismatch.
//
// --tls: the same over TLS; the handshake (OpenSSL's) is part of connecting,
// before the clock. The records after it are sealed and opened by a record
// layer of evmux-load's own (load_tls.cpp: EVP's ciphers, none of OpenSSL's
// record layer's bookkeeping), so that a TLS client costs about what the
// server's records cost and the server, not the client, limits a TLS point;
// --tls-records openssl keeps SSL_read/SSL_write on OpenSSL's socket BIO.
//
// --rate R: paced instead of closed: each active connection sends its
// messages on a fixed schedule, A/R seconds apart, the connections' schedules
// staggered by 1/R, so R round trips per second arrive spread evenly (as
// wrk2's constant throughput). A reply that comes after its connection's next
// send was due starts that send at once (the schedule is not shifted, so a
// client or server that falls behind catches up), and latency is counted from
// when the message was due, not from when it went out (a stalled server is
// not hidden by the sends it delayed). A server compared with another at the
// same rate then does the same work per second however fast each could go.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "cli_number.hpp"
#include "fd_limit.hpp"
#include "load_common.hpp"

#if EVMUX_LOAD_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "load_tls.hpp"
#else
struct ssl_st;  // never made without TLS
using SSL = ssl_st;
namespace evmux::load {
struct TlsSecrets {};
struct TlsRecords {
    bool drained() const { return true; }
    bool has_unsent() const { return false; }
    int flush(int) { return 1; }
};
}  // namespace evmux::load
#endif

namespace {

using namespace evmux::load;

/// Connects in flight at once: well under the smallest common listen backlog
/// (128), so a server that accepts slowly is never sent more SYNs than its
/// accept queue holds (an overflowing queue silently drops handshakes, which
/// turns into one-second SYN retransmits and distorted numbers).
constexpr std::size_t connect_window = 64;
/// File descriptors kept free besides the connections (stdio, epoll, margin).
constexpr long fd_margin = 32;
/// One read takes up to this much: large, so a 100 KB reply costs few calls.
constexpr std::size_t read_buffer_size = 256 * 1024;
/// After the duration ends, round trips in flight get this long to finish;
/// one that does not is counted as an error (the server stalled).
constexpr auto drain_bound = std::chrono::seconds(5);
/// The random pool the messages are cut from is this much longer than one.
constexpr std::size_t pool_extra = 1024 * 1024;
/// Error messages printed to stderr; the rest are only counted.
constexpr int max_error_messages = 10;

/// One TCP connection to the server and its round-trip state.
struct Conn {
    enum class State : std::uint8_t {
        unused,       // not yet connecting
        connecting,   // connect() in progress
        handshaking,  // --tls: connected, TLS handshake in progress
        idle,         // connected, sends nothing, must stay connected
        in_round,     // a message is being sent and/or its echo received
        finished,     // active, no round in flight (after the duration ended)
        closed,       // failed (error or mismatch) and closed
    };
    int fd = -1;
    SSL* ssl = nullptr;  // --tls only
    // --tls with its own records: the handshake's secrets, then the records.
    std::unique_ptr<TlsSecrets> secrets;
    std::unique_ptr<TlsRecords> records;
    State state = State::unused;
    bool active = false;
    bool want_write = false;             // EPOLLOUT is in the registered interest
    std::uint64_t rng = 0;               // this connection's payload stream
    const unsigned char* msg = nullptr;  // the message in flight (size bytes of the pool)
    std::size_t sent = 0;                // bytes of msg written so far
    std::size_t received = 0;            // bytes of the echo received and verified
    Clock::time_point started{};  // connect start, then round start (--rate: when it was due)
    Clock::time_point due{};      // --rate: when the next round is to start
};

/// The counters the report is made of.
struct Results {
    std::uint64_t round_trips = 0;
    std::uint64_t mismatches = 0;
    std::uint64_t errors = 0;
    double elapsed_s = 0;
    LatencyHistogram latency;
};

/// The load run: owns the epoll fd, the connections and every buffer.
/// Single-threaded; construct, then connect_all(), then run().
class LoadClient {
  public:
    LoadClient(const Options& opt, const sockaddr_storage& addr, socklen_t addr_len)
        : opt_(opt),
          addr_(addr),
          addr_len_(addr_len),
          conns_(opt.conns),
          pool_(pool_extra + opt.size),
          read_buf_(read_buffer_size) {
        epfd_ = epoll_create1(EPOLL_CLOEXEC);
        if (epfd_ < 0) die_errno("epoll_create1");
        if (opt.tls) tls_ctx_ = make_tls_context(opt);
        if (opt.rate > 0) waiting_.reserve(opt.active);
        for (std::size_t i = 0; i < conns_.size(); ++i) {
            Conn& c = conns_[i];
            c.active = i < opt.active;
            // Distinct, reproducible streams: seed from the index.
            if (c.active) c.rng = 0x5EED0000ull + i * 0x100000001B3ull;
        }
        std::uint64_t seed = 0x9001;
        fill_payload(seed, pool_.data(), pool_.size());
    }
    ~LoadClient() {
        for (Conn& c : conns_) close_conn(c);
        if (epfd_ >= 0) ::close(epfd_);
#if EVMUX_LOAD_TLS
        SSL_CTX_free(tls_ctx_);
#endif
    }
    LoadClient(const LoadClient&) = delete;
    LoadClient& operator=(const LoadClient&) = delete;

    /// Opens every connection, at most connect_window in flight. Returns false
    /// (errors counted) if any connect failed or timed out; it then stops
    /// starting new ones.
    bool connect_all();
    /// One unrecorded round trip on every active connection, so the clock
    /// starts with every active connection accepted and served. Returns false
    /// (errors counted) if any failed or got no reply within --connect-timeout.
    bool warm_up();
    /// Runs the ping-pong (paced with --rate) for the duration, drains,
    /// checks the idle ones.
    void run();
    /// The counters so far.
    const Results& results() const {
        return res_;
    }

  private:
    [[noreturn]] static void die_errno(const char* what) {
        std::fprintf(stderr, "evmux-load: %s: %s\n", what, std::strerror(errno));
        std::exit(1);
    }
    void error(std::size_t i, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
    void mismatch(std::size_t i, std::size_t offset);
    void close_conn(Conn& c);
    void set_interest(std::size_t i, std::uint32_t events, int op = EPOLL_CTL_MOD);
    bool start_connect(std::size_t i);
    void finish_connect(std::size_t i);
    // --tls: the handshake after connect, driven by readiness like connect.
    void continue_handshake(std::size_t i);
    // recv()/send() or, with --tls, SSL_read()/SSL_write() answering alike:
    // -1 with errno EAGAIN (wait), EPROTO (a TLS error, printed) or another.
    ssize_t io_recv(std::size_t i, void* buf, std::size_t len);
    ssize_t io_send(std::size_t i, const void* buf, std::size_t len);
    void start_round(std::size_t i);
    // After a round: the next one now (closed loop, or --rate and it is due),
    // or when it is due.
    void next_round(std::size_t i, Clock::time_point now);
    // --rate: starts the rounds that have come due.
    void start_due(Clock::time_point now);
    static struct ssl_ctx_st* make_tls_context(const Options& opt);
    void start_tls(std::size_t i);
    void on_writable(std::size_t i);
    void on_readable(std::size_t i);
    // Reply bytes wait in the TLS layer that no readiness event will announce.
    static bool tls_buffered(const Conn& c);
    void check_idle(std::size_t i, bool at_end);
    // Waits for events until `until` at the latest, handles them; returns the
    // time after.
    Clock::time_point poll_once(Clock::time_point now, Clock::time_point until);

    const Options& opt_;
    sockaddr_storage addr_;
    socklen_t addr_len_;
    int epfd_ = -1;
    struct ssl_ctx_st* tls_ctx_ = nullptr;  // --tls
    std::vector<Conn> conns_;
    std::vector<unsigned char> pool_;  // the messages' bytes: pool_extra + size random bytes
    std::vector<unsigned char> read_buf_;
    std::array<epoll_event, 1024> events_{};
    // --rate: the connections waiting for their next round, earliest first
    // (a heap; room for every active connection, reserved up front).
    std::vector<std::pair<Clock::time_point, std::size_t>> waiting_;
    Clock::duration period_{};  // --rate: between one connection's sends
    Results res_;
    bool stopping_ = false;          // the duration is over: start no new round
    bool warming_ = false;           // in warm_up(): record nothing
    std::size_t in_flight_ = 0;      // conns in State::in_round
    std::size_t active_closed_ = 0;  // active conns closed (failed), none to load with
    int messages_printed_ = 0;
    std::size_t openssl_records_ = 0;  // --tls-records own: connections left on OpenSSL's
    std::string openssl_records_why_;  // the first one's reason
};

void LoadClient::error(std::size_t i, const char* fmt, ...) {
    ++res_.errors;
    if (messages_printed_++ >= max_error_messages) return;
    va_list ap;
    va_start(ap, fmt);
    print_error("conn", i, fmt, ap);
    va_end(ap);
}

void LoadClient::mismatch(std::size_t i, std::size_t offset) {
    ++res_.mismatches;
    if (messages_printed_++ < max_error_messages)
        std::fprintf(stderr, "evmux-load: conn %zu: reply differs from the message at byte %zu\n",
                     i, offset);
    // The stream is out of step now; nothing more on it can be trusted.
    close_conn(conns_[i]);
}

void LoadClient::close_conn(Conn& c) {
    if (c.active && c.state != Conn::State::closed) ++active_closed_;
    if (c.state == Conn::State::in_round) --in_flight_;
    c.state = Conn::State::closed;
#if EVMUX_LOAD_TLS
    SSL_free(c.ssl);  // no close_notify: the server sees the end as an error, as after a kill
#endif
    c.ssl = nullptr;
    c.secrets.reset();
    c.records.reset();
    if (c.fd >= 0) ::close(c.fd);  // close() also removes it from the epoll set
    c.fd = -1;
}

void LoadClient::set_interest(std::size_t i, std::uint32_t events, int op) {
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = i;
    if (epoll_ctl(epfd_, op, conns_[i].fd, &ev) < 0) die_errno("epoll_ctl");
    conns_[i].want_write = (events & EPOLLOUT) != 0;
}

bool LoadClient::start_connect(std::size_t i) {
    Conn& c = conns_[i];
    c.fd = ::socket(addr_.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c.fd < 0) {
        error(i, "socket: %s", std::strerror(errno));
        c.state = Conn::State::closed;
        return false;
    }
    const int one = 1;
    // Ping-pong of small messages: without NODELAY, Nagle + delayed ACK would
    // add up to 40 ms to a round trip whose send was split.
    ::setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (opt_.sndbuf > 0 &&
        ::setsockopt(c.fd, SOL_SOCKET, SO_SNDBUF, &opt_.sndbuf, sizeof opt_.sndbuf) < 0)
        die_errno("setsockopt(SO_SNDBUF)");
    c.started = Clock::now();
    c.state = Conn::State::connecting;
    if (::connect(c.fd, reinterpret_cast<const sockaddr*>(&addr_), addr_len_) == 0) {
        set_interest(i, EPOLLOUT, EPOLL_CTL_ADD);
        finish_connect(i);
        return c.state != Conn::State::closed;
    }
    if (errno != EINPROGRESS) {
        error(i, "connect: %s", std::strerror(errno));
        close_conn(c);
        return false;
    }
    set_interest(i, EPOLLOUT, EPOLL_CTL_ADD);
    return true;
}

void LoadClient::finish_connect(std::size_t i) {
    Conn& c = conns_[i];
    int err = 0;
    socklen_t len = sizeof err;
    if (::getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err != 0) {
        error(i, "connect: %s", std::strerror(err));
        close_conn(c);
        return;
    }
    if (tls_ctx_) {
        start_tls(i);
        return;
    }
    // Readable interest only: write interest is added while a send is blocked.
    // RDHUP so that an idle connection the server drops is seen at once.
    c.state = c.active ? Conn::State::finished : Conn::State::idle;
    set_interest(i, c.active ? EPOLLIN : (EPOLLIN | EPOLLRDHUP));
}

#if EVMUX_LOAD_TLS
namespace {
// OpenSSL's reason for the last failure, and its queue emptied.
const char* tls_reason() {
    const unsigned long e = ERR_get_error();
    ERR_clear_error();
    if (e != 0 && ERR_SYSTEM_ERROR(e)) return std::strerror(ERR_GET_REASON(e));  // fopen's errno
    const char* r = e ? ERR_reason_error_string(e) : nullptr;
    return r ? r : "unexpected EOF";
}
}  // namespace

SSL_CTX* LoadClient::make_tls_context(const Options& opt) {
    SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) die_errno("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    // Records one by one as the socket takes them; a retry may not move.
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE);
    if (opt.tls_records == "openssl") {
        // One recv() takes what is there, not a record's header and then its body.
        SSL_CTX_set_read_ahead(ctx, 1);
    } else {
        // Our records take over after the handshake: OpenSSL reads no byte
        // past it (no read-ahead), and hands over the traffic secrets.
        SSL_CTX_set_keylog_callback(ctx, [](const SSL* ssl, const char* line) {
            if (auto* secrets = static_cast<TlsSecrets*>(SSL_get_app_data(ssl)))
                secrets->note(line);
        });
    }
    if (!opt.tls_suites.empty() && SSL_CTX_set_ciphersuites(ctx, opt.tls_suites.c_str()) != 1) {
        std::fprintf(stderr, "evmux-load: --tls-suites %s: %s\n", opt.tls_suites.c_str(),
                     tls_reason());
        std::exit(2);
    }
    if (opt.tls_ca.empty()) {
        std::fprintf(stderr,
                     "evmux-load: --tls without --tls-ca: the server's certificate is not "
                     "checked\n");
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);
    } else {
        if (SSL_CTX_load_verify_locations(ctx, opt.tls_ca.c_str(), nullptr) != 1) {
            std::fprintf(stderr, "evmux-load: --tls-ca %s: %s\n", opt.tls_ca.c_str(), tls_reason());
            std::exit(2);
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
    }
    return ctx;
}

void LoadClient::start_tls(std::size_t i) {
    Conn& c = conns_[i];
    c.ssl = SSL_new(tls_ctx_);
    if (!c.ssl || SSL_set_fd(c.ssl, c.fd) != 1) die_errno("SSL_new");
    if (!opt_.tls_ca.empty()) {
        SSL_set_tlsext_host_name(c.ssl, opt_.tls_name.c_str());
        SSL_set1_host(c.ssl, opt_.tls_name.c_str());
    }
    if (opt_.tls_records != "openssl") {
        c.secrets = std::make_unique<TlsSecrets>();
        SSL_set_app_data(c.ssl, c.secrets.get());
    }
    SSL_set_connect_state(c.ssl);
    c.state = Conn::State::handshaking;
    continue_handshake(i);
}

void LoadClient::continue_handshake(std::size_t i) {
    Conn& c = conns_[i];
    ERR_clear_error();
    const int r = SSL_do_handshake(c.ssl);
    if (r == 1) {
        if (c.secrets) {
            std::string why;
            c.records = TlsRecords::take_over(c.ssl, *c.secrets, why);
            SSL_set_app_data(c.ssl, nullptr);
            c.secrets.reset();
            if (!c.records && openssl_records_++ == 0) openssl_records_why_ = why;
        }
        c.state = c.active ? Conn::State::finished : Conn::State::idle;
        set_interest(i, c.active ? EPOLLIN : (EPOLLIN | EPOLLRDHUP));
        return;
    }
    const int e = SSL_get_error(c.ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        set_interest(i, e == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT);
        return;
    }
    const long verify = SSL_get_verify_result(c.ssl);
    error(i, "TLS handshake: %s%s%s%s", tls_reason(), verify != X509_V_OK ? " (" : "",
          verify != X509_V_OK ? X509_verify_cert_error_string(verify) : "",
          verify != X509_V_OK ? ")" : "");
    close_conn(c);
}

// SSL_get_error() needs the thread's error queue empty before the call.
// Every failure here empties it (tls_reason()), so it is nearly always
// empty already: look before clearing, as clearing walks all 16 slots of
// the queue (ERR_clear_error was 3 % of the client's time per message).
void clear_tls_errors() {
    if (ERR_peek_error() != 0) ERR_clear_error();
}

ssize_t LoadClient::io_recv(std::size_t i, void* buf, std::size_t len) {
    Conn& c = conns_[i];
    if (!c.ssl) return ::recv(c.fd, buf, len, 0);
    if (c.records) {
        const ssize_t n = c.records->read(c.fd, static_cast<unsigned char*>(buf), len);
        if (n < 0 && errno == EPROTO) error(i, "%s", c.records->error_text().c_str());
        // Reading made it answer a KeyUpdate: out now if the socket takes it,
        // else ahead of the next message (write() sends it first).
        if (n >= 0 && c.records->has_unsent() && c.records->flush(c.fd) < 0) return -1;
        return n;
    }
    clear_tls_errors();
    const int n = SSL_read(c.ssl, buf, static_cast<int>(std::min<std::size_t>(len, INT32_MAX)));
    if (n > 0) return n;
    switch (SSL_get_error(c.ssl, n)) {
        case SSL_ERROR_WANT_READ:
        case SSL_ERROR_WANT_WRITE:
            errno = EAGAIN;
            return -1;
        case SSL_ERROR_ZERO_RETURN:
            return 0;  // close_notify
        case SSL_ERROR_SYSCALL:
            if (errno != 0 && ERR_peek_error() == 0) return -1;  // the socket's error
            break;
    }
    error(i, "TLS: %s", tls_reason());
    errno = EPROTO;
    return -1;
}

ssize_t LoadClient::io_send(std::size_t i, const void* buf, std::size_t len) {
    Conn& c = conns_[i];
    if (!c.ssl) return ::send(c.fd, buf, len, MSG_NOSIGNAL);
    if (c.records) {
        const ssize_t n = c.records->write(c.fd, static_cast<const unsigned char*>(buf), len);
        if (n < 0 && errno == EPROTO) error(i, "%s", c.records->error_text().c_str());
        return n;
    }
    clear_tls_errors();
    const int n = SSL_write(c.ssl, buf, static_cast<int>(std::min<std::size_t>(len, INT32_MAX)));
    if (n > 0) return n;
    const int e = SSL_get_error(c.ssl, n);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        errno = EAGAIN;
        return -1;
    }
    if (e == SSL_ERROR_SYSCALL && errno != 0 && ERR_peek_error() == 0) return -1;
    error(i, "TLS: %s", tls_reason());
    errno = EPROTO;
    return -1;
}

bool LoadClient::tls_buffered(const Conn& c) {
    if (c.records) return !c.records->drained();
    return c.ssl && SSL_has_pending(c.ssl) == 1;
}
#else
bool LoadClient::tls_buffered(const Conn&) {
    return false;
}
struct ssl_ctx_st* LoadClient::make_tls_context(const Options&) {
    return nullptr;  // --tls is refused at parse time without TLS
}
void LoadClient::start_tls(std::size_t) {}
void LoadClient::continue_handshake(std::size_t) {}
ssize_t LoadClient::io_recv(std::size_t i, void* buf, std::size_t len) {
    return ::recv(conns_[i].fd, buf, len, 0);
}
ssize_t LoadClient::io_send(std::size_t i, const void* buf, std::size_t len) {
    return ::send(conns_[i].fd, buf, len, MSG_NOSIGNAL);
}
#endif

bool LoadClient::connect_all() {
    const auto timeout = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(opt_.connect_timeout_s));
    std::vector<std::size_t> pending;  // indices in State::connecting
    pending.reserve(connect_window);
    std::size_t next = 0;
    bool failed = false;
    while (true) {
        while (!failed && pending.size() < connect_window && next < conns_.size()) {
            const std::size_t i = next++;
            if (!start_connect(i))
                failed = true;
            else if (conns_[i].state == Conn::State::connecting)
                pending.push_back(i);
        }
        if (pending.empty() && (failed || next == conns_.size())) break;
        const int n = epoll_wait(epfd_, events_.data(), static_cast<int>(events_.size()), 50);
        if (n < 0 && errno != EINTR) die_errno("epoll_wait");
        for (int k = 0; k < n; ++k) {
            const std::size_t i = events_[k].data.u64;
            if (conns_[i].state == Conn::State::connecting ||
                conns_[i].state == Conn::State::handshaking) {
                if (conns_[i].state == Conn::State::connecting)
                    finish_connect(i);
                else
                    continue_handshake(i);
                if (conns_[i].state == Conn::State::closed) failed = true;
            } else if (conns_[i].state == Conn::State::idle) {
                check_idle(i, false);
            } else if (conns_[i].state == Conn::State::finished) {
                // TLS 1.3 session tickets; else an end of file or bytes no
                // request asked for, said as in the load.
                on_readable(i);
            }
        }
        const auto now = Clock::now();
        for (std::size_t k = 0; k < pending.size();) {
            Conn& c = conns_[pending[k]];
            const bool waiting =
                c.state == Conn::State::connecting || c.state == Conn::State::handshaking;
            if (waiting && now - c.started > timeout) {
                error(pending[k], "%s: no answer within %.3g s",
                      c.state == Conn::State::handshaking ? "TLS handshake" : "connect",
                      opt_.connect_timeout_s);
                close_conn(c);
                failed = true;
            }
            if (c.state != Conn::State::connecting && c.state != Conn::State::handshaking) {
                pending[k] = pending.back();
                pending.pop_back();
            } else {
                ++k;
            }
        }
    }
    if (openssl_records_ > 0)
        std::fprintf(stderr, "evmux-load: %zu connection(s) keep OpenSSL's record layer (%s)\n",
                     openssl_records_, openssl_records_why_.c_str());
    return !failed && res_.errors == 0;
}

void LoadClient::start_round(std::size_t i) {
    Conn& c = conns_[i];
    // Other bytes every round, chosen before the clock starts for it.
    c.msg = pool_.data() + next_random(c.rng) % (pool_extra + 1);
    c.sent = 0;
    c.received = 0;
    c.state = Conn::State::in_round;
    ++in_flight_;
    c.started = Clock::now();
    on_writable(i);
}

void LoadClient::on_writable(std::size_t i) {
    Conn& c = conns_[i];
    // Its own records: the rest of a record the socket took only part of.
    if (c.records && c.records->has_unsent()) {
        const int r = c.records->flush(c.fd);
        if (r < 0) {
            error(i, "send: %s", std::strerror(errno));
            close_conn(c);
            return;
        }
        if (r == 0) {
            if (!c.want_write) set_interest(i, EPOLLIN | EPOLLOUT);
            return;
        }
    }
    while (c.sent < opt_.size) {
        const ssize_t n = io_send(i, c.msg + c.sent, opt_.size - c.sent);
        if (n > 0) {
            c.sent += static_cast<std::size_t>(n);
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c.want_write) set_interest(i, EPOLLIN | EPOLLOUT);
            return;
        }
        if (errno != EPROTO || !c.ssl) error(i, "send: %s", std::strerror(errno));
        close_conn(c);
        return;
    }
    if (c.records && c.records->has_unsent()) {
        if (!c.want_write) set_interest(i, EPOLLIN | EPOLLOUT);
    } else if (c.want_write) {
        set_interest(i, EPOLLIN);
    }
}

void LoadClient::on_readable(std::size_t i) {
    Conn& c = conns_[i];
    const std::size_t size = opt_.size;
    while (c.state == Conn::State::in_round || c.state == Conn::State::finished) {
        const ssize_t n = io_recv(i, read_buf_.data(), read_buf_.size());
        if (n == 0) {
            if (c.state == Conn::State::in_round)
                error(i, "server closed the connection (%zu of %zu reply bytes received)",
                      c.received, size);
            else
                error(i, "server closed the connection while no request was out");
            close_conn(c);
            return;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            if (errno != EPROTO || !c.ssl) error(i, "recv: %s", std::strerror(errno));
            close_conn(c);
            return;
        }
        const auto got = static_cast<std::size_t>(n);
        // The bytes due in this round (none outside one), checked first: a
        // reply that differs and runs long is reported where it differs.
        const std::size_t due = c.state == Conn::State::in_round ? size - c.received : 0;
        const std::size_t check = std::min(got, due);
        const unsigned char* want = c.msg + c.received;
        const unsigned char* have = read_buf_.data();
        if (!opt_.upper) {
            if (std::memcmp(want, have, check) != 0) {
                const auto d = std::mismatch(have, have + check, want).first - have;
                mismatch(i, c.received + static_cast<std::size_t>(d));
                return;
            }
        } else {
            for (std::size_t k = 0; k < check; ++k) {
                if (have[k] != expected_byte(want[k], true)) {
                    mismatch(i, c.received + k);
                    return;
                }
            }
        }
        if (got > due) {
            // More bytes than were sent: the server invented or duplicated some.
            mismatch(i, c.state == Conn::State::in_round ? size : 0);
            return;
        }
        c.received += got;
        if (c.received == size) {
            const auto now = Clock::now();
            if (!warming_) {
                res_.latency.record(static_cast<std::uint64_t>(
                    std::chrono::duration_cast<std::chrono::nanoseconds>(now - c.started).count()));
                ++res_.round_trips;
            }
            --in_flight_;
            c.state = Conn::State::finished;
            if (!stopping_) next_round(i, now);
        }
        // A short read means the socket is empty: skip the EAGAIN round trip
        // to the kernel; level-triggered epoll reports whatever comes later.
        // (TLS: one record per SSL_read, or what one recv() brought with our
        // own records; what is buffered is announced by no event, so read on
        // while there is some.)
        if (got < read_buf_.size() && !tls_buffered(c)) return;
    }
}

void LoadClient::check_idle(std::size_t i, bool at_end) {
    Conn& c = conns_[i];
    char byte;
    // TLS: SSL_read takes in what the server may send unasked (session
    // tickets) and returns application data only.
    const ssize_t n =
        c.ssl ? io_recv(i, &byte, 1) : ::recv(c.fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && errno == EPROTO && c.ssl) {  // io_recv said why
        close_conn(c);
        return;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        int err = 0;
        socklen_t len = sizeof err;
        ::getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err == 0) return;  // still connected and quiet, as it must be
        errno = err;
    }
    const char* when = at_end ? "at the end" : "during the run";
    if (n == 0)
        error(i, "idle connection closed by the server %s", when);
    else if (n > 0)
        error(i, "idle connection received unexpected data %s", when);
    else
        error(i, "idle connection failed %s: %s", when, std::strerror(errno));
    close_conn(c);
}

void LoadClient::next_round(std::size_t i, Clock::time_point now) {
    Conn& c = conns_[i];
    if (opt_.rate <= 0) return start_round(i);
    c.due += period_;
    if (c.due > now) {
        waiting_.emplace_back(c.due, i);
        std::push_heap(waiting_.begin(), waiting_.end(), std::greater<>());
        return;
    }
    start_round(i);
    c.started = c.due;
}

void LoadClient::start_due(Clock::time_point now) {
    while (!waiting_.empty() && waiting_.front().first <= now) {
        const std::size_t i = waiting_.front().second;
        std::pop_heap(waiting_.begin(), waiting_.end(), std::greater<>());
        waiting_.pop_back();
        if (conns_[i].state != Conn::State::finished) continue;  // closed meanwhile
        start_round(i);
        conns_[i].started = conns_[i].due;
    }
}

Clock::time_point LoadClient::poll_once(Clock::time_point now, Clock::time_point until) {
    int n = 0;
    if (opt_.rate > 0 && !stopping_) {
        // Paced: wake for the next round due, to the nanosecond.
        if (!waiting_.empty()) until = std::min(until, waiting_.front().first);
        const auto ns = std::max<std::int64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(until - now).count(), 0);
        const timespec timeout{static_cast<time_t>(ns / 1000000000),
                               static_cast<long>(ns % 1000000000)};
        n = epoll_pwait2(epfd_, events_.data(), static_cast<int>(events_.size()), &timeout,
                         nullptr);
        if (n < 0 && errno == ENOSYS) die_errno("epoll_pwait2 (--rate needs Linux 5.11 or later)");
    } else {
        // Round the timeout up so the wait never returns just before `until`.
        const auto ms = std::chrono::ceil<std::chrono::milliseconds>(until - now).count();
        n = epoll_wait(epfd_, events_.data(), static_cast<int>(events_.size()),
                       static_cast<int>(std::max<long long>(ms, 0)));
    }
    if (n < 0 && errno != EINTR) die_errno("epoll_wait");
    for (int k = 0; k < n; ++k) {
        const std::size_t i = events_[k].data.u64;
        Conn& c = conns_[i];
        const std::uint32_t ev = events_[k].events;
        if (c.state == Conn::State::idle) {
            check_idle(i, false);
            continue;
        }
        // Read first: an error or hang-up surfaces as a failed or empty read
        // with its reason, after any reply bytes that arrived before it.
        if (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(i);
        if ((ev & EPOLLOUT) && c.state == Conn::State::in_round) on_writable(i);
    }
    now = Clock::now();
    if (!stopping_ && !waiting_.empty()) start_due(now);
    return now;
}

bool LoadClient::warm_up() {
    // One verified, unrecorded round trip per active connection. A connect
    // completes in the kernel before the server has accepted the connection;
    // a server slow to accept thousands of them (threads, fork) would
    // otherwise have its accept backlog counted as round-trip latency.
    warming_ = stopping_ = true;  // no second round, no sample
    for (std::size_t i = 0; i < conns_.size(); ++i)
        if (conns_[i].active && conns_[i].state == Conn::State::finished) start_round(i);
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(opt_.connect_timeout_s));
    auto now = Clock::now();
    while (in_flight_ > 0 && now < deadline) now = poll_once(now, deadline);
    for (std::size_t i = 0; i < conns_.size(); ++i) {
        if (conns_[i].state != Conn::State::in_round) continue;
        error(i, "no full reply to the warm-up message within %.3g s (%zu of %zu bytes back)",
              opt_.connect_timeout_s, conns_[i].received, opt_.size);
        close_conn(conns_[i]);
    }
    warming_ = stopping_ = false;
    return res_.errors == 0 && res_.mismatches == 0;
}

void LoadClient::run() {
    mark_window(opt_);
    const auto start = Clock::now();
    const auto end = start + std::chrono::duration_cast<Clock::duration>(
                                 std::chrono::duration<double>(opt_.duration_s));
    const auto drain_deadline = end + drain_bound;
    if (opt_.rate > 0) {
        // Connection k's first send at start + k/R, then every A/R.
        const auto step = std::chrono::duration_cast<Clock::duration>(
            std::chrono::duration<double>(1.0 / opt_.rate));
        period_ = step * static_cast<Clock::rep>(opt_.active);
        Clock::duration offset{};
        for (std::size_t i = 0; i < conns_.size(); ++i) {
            if (!conns_[i].active || conns_[i].state != Conn::State::finished) continue;
            conns_[i].due = start + offset - period_;  // next_round() adds one period
            offset += step;
            next_round(i, start);
        }
    } else {
        for (std::size_t i = 0; i < conns_.size(); ++i)
            if (conns_[i].active && conns_[i].state == Conn::State::finished) start_round(i);
    }

    auto now = Clock::now();
    while (true) {
        if (!stopping_ && now >= end) {
            stopping_ = true;
            mark_window(opt_, "end\n");
        }
        if (stopping_ && (in_flight_ == 0 || now >= drain_deadline)) break;
        if (!stopping_ && active_closed_ == opt_.active) {
            // The server died or dropped every one: nothing left to measure.
            std::fprintf(stderr,
                         "evmux-load: every active connection failed; stopped after %.2f s of "
                         "%.3g s\n",
                         std::chrono::duration<double>(now - start).count(), opt_.duration_s);
            break;
        }
        now = poll_once(now, stopping_ ? drain_deadline : end);
    }
    res_.elapsed_s = std::chrono::duration<double>(now - start).count();

    for (std::size_t i = 0; i < conns_.size(); ++i) {
        Conn& c = conns_[i];
        if (c.state == Conn::State::in_round) {
            error(i, "round trip unfinished %lld s after the end (%zu of %zu bytes back)",
                  static_cast<long long>(drain_bound.count()), c.received, opt_.size);
            close_conn(c);
        } else if (c.state == Conn::State::idle) {
            check_idle(i, true);
        }
    }
}

/// Raises RLIMIT_NOFILE so that `need` descriptors fit; exits 1 with the
/// reason if the hard limit forbids it.
void ensure_fd_limit(long need) {
    rlimit rl{};  // as it was, for the message
    if (::getrlimit(RLIMIT_NOFILE, &rl) < 0) return;
    if (evmux::support::raise_fd_limit(need) >= need) return;
    std::fprintf(stderr,
                 "evmux-load: %ld file descriptors needed but RLIMIT_NOFILE is %llu (hard %llu) "
                 "and cannot be raised: %s\n",
                 need, static_cast<unsigned long long>(rl.rlim_cur),
                 static_cast<unsigned long long>(rl.rlim_max), std::strerror(errno));
    std::exit(1);
}

/// Resolves host:port to a socket address; false with a message if it cannot.
bool resolve(const Options& opt, sockaddr_storage& out, socklen_t& len, std::string& why) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* res = nullptr;
    const std::string port = std::to_string(opt.port);
    // "[::1]", as evmux-echo takes it and prints it: the address inside (to
    // getaddrinfo the brackets made it a name, "Name or service not known").
    // Brackets hold an IPv6 address only (RFC 3986), as evmux's parsers say:
    // "[localhost]" is refused, not looked up as localhost.
    std::string host = opt.host;
    if (host.starts_with('[')) {
        host = host.substr(1, host.size() - (host.ends_with(']') ? 2 : 1));
        in6_addr v6{};
        if (!opt.host.ends_with(']') ||
            ::inet_pton(AF_INET6, host.substr(0, host.find('%')).c_str(), &v6) != 1) {
            why = "brackets hold an IPv6 address only, as in [::1]";
            return false;
        }
    }
    const int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
    if (rc != 0) {
        why = ::gai_strerror(rc);
        return false;
    }
    std::memcpy(&out, res->ai_addr, res->ai_addrlen);
    len = res->ai_addrlen;
    ::freeaddrinfo(res);
    return true;
}

void print_report(const Options& opt, const Results& r) {
    const double rate = r.elapsed_s > 0 ? static_cast<double>(r.round_trips) / r.elapsed_s : 0;
    // Payload both ways: each round trip moves size bytes out and size back.
    const double mib = r.elapsed_s > 0
                           ? 2.0 * static_cast<double>(r.round_trips) *
                                 static_cast<double>(opt.size) / r.elapsed_s / (1024.0 * 1024.0)
                           : 0;
    const double p50 = to_us(r.latency.quantile(0.50));
    const double p99 = to_us(r.latency.quantile(0.99));
    const double max = to_us(r.latency.max());
    if (opt.json) {
        std::printf(
            "{\"conns\":%zu,\"active\":%zu,\"size\":%zu,\"duration_s\":%.3f,"
            "\"round_trips\":%" PRIu64
            ",\"round_trips_per_s\":%.1f,\"mib_per_s\":%.3f,"
            "\"mib_per_s_counts\":\"payload both directions\","
            "\"latency_us\":{\"p50\":%.1f,\"p99\":%.1f,\"max\":%.1f},"
            "\"rate_requested\":%.1f,"
            "\"mismatches\":%" PRIu64 ",\"errors\":%" PRIu64 "}\n",
            opt.conns, opt.active, opt.size, r.elapsed_s, r.round_trips, rate, mib, p50, p99, max,
            opt.rate, r.mismatches, r.errors);
    } else {
        std::printf("evmux-load: %s port %d, %zu connections (%zu active), %zu-byte messages%s\n",
                    opt.host.c_str(), opt.port, opt.conns, opt.active, opt.size,
                    opt.upper ? ", expecting uppercase" : "");
        std::printf("  duration     %.3f s\n", r.elapsed_s);
        std::printf("  round trips  %" PRIu64 " (%.1f/s)\n", r.round_trips, rate);
        if (opt.rate > 0)
            std::printf("  paced        %.1f/s requested (latency from when each was due)\n",
                        opt.rate);
        std::printf("  throughput   %.3f MiB/s (payload, both directions)\n", mib);
        std::printf("  latency      p50 %.1f us, p99 %.1f us, max %.1f us\n", p50, p99, max);
        std::printf("  mismatches   %" PRIu64 "\n", r.mismatches);
        std::printf("  errors       %" PRIu64 "\n", r.errors);
    }
    std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
    Options opt;
    CLI::App app{
        "Closed-loop TCP echo load client: C connections, A of them ping-pong S-byte "
        "messages for a duration; reports round trips, throughput and latency.",
        "evmux-load"};
    app.add_option("--port", opt.port, "server port")
        ->required()
        ->check(evmux::support::number_in(1, 65535));
    app.add_option("--host", opt.host, "server address or name (default 127.0.0.1)");
    app.add_option("--conns", opt.conns, "connections to open")
        ->required()
        ->check(evmux::support::number_in(1, 1000000));
    app.add_option("--size", opt.size, "message size in bytes")
        ->required()
        ->check(evmux::support::number_in(1, 64 * 1024 * 1024));
    app.add_option("--duration", opt.duration_s, "seconds of load after all are connected")
        ->required()
        ->check(evmux::support::number_in(0.001, 86400.0));
    app.add_option("--active", opt.active, "connections that send (default: all)")
        ->check(evmux::support::number_in(1, 1000000));
    app.add_flag("--upper", opt.upper, "expect the ASCII-uppercased payload back");
    app.add_flag("--json", opt.json, "print one JSON object instead of text");
    app.add_flag("--mark-window", opt.mark_window,
                 "print a line 'window' on stdout as the measured load starts (after the "
                 "connections and the warm-up) and a line 'end' as its duration ends, for a "
                 "tool that samples the server then; after its report it keeps the "
                 "connections open until SIGUSR1 (at most 5 s)");
    app.add_option("--rate", opt.rate,
                   "paced: this many round trips per second over all active connections, "
                   "each connection's sends evenly spaced (default: closed loop, each sends "
                   "again as soon as its echo is back)")
        ->check(evmux::support::number_in(1.0, 1e9));
    app.add_option("--connect-timeout", opt.connect_timeout_s,
                   "seconds each connect (and TLS handshake) may take (default 10)")
        ->check(evmux::support::number_in(0.001, 3600.0));
    app.add_option("--sndbuf", opt.sndbuf,
                   "each connection's socket send buffer (SO_SNDBUF) in bytes, e.g. small to "
                   "make sends partial (default: the kernel's)")
        ->check(evmux::support::number_in(1, 1 << 30));
    auto* tls = app.add_flag("--tls", opt.tls, "speak TLS (OpenSSL's handshake)");
    app.add_option("--tls-records", opt.tls_records,
                   "who seals and opens the TLS 1.3 records after the handshake: own (evmux-load's "
                   "record layer, the default: as cheap as a server's) or openssl "
                   "(SSL_read/SSL_write)")
        ->check(CLI::IsMember({"own", "openssl"}))
        ->needs(tls);
    app.add_option("--tls-suites", opt.tls_suites,
                   "TLS 1.3 cipher suites to offer, OpenSSL's list syntax, e.g. "
                   "TLS_CHACHA20_POLY1305_SHA256 (default: OpenSSL's)")
        ->needs(tls);
    app.add_option("--tls-ca", opt.tls_ca,
                   "PEM CA file: check the server's certificate and --tls-name (default: "
                   "not checked, said on stderr)")
        ->needs(tls);
    app.add_option("--tls-name", opt.tls_name, "server name to send and check (default localhost)")
        ->needs(tls);
    app.add_flag("--udp", opt.udp,
                 "UDP: --conns sessions (sockets) each send a datagram and wait for its echo; "
                 "reports loss too");
    auto* timeout =
        app.add_option("--timeout", opt.timeout_s,
                       "--udp: seconds a datagram's echo may take before it counts as lost "
                       "(default 0.25)")
            ->check(evmux::support::number_in(0.001, 60.0));
    try {
        app.parse(argc, argv);
        if (opt.active > opt.conns)
            throw CLI::ValidationError("--active", "must not exceed --conns");
#if !EVMUX_LOAD_TLS
        if (opt.tls) throw CLI::ValidationError("--tls", "not compiled in (needs libssl-dev)");
#endif
        if (opt.udp && opt.active != 0 && opt.active != opt.conns)
            throw CLI::ValidationError("--active", "--udp: every session sends (no idle ones)");
        if (opt.udp && (opt.size < 8 || opt.size > 65507))
            throw CLI::ValidationError(
                "--size", "--udp: 8 to 65507 bytes (a sequence number rides in each datagram)");
        if (opt.udp && opt.tls) throw CLI::ValidationError("--tls", "not with --udp (no DTLS)");
        if (opt.udp && opt.rate > 0) throw CLI::ValidationError("--rate", "TCP only, not --udp");
        if (opt.udp && opt.sndbuf > 0)
            throw CLI::ValidationError("--sndbuf", "TCP only, not --udp");
        if (!opt.udp && timeout->count() > 0)
            throw CLI::ValidationError("--timeout", "--udp only (TCP: --connect-timeout)");
    } catch (const CLI::ParseError& e) {
        if (e.get_exit_code() == 0) return app.exit(e);  // --help
        std::fprintf(stderr, "evmux-load: %s (see --help)\n", e.what());
        return 2;
    }
    if (opt.active == 0) opt.active = opt.conns;

    sockaddr_storage addr{};
    socklen_t addr_len = 0;
    std::string why;
    if (!resolve(opt, addr, addr_len, why)) {
        std::fprintf(stderr, "evmux-load: --host %s: %s\n", opt.host.c_str(), why.c_str());
        return 2;
    }
    ensure_fd_limit(static_cast<long>(opt.conns) + fd_margin);
    ::signal(SIGPIPE, SIG_IGN);  // belt and braces: every send uses MSG_NOSIGNAL
    // --mark-window: SIGUSR1 is the sampling tool's "read": blocked from the
    // start, so that one sent early stays pending instead of killing us.
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    if (opt.mark_window) ::sigprocmask(SIG_BLOCK, &usr1, nullptr);
    if (opt.udp) return run_udp_load(opt, addr, addr_len);

    LoadClient client(opt, addr, addr_len);
    if (!client.connect_all()) {
        std::fprintf(stderr, "evmux-load: not all connections could be opened; no load sent\n");
    } else if (!client.warm_up()) {
        std::fprintf(stderr, "evmux-load: the warm-up round trips failed; no load sent\n");
    } else {
        client.run();
    }
    const Results& r = client.results();
    print_report(opt, r);
    if (opt.mark_window) {
        // Keep the connections open until the sampling tool has read the
        // server at the window's end (SIGUSR1), at most 5 s: a server with a
        // process per connection loses them as they close.
        std::fflush(stdout);
        const timespec limit{5, 0};
        ::sigtimedwait(&usr1, nullptr, &limit);
    }
    return (r.mismatches || r.errors) ? 1 : 0;
}
