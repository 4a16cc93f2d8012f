// TLS 1.3 records after OpenSSL's handshake: see tls_records.hpp.
// RFC 8446: 5.2 (record protection), 5.3 (per-record nonce), 7.1 and 7.2
// (HKDF-Expand-Label, traffic key calculation), 4.6.3 (KeyUpdate), 6 (alerts).
#include "tls_records.hpp"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <utility>

#include "evmux_config.h"

#if EVMUX_HAVE_TLS
#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/ssl.h>

namespace evmux::detail {

namespace {

constexpr unsigned char type_alert = 21;
constexpr unsigned char type_handshake = 22;
constexpr unsigned char type_application = 23;
constexpr unsigned char alert_close_notify = 0;
constexpr unsigned char alert_unexpected_message = 10;
constexpr unsigned char alert_bad_record_mac = 20;
constexpr unsigned char alert_record_overflow = 22;
constexpr unsigned char alert_illegal_parameter = 47;
constexpr unsigned char alert_decode_error = 50;
constexpr unsigned char alert_user_canceled = 90;
constexpr unsigned char msg_new_session_ticket = 4;
constexpr unsigned char msg_key_update = 24;

constexpr std::size_t header_len = 5;
constexpr std::size_t tag_len = 16;
constexpr std::size_t max_plain_record = 16384;
// A record's ciphertext may be up to 2^14 + 256 bytes (RFC 8446 5.2).
constexpr std::size_t max_cipher_len = max_plain_record + 256;
constexpr std::size_t max_record = header_len + max_cipher_len;
// A sealed record's size beyond its plaintext: header, content type, tag.
constexpr std::size_t overhead = header_len + 1 + tag_len;
constexpr std::size_t max_handshake_message = 64 * 1024;
// Records sealed per write() call at most.
constexpr std::size_t batch_records = 4;

// The thread's ciphertext buffers: what recv() brought (decrypted from here
// into the caller's buffer) and what send() is to take (sealed here from the
// caller's bytes). Only what the socket did not take, or a record not yet
// whole, is copied into the session.
struct Scratch {
    unsigned char in[64 * 1024 + max_record];
    unsigned char out[batch_records * (max_plain_record + overhead) + 64];
};

Scratch& scratch() {
    thread_local std::unique_ptr<Scratch> s;
    if (!s) s = std::make_unique_for_overwrite<Scratch>();
    return *s;
}

// HKDF-Expand-Label(secret, label, "", len) (RFC 8446 7.1).
bool expand_label(const EVP_MD* md, const unsigned char* secret, std::size_t secret_len,
                  const char* label, unsigned char* out, std::size_t len) {
    unsigned char info[2 + 1 + 255 + 1];
    const std::size_t label_len = 6 + std::strlen(label);
    info[0] = static_cast<unsigned char>(len >> 8);
    info[1] = static_cast<unsigned char>(len);
    info[2] = static_cast<unsigned char>(label_len);
    std::memcpy(info + 3, "tls13 ", 6);
    std::memcpy(info + 9, label, label_len - 6);
    info[3 + label_len] = 0;  // no context
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr);
    if (!ctx) return false;
    std::size_t out_len = len;
    bool ok = EVP_PKEY_derive_init(ctx) == 1 &&
              EVP_PKEY_CTX_set_hkdf_mode(ctx, EVP_PKEY_HKDEF_MODE_EXPAND_ONLY) == 1 &&
              EVP_PKEY_CTX_set_hkdf_md(ctx, md) == 1 &&
              EVP_PKEY_CTX_set1_hkdf_key(ctx, secret, static_cast<int>(secret_len)) == 1 &&
              EVP_PKEY_CTX_add1_hkdf_info(ctx, info, static_cast<int>(4 + label_len)) == 1 &&
              EVP_PKEY_derive(ctx, out, &out_len) == 1 && out_len == len;
    EVP_PKEY_CTX_free(ctx);
    return ok;
}

// The per-record nonce: the IV xor the sequence number (RFC 8446 5.3).
void make_nonce(const unsigned char* iv, std::uint64_t seq, unsigned char* nonce) {
    std::memcpy(nonce, iv, 12);
    for (int i = 0; i < 8; ++i) nonce[11 - i] ^= static_cast<unsigned char>(seq >> (8 * i));
}

const char* cipher_name(unsigned suite) {
    switch (suite) {
        case 0x1301:
            return "AES-128-GCM";
        case 0x1302:
            return "AES-256-GCM";
        default:
            return "ChaCha20-Poly1305";
    }
}

// True if `name` is one of the colon-separated `names` (any case).
bool names_include(const char* names, const char* name) {
    const std::size_t len = std::strlen(name);
    for (const char* p = names;;) {
        const char* end = std::strchr(p, ':');
        const std::size_t n = end ? static_cast<std::size_t>(end - p) : std::strlen(p);
        if (n == len && OPENSSL_strncasecmp(p, name, n) == 0) return true;
        if (!end) return false;
        p = end + 1;
    }
}

}  // namespace

// A suite's AEAD as the provider that EVP would use implements it: its
// functions called directly, without EVP's cipher layer. Per record that layer
// costs more than the cipher's own set-up (OpenSSL 3.0: each EVP init asks
// the provider for the IV length by name, each ctrl is turned into a
// parameter list; about 0.25 us per seal + open of 1 KiB in a loop, more in a
// server between system calls). Found once per suite and kept: the fetched
// cipher keeps its provider loaded.
struct TlsAead {
    EVP_CIPHER* cipher = nullptr;
    void* provctx = nullptr;
    OSSL_FUNC_cipher_newctx_fn* newctx = nullptr;
    OSSL_FUNC_cipher_freectx_fn* freectx = nullptr;
    OSSL_FUNC_cipher_encrypt_init_fn* einit = nullptr;
    OSSL_FUNC_cipher_decrypt_init_fn* dinit = nullptr;
    OSSL_FUNC_cipher_update_fn* update = nullptr;
    OSSL_FUNC_cipher_final_fn* final = nullptr;
    OSSL_FUNC_cipher_get_ctx_params_fn* get_params = nullptr;
    OSSL_FUNC_cipher_set_ctx_params_fn* set_params = nullptr;

    bool complete() const {
        return newctx && freectx && einit && dinit && update && final && get_params && set_params;
    }
    // The AEAD of `suite`, or nullptr if its provider's cannot be called so.
    static const TlsAead* of(unsigned suite);
};

namespace {

TlsAead find_aead(unsigned suite) {
    TlsAead a;
    const char* name = cipher_name(suite);
    a.cipher = EVP_CIPHER_fetch(nullptr, name, nullptr);
    if (!a.cipher) return a;
    OSSL_PROVIDER* prov = const_cast<OSSL_PROVIDER*>(EVP_CIPHER_get0_provider(a.cipher));
    int no_store = 0;
    const OSSL_ALGORITHM* algs = OSSL_PROVIDER_query_operation(prov, OSSL_OP_CIPHER, &no_store);
    for (const OSSL_ALGORITHM* alg = algs; alg && alg->algorithm_names; ++alg) {
        if (!names_include(alg->algorithm_names, name)) continue;
        for (const OSSL_DISPATCH* f = alg->implementation; f->function_id != 0; ++f) {
            switch (f->function_id) {
                case OSSL_FUNC_CIPHER_NEWCTX:
                    a.newctx = OSSL_FUNC_cipher_newctx(f);
                    break;
                case OSSL_FUNC_CIPHER_FREECTX:
                    a.freectx = OSSL_FUNC_cipher_freectx(f);
                    break;
                case OSSL_FUNC_CIPHER_ENCRYPT_INIT:
                    a.einit = OSSL_FUNC_cipher_encrypt_init(f);
                    break;
                case OSSL_FUNC_CIPHER_DECRYPT_INIT:
                    a.dinit = OSSL_FUNC_cipher_decrypt_init(f);
                    break;
                case OSSL_FUNC_CIPHER_UPDATE:
                    a.update = OSSL_FUNC_cipher_update(f);
                    break;
                case OSSL_FUNC_CIPHER_FINAL:
                    a.final = OSSL_FUNC_cipher_final(f);
                    break;
                case OSSL_FUNC_CIPHER_GET_CTX_PARAMS:
                    a.get_params = OSSL_FUNC_cipher_get_ctx_params(f);
                    break;
                case OSSL_FUNC_CIPHER_SET_CTX_PARAMS:
                    a.set_params = OSSL_FUNC_cipher_set_ctx_params(f);
                    break;
                default:
                    break;
            }
        }
        break;
    }
    if (algs) OSSL_PROVIDER_unquery_operation(prov, OSSL_OP_CIPHER, algs);
    a.provctx = OSSL_PROVIDER_get0_provider_ctx(prov);
    return a;
}

}  // namespace

const TlsAead* TlsAead::of(unsigned suite) {
    static const TlsAead aeads[3] = {find_aead(0x1301), find_aead(0x1302), find_aead(0x1303)};
    const TlsAead* a = &aeads[suite - 0x1301];
    return a->complete() ? a : nullptr;
}

TlsRecordLayer::TlsRecordLayer(int fd, unsigned suite, const unsigned char* read_secret,
                               const unsigned char* write_secret, std::size_t secret_len,
                               std::uint64_t read_seq, std::uint64_t write_seq,
                               std::size_t max_plain, std::uint64_t key_update_records, bool server)
    : fd_(fd),
      aead_(supports(suite) ? TlsAead::of(suite) : nullptr),
      md_(suite == 0x1302 ? EVP_sha384() : EVP_sha256()),
      secret_len_(secret_len),
      key_len_(suite == 0x1301 ? 16 : 32),
      max_plain_(std::clamp<std::size_t>(max_plain, 512, max_plain_record)),
      key_update_records_(key_update_records),
      server_(server) {
    if (!supports(suite) || secret_len != static_cast<std::size_t>(EVP_MD_get_size(md_)))
        throw std::runtime_error("TLS: records: unsupported suite");
    if (!aead_) throw std::runtime_error("TLS: records: the cipher's provider cannot be called");
    std::memcpy(read_.secret, read_secret, secret_len);
    std::memcpy(write_.secret, write_secret, secret_len);
    read_.seq = read_.records = read_seq;
    write_.seq = write_.records = write_seq;
    read_.ctx = aead_->newctx(aead_->provctx);
    write_.ctx = aead_->newctx(aead_->provctx);
    if (!read_.ctx || !write_.ctx || !set_keys(read_, false) || !set_keys(write_, true)) {
        if (read_.ctx) aead_->freectx(read_.ctx);
        if (write_.ctx) aead_->freectx(write_.ctx);
        throw std::runtime_error("TLS: records: cannot set up the cipher");
    }
}

TlsRecordLayer::~TlsRecordLayer() {
    aead_->freectx(read_.ctx);
    aead_->freectx(write_.ctx);
    OPENSSL_cleanse(read_.secret, sizeof read_.secret);
    OPENSSL_cleanse(write_.secret, sizeof write_.secret);
}

// The traffic key and IV of a direction's secret (RFC 8446 7.3).
bool TlsRecordLayer::set_keys(Direction& d, bool encrypt) {
    unsigned char key[32];
    bool ok =
        expand_label(md_, d.secret, secret_len_, "key", key, key_len_) &&
        expand_label(md_, d.secret, secret_len_, "iv", d.iv, sizeof d.iv) &&
        (encrypt ? aead_->einit : aead_->dinit)(d.ctx, key, key_len_, nullptr, 0, nullptr) == 1;
    OPENSSL_cleanse(key, sizeof key);
    return ok;
}

// KeyUpdate: the next generation of a direction's secret (RFC 8446 7.2).
bool TlsRecordLayer::update_key(Direction& d, bool encrypt) {
    unsigned char next[max_secret];
    if (!expand_label(md_, d.secret, secret_len_, "traffic upd", next, secret_len_)) return false;
    std::memcpy(d.secret, next, secret_len_);
    OPENSSL_cleanse(next, sizeof next);
    d.seq = 0;
    d.records = 0;
    return set_keys(d, encrypt);
}

std::size_t TlsRecordLayer::seal(unsigned char type, const unsigned char* plain, std::size_t n,
                                 unsigned char* out) {
    const std::size_t clen = n + 1 + tag_len;
    out[0] = type_application;  // the outer type of every protected record
    out[1] = 3;
    out[2] = 3;
    out[3] = static_cast<unsigned char>(clen >> 8);
    out[4] = static_cast<unsigned char>(clen);
    unsigned char nonce[12];
    make_nonce(write_.iv, write_.seq, nonce);
    unsigned char* body = out + header_len;
    unsigned char* tag = body + n + 1;
    OSSL_PARAM get_tag[] = {
        OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG, tag, tag_len),
        OSSL_PARAM_construct_end()};
    std::size_t len = 0;
    void* ctx = write_.ctx;
    const TlsAead& a = *aead_;
    bool ok = a.einit(ctx, nullptr, 0, nonce, sizeof nonce, nullptr) == 1 &&
              a.update(ctx, nullptr, &len, header_len, out, header_len) == 1 &&
              a.update(ctx, body, &len, n, plain, n) == 1 &&
              a.update(ctx, body + n, &len, 1, &type, 1) == 1 &&
              a.final(ctx, tag, &len, tag_len) == 1 && a.get_params(ctx, get_tag) == 1;
    if (!ok) return 0;
    ++write_.seq;
    ++write_.records;
    return header_len + clen;
}

bool TlsRecordLayer::open(unsigned char* rec, std::size_t clen, unsigned char* out) {
    unsigned char nonce[12];
    make_nonce(read_.iv, read_.seq, nonce);
    const std::size_t body = clen - tag_len;
    OSSL_PARAM set_tag[] = {OSSL_PARAM_construct_octet_string(OSSL_CIPHER_PARAM_AEAD_TAG,
                                                              rec + header_len + body, tag_len),
                            OSSL_PARAM_construct_end()};
    std::size_t len = 0;
    std::size_t fin = 0;
    void* ctx = read_.ctx;
    const TlsAead& a = *aead_;
    bool ok = a.dinit(ctx, nullptr, 0, nonce, sizeof nonce, nullptr) == 1 &&
              a.update(ctx, nullptr, &len, header_len, rec, header_len) == 1 &&
              a.update(ctx, out, &len, body, rec + header_len, body) == 1 &&
              a.set_params(ctx, set_tag) == 1 && a.final(ctx, out + len, &fin, 0) == 1;
    if (!ok) return false;
    ++read_.seq;
    ++read_.records;
    return true;
}

ssize_t TlsRecordLayer::fail(unsigned char alert, const char* why) {
    if (!failed_) {
        failed_ = true;
        error_ = why;
        if (alert != 0 && !notify_sealed_) {
            // Fatal alerts go out best effort, after whatever was already made.
            const unsigned char body[2] = {2, alert};
            if (queue_record(type_alert, body, sizeof body)) flush();
        }
    }
    errno = EPROTO;
    return -1;
}

bool TlsRecordLayer::queue_record(unsigned char type, const unsigned char* plain, std::size_t n) {
    unsigned char rec[64];
    std::size_t size = seal(type, plain, n, rec);
    if (size == 0) return false;
    if (unsent_off_ == unsent_.size()) {
        unsent_.clear();
        unsent_off_ = 0;
    }
    unsent_.append(reinterpret_cast<const char*>(rec), size);
    return true;
}

// A KeyUpdate of our own before a key has protected too many records (AES-GCM
// keeps its margin up to about 2^24.5 records, RFC 8446 5.5).
bool TlsRecordLayer::maybe_rekey() {
    if (key_update_records_ == 0 || write_.records < key_update_records_) return true;
    const unsigned char msg[5] = {msg_key_update, 0, 0, 1, 0};  // update_not_requested
    return queue_record(type_handshake, msg, sizeof msg) && update_key(write_, true);
}

int TlsRecordLayer::flush() {
    if (!socket_io_) return has_unsent() ? 0 : 1;  // it goes with the next send request
    return send_unsent();
}

int TlsRecordLayer::send_unsent() {
    while (unsent_off_ < unsent_.size()) {
        ssize_t n =
            ::send(fd_, unsent_.data() + unsent_off_, unsent_.size() - unsent_off_, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -1;
        }
        unsent_off_ += static_cast<std::size_t>(n);
    }
    std::string().swap(unsent_);  // a connection that is not writing holds none
    unsent_off_ = 0;
    return 1;
}

int TlsRecordLayer::close_notify() {
    if (!notify_sealed_ && !failed_) {
        const unsigned char body[2] = {1, alert_close_notify};
        if (!queue_record(type_alert, body, sizeof body)) return errno = EPROTO, -1;
        notify_sealed_ = true;
    }
    return flush();
}

ssize_t TlsRecordLayer::write(const char* buf, std::size_t len) {
    if (failed_ || notify_sealed_) return errno = failed_ ? EPROTO : EPIPE, -1;
    if (!socket_io_) return errno = EAGAIN, -1;  // completion I/O: seal_append() and a request
    if (has_unsent()) {
        int r = flush();
        if (r <= 0) {
            if (r == 0) errno = EAGAIN;
            return -1;
        }
        if (sealed_plain_ > 0) return static_cast<ssize_t>(std::exchange(sealed_plain_, 0));
    }
    if (!maybe_rekey()) return fail(0, "TLS: KeyUpdate failed");
    if (has_unsent()) {  // the KeyUpdate goes first
        int r = flush();
        if (r <= 0) {
            if (r == 0) errno = EAGAIN;
            return -1;
        }
    }
    unsigned char* out = scratch().out;
    const auto* p = reinterpret_cast<const unsigned char*>(buf);
    std::size_t plain_of[batch_records];  // each record's plaintext, in order
    std::size_t count = 0;
    std::size_t made = 0;
    std::size_t taken = 0;
    while (taken < len && count < batch_records) {
        // A KeyUpdate due: the next call makes it first.
        if (key_update_records_ != 0 && write_.records >= key_update_records_) break;
        const std::size_t n = std::min(len - taken, max_plain_);
        const std::size_t size = seal(type_application, p + taken, n, out + made);
        if (size == 0) return fail(0, "TLS: encryption failed");
        plain_of[count++] = n;
        made += size;
        taken += n;
    }
    std::size_t sent = 0;
    while (sent < made) {
        ssize_t n = ::send(fd_, out + sent, made - sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            failed_ = true;  // the socket's error: the records made are lost with it
            return -1;
        }
        sent += static_cast<std::size_t>(n);
    }
    if (sent == made) return static_cast<ssize_t>(taken);
    // The socket is full. Records it took whole are done; the rest wait as
    // ciphertext, standing for the caller's next sealed_plain_ bytes.
    unsent_.assign(reinterpret_cast<const char*>(out + sent), made - sent);
    unsent_off_ = 0;
    std::size_t done_plain = 0;
    std::size_t at = 0;
    for (std::size_t i = 0; i < count; ++i) {
        at += plain_of[i] + overhead;
        if (at > sent) break;
        done_plain += plain_of[i];
    }
    sealed_plain_ = taken - done_plain;
    if (done_plain > 0) return static_cast<ssize_t>(done_plain);
    errno = EAGAIN;
    return -1;
}

void TlsRecordLayer::absorb(const char* p, std::size_t n) {
    in_.append(p, n);
    pending_record_ = whole_record();
}

bool TlsRecordLayer::whole_record() const {
    const auto* h = reinterpret_cast<const unsigned char*>(in_.data());
    return in_.size() >= header_len && in_.size() >= header_len + ((std::size_t{h[3]} << 8) | h[4]);
}

// A header read() refuses (a record type or length it will not wait out).
bool TlsRecordLayer::bad_header() const {
    if (in_.size() < header_len) return false;
    const auto* h = reinterpret_cast<const unsigned char*>(in_.data());
    const std::size_t clen = (std::size_t{h[3]} << 8) | h[4];
    return h[0] != type_application || clen > max_cipher_len || clen < 1 + tag_len;
}

bool TlsRecordLayer::seal_append(std::string& out, const char* p, std::size_t n) {
    if (failed_ || (notify_sealed_ && n > 0)) return false;
    const auto* plain = reinterpret_cast<const unsigned char*>(p);
    for (std::size_t taken = 0;;) {
        if (!notify_sealed_ && !maybe_rekey()) return fail(0, "TLS: KeyUpdate failed"), false;
        if (has_unsent()) {  // in order: what was made before goes first
            out.append(unsent_, unsent_off_);
            std::string().swap(unsent_);
            unsent_off_ = 0;
        }
        if (taken == n) break;
        const std::size_t len = std::min(n - taken, max_plain_);
        const std::size_t at = out.size();
        out.resize(at + len + overhead);
        if (seal(type_application, plain + taken, len,
                 reinterpret_cast<unsigned char*>(&out[at])) == 0)
            return fail(0, "TLS: encryption failed"), false;
        taken += len;
    }
    return true;
}

bool TlsRecordLayer::end_of_file() {
    if (peer_closed_) return true;
    if (!failed_) {
        failed_ = true;
        error_ = "TLS: unexpected eof while reading";
    }
    return false;
}

ssize_t TlsRecordLayer::deliver_plain(char* buf, std::size_t len) {
    const std::size_t n = std::min(len, plain_.size() - plain_off_);
    std::memcpy(buf, plain_.data() + plain_off_, n);
    plain_off_ += n;
    if (plain_off_ == plain_.size()) {
        std::string().swap(plain_);
        plain_off_ = 0;
    }
    return static_cast<ssize_t>(n);
}

bool TlsRecordLayer::handshake_message(const unsigned char* p, std::size_t n) {
    hs_.append(reinterpret_cast<const char*>(p), n);
    while (hs_.size() >= 4) {
        const auto* m = reinterpret_cast<const unsigned char*>(hs_.data());
        const std::size_t mlen = (std::size_t{m[1]} << 16) | (std::size_t{m[2]} << 8) | m[3];
        if (mlen > max_handshake_message)
            return fail(alert_decode_error, "TLS: post-handshake message too long"), false;
        if (hs_.size() < 4 + mlen) return true;
        switch (m[0]) {
            case msg_new_session_ticket:
                if (server_) {
                    fail(alert_unexpected_message, "TLS: NewSessionTicket from a client");
                    return false;
                }
                break;  // for resumption, which evmux's clients do not do
            case msg_key_update: {
                // A key change ends the record (RFC 8446 5.1).
                if (mlen != 1 || hs_.size() != 5)
                    return fail(alert_unexpected_message, "TLS: bad KeyUpdate"), false;
                if (m[4] > 1)
                    return fail(alert_illegal_parameter, "TLS: bad KeyUpdate request"), false;
                const bool requested = m[4] == 1;
                if (!update_key(read_, false)) return fail(0, "TLS: KeyUpdate failed"), false;
                if (requested && !notify_sealed_) {
                    // Ours goes out before any further application data.
                    const unsigned char msg[5] = {msg_key_update, 0, 0, 1, 0};
                    if (!queue_record(type_handshake, msg, sizeof msg) || !update_key(write_, true))
                        return fail(0, "TLS: KeyUpdate failed"), false;
                    if (flush() < 0) return false;
                }
                break;
            }
            default:
                return fail(alert_unexpected_message, "TLS: unexpected post-handshake message"),
                       false;
        }
        hs_.erase(0, 4 + mlen);
    }
    return true;
}

ssize_t TlsRecordLayer::read(char* buf, std::size_t len) {
    if (failed_) return error_pending_ = false, errno = EPROTO, -1;
    if (!plain_.empty()) return deliver_plain(buf, len);
    if (peer_closed_) return 0;
    Scratch& s = scratch();
    std::size_t have = in_.size();
    // Never more than a record and one read's worth (absorb() is followed by
    // reads until EAGAIN); a caller that broke that gets an error, not an overflow.
    if (have > sizeof s.in) return fail(0, "TLS: too much ciphertext waiting");
    // The ciphertext: completion I/O's absorb() put it in in_, where records
    // are opened (a record not whole yet just waits there: no copy per piece
    // that arrives); readiness reads it into the thread's buffer after what
    // in_ kept.
    unsigned char* base = reinterpret_cast<unsigned char*>(in_.data());
    if (!socket_io_) {
        socket_drained_ = true;  // what absorb() gave is all there is
        if (!pending_record_ && !bad_header()) return errno = EAGAIN, -1;
    } else {
        std::memcpy(s.in, in_.data(), have);
        in_.clear();
        base = s.in;
    }
    pending_record_ = false;
    // Ciphertext no larger than `len` always decrypts into `len` bytes.
    const std::size_t want = std::min(std::max(len, max_record), sizeof s.in);
    int read_errno = 0;
    bool eof = false;
    if (socket_io_ && have < want) {
        ssize_t n;
        do {
            n = ::recv(fd_, s.in + have, want - have, 0);
        } while (n < 0 && errno == EINTR);
        if (n > 0) {
            socket_drained_ = static_cast<std::size_t>(n) < want - have;
            have += static_cast<std::size_t>(n);
        } else if (n == 0) {
            eof = true;
            socket_drained_ = true;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            socket_drained_ = true;
        } else {
            read_errno = errno;
            socket_drained_ = true;
        }
    }
    std::size_t pos = 0;
    std::size_t out = 0;
    auto* dst_base = reinterpret_cast<unsigned char*>(buf);
    // A bad record after good ones in the same read: the good ones' plaintext
    // goes to the caller now, the error with the next read() (has_pending()).
    auto stop = [&](unsigned char alert, const char* why) -> ssize_t {
        if (why) fail(alert, why);
        if (out == 0) return errno = EPROTO, -1;
        error_pending_ = true;
        return static_cast<ssize_t>(out);
    };
    while (have - pos >= header_len && !peer_closed_) {
        unsigned char* rec = base + pos;
        const std::size_t clen = (std::size_t{rec[3]} << 8) | rec[4];
        if (rec[0] != type_application)
            return stop(alert_unexpected_message, "TLS: unexpected record type");
        if (clen > max_cipher_len) return stop(alert_record_overflow, "TLS: record overflow");
        if (clen < 1 + tag_len) return stop(alert_decode_error, "TLS: record too short");
        if (have - pos < header_len + clen) break;  // not whole yet
        const std::size_t inner = clen - tag_len;
        const bool fits = len - out >= inner;
        if (!fits && out > 0) break;  // deliver what there is; this one next time
        unsigned char* dst = dst_base + out;
        if (!fits) {
            plain_.resize(inner);
            dst = reinterpret_cast<unsigned char*>(plain_.data());
        }
        if (!open(rec, clen, dst)) {
            std::string().swap(plain_);
            return stop(alert_bad_record_mac, "TLS: decryption failed or bad record mac");
        }
        pos += header_len + clen;
        std::size_t i = inner;
        while (i > 0 && dst[i - 1] == 0) --i;  // padding
        if (i == 0) return stop(alert_unexpected_message, "TLS: record without a content type");
        const unsigned char type = dst[i - 1];
        const std::size_t n = i - 1;
        if (n > max_plain_record) return stop(alert_record_overflow, "TLS: record overflow");
        // A handshake message in pieces may not have other records between
        // them (RFC 8446 5.1).
        if (type != type_handshake && !hs_.empty())
            return stop(alert_unexpected_message, "TLS: handshake message interleaved");
        if (type == type_application) {
            if (fits) {
                out += n;
                continue;
            }
            plain_.resize(n);
            plain_off_ = 0;
            out = static_cast<std::size_t>(deliver_plain(buf, len));
            break;
        }
        if (type == type_alert) {
            if (n != 2) return stop(alert_decode_error, "TLS: bad alert");
            if (dst[1] == alert_close_notify) {
                peer_closed_ = true;  // whatever follows it is ignored
            } else if (dst[1] == alert_user_canceled) {
                // A closure alert, not an error (RFC 8446 6.1): close_notify follows.
            } else {
                std::string why = "TLS: tlsv1 alert ";
                why += SSL_alert_desc_string_long(dst[1]);
                fail(0, why.c_str());
            }
        } else if (type == type_handshake) {
            if (n == 0) return stop(alert_unexpected_message, "TLS: empty handshake record");
            handshake_message(dst, n);
        } else {
            fail(alert_unexpected_message, "TLS: unexpected record type");
        }
        if (!fits) std::string().swap(plain_);
        if (failed_) return stop(0, nullptr);
    }
    if (peer_closed_) {
        in_.clear();
    } else {
        if (!socket_io_)
            in_.erase(0, pos);  // (usually all, or a record's first pieces)
        else if (pos < have)
            in_.assign(reinterpret_cast<const char*>(s.in + pos), have - pos);
        pending_record_ = whole_record();
    }
    if (out > 0) return static_cast<ssize_t>(out);
    if (peer_closed_) return 0;
    if (pending_record_) return errno = EAGAIN, -1;  // has_pending() brings us back
    if (eof) {
        failed_ = true;
        error_ = "TLS: unexpected eof while reading";
        return errno = EPROTO, -1;
    }
    if (read_errno != 0) {
        failed_ = true;
        return errno = read_errno, -1;
    }
    return errno = EAGAIN, -1;
}

}  // namespace evmux::detail

#else  // !EVMUX_HAVE_TLS: never made (no context can be), but a TlsSession holds one.

evmux::detail::TlsRecordLayer::~TlsRecordLayer() = default;

#endif  // EVMUX_HAVE_TLS
