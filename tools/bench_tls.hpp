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
/// EVP: the median of 5 timings of enough iterations for ~10 ms each, on CPU
/// `cpu` (the servers' CPU; the thread's affinity is restored afterwards; -1:
/// wherever it runs). What an echo server does to each message over TLS, minus
/// everything else. evmux-bench times it once per round, beside the servers'
/// runs of that round, so that a disturbed moment moves one round's pair only.
/// Throws std::runtime_error if OpenSSL fails (or TLS is not built).
double evp_seal_open_us(int size, int cpu = -1);

/// The same seal and open in a bare loop that also sends each sealed message
/// over loopback TCP and receives it at the other end (both sockets in this
/// thread, no server, no framework): CPU microseconds per message with the
/// cipher minus without it, interleaved (the median of three such
/// differences of medians). On a machine where entering the kernel flushes
/// the TLB or the kernel's copies evict the cipher's state, this is above
/// evp_seal_open_us(): (this / EVP alone) is the extra/evp of an echo with
/// nothing but the system calls around its cipher, a reference for the TLS
/// target's extra/evp (which stays measured against EVP alone). On CPU `cpu`
/// as evp_seal_open_us(). Throws std::runtime_error if a socket or OpenSSL
/// fails (or TLS is not built).
double bare_tls_loop_us(int size, int cpu = -1);

/// The largest message handwritten_tls_echo_us() measures (each connection
/// must hold a message each way in its socket buffers).
inline constexpr int max_handwritten_echo_size = 64 * 1024;

/// A hand-written TLS echo, no framework, in the servers' shape: this thread,
/// on CPU `cpu`, serves `sessions` loopback TCP connections in turn (a
/// blocking recv of a message, EVP open and seal, a send), and a thread on CPU
/// `peer_cpu` echoes each message back raw (evmux-load's place). Its CPU
/// microseconds per message with the cipher minus without it, interleaved
/// (the median of three such differences); (this / EVP alone) is the
/// extra/evp of a TLS echo with no framework on this machine, beside the TLS
/// target's (which stays measured against EVP alone). NaN (not measured) for
/// a message over max_handwritten_echo_size, or when the fd limit has no
/// room for both ends of the connections (2 x `sessions` + 64). Throws
/// std::runtime_error if a socket fails or stalls for 2 s, or OpenSSL fails
/// (or TLS is not built).
double handwritten_tls_echo_us(int size, int sessions, int cpu = -1, int peer_cpu = -1);

/// The server certificate and key evmux-echo --tls-cert/--tls-key gets and the
/// CA evmux-load --tls-ca checks it with, made on first use (a temporary
/// directory, removed at exit).
struct BenchCert {
    std::string cert, key, ca;
};
const BenchCert& bench_cert();

}  // namespace evmux::bench
