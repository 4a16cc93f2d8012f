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
#include <cstdint>
#include <memory>
#include <string>

#include "evmux/tls.hpp"
#include "tls_records.hpp"

struct ssl_st;  // OpenSSL's SSL

namespace evmux::detail {

/// One connection's TLS state over a non-blocking socket `fd` (not owned).
/// Thread rule: the connection's loop thread. Non-copyable.
class TlsSession {
  public:
    /// Throws std::runtime_error with OpenSSL's reason if the SSL object
    /// cannot be made. A client sends and checks the context's server name;
    /// without one, `host_name` (the name connected to); without both,
    /// `peer_ip`, checked as an address.
    TlsSession(const TlsContext& context, int fd, const std::string& host_name,
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
    bool drained() const {
        return records_ ? records_->drained() : socket_drained_ && !has_pending();
    }
    /// Seal close_notify and send it: 1 sent, 0 the socket is full (it goes
    /// with flush() when writable), -1 an error (errno). Once only.
    int close_notify();
    /// Bytes of TLS's own wait for the socket to be writable: a record the
    /// socket took part of, a KeyUpdate answered while reading, close_notify.
    bool has_unsent() const;
    /// Send them: 1 all sent, 0 the socket is full, -1 an error (errno).
    int flush();
    /// The last read() needs the socket writable before it can go on
    /// (OpenSSL answering the peer); read again once it is.
    bool read_wants_write() const { return read_wants_write_; }
    /// Who protects the records now: true once evmux's record layer took over.
    bool own_records() const { return records_ != nullptr; }
    /// With own_records(): the record layer for completion I/O, where the
    /// connection's requests move the ciphertext (TlsRecordLayer::use_buffers).
    TlsRecordLayer& records() { return *records_; }
    /// The reason the last EPROTO was given, e.g. "TLS handshake: certificate
    /// verify failed (hostname mismatch)".
    const std::string& error_text() const {
        return records_ && records_->failed() ? records_->error_text() : error_;
    }
    /// True once a TLS error was seen (no close_notify is sent after one).
    bool failed() const { return failed_ || (records_ && records_->failed()); }

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
    // For the keylog and message callbacks (tls.cpp).
    void note_secret(bool client, const unsigned char* secret, std::size_t len);
    void note_message(bool written, int content_type, const unsigned char* p, std::size_t len);

  private:
    // Maps an SSL call's result; returns what read/write/handshake return.
    ssize_t outcome(int ret, const char* during);
    // After the handshake: evmux's record layer where it can, else OpenSSL's.
    void take_records();

    ssl_st* ssl_ = nullptr;
    int fd_;
    bool wants_write_ = false;
    bool socket_drained_ = false;
    bool failed_ = false;
    bool handshake_done_ = false;
    bool eof_ = false;               // recv() returned 0: OpenSSL tells an EOF without close_notify
    int last_errno_ = 0;             // the socket's, from the BIO
    bool read_wants_write_ = false;  // OpenSSL: SSL_read wanted the socket writable
    bool shutdown_pending_ = false;  // OpenSSL: close_notify not on the socket yet
    bool notify_done_ = false;       // close_notify sealed (or tried)
    std::string error_;

    // The handover to evmux's record layer: the application traffic secrets
    // (OpenSSL's keylog callback) and how many records OpenSSL protected with
    // them (its message callback: records after each side's Finished).
    const TlsContext* context_;
    bool want_records_;
    unsigned char client_secret_[TlsRecordLayer::max_secret];
    unsigned char server_secret_[TlsRecordLayer::max_secret];
    std::size_t client_secret_len_ = 0;
    std::size_t server_secret_len_ = 0;
    bool own_finished_ = false;
    bool peer_finished_ = false;
    std::uint64_t own_records_ = 0;
    std::uint64_t peer_records_ = 0;
    std::unique_ptr<TlsRecordLayer> records_;
};

}  // namespace evmux::detail
