// TlsRecordLayer: TLS 1.3's record layer, done by evmux once OpenSSL has finished
// the handshake (not installed). OpenSSL makes the keys (the handshake, the
// certificates, the key schedule); this protects and checks the records of
// the application traffic with OpenSSL's AEAD ciphers (their provider's functions,
// called without EVP's cipher layer: TlsAead) and moves them
// between the socket and the connection's own buffers: a record is decrypted
// straight into the connection's scratch buffer and encrypted straight out of
// its queue, with none of the OpenSSL record layer's copies and bookkeeping
// (about 7 800 instructions per echoed message under OpenSSL 3.0). What it
// handles after the handshake: application data, alerts (close_notify, the
// peer's errors), KeyUpdate both ways (and one of its own every
// key_update_records records), NewSessionTicket (a client ignores them).
// Anything else is an error with an alert. The user-space analogue of the
// kernel's TLS (kTLS), which this machine's kernel lacks.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>

struct evp_md_st;  // OpenSSL's EVP_MD

namespace evmux::detail {

struct TlsAead;  // the suite's AEAD, its provider's functions (tls_records.cpp)

class TlsRecordLayer {
  public:
    /// The TLS 1.3 cipher suites handled (by their IANA numbers).
    static bool supports(unsigned suite) { return suite >= 0x1301 && suite <= 0x1303; }
    /// A traffic secret's longest size (SHA-384).
    static constexpr std::size_t max_secret = 48;

    /// Over non-blocking socket `fd` (not owned), for `suite` (supports()),
    /// from the application traffic secrets OpenSSL logged and the sequence
    /// numbers its records under them reached. `max_plain`: the largest
    /// plaintext per record (16 384, less if the peer asked for less).
    /// `key_update_records`: send a KeyUpdate after that many records under
    /// one key (0: never). `server`: this end is the server (a client's
    /// NewSessionTicket is an error). Throws std::runtime_error if OpenSSL fails.
    TlsRecordLayer(int fd, unsigned suite, const unsigned char* read_secret,
                   const unsigned char* write_secret, std::size_t secret_len,
                   std::uint64_t read_seq, std::uint64_t write_seq, std::size_t max_plain,
                   std::uint64_t key_update_records, bool server);
    ~TlsRecordLayer();
    TlsRecordLayer(const TlsRecordLayer&) = delete;
    TlsRecordLayer& operator=(const TlsRecordLayer&) = delete;

    /// As TlsSession::read(): plaintext bytes; 0 after the peer's
    /// close_notify; -1 with errno EAGAIN, EPROTO (see error_text()) or the
    /// socket's error.
    ssize_t read(char* buf, std::size_t len);
    /// As TlsSession::write(): plaintext bytes taken (their records are all
    /// on the socket); -1 with EAGAIN, EPROTO or the socket's error. After
    /// EAGAIN the next call must start with the same bytes: records already
    /// made of them wait in unsent ciphertext and are not made twice.
    ssize_t write(const char* buf, std::size_t len);
    /// Ciphertext made but not yet on the socket (a record the socket took
    /// part of, a KeyUpdate answered while reading, close_notify).
    bool has_unsent() const { return unsent_off_ < unsent_.size(); }
    /// Send it: 1 all sent, 0 the socket is full, -1 an error (errno).
    /// Under completion I/O (use_buffers()) it stays for the next request: 0.
    int flush();
    /// As flush(), but on the socket whichever I/O the connection uses: for
    /// completion I/O's last words (close_notify, a fatal alert) when the
    /// connection closes with no send request in the kernel.
    int send_unsent();
    /// Seal close_notify (once) and flush(); as flush().
    int close_notify();
    /// Completion I/O: the connection's requests move the ciphertext, not
    /// this: read() decrypts only what absorb() gave it, and flush() never
    /// touches the socket (the unsent ciphertext goes with seal_append()).
    void use_buffers() { socket_io_ = false; }
    /// Ciphertext a receive request brought (copied until decrypted).
    void absorb(const char* p, std::size_t n);
    /// Appends to `out` the unsent ciphertext (a KeyUpdate, close_notify),
    /// then records of `n` plaintext bytes. False on a failure (error_text()).
    bool seal_append(std::string& out, const char* p, std::size_t n);
    /// The socket's end of file came: true if after close_notify, else the
    /// session fails ("TLS: unexpected eof while reading").
    bool end_of_file();
    /// Whole records (or plaintext) wait here that no readiness event will
    /// announce.
    bool has_pending() const { return !plain_.empty() || pending_record_ || error_pending_; }
    /// No more can come without a new readiness event.
    bool drained() const { return socket_drained_ && !has_pending(); }
    bool failed() const { return failed_; }
    const std::string& error_text() const { return error_; }
    /// The peer's close_notify was seen.
    bool peer_closed() const { return peer_closed_; }
    /// close_notify was sealed.
    bool notify_sealed() const { return notify_sealed_; }

  private:
    struct Direction {
        void* ctx = nullptr;  // the AEAD provider's context
        unsigned char secret[max_secret];
        unsigned char iv[12];
        std::uint64_t seq = 0;
        std::uint64_t records = 0;  // under the current key
    };

    bool set_keys(Direction& d, bool encrypt);
    bool update_key(Direction& d, bool encrypt);
    // One record of `type` with `n` bytes of plaintext into `out` (room for
    // n + overhead bytes); its size.
    std::size_t seal(unsigned char type, const unsigned char* plain, std::size_t n,
                     unsigned char* out);
    // Authenticates and decrypts the record at `rec` (header + `clen` bytes)
    // into `out` (room for clen - 16 bytes).
    bool open(unsigned char* rec, std::size_t clen, unsigned char* out);
    // A sealed record of `type` appended to the unsent ciphertext.
    bool queue_record(unsigned char type, const unsigned char* plain, std::size_t n);
    bool maybe_rekey();
    bool handshake_message(const unsigned char* p, std::size_t n);
    // Fails the session: EPROTO, `why` in error_text(); sends `alert` (if
    // not 0) best effort.
    ssize_t fail(unsigned char alert, const char* why);
    ssize_t deliver_plain(char* buf, std::size_t len);

    int fd_;
    const TlsAead* aead_;
    const evp_md_st* md_ = nullptr;
    std::size_t secret_len_;
    std::size_t key_len_;
    std::size_t max_plain_;
    std::uint64_t key_update_records_;
    bool server_;
    Direction read_;
    Direction write_;

    std::string in_;               // ciphertext read past what was decrypted
    bool pending_record_ = false;  // in_ holds a whole record
    bool whole_record() const;     // in_ starts with a whole record
    bool bad_header() const;       // in_ starts with a header read() refuses
    std::string plain_;            // a record's plaintext that did not fit the caller's buffer
    std::size_t plain_off_ = 0;
    std::string hs_;      // a post-handshake message in pieces
    std::string unsent_;  // ciphertext the socket did not take yet
    std::size_t unsent_off_ = 0;
    std::size_t sealed_plain_ = 0;  // plaintext of the caller's next bytes already in unsent_
    bool socket_drained_ = false;
    bool socket_io_ = true;
    bool peer_closed_ = false;
    bool notify_sealed_ = false;
    bool failed_ = false;
    // Failed after read() had plaintext of earlier records for its caller:
    // that went out first, the error comes with the next read().
    bool error_pending_ = false;
    std::string error_;
};

}  // namespace evmux::detail
