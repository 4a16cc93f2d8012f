// evmux-load --tls's own TLS 1.3 record layer (--tls-records own, the
// default): after OpenSSL's handshake, the application records are sealed and
// opened here with EVP's AEAD ciphers, not by SSL_read/SSL_write. OpenSSL's
// record layer costs a client several thousand instructions per message
// beyond the cipher; with it the client, not the server, was what limited a
// TLS point (the server then waited for it, and the bench measured its waits).
//
// Written for evmux-load alone, from RFC 8446: it shares no code with evmux's
// own record layer (src/tls_records.cpp), which it measures; the two agreeing
// byte for byte is itself a check of both (and evmux-echo --tls-records
// openssl serves it with OpenSSL's records). Handles application data,
// close_notify and other alerts, NewSessionTicket (ignored) and KeyUpdate both
// ways; a connection where it cannot take over (not TLS 1.3, another cipher
// suite, bytes OpenSSL has already read) keeps OpenSSL's records.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

struct ssl_st;             // OpenSSL's SSL
struct evp_cipher_ctx_st;  // EVP_CIPHER_CTX
struct evp_md_st;          // EVP_MD

namespace evmux::load {

/// The application traffic secrets of one handshake, as OpenSSL's keylog
/// callback hands them over (note()).
struct TlsSecrets {
    static constexpr std::size_t max_len = 48;  // SHA-384
    unsigned char client[max_len] = {};
    unsigned char server[max_len] = {};
    std::size_t client_len = 0;
    std::size_t server_len = 0;
    /// A keylog line: keeps CLIENT_TRAFFIC_SECRET_0 and SERVER_TRAFFIC_SECRET_0.
    void note(const char* line);
    ~TlsSecrets();
};

class TlsRecords {
  public:
    /// Takes the records of `ssl` (a client whose handshake has just ended)
    /// over; nullptr and `why` where it cannot.
    static std::unique_ptr<TlsRecords> take_over(ssl_st* ssl, const TlsSecrets& secrets,
                                                 std::string& why);
    ~TlsRecords();
    TlsRecords(const TlsRecords&) = delete;
    TlsRecords& operator=(const TlsRecords&) = delete;

    /// As recv() on socket `fd`: plaintext bytes; 0 after close_notify; -1
    /// with errno EAGAIN, EPROTO (error_text() says why) or the socket's.
    ssize_t read(int fd, unsigned char* buf, std::size_t len);
    /// As send(): seals up to one record of `buf` and sends it; the bytes
    /// sealed are taken even if the socket took only part of the record (the
    /// rest waits: has_unsent(), flush()). -1 with EAGAIN while earlier
    /// ciphertext still waits, or EPROTO, or the socket's errno.
    ssize_t write(int fd, const unsigned char* buf, std::size_t len);
    /// Sends waiting ciphertext: 1 all sent, 0 the socket is full, -1 an error.
    int flush(int fd);
    bool has_unsent() const { return unsent_off_ < unsent_.size(); }
    /// Nothing more to read without a readiness event: the last recv() was
    /// short and no whole record or plaintext waits here.
    bool drained() const;
    const std::string& error_text() const { return error_; }

  private:
    struct Direction {
        evp_cipher_ctx_st* ctx = nullptr;
        unsigned char secret[TlsSecrets::max_len] = {};
        unsigned char iv[12] = {};
        std::uint64_t seq = 0;
    };
    TlsRecords() = default;
    bool set_keys(Direction& d, bool encrypt);
    bool next_secret(Direction& d, bool encrypt);
    void nonce(const Direction& d, unsigned char* out) const;
    // One record of `type` (inner) with `n` bytes into `out` (n + 22 room).
    bool seal(unsigned char type, const unsigned char* plain, std::size_t n, unsigned char* out);
    // Opens the record at `rec` (header + `clen`) into `out`; the inner
    // plaintext's length with padding (clen - 16).
    bool open(const unsigned char* rec, std::size_t clen, unsigned char* out);
    bool handshake_message(const unsigned char* p, std::size_t n);
    ssize_t fail(const char* why);
    bool whole_record_waits() const;

    const void* cipher_ = nullptr;  // EVP_CIPHER
    const evp_md_st* md_ = nullptr;
    std::size_t secret_len_ = 0;
    std::size_t key_len_ = 0;
    Direction read_;
    Direction write_;
    std::string in_;     // ciphertext after the last whole record
    std::string plain_;  // plaintext that did not fit the caller's buffer
    std::size_t plain_off_ = 0;
    std::string hs_;  // post-handshake messages in pieces
    std::string unsent_;
    std::size_t unsent_off_ = 0;
    bool socket_drained_ = false;
    bool closed_ = false;  // close_notify came
    bool failed_ = false;
    std::string error_;
};

}  // namespace evmux::load
