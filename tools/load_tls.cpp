// evmux-load's TLS 1.3 record layer (see load_tls.hpp). RFC 8446 sections 5
// (records), 7.1 and 7.2 (HKDF-Expand-Label, traffic key updates), 4.6.3
// (KeyUpdate).
#include "load_tls.hpp"

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/ssl.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

namespace evmux::load {
namespace {

constexpr std::size_t header_len = 5;
constexpr std::size_t tag_len = 16;
constexpr std::size_t max_plain = 16384;
constexpr std::size_t max_cipher = max_plain + 256;  // the largest record body allowed
constexpr unsigned char type_alert = 21;
constexpr unsigned char type_handshake = 22;
constexpr unsigned char type_application = 23;
constexpr unsigned char msg_new_session_ticket = 4;
constexpr unsigned char msg_key_update = 24;

// One thread's buffers (evmux-load is single-threaded): ciphertext as read,
// and one record as sealed.
struct Scratch {
    std::vector<unsigned char> in = std::vector<unsigned char>(64 * 1024 + header_len + max_cipher);
    std::vector<unsigned char> out =
        std::vector<unsigned char>(header_len + max_plain + 1 + tag_len);
};
Scratch& scratch() {
    thread_local Scratch s;
    return s;
}

// HKDF-Expand-Label(secret, label, "", len) (RFC 8446 7.1; HKDF-Expand, RFC 5869).
bool expand_label(const EVP_MD* md, const unsigned char* secret, std::size_t secret_len,
                  const char* label, unsigned char* out, std::size_t len) {
    unsigned char info[2 + 1 + 6 + 32 + 1];
    const std::size_t label_len = std::strlen(label);
    std::size_t k = 0;
    info[k++] = static_cast<unsigned char>(len >> 8);
    info[k++] = static_cast<unsigned char>(len);
    info[k++] = static_cast<unsigned char>(6 + label_len);
    std::memcpy(info + k, "tls13 ", 6);
    std::memcpy(info + k + 6, label, label_len);
    k += 6 + label_len;
    info[k++] = 0;  // empty context
    // HKDF-Expand: T(i) = HMAC(secret, T(i-1) | info | i).
    unsigned char t[EVP_MAX_MD_SIZE];
    unsigned int t_len = 0;
    std::size_t done = 0;
    for (unsigned char i = 1; done < len; ++i) {
        unsigned char block[EVP_MAX_MD_SIZE + sizeof info + 1];
        std::size_t b = 0;
        std::memcpy(block, t, t_len);
        b += t_len;
        std::memcpy(block + b, info, k);
        b += k;
        block[b++] = i;
        if (!HMAC(md, secret, static_cast<int>(secret_len), block, b, t, &t_len)) return false;
        const std::size_t n = std::min<std::size_t>(t_len, len - done);
        std::memcpy(out + done, t, n);
        done += n;
    }
    OPENSSL_cleanse(t, sizeof t);
    return true;
}

}  // namespace

void TlsSecrets::note(const char* line) {
    const bool client = std::strncmp(line, "CLIENT_TRAFFIC_SECRET_0 ", 24) == 0;
    if (!client && std::strncmp(line, "SERVER_TRAFFIC_SECRET_0 ", 24) != 0) return;
    const char* hex = std::strchr(line + 24, ' ');  // after the client random
    if (!hex) return;
    ++hex;
    unsigned char* out = client ? this->client : server;
    std::size_t n = 0;
    auto nibble = [](char c) { return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10; };
    for (; hex[0] && hex[1] && n < max_len; hex += 2)
        out[n++] = static_cast<unsigned char>(nibble(hex[0]) << 4 | nibble(hex[1]));
    (client ? client_len : server_len) = n;
}

TlsSecrets::~TlsSecrets() {
    OPENSSL_cleanse(client, sizeof client);
    OPENSSL_cleanse(server, sizeof server);
}

std::unique_ptr<TlsRecords> TlsRecords::take_over(SSL* ssl, const TlsSecrets& secrets,
                                                  std::string& why) {
    if (SSL_version(ssl) != TLS1_3_VERSION) return why = "not TLS 1.3", nullptr;
    // Bytes OpenSSL read past the handshake would be lost to us.
    if (SSL_has_pending(ssl)) return why = "OpenSSL holds bytes read past the handshake", nullptr;
    const SSL_CIPHER* suite = SSL_get_current_cipher(ssl);
    std::unique_ptr<TlsRecords> r(new TlsRecords);
    switch (suite ? SSL_CIPHER_get_protocol_id(suite) : 0) {
        case 0x1301:
            r->cipher_ = EVP_aes_128_gcm();
            r->md_ = EVP_sha256();
            break;
        case 0x1302:
            r->cipher_ = EVP_aes_256_gcm();
            r->md_ = EVP_sha384();
            break;
        case 0x1303:
            r->cipher_ = EVP_chacha20_poly1305();
            r->md_ = EVP_sha256();
            break;
        default:
            return why = "cipher suite not handled", nullptr;
    }
    r->secret_len_ = static_cast<std::size_t>(EVP_MD_get_size(r->md_));
    r->key_len_ = static_cast<std::size_t>(
        EVP_CIPHER_get_key_length(static_cast<const EVP_CIPHER*>(r->cipher_)));
    if (secrets.client_len != r->secret_len_ || secrets.server_len != r->secret_len_)
        return why = "no traffic secrets from the key log", nullptr;
    std::memcpy(r->write_.secret, secrets.client, r->secret_len_);
    std::memcpy(r->read_.secret, secrets.server, r->secret_len_);
    if (!r->set_keys(r->write_, true) || !r->set_keys(r->read_, false))
        return why = "EVP could not be keyed", nullptr;
    return r;
}

TlsRecords::~TlsRecords() {
    EVP_CIPHER_CTX_free(read_.ctx);
    EVP_CIPHER_CTX_free(write_.ctx);
    OPENSSL_cleanse(read_.secret, sizeof read_.secret);
    OPENSSL_cleanse(write_.secret, sizeof write_.secret);
}

bool TlsRecords::set_keys(Direction& d, bool encrypt) {
    unsigned char key[32];
    if (!expand_label(md_, d.secret, secret_len_, "key", key, key_len_) ||
        !expand_label(md_, d.secret, secret_len_, "iv", d.iv, sizeof d.iv))
        return false;
    if (!d.ctx) d.ctx = EVP_CIPHER_CTX_new();
    const auto* cipher = static_cast<const EVP_CIPHER*>(cipher_);
    const bool ok = d.ctx && EVP_CipherInit_ex(d.ctx, cipher, nullptr, key, nullptr, encrypt) == 1;
    OPENSSL_cleanse(key, sizeof key);
    d.seq = 0;
    return ok;
}

// application_traffic_secret_N+1 = HKDF-Expand-Label(secret_N, "traffic upd", "", Hash.length)
bool TlsRecords::next_secret(Direction& d, bool encrypt) {
    unsigned char next[TlsSecrets::max_len];
    if (!expand_label(md_, d.secret, secret_len_, "traffic upd", next, secret_len_)) return false;
    std::memcpy(d.secret, next, secret_len_);
    OPENSSL_cleanse(next, sizeof next);
    return set_keys(d, encrypt);
}

void TlsRecords::nonce(const Direction& d, unsigned char* out) const {
    std::memcpy(out, d.iv, sizeof d.iv);
    for (int i = 0; i < 8; ++i) out[11 - i] ^= static_cast<unsigned char>(d.seq >> (8 * i));
}

bool TlsRecords::seal(unsigned char type, const unsigned char* plain, std::size_t n,
                      unsigned char* out) {
    const std::size_t clen = n + 1 + tag_len;
    const unsigned char header[header_len] = {type_application, 3, 3,
                                              static_cast<unsigned char>(clen >> 8),
                                              static_cast<unsigned char>(clen)};
    std::memcpy(out, header, header_len);
    unsigned char iv[12];
    nonce(write_, iv);
    int l = 0;
    unsigned char* body = out + header_len;
    const bool ok =
        EVP_EncryptInit_ex(write_.ctx, nullptr, nullptr, nullptr, iv) == 1 &&
        EVP_EncryptUpdate(write_.ctx, nullptr, &l, header, header_len) == 1 &&
        EVP_EncryptUpdate(write_.ctx, body, &l, plain, static_cast<int>(n)) == 1 &&
        EVP_EncryptUpdate(write_.ctx, body + n, &l, &type, 1) == 1 &&
        EVP_EncryptFinal_ex(write_.ctx, body + n + 1, &l) == 1 &&
        EVP_CIPHER_CTX_ctrl(write_.ctx, EVP_CTRL_AEAD_GET_TAG, tag_len, body + n + 1) == 1;
    ++write_.seq;
    return ok;
}

bool TlsRecords::open(const unsigned char* rec, std::size_t clen, unsigned char* out) {
    unsigned char iv[12];
    nonce(read_, iv);
    const std::size_t body = clen - tag_len;
    int l = 0;
    int fin = 0;
    const bool ok =
        EVP_DecryptInit_ex(read_.ctx, nullptr, nullptr, nullptr, iv) == 1 &&
        EVP_DecryptUpdate(read_.ctx, nullptr, &l, rec, header_len) == 1 &&
        EVP_DecryptUpdate(read_.ctx, out, &l, rec + header_len, static_cast<int>(body)) == 1 &&
        EVP_CIPHER_CTX_ctrl(read_.ctx, EVP_CTRL_AEAD_SET_TAG, tag_len,
                            const_cast<unsigned char*>(rec + header_len + body)) == 1 &&
        EVP_DecryptFinal_ex(read_.ctx, out + l, &fin) == 1;
    ++read_.seq;
    return ok;
}

ssize_t TlsRecords::fail(const char* why) {
    failed_ = true;
    error_ = why;
    errno = EPROTO;
    return -1;
}

bool TlsRecords::whole_record_waits() const {
    if (in_.size() < header_len) return false;
    const auto* p = reinterpret_cast<const unsigned char*>(in_.data());
    return in_.size() >= header_len + (std::size_t{p[3]} << 8 | p[4]);
}

bool TlsRecords::drained() const {
    return socket_drained_ && plain_off_ >= plain_.size() && !whole_record_waits();
}

// Post-handshake messages (RFC 8446 4.6): tickets are ignored (no resumption
// here); a KeyUpdate moves the read key on and, if asked, ours too.
bool TlsRecords::handshake_message(const unsigned char* p, std::size_t n) {
    hs_.append(reinterpret_cast<const char*>(p), n);
    while (hs_.size() >= 4) {
        const auto* m = reinterpret_cast<const unsigned char*>(hs_.data());
        const std::size_t len = std::size_t{m[1]} << 16 | std::size_t{m[2]} << 8 | m[3];
        if (len > 64 * 1024) return fail("TLS: handshake message too long"), false;
        if (hs_.size() < 4 + len) break;
        if (m[0] == msg_key_update) {
            if (len != 1 || m[4] > 1) return fail("TLS: bad KeyUpdate"), false;
            const bool answer = m[4] == 1;  // update_requested
            if (!next_secret(read_, false)) return fail("TLS: KeyUpdate failed"), false;
            if (answer) {
                const unsigned char msg[5] = {msg_key_update, 0, 0, 1, 0};
                unsigned char rec[header_len + sizeof msg + 1 + tag_len];
                if (!seal(type_handshake, msg, sizeof msg, rec) || !next_secret(write_, true))
                    return fail("TLS: KeyUpdate failed"), false;
                unsent_.append(reinterpret_cast<const char*>(rec), sizeof rec);
            }
        } else if (m[0] != msg_new_session_ticket) {
            return fail("TLS: unexpected handshake message"), false;
        }
        hs_.erase(0, 4 + len);
    }
    return true;
}

ssize_t TlsRecords::read(int fd, unsigned char* buf, std::size_t len) {
    if (failed_) return errno = EPROTO, -1;
    if (plain_off_ < plain_.size()) {  // the rest of a record that did not fit
        const std::size_t n = std::min(len, plain_.size() - plain_off_);
        std::memcpy(buf, plain_.data() + plain_off_, n);
        plain_off_ += n;
        return static_cast<ssize_t>(n);
    }
    if (closed_) return 0;
    Scratch& s = scratch();
    std::size_t have = in_.size();
    std::memcpy(s.in.data(), in_.data(), have);
    std::size_t pos = 0;
    std::size_t out = 0;
    bool received = false;  // recv() was called in this read
    int read_errno = 0;
    bool eof = false;
    for (;;) {
        // Every whole record there is, while its plaintext fits `buf`.
        while (have - pos >= header_len && !closed_) {
            const unsigned char* rec = s.in.data() + pos;
            const std::size_t clen = std::size_t{rec[3]} << 8 | rec[4];
            if (rec[0] != type_application) return fail("TLS: unexpected record type");
            if (clen > max_cipher || clen < 1 + tag_len) return fail("TLS: bad record length");
            if (have - pos < header_len + clen) break;
            const std::size_t inner = clen - tag_len;
            if (len - out < inner && out > 0) break;  // the caller's next read
            const bool aside = len - out < inner;     // a small buffer: decrypt into plain_
            if (aside) plain_.resize(inner);
            unsigned char* dst =
                aside ? reinterpret_cast<unsigned char*>(plain_.data()) : buf + out;
            if (!open(rec, clen, dst)) return fail("TLS: decryption failed or bad record mac");
            pos += header_len + clen;
            std::size_t i = inner;
            while (i > 0 && dst[i - 1] == 0) --i;  // padding
            if (i == 0) return fail("TLS: record without a content type");
            const unsigned char type = dst[i - 1];
            const std::size_t n = i - 1;
            if (type == type_application && aside) {
                plain_.resize(n);
                plain_off_ = std::min(len, n);
                std::memcpy(buf, plain_.data(), plain_off_);
                out = plain_off_;
                break;
            }
            if (type == type_application) {
                out += n;
                continue;
            }
            if (type == type_alert) {
                if (n != 2) return fail("TLS: bad alert");
                if (dst[1] != 0) {  // anything but close_notify
                    const std::string why =
                        "TLS: alert " + std::to_string(dst[1]) + " from the server";
                    return fail(why.c_str());
                }
                closed_ = true;
            } else if (type == type_handshake) {
                if (!handshake_message(dst, n)) return -1;
            } else {
                return fail("TLS: unexpected record type");
            }
            if (aside) plain_.clear();
        }
        if (out > 0 || closed_ || (received && socket_drained_)) break;
        // Nothing for the caller yet: read the socket, after what is kept.
        std::memmove(s.in.data(), s.in.data() + pos, have - pos);
        have -= pos;
        pos = 0;
        const std::size_t room = s.in.size() - have;
        ssize_t n;
        do {
            n = ::recv(fd, s.in.data() + have, room, 0);
        } while (n < 0 && errno == EINTR);
        received = true;
        socket_drained_ = n <= 0 || static_cast<std::size_t>(n) < room;
        if (n > 0) {
            have += static_cast<std::size_t>(n);
            continue;
        }
        if (n == 0)
            eof = true;
        else if (errno != EAGAIN && errno != EWOULDBLOCK)
            read_errno = errno;
        break;
    }
    in_.assign(reinterpret_cast<const char*>(s.in.data() + pos), have - pos);
    if (out > 0) return static_cast<ssize_t>(out);
    if (closed_) return 0;
    if (eof) return fail("TLS: unexpected eof while reading");
    if (read_errno != 0) return failed_ = true, errno = read_errno, -1;
    return errno = EAGAIN, -1;
}

ssize_t TlsRecords::write(int fd, const unsigned char* buf, std::size_t len) {
    if (failed_) return errno = EPROTO, -1;
    if (has_unsent()) {
        const int r = flush(fd);
        if (r <= 0) return r == 0 ? (errno = EAGAIN, -1) : -1;
    }
    const std::size_t n = std::min(len, max_plain);
    unsigned char* rec = scratch().out.data();
    if (!seal(type_application, buf, n, rec)) return fail("TLS: encryption failed");
    const std::size_t size = header_len + n + 1 + tag_len;
    std::size_t sent = 0;
    while (sent < size) {
        const ssize_t k = ::send(fd, rec + sent, size - sent, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            failed_ = true;
            return -1;
        }
        sent += static_cast<std::size_t>(k);
    }
    if (sent < size) {
        unsent_.assign(reinterpret_cast<const char*>(rec + sent), size - sent);
        unsent_off_ = 0;
    }
    return static_cast<ssize_t>(n);
}

int TlsRecords::flush(int fd) {
    while (unsent_off_ < unsent_.size()) {
        const ssize_t k =
            ::send(fd, unsent_.data() + unsent_off_, unsent_.size() - unsent_off_, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            failed_ = true;
            return -1;
        }
        unsent_off_ += static_cast<std::size_t>(k);
    }
    unsent_.clear();
    unsent_off_ = 0;
    return 1;
}

}  // namespace evmux::load
