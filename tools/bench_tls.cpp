// evmux-bench's TLS point: an EVP-only seal+open timing and the certificate.
#include "bench_tls.hpp"

#include "bench_interference.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#if EVMUX_BENCH_TLS
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <thread>

#include "test_certs.hpp"
#endif

namespace evmux::bench {

#if EVMUX_BENCH_TLS

namespace {

// One AES-256-GCM context each way, keyed once; per message a fresh IV (as
// TLS 1.3's per-record nonce), the bytes, the tag: what a record costs.
class Gcm {
  public:
    explicit Gcm(int size)
        : plain_(static_cast<std::size_t>(size), 'x'),
          sealed_(plain_.size()),
          opened_(plain_.size()) {
        seal_ = EVP_CIPHER_CTX_new();
        open_ = EVP_CIPHER_CTX_new();
        const unsigned char key[32] = {1, 2, 3};
        if (!seal_ || !open_ ||
            EVP_EncryptInit_ex(seal_, EVP_aes_256_gcm(), nullptr, key, nullptr) != 1 ||
            EVP_DecryptInit_ex(open_, EVP_aes_256_gcm(), nullptr, key, nullptr) != 1)
            throw std::runtime_error("EVP AES-256-GCM set-up failed");
    }
    ~Gcm() {
        EVP_CIPHER_CTX_free(seal_);
        EVP_CIPHER_CTX_free(open_);
    }
    Gcm(const Gcm&) = delete;
    Gcm& operator=(const Gcm&) = delete;

    /// The sealed message (valid after round()).
    const unsigned char* sealed() const { return sealed_.data(); }

    /// Seals and opens the message under the IV of `n`.
    void round(std::uint64_t n) {
        unsigned char tag[16];
        if (!seal(n, plain_.data(), sealed_.data(), tag) ||
            !open(n, sealed_.data(), tag, opened_.data()))
            throw std::runtime_error("EVP AES-256-GCM seal/open failed");
    }

    /// What an echo server does to a record: opens `rec` (the message's
    /// bytes, then their 16-byte tag) under the IV of `n` and seals the
    /// plaintext again into `out` (the same layout). Throws if the tag does
    /// not match.
    void echo(std::uint64_t n, const unsigned char* rec, unsigned char* out) {
        const std::size_t size = plain_.size();
        if (!open(n, rec, rec + size, opened_.data()) || !seal(n, opened_.data(), out, out + size))
            throw std::runtime_error("EVP AES-256-GCM open/seal of an echoed record failed");
    }

    /// The message sealed under the IV of `n` into `out`, as echo() takes it.
    void seal_record(std::uint64_t n, unsigned char* out) {
        if (!seal(n, plain_.data(), out, out + plain_.size()))
            throw std::runtime_error("EVP AES-256-GCM seal failed");
    }

  private:
    static void make_iv(std::uint64_t n, unsigned char* iv) {
        std::memset(iv, 0, 4);
        for (int i = 0; i < 8; ++i) iv[4 + i] = static_cast<unsigned char>(n >> (8 * i));
    }
    bool seal(std::uint64_t n, const unsigned char* plain, unsigned char* out, unsigned char* tag) {
        unsigned char iv[12];
        make_iv(n, iv);
        int len = 0, fin = 0;
        const int size = static_cast<int>(plain_.size());
        return EVP_EncryptInit_ex(seal_, nullptr, nullptr, nullptr, iv) == 1 &&
               EVP_EncryptUpdate(seal_, out, &len, plain, size) == 1 &&
               EVP_EncryptFinal_ex(seal_, out + len, &fin) == 1 &&
               EVP_CIPHER_CTX_ctrl(seal_, EVP_CTRL_GCM_GET_TAG, 16, tag) == 1;
    }
    bool open(std::uint64_t n, const unsigned char* sealed, const unsigned char* tag,
              unsigned char* out) {
        unsigned char iv[12];
        make_iv(n, iv);
        int len = 0, fin = 0;
        const int size = static_cast<int>(plain_.size());
        return EVP_DecryptInit_ex(open_, nullptr, nullptr, nullptr, iv) == 1 &&
               EVP_DecryptUpdate(open_, out, &len, sealed, size) == 1 &&
               EVP_CIPHER_CTX_ctrl(open_, EVP_CTRL_GCM_SET_TAG, 16,
                                   const_cast<unsigned char*>(tag)) == 1 &&
               EVP_DecryptFinal_ex(open_, out + len, &fin) == 1;
    }

    std::vector<unsigned char> plain_, sealed_, opened_;
    EVP_CIPHER_CTX* seal_ = nullptr;
    EVP_CIPHER_CTX* open_ = nullptr;
};

/// Two connected loopback TCP sockets, both ends in this thread: one
/// record's trip through the kernel (a send, then the peer's recv of it).
class LoopbackPair {
  public:
    LoopbackPair() {
        const int l = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t len = sizeof a;
        const bool listening = l >= 0 && ::bind(l, reinterpret_cast<sockaddr*>(&a), len) == 0 &&
                               ::listen(l, 1) == 0 &&
                               ::getsockname(l, reinterpret_cast<sockaddr*>(&a), &len) == 0;
        if (listening) out_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (out_ >= 0 && ::connect(out_, reinterpret_cast<sockaddr*>(&a), len) == 0)
            in_ = ::accept4(l, nullptr, nullptr, SOCK_CLOEXEC);
        const int err = errno;
        if (l >= 0) ::close(l);
        if (in_ < 0) {
            if (out_ >= 0) ::close(out_);
            throw std::runtime_error(
                std::string("a loopback TCP connection for the TLS reference loops: ") +
                std::strerror(err));
        }
        const int one = 1;
        ::setsockopt(out_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        ::setsockopt(in_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    ~LoopbackPair() {
        ::close(out_);
        ::close(in_);
    }
    LoopbackPair(const LoopbackPair&) = delete;
    LoopbackPair& operator=(const LoopbackPair&) = delete;

    /// The connecting end (a client's) and the accepted end (a server's).
    int client() const { return out_; }
    int server() const { return in_; }

    /// Sends `n` bytes of `p` and receives them at the other end into
    /// `into`. The sends do not block (a message larger than the socket
    /// buffers would wait for a recv this thread has not made yet); a recv
    /// waits only for bytes already sent.
    void trip(const unsigned char* p, std::size_t n, unsigned char* into) {
        std::size_t sent = 0, got = 0;
        while (got < n) {
            if (sent < n) {
                const ssize_t w = ::send(out_, p + sent, n - sent, MSG_DONTWAIT);
                if (w > 0)
                    sent += static_cast<std::size_t>(w);
                else if (errno != EAGAIN && errno != EINTR)
                    throw std::runtime_error(std::string("bare TLS loop: send on loopback: ") +
                                             std::strerror(errno));
                else if (sent == got)
                    wait_writable();
            }
            if (sent == got) continue;
            const ssize_t r = ::recv(in_, into + got, sent - got, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0)
                throw std::runtime_error(std::string("bare TLS loop: recv on loopback: ") +
                                         (r == 0 ? "the connection closed" : std::strerror(errno)));
            got += static_cast<std::size_t>(r);
        }
    }

  private:
    // Nothing is in flight and the socket still takes nothing: up to 1 s.
    void wait_writable() {
        pollfd pfd{out_, POLLOUT, 0};
        if (::poll(&pfd, 1, 1000) <= 0)
            throw std::runtime_error("bare TLS loop: loopback socket not writable for 1 s");
    }

    int out_ = -1;
    int in_ = -1;
};

// errno's text; the sockets' 2 s timeout said as such.
std::string io_error() {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return "no progress for 2 s";
    return std::strerror(errno);
}

// The whole of `n` bytes, or an error naming `what` (a socket's 2 s timeout
// included: a stalled echo ends in an error, not a hang).
void send_all(int fd, const unsigned char* p, std::size_t n, const char* what) {
    for (std::size_t done = 0; done < n;) {
        const ssize_t w = ::send(fd, p + done, n - done, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0)
            throw std::runtime_error(std::string(what) + ": send on loopback: " + io_error());
        done += static_cast<std::size_t>(w);
    }
}

// The whole of `n` bytes; false at the peer's end of file before any.
bool recv_all(int fd, unsigned char* p, std::size_t n, const char* what) {
    for (std::size_t done = 0; done < n;) {
        const ssize_t r = ::recv(fd, p + done, n - done, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r == 0 && done == 0) return false;
        if (r <= 0)
            throw std::runtime_error(std::string(what) + ": recv on loopback: " +
                                     (r == 0 ? "the connection closed" : io_error()));
        done += static_cast<std::size_t>(r);
    }
    return true;
}

/// The far end of the hand-written echo: `sessions` loopback TCP connections
/// and a thread on CPU `cpu` (-1: anywhere) that, connection after
/// connection in turn, receives a `record`-byte message and sends it back
/// unchanged, as evmux-load is the servers' far end (but with no cipher of
/// its own). It stops when the near ends close (the destructor).
class EchoPeer {
  public:
    EchoPeer(int sessions, std::size_t record, int cpu) {
        for (int i = 0; i < sessions; ++i) {
            LoopbackPair& p = pairs_.emplace_back();
            // Room for a message each way in every connection, whoever is
            // slower; a stall still ends in 2 s.
            const int room = 256 * 1024;
            const timeval limit{2, 0};
            for (int fd : {p.client(), p.server()}) {
                ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &room, sizeof room);
                ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &room, sizeof room);
                ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
                ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
            }
        }
        thread_ = std::thread([this, record, cpu] { echo(record, cpu); });
    }
    ~EchoPeer() {
        for (LoopbackPair& p : pairs_) ::shutdown(p.server(), SHUT_RDWR);
        thread_.join();
    }
    EchoPeer(const EchoPeer&) = delete;
    EchoPeer& operator=(const EchoPeer&) = delete;

    std::size_t size() const { return pairs_.size(); }
    /// The near (server's) end of connection `i`.
    int fd(std::size_t i) const { return pairs_[i].server(); }

  private:
    void echo(std::size_t record, int cpu) {
        const PinnedTo pin(cpu);
        std::vector<unsigned char> buf(record);
        try {
            for (std::size_t i = 0;; i = (i + 1) % pairs_.size()) {
                const int fd = pairs_[i].client();
                if (!recv_all(fd, buf.data(), record, "hand-written TLS echo's peer")) return;
                send_all(fd, buf.data(), record, "hand-written TLS echo's peer");
            }
        } catch (const std::exception&) {
            // The near ends closed mid-message (the destructor), or a stall
            // the near end reports on its own side when it times out.
        }
    }

    std::deque<LoopbackPair> pairs_;
    std::thread thread_;
};

/// The median of 5 per-iteration timings of `step` (this thread's CPU), each
/// over enough iterations for about `ms` milliseconds (calibrated first).
template <typename Step>
double median_us(Step step, double ms) {
    double t0 = thread_cpu_us();
    std::uint64_t iterations = 0;
    while (thread_cpu_us() - t0 < ms * 200) step(), ++iterations;
    iterations = std::max<std::uint64_t>(iterations * 5, 1);
    std::vector<double> per;
    for (int rep = 0; rep < 5; ++rep) {
        t0 = thread_cpu_us();
        for (std::uint64_t i = 0; i < iterations; ++i) step();
        per.push_back((thread_cpu_us() - t0) / static_cast<double>(iterations));
    }
    std::sort(per.begin(), per.end());
    return per[per.size() / 2];
}

}  // namespace

bool tls_built() {
    return true;
}

double evp_seal_open_us(int size, int cpu) {
    // On the servers' CPU for the timing, as the servers are pinned.
    const PinnedTo pin(cpu);
    Gcm gcm(size);
    std::uint64_t n = 0;
    return median_us([&] { gcm.round(n++); }, 10);
}

double bare_tls_loop_us(int size, int cpu) {
    const PinnedTo pin(cpu);
    Gcm gcm(size);
    LoopbackPair pair;
    const auto len = static_cast<std::size_t>(size);
    std::vector<unsigned char> wire(len, 'x'), got(len);
    std::uint64_t n = 0;
    // Interleaved, three times: the I/O alone, then with the cipher; the
    // difference of their medians, and the median of those three.
    std::vector<double> cipher;
    for (int rep = 0; rep < 3; ++rep) {
        const double io = median_us([&] { pair.trip(wire.data(), len, got.data()); }, 4);
        const double both = median_us(
            [&] {
                gcm.round(n++);
                pair.trip(gcm.sealed(), len, got.data());
            },
            4);
        cipher.push_back(both - io);
    }
    std::sort(cipher.begin(), cipher.end());
    return cipher[1];
}

double handwritten_tls_echo_us(int size, int sessions, int cpu, int peer_cpu) {
    if (size > max_handwritten_echo_size) return NAN;
    // Both ends of every connection in this process, and some to spare.
    rlimit fds{};
    if (::getrlimit(RLIMIT_NOFILE, &fds) == 0 && fds.rlim_cur != RLIM_INFINITY &&
        fds.rlim_cur < 2 * static_cast<rlim_t>(std::max(sessions, 1)) + 64)
        return NAN;
    const PinnedTo pin(cpu);
    Gcm gcm(size);
    const std::size_t record = static_cast<std::size_t>(size) + 16;  // the bytes, the tag
    std::vector<unsigned char> in(record), out(record);
    // One IV for every record: then whatever is in flight when the passes
    // switch opens (a benchmark's key; the cipher costs the same).
    gcm.seal_record(0, out.data());
    EchoPeer peer(std::max(sessions, 1), record, peer_cpu);
    for (std::size_t i = 0; i < peer.size(); ++i)
        send_all(peer.fd(i), out.data(), record, "hand-written TLS echo");
    std::size_t next = 0;
    // `messages` echoed, each connection in turn, with or without the
    // cipher: this thread's CPU per message.
    auto pass = [&](bool cipher, std::uint64_t messages) {
        const double t0 = thread_cpu_us();
        for (std::uint64_t m = 0; m < messages; ++m) {
            const int fd = peer.fd(next++ % peer.size());
            if (!recv_all(fd, in.data(), record, "hand-written TLS echo"))
                throw std::runtime_error("hand-written TLS echo: the peer closed");
            if (cipher) gcm.echo(0, in.data(), out.data());
            send_all(fd, cipher ? out.data() : in.data(), record, "hand-written TLS echo");
        }
        return (thread_cpu_us() - t0) / static_cast<double>(messages);
    };
    // A warm-up pass sizes the others at about 20 ms of CPU each.
    const double guess = std::max(pass(true, peer.size()), 0.1);
    const auto messages = std::clamp<std::uint64_t>(static_cast<std::uint64_t>(20'000 / guess),
                                                    peer.size(), 1'000'000);
    // Interleaved, three times: without the cipher, then with it; the
    // median of the three differences.
    std::vector<double> cipher;
    for (int rep = 0; rep < 3; ++rep) {
        const double plain = pass(false, messages);
        cipher.push_back(pass(true, messages) - plain);
    }
    std::sort(cipher.begin(), cipher.end());
    return cipher[1];
}

const BenchCert& bench_cert() {
    static const BenchCert cert = [] {
        const support::TlsFiles& f = support::tls_files();
        return BenchCert{f.server_cert, f.server_key, f.ca};
    }();
    return cert;
}

#else

bool tls_built() {
    return false;
}

double evp_seal_open_us(int, int) {
    throw std::runtime_error("TLS not built");
}

double bare_tls_loop_us(int, int) {
    throw std::runtime_error("TLS not built");
}

double handwritten_tls_echo_us(int, int, int, int) {
    throw std::runtime_error("TLS not built");
}

const BenchCert& bench_cert() {
    throw std::runtime_error("TLS not built");
}

#endif

}  // namespace evmux::bench
