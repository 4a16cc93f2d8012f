// evmux-bench's TLS point: an EVP-only seal+open timing and the certificate.
#include "bench_tls.hpp"

#include "bench_interference.hpp"

#include <algorithm>
#include <stdexcept>
#include <vector>

#if EVMUX_BENCH_TLS
#include <openssl/evp.h>

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

}  // namespace

bool tls_built() {
    return true;
}

double evp_seal_open_us(int size, int cpu) {
    // On the servers' CPU for the timing, as the servers are pinned.
    const PinnedTo pin(cpu);
    Gcm gcm(size);
    std::uint64_t n = 0;
    // Calibrate: iterations for ~10 ms.
    double t0 = thread_cpu_us();
    std::uint64_t iterations = 0;
    while (thread_cpu_us() - t0 < 2000) gcm.round(n++), ++iterations;
    iterations = std::max<std::uint64_t>(iterations * 5, 1);
    std::vector<double> per;
    for (int rep = 0; rep < 5; ++rep) {
        t0 = thread_cpu_us();
        for (std::uint64_t i = 0; i < iterations; ++i) gcm.round(n++);
        per.push_back((thread_cpu_us() - t0) / static_cast<double>(iterations));
    }
    std::sort(per.begin(), per.end());
    return per[per.size() / 2];
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

const BenchCert& bench_cert() {
    throw std::runtime_error("TLS not built");
}

#endif

}  // namespace evmux::bench
