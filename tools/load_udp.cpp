// evmux-load --udp: a closed-loop UDP echo load client, on raw epoll like
// the TCP one (no evmux code in the instrument).
//
// Model: C sessions, each a UDP socket connected to the server (so it hears
// only the server, and an ICMP port unreachable is an error it sees). Each
// sends one S-byte datagram, waits for its echo, verifies it byte for byte,
// records the round trip, sends the next; a datagram not echoed within
// --timeout is lost, and the session sends the next. Each datagram starts
// with its sequence number (8 bytes, every one with the top bit set, so
// --upper leaves them alone), then fresh bytes of the session's seeded
// stream: an echo of an earlier datagram arriving after its timeout is
// counted as late, not as a mismatch. One unrecorded round trip per session
// (resent per --timeout, for at most --connect-timeout) precedes the clock.
// After the duration no new datagram is sent; those in flight get --timeout
// to come back.
#include <sys/epoll.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <deque>
#include <vector>

#include "load_common.hpp"

namespace evmux::load {
namespace {

constexpr int max_error_messages = 10;
constexpr std::size_t seq_bytes = 8;

void put_seq(unsigned char* p, std::uint64_t seq) {
    for (std::size_t k = 0; k < seq_bytes; ++k)
        p[k] = static_cast<unsigned char>(0x80 | ((seq >> (7 * k)) & 0x7f));
}

bool get_seq(const unsigned char* p, std::uint64_t& seq) {
    seq = 0;
    for (std::size_t k = 0; k < seq_bytes; ++k) {
        if (!(p[k] & 0x80)) return false;
        seq |= static_cast<std::uint64_t>(p[k] & 0x7f) << (7 * k);
    }
    return true;
}

struct Session {
    int fd = -1;
    std::uint64_t rng = 0;
    std::uint64_t seq = 0;  // of the datagram in flight, or the last one sent
    bool waiting = false;   // a datagram is in flight
    bool warmed = false;    // its warm-up datagram came back
    bool refused = false;   // ECONNREFUSED: nothing listens there; sends no more
    Clock::time_point sent_at{};
    unsigned char* msg = nullptr;  // size bytes, preallocated
};

/// When a session's datagram counts as lost; in send order, so a FIFO.
struct Deadline {
    Clock::time_point when;
    std::size_t session;
    std::uint64_t seq;
};

struct UdpResults {
    std::uint64_t sent = 0, received = 0, lost = 0, late = 0, mismatches = 0, errors = 0;
    double elapsed_s = 0;
    LatencyHistogram latency;
};

class UdpLoad {
  public:
    UdpLoad(const Options& opt, const sockaddr_storage& addr, socklen_t addr_len);
    ~UdpLoad();
    UdpLoad(const UdpLoad&) = delete;
    UdpLoad& operator=(const UdpLoad&) = delete;

    /// One connected socket per session; false (errors counted) if any fails.
    bool open_all();
    /// One unrecorded round trip per session; false if any got no echo.
    bool warm_up();
    /// The load for the duration, then the drain of what is in flight.
    void run();
    const UdpResults& results() const { return res_; }

  private:
    enum class Phase { warm, run, drain };
    void error(std::size_t i, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
    void send_next(std::size_t i, Clock::time_point now);
    void on_readable(std::size_t i);
    void on_reply(std::size_t i, std::size_t n, Clock::time_point now);
    void settle(Session& s) {
        s.waiting = false;
        --in_flight_;
    }
    void refuse(std::size_t i, const char* call);
    void expire(Clock::time_point now);
    void poll_once(Clock::time_point until);
    bool all_refused() const { return refused_ == sessions_.size(); }

    const Options& opt_;
    sockaddr_storage addr_;
    socklen_t addr_len_;
    Clock::duration timeout_;
    int epfd_ = -1;
    std::vector<Session> sessions_;
    std::vector<unsigned char> payload_;
    std::vector<unsigned char> read_buf_ = std::vector<unsigned char>(65536);
    std::array<epoll_event, 1024> events_{};
    std::deque<Deadline> deadlines_;
    Phase phase_ = Phase::warm;
    std::size_t in_flight_ = 0;
    std::size_t refused_ = 0;  // sessions refused
    Clock::time_point last_reply_{};
    UdpResults res_;
    int messages_printed_ = 0;
};

UdpLoad::UdpLoad(const Options& opt, const sockaddr_storage& addr, socklen_t addr_len)
    : opt_(opt),
      addr_(addr),
      addr_len_(addr_len),
      timeout_(std::chrono::duration_cast<Clock::duration>(
          std::chrono::duration<double>(opt.timeout_s))),
      sessions_(opt.conns),
      payload_(opt.conns * opt.size) {
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    for (std::size_t i = 0; i < sessions_.size(); ++i) {
        sessions_[i].msg = payload_.data() + i * opt.size;
        sessions_[i].rng = 0x5EED0000ull + i * 0x100000001B3ull;
    }
}

UdpLoad::~UdpLoad() {
    for (Session& s : sessions_)
        if (s.fd >= 0) ::close(s.fd);
    if (epfd_ >= 0) ::close(epfd_);
}

void UdpLoad::error(std::size_t i, const char* fmt, ...) {
    ++res_.errors;
    if (messages_printed_++ >= max_error_messages) return;
    va_list ap;
    va_start(ap, fmt);
    print_error("session", i, fmt, ap);
    va_end(ap);
}

bool UdpLoad::open_all() {
    if (epfd_ < 0) {
        error(0, "epoll_create1: %s", std::strerror(errno));
        return false;
    }
    for (std::size_t i = 0; i < sessions_.size(); ++i) {
        Session& s = sessions_[i];
        s.fd = ::socket(addr_.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (s.fd < 0) {
            error(i, "socket: %s", std::strerror(errno));
            return false;
        }
        if (::connect(s.fd, reinterpret_cast<const sockaddr*>(&addr_), addr_len_) < 0) {
            error(i, "connect: %s", std::strerror(errno));
            return false;
        }
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = i;
        if (epoll_ctl(epfd_, EPOLL_CTL_ADD, s.fd, &ev) < 0) {
            error(i, "epoll_ctl: %s", std::strerror(errno));
            return false;
        }
    }
    return true;
}

void UdpLoad::send_next(std::size_t i, Clock::time_point now) {
    Session& s = sessions_[i];
    put_seq(s.msg, ++s.seq);
    fill_payload(s.rng, s.msg + seq_bytes, opt_.size - seq_bytes);
    ssize_t n;
    do {
        n = ::send(s.fd, s.msg, opt_.size, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && errno == ECONNREFUSED) return refuse(i, "send");
    // EAGAIN or ENOBUFS: the datagram is as good as lost, and its timeout
    // says so. Anything else is an error too.
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOBUFS)
        error(i, "send: %s", std::strerror(errno));
    if (phase_ == Phase::run) ++res_.sent;
    s.waiting = true;
    s.sent_at = now;
    ++in_flight_;
    deadlines_.push_back({now + timeout_, i, s.seq});
}

// The kernel got an ICMP port unreachable for an earlier datagram: nothing
// listens there (or no longer). Waiting for that session's echoes, or sending
// it more, cannot help: it is done, with one error.
void UdpLoad::refuse(std::size_t i, const char* call) {
    Session& s = sessions_[i];
    error(i, "%s: %s", call, std::strerror(ECONNREFUSED));
    if (s.refused) return;
    s.refused = true;
    ++refused_;
    if (s.waiting) settle(s);
}

void UdpLoad::on_readable(std::size_t i) {
    for (;;) {
        const ssize_t n = ::recv(sessions_[i].fd, read_buf_.data(), read_buf_.size(), 0);
        if (n >= 0) {
            on_reply(i, static_cast<std::size_t>(n), Clock::now());
            continue;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == ECONNREFUSED) return refuse(i, "recv");  // reading it cleared it
        error(i, "recv: %s", std::strerror(errno));
        return;
    }
}

void UdpLoad::on_reply(std::size_t i, std::size_t n, Clock::time_point now) {
    Session& s = sessions_[i];
    std::uint64_t seq = 0;
    if (n < seq_bytes || !get_seq(read_buf_.data(), seq) || seq > s.seq) {
        ++res_.mismatches;
        if (messages_printed_++ < max_error_messages)
            std::fprintf(stderr,
                         "evmux-load: session %zu: a %zu-byte reply no datagram asked for\n", i, n);
        return;
    }
    if (!s.waiting || seq != s.seq) {
        ++res_.late;  // its datagram timed out already
        return;
    }
    bool same = n == opt_.size;
    for (std::size_t k = 0; same && k < n; ++k)
        same = read_buf_[k] == expected_byte(s.msg[k], opt_.upper);
    settle(s);
    if (!same) {
        ++res_.mismatches;
        if (messages_printed_++ < max_error_messages)
            std::fprintf(stderr, "evmux-load: session %zu: reply differs from the datagram\n", i);
    } else if (phase_ == Phase::warm) {
        s.warmed = true;
        return;
    } else {
        ++res_.received;
        res_.latency.record(static_cast<std::uint64_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(now - s.sent_at).count()));
        last_reply_ = now;
    }
    if (phase_ == Phase::run) send_next(i, now);
}

void UdpLoad::expire(Clock::time_point now) {
    while (!deadlines_.empty() && deadlines_.front().when <= now) {
        const Deadline d = deadlines_.front();
        deadlines_.pop_front();
        Session& s = sessions_[d.session];
        if (!s.waiting || s.seq != d.seq) continue;  // answered in time
        settle(s);
        if (phase_ != Phase::warm) ++res_.lost;
        if (phase_ == Phase::run || (phase_ == Phase::warm && !s.warmed)) send_next(d.session, now);
    }
}

void UdpLoad::poll_once(Clock::time_point until) {
    auto now = Clock::now();
    if (!deadlines_.empty()) until = std::min(until, deadlines_.front().when);
    const auto ms = std::chrono::ceil<std::chrono::milliseconds>(until - now).count();
    const int n = epoll_wait(epfd_, events_.data(), static_cast<int>(events_.size()),
                             static_cast<int>(std::max<long long>(ms, 0)));
    for (int k = 0; k < n; ++k) on_readable(events_[k].data.u64);
    expire(Clock::now());
}

bool UdpLoad::warm_up() {
    phase_ = Phase::warm;
    auto now = Clock::now();
    for (std::size_t i = 0; i < sessions_.size(); ++i) send_next(i, now);
    const auto deadline = now + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(opt_.connect_timeout_s));
    while (in_flight_ > 0 && Clock::now() < deadline) poll_once(deadline);
    for (std::size_t i = 0; i < sessions_.size(); ++i)
        if (!sessions_[i].warmed && !sessions_[i].refused)
            error(i, "no echo to the warm-up datagram within %.3g s", opt_.connect_timeout_s);
    return res_.errors == 0 && res_.mismatches == 0;
}

void UdpLoad::run() {
    // Warm-up datagrams still in flight are forgotten (late if they come).
    for (Session& s : sessions_) s.waiting = false;
    in_flight_ = 0;
    deadlines_.clear();
    phase_ = Phase::run;
    mark_window(opt_);
    const auto start = Clock::now();
    const auto end = start + std::chrono::duration_cast<Clock::duration>(
                                 std::chrono::duration<double>(opt_.duration_s));
    for (std::size_t i = 0; i < sessions_.size(); ++i) send_next(i, start);
    while (Clock::now() < end && !all_refused()) poll_once(end);
    if (all_refused())
        std::fprintf(stderr,
                     "evmux-load: every session's datagrams were refused (nothing listens "
                     "there any more); stopped after %.1f s\n",
                     std::chrono::duration<double>(Clock::now() - start).count());
    mark_window(opt_, "end\n");
    phase_ = Phase::drain;
    // Every datagram in flight is answered or expires within the timeout.
    const auto drain_end = Clock::now() + timeout_ + std::chrono::milliseconds(100);
    while (in_flight_ > 0 && Clock::now() < drain_end) poll_once(drain_end);
    res_.elapsed_s = std::chrono::duration<double>(std::max(end, last_reply_) - start).count();
}

void print_udp_report(const Options& opt, const UdpResults& r) {
    const double rate = r.elapsed_s > 0 ? static_cast<double>(r.received) / r.elapsed_s : 0;
    const double mib = r.elapsed_s > 0
                           ? 2.0 * static_cast<double>(r.received) * static_cast<double>(opt.size) /
                                 r.elapsed_s / (1024.0 * 1024.0)
                           : 0;
    const double loss = r.sent > 0 ? 100.0 * static_cast<double>(r.lost) / r.sent : 0;
    const double p50 = to_us(r.latency.quantile(0.50));
    const double p99 = to_us(r.latency.quantile(0.99));
    const double max = to_us(r.latency.max());
    if (opt.json) {
        std::printf(
            "{\"udp\":true,\"conns\":%zu,\"active\":%zu,\"size\":%zu,\"duration_s\":%.3f,"
            "\"sent\":%" PRIu64 ",\"received\":%" PRIu64 ",\"lost\":%" PRIu64
            ",\"loss_percent\":%.3f,\"late\":%" PRIu64 ",\"round_trips\":%" PRIu64
            ",\"round_trips_per_s\":%.1f,\"mib_per_s\":%.3f,"
            "\"latency_us\":{\"p50\":%.1f,\"p99\":%.1f,\"max\":%.1f},"
            "\"mismatches\":%" PRIu64 ",\"errors\":%" PRIu64 "}\n",
            opt.conns, opt.conns, opt.size, r.elapsed_s, r.sent, r.received, r.lost, loss, r.late,
            r.received, rate, mib, p50, p99, max, r.mismatches, r.errors);
    } else {
        std::printf("evmux-load: udp %s port %d, %zu sessions, %zu-byte datagrams%s\n",
                    opt.host.c_str(), opt.port, opt.conns, opt.size,
                    opt.upper ? ", expecting uppercase" : "");
        std::printf("  duration     %.3f s\n", r.elapsed_s);
        std::printf("  sent         %" PRIu64 "\n", r.sent);
        std::printf("  received     %" PRIu64 " (%.1f/s)\n", r.received, rate);
        std::printf("  lost         %" PRIu64 " (%.3f %%, no echo within %.3g s; %" PRIu64
                    " of them came late)\n",
                    r.lost, loss, opt.timeout_s, r.late);
        std::printf("  throughput   %.3f MiB/s (payload, both directions)\n", mib);
        std::printf("  latency      p50 %.1f us, p99 %.1f us, max %.1f us\n", p50, p99, max);
        std::printf("  mismatches   %" PRIu64 "\n", r.mismatches);
        std::printf("  errors       %" PRIu64 "\n", r.errors);
    }
    std::fflush(stdout);
}

}  // namespace

int run_udp_load(const Options& opt, const sockaddr_storage& addr, socklen_t addr_len) {
    UdpLoad load(opt, addr, addr_len);
    if (!load.open_all())
        std::fprintf(stderr, "evmux-load: not all sessions could be opened; no load sent\n");
    else if (!load.warm_up())
        std::fprintf(stderr, "evmux-load: the warm-up round trips failed; no load sent\n");
    else
        load.run();
    const UdpResults& r = load.results();
    print_udp_report(opt, r);
    return (r.mismatches || r.errors) ? 1 : 0;
}

}  // namespace evmux::load
