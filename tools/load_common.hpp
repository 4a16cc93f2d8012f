// evmux-load's parts shared by its TCP client (evmux_load.cpp) and its UDP
// client (load_udp.cpp): the options, the latency histogram, the payload
// streams. Plain C++ and the C library: no evmux code (see evmux_load.cpp).
#pragma once

#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace evmux::load {

using Clock = std::chrono::steady_clock;

/// The command line, validated.
struct Options {
    std::string host = "127.0.0.1";
    int port = 0;
    std::size_t conns = 0;
    std::size_t active = 0;  // 0 on the command line means "all"
    std::size_t size = 0;
    double duration_s = 0;
    double rate = 0;  // --rate: round trips per second over all active connections; 0: closed loop
    double connect_timeout_s = 10;
    int sndbuf = 0;  // --sndbuf: each TCP connection's SO_SNDBUF (0: the kernel's)
    bool upper = false;
    bool json = false;
    bool mark_window = false;  // "window\n" on stdout when the measured load starts
    bool tls = false;
    std::string tls_ca;                  // empty: the server's certificate is not checked
    std::string tls_name = "localhost";  // checked (and sent as SNI) with tls_ca
    std::string tls_records = "own";     // after the handshake: "own" (load_tls.cpp) or "openssl"
    std::string tls_suites;              // TLS 1.3 suites to offer (empty: OpenSSL's default)
    bool udp = false;                    // --udp: sessions are UDP sockets (load_udp.cpp)
    double timeout_s = 0.25;             // --udp: a datagram not echoed within this is lost
};

/// A log-linear latency histogram (in the style of HdrHistogram): 128
/// sub-buckets per power of two, so any recorded value is known to within
/// 1/128 (< 0.8 %). Fixed size, allocated once: recording never allocates,
/// however long the run.
class LatencyHistogram {
  public:
    /// Records one sample in nanoseconds.
    void record(std::uint64_t ns) {
        ++counts_[index_of(ns)];
        ++total_;
        if (ns > max_) max_ = ns;
    }
    /// The number of samples recorded.
    std::uint64_t total() const { return total_; }
    /// The largest sample, exact.
    std::uint64_t max() const { return max_; }
    /// The value at quantile q (0..1]: the midpoint of the bucket holding the
    /// ceil(q * total)-th smallest sample, capped at max(). 0 if empty.
    std::uint64_t quantile(double q) const {
        if (total_ == 0) return 0;
        auto rank = static_cast<std::uint64_t>(q * static_cast<double>(total_) + 0.999999);
        rank = std::clamp<std::uint64_t>(rank, 1, total_);
        std::uint64_t seen = 0;
        for (std::size_t i = 0; i < counts_.size(); ++i) {
            seen += counts_[i];
            if (seen >= rank) return std::min(midpoint_of(i), max_);
        }
        return max_;
    }

  private:
    static constexpr int sub_bits = 7;
    static constexpr std::uint64_t sub_buckets = 1u << sub_bits;  // 128
    // Values below 2*sub_buckets are their own bucket; above, the top sub_bits+1
    // bits select the bucket: shift * sub_buckets + (v >> shift), shift <= 56.
    static constexpr std::size_t bucket_count = 57 * sub_buckets + 2 * sub_buckets;

    static std::size_t index_of(std::uint64_t v) {
        if (v < 2 * sub_buckets) return static_cast<std::size_t>(v);
        const int shift = 63 - std::countl_zero(v) - sub_bits;
        return static_cast<std::size_t>(shift) * sub_buckets + static_cast<std::size_t>(v >> shift);
    }
    static std::uint64_t midpoint_of(std::size_t i) {
        if (i < 2 * sub_buckets) return i;
        // Invert index_of: i = shift * sub_buckets + sub with sub in [sub_buckets, 2 *
        // sub_buckets).
        const std::uint64_t shift = i / sub_buckets - 1;
        const std::uint64_t sub = i - shift * sub_buckets;
        const std::uint64_t low = sub << shift;
        return low + ((std::uint64_t{1} << shift) >> 1);
    }

    std::array<std::uint64_t, bucket_count> counts_{};
    std::uint64_t total_ = 0;
    std::uint64_t max_ = 0;
};

/// splitmix64: a tiny, fast, well-mixed generator; one per connection.
inline std::uint64_t next_random(std::uint64_t& state) {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/// Fills buf[0..n) with the connection's next n pseudo-random bytes.
inline void fill_payload(std::uint64_t& state, unsigned char* buf, std::size_t n) {
    std::size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const std::uint64_t r = next_random(state);
        std::memcpy(buf + i, &r, 8);
    }
    if (i < n) {
        const std::uint64_t r = next_random(state);
        std::memcpy(buf + i, &r, n - i);
    }
}

/// What the server must send back for byte c: c itself, or with --upper its
/// ASCII uppercase (only 'a'..'z' change; no locale).
inline unsigned char expected_byte(unsigned char c, bool upper) {
    return (upper && c >= 'a' && c <= 'z') ? static_cast<unsigned char>(c - 32) : c;
}

/// Prints "evmux-load: UNIT I: " and the message to stderr, one line.
inline void print_error(const char* unit, std::size_t i, const char* fmt, va_list ap) {
    std::fprintf(stderr, "evmux-load: %s %zu: ", unit, i);
    std::vfprintf(stderr, fmt, ap);
    std::fputc('\n', stderr);
}

/// --mark-window: a line "window" on stdout as the measured load starts,
/// and a line "end" as its duration ends (before the rounds in flight drain
/// and any connection closes: a server with a process per connection still
/// has them all then).
inline void mark_window(const Options& opt, const char* line = "window\n") {
    if (!opt.mark_window) return;
    std::fputs(line, stdout);
    std::fflush(stdout);
}

inline double to_us(std::uint64_t ns) {
    return static_cast<double>(ns) / 1000.0;
}

/// evmux-load --udp: opens the sessions, warms up, runs, prints the report;
/// returns the exit code (0; 1 on mismatches or errors; loss is reported,
/// not an error). `addr` is the server's.
int run_udp_load(const Options& opt, const sockaddr_storage& addr, socklen_t addr_len);

}  // namespace evmux::load
