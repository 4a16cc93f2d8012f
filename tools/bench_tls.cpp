// evmux-bench's TLS point: an EVP-only seal+open timing and the certificate.
#include "bench_tls.hpp"

#include "bench_interference.hpp"

#include <algorithm>
#include <stdexcept>
#include <vector>

#if EVMUX_BENCH_TLS
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

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

    void round(std::uint64_t n) {
        unsigned char iv[12] = {};
        for (int i = 0; i < 8; ++i) iv[4 + i] = static_cast<unsigned char>(n >> (8 * i));
        unsigned char tag[16];
        int len = 0, fin = 0;
        const int size = static_cast<int>(plain_.size());
        bool ok = EVP_EncryptInit_ex(seal_, nullptr, nullptr, nullptr, iv) == 1 &&
                  EVP_EncryptUpdate(seal_, sealed_.data(), &len, plain_.data(), size) == 1 &&
                  EVP_EncryptFinal_ex(seal_, sealed_.data() + len, &fin) == 1 &&
                  EVP_CIPHER_CTX_ctrl(seal_, EVP_CTRL_GCM_GET_TAG, 16, tag) == 1 &&
                  EVP_DecryptInit_ex(open_, nullptr, nullptr, nullptr, iv) == 1 &&
                  EVP_DecryptUpdate(open_, opened_.data(), &len, sealed_.data(), size) == 1 &&
                  EVP_CIPHER_CTX_ctrl(open_, EVP_CTRL_GCM_SET_TAG, 16, tag) == 1 &&
                  EVP_DecryptFinal_ex(open_, opened_.data() + len, &fin) == 1;
        if (!ok) throw std::runtime_error("EVP AES-256-GCM seal/open failed");
    }

  private:
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
            throw std::runtime_error(std::string("loopback TCP pair for the bare TLS loop: ") +
                                     std::strerror(err));
        }
        const int one = 1;
        ::setsockopt(out_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    ~LoopbackPair() {
        ::close(out_);
        ::close(in_);
    }
    LoopbackPair(const LoopbackPair&) = delete;
    LoopbackPair& operator=(const LoopbackPair&) = delete;

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

const BenchCert& bench_cert() {
    throw std::runtime_error("TLS not built");
}

#endif

}  // namespace evmux::bench
