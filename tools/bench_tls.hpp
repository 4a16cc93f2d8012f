// evmux-bench's TLS point: what sealing and opening one message costs with
// OpenSSL's EVP API alone (AES-256-GCM, TLS 1.3's default suite), timed in the
// bench's own process in the same run, so that the TLS server's CPU per
// message can be read against the plain server's plus that cost.
//
// Internal to tools/; not installed.
#pragma once

#include <string>

namespace evmux::bench {

/// True if evmux-bench was built with TLS (then the "evmux-tls" server runs).
bool tls_built();

/// CPU microseconds (this thread's) to seal (encrypt + tag) and open
/// (decrypt + check the tag) one `size`-byte message with AES-256-GCM through
/// EVP: the median of 5 timings of enough iterations for ~50 ms each. What an
/// echo server does to each message over TLS, minus everything else.
/// Throws std::runtime_error if OpenSSL fails (or TLS is not built).
double evp_seal_open_us(int size);

/// The server certificate and key evmux-echo --tls-cert/--tls-key gets and the
/// CA evmux-load --tls-ca checks it with, made on first use (a temporary
/// directory, removed at exit).
struct BenchCert {
    std::string cert, key, ca;
};
const BenchCert& bench_cert();

}  // namespace evmux::bench
