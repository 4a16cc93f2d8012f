// TlsSession: the TLS byte transport of one Connection (not installed). An
// OpenSSL SSL object reading and writing the socket itself through a small BIO
// of ours (recv, and send with MSG_NOSIGNAL), so ciphertext goes straight
// between the kernel and OpenSSL's record buffers and plaintext straight
// between those and the connection's scratch buffer or queue: no copy beyond
// the one the cipher makes. Its read() and write() answer like recv() and
// send(), so the connection's code stays the same for both transports.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <string>

#include "evmux/tls.hpp"

struct ssl_st;  // OpenSSL's SSL

namespace evmux::detail {

/// One connection's TLS state over a non-blocking socket `fd` (not owned).
/// Thread rule: the connection's loop thread. Non-copyable.
class TlsSession {
  public:
    /// Throws std::runtime_error with OpenSSL's reason if the SSL object
    /// cannot be made. `server_name`: a client's name to send and check
    /// (empty: the context's; both empty: `peer_ip`, checked as an address).
    TlsSession(const TlsContext& context, int fd, const std::string& server_name,
               const std::string& peer_ip);
    ~TlsSession();
    TlsSession(const TlsSession&) = delete;
    TlsSession& operator=(const TlsSession&) = delete;

    /// Advance the handshake: 1 done, 0 waiting (wants_write() says for
    /// what), -1 failed (errno set: the socket's error; EPROTO: a TLS error,
    /// see error_text()).
    int handshake();
    /// True if the last call that waited needs the socket writable, false if
    /// readable.
    bool wants_write() const { return wants_write_; }
    /// As recv(): plaintext bytes (> 0); 0 when the peer sent close_notify;
    /// -1 with errno EAGAIN (nothing yet), EPROTO (a TLS error, including an
    /// EOF without close_notify) or the socket's error.
    ssize_t read(char* buf, std::size_t len);
    /// As send(): plaintext bytes taken (> 0); -1 with errno EAGAIN, EPROTO or
    /// the socket's error. Once it has returned EAGAIN after encrypting a
    /// record, the next call must start with the same bytes (the queue does).
    ssize_t write(const char* buf, std::size_t len);
    /// Plaintext or ciphertext is buffered in OpenSSL that the socket's
    /// readiness will not announce.
    bool has_pending() const;
    /// No more can come without a new readiness event: nothing buffered and
    /// the last recv() returned less than asked (or would block).
    bool drained() const { return socket_drained_ && !has_pending(); }
    /// Send close_notify (best effort: a full socket drops it).
    void close_notify();
    /// The reason the last EPROTO was given, e.g. "TLS handshake: certificate
    /// verify failed (hostname mismatch)".
    const std::string& error_text() const { return error_; }
    /// True once a TLS error was seen (no close_notify is sent after one).
    bool failed() const { return failed_; }

    /// The ALPN protocol agreed on ("" if none).
    std::string alpn() const;
    /// The peer certificate's subject, one line ("" if none).
    std::string peer_subject() const;
    /// "TLSv1.3", "TLSv1.2".
    std::string version() const;

    // For the BIO callbacks (tls.cpp).
    int fd() const { return fd_; }
    void note_read(bool drained) { socket_drained_ = drained; }
    void note_errno(int err) { last_errno_ = err; }
    void note_eof() { eof_ = true; }
    bool at_eof() const { return eof_; }

  private:
    // Maps an SSL call's result; returns what read/write/handshake return.
    ssize_t outcome(int ret, const char* during);

    ssl_st* ssl_ = nullptr;
    int fd_;
    bool wants_write_ = false;
    bool socket_drained_ = false;
    bool failed_ = false;
    bool handshake_done_ = false;
    bool eof_ = false;    // recv() returned 0: OpenSSL tells an EOF without close_notify
    int last_errno_ = 0;  // the socket's, from the BIO
    std::string error_;
};

}  // namespace evmux::detail
