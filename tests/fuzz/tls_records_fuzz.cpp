// Fuzz target: evmux's own TLS 1.3 record layer (TlsRecords::evmux) on a real
// TLS server Connection, fed records that an independent reference sealer in
// this file makes from the input.
//
// Per input: a socketpair; on one end an evmux TLS server Connection (epoll
// or poll backend, or io_uring with completion I/O: records absorbed from the
// receive requests' buffers, where usable), on the other an in-process OpenSSL client
// (non-blocking, pumped with the loop) that completes a TLS 1.3 handshake with the suite the input
// picks. The client's keylog callback gives CLIENT_TRAFFIC_SECRET_0; from it this file derives the
// keys itself (HKDF-Expand-Label written here over HMAC, RFC 8446 7.1/7.3; a KeyUpdate's "traffic
// upd", 7.2) and writes raw records to the socket. The client's write sequence number is 0 then: it
// sends nothing after its Finished.
//
// Input: byte 0 the backend and suite (bit 0 poll/epoll, bit 7 io_uring
// completion I/O where it works, the rest the suite), byte 1 the server's read_budget (many
// small: then a record's plaintext does not fit the caller's buffer), then
// records, each an op byte and its arguments:
//   op & 7: 0 application data (length: a byte, with op bit 7 a second one),
//           1 alert (level, description), 2 KeyUpdate in one record (request
//           0/1, with op bit 7 any byte), 3 a handshake message queued (type
//           4 NewSessionTicket-shaped, 24 KeyUpdate or any byte; body length)
//           to go out in pieces, 4 a handshake record taking the next n bytes
//           of the queued messages (0: all), 5 any inner content type with
//           content, 6 a padding-only record, 7 application data, empty;
//   op bit 3: zero padding after the content type (a byte b: b bytes, or
//           (b - 199) * 300 from b = 200 on, to 16 800);
//   op bit 4: corrupt the record (flip a byte of the header or ciphertext, a
//           tag byte, a wrong header length, a wrong outer type);
//   op bits 5-6: how it is sent: kept to go with the next record, alone, in
//           chunks of a size from the input, or in small chunks.
// After the last record (or the first that must fail, or close_notify) the
// client shuts down its side.
//
// Checked, against a model of RFC 8446 (5.1-5.4, 4.6.3, 6) kept here:
//  - on_message sees exactly the application data of the valid records sent
//    before the first invalid one (nothing lost, doubled or reordered);
//  - the connection closes with CloseReason::tls and a close_message() after
//    an invalid record (an intact but forbidden one: not the EOF's message)
//    or an EOF without close_notify, with peer_closed after
//    close_notify; on_close exactly once; every loop bounded.
//
// Where evmux is more lenient than a strict reading of the RFC the model
// follows evmux (and says so): padding may take the inner plaintext past
// 2^14 + 1 bytes as long as the record is within 2^14 + 256. (A client's
// NewSessionTicket, records between a handshake message's pieces: errors;
// user_canceled: a closure alert, not an error.)
//
// Built as a libFuzzer target with -Dfuzz=enabled (clang), and otherwise as a
// replay program that runs the stored corpus as a regression test.
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/selector.hpp"
#include "evmux/tls.hpp"
#include "fuzz_input.hpp"
#include "test_certs.hpp"

using namespace evmux;
using namespace std::chrono_literals;

namespace {

using fuzz::Input;
using Bytes = std::vector<unsigned char>;

[[noreturn]] void fail(const char* what, unsigned long long a = 0, unsigned long long b = 0) {
    std::fprintf(stderr, "tls_records_fuzz: %s (%llu, %llu)\n", what, a, b);
    std::abort();
}

constexpr unsigned char type_alert = 21;
constexpr unsigned char type_handshake = 22;
constexpr unsigned char type_application = 23;
constexpr std::size_t max_content = 16384;           // 2^14 (RFC 8446 5.1)
constexpr std::size_t max_ciphertext = 16384 + 256;  // 5.2
constexpr std::size_t tag_len = 16;
// evmux's limit on one post-handshake message (tls_records.cpp).
constexpr std::size_t max_handshake_message = 64 * 1024;

// ---- the reference sealer ------------------------------------------------------------

// HKDF-Expand-Label(secret, label, "", len), RFC 8446 7.1, with HKDF-Expand
// (RFC 5869 2.3) done by hand over HMAC.
Bytes expand_label(const EVP_MD* md, const Bytes& secret, const char* label, std::size_t len) {
    std::string full = "tls13 ";
    full += label;
    std::string info;
    info += static_cast<char>(len >> 8);
    info += static_cast<char>(len);
    info += static_cast<char>(full.size());
    info += full;
    info += '\0';  // empty context
    Bytes out;
    std::string t;  // T(i-1)
    for (unsigned char i = 1; out.size() < len; ++i) {
        std::string block = t;
        block += info;
        block += static_cast<char>(i);
        unsigned char mac[EVP_MAX_MD_SIZE];
        unsigned mac_len = 0;
        if (!HMAC(md, secret.data(), static_cast<int>(secret.size()),
                  reinterpret_cast<const unsigned char*>(block.data()), block.size(), mac,
                  &mac_len))
            fail("HMAC");
        t.assign(reinterpret_cast<const char*>(mac), mac_len);
        out.insert(out.end(), mac, mac + mac_len);
    }
    out.resize(len);
    return out;
}

/// The client's write direction, as RFC 8446 has it.
struct Sealer {
    const EVP_CIPHER* cipher = nullptr;
    const EVP_MD* md = nullptr;
    std::size_t key_len = 0;
    Bytes secret, key, iv;
    std::uint64_t seq = 0;

    void set(unsigned suite, const Bytes& s) {
        cipher = suite == 0x1301   ? EVP_aes_128_gcm()
                 : suite == 0x1302 ? EVP_aes_256_gcm()
                                   : EVP_chacha20_poly1305();
        md = suite == 0x1302 ? EVP_sha384() : EVP_sha256();
        key_len = suite == 0x1301 ? 16 : 32;
        if (s.size() != static_cast<std::size_t>(EVP_MD_get_size(md)))
            fail("secret size", s.size());
        secret = s;
        derive();
    }
    void derive() {
        key = expand_label(md, secret, "key", key_len);
        iv = expand_label(md, secret, "iv", 12);
        seq = 0;
    }
    void update() {  // after our KeyUpdate (7.2)
        secret = expand_label(md, secret, "traffic upd", secret.size());
        derive();
    }
    /// The record protecting `inner` (TLSInnerPlaintext), 5.2.
    Bytes seal(const Bytes& inner) {
        const std::size_t clen = inner.size() + tag_len;
        Bytes rec(5 + clen);
        rec[0] = type_application;
        rec[1] = 3;
        rec[2] = 3;
        rec[3] = static_cast<unsigned char>(clen >> 8);
        rec[4] = static_cast<unsigned char>(clen);
        unsigned char nonce[12];
        std::memcpy(nonce, iv.data(), 12);
        for (int i = 0; i < 8; ++i) nonce[11 - i] ^= static_cast<unsigned char>(seq >> (8 * i));
        EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
        int len = 0;
        bool ok = ctx && EVP_EncryptInit_ex(ctx, cipher, nullptr, key.data(), nonce) == 1 &&
                  EVP_EncryptUpdate(ctx, nullptr, &len, rec.data(), 5) == 1 &&
                  (inner.empty() || EVP_EncryptUpdate(ctx, rec.data() + 5, &len, inner.data(),
                                                      static_cast<int>(inner.size())) == 1) &&
                  EVP_EncryptFinal_ex(ctx, rec.data() + 5 + inner.size(), &len) == 1 &&
                  EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, tag_len,
                                      rec.data() + 5 + inner.size()) == 1;
        EVP_CIPHER_CTX_free(ctx);
        if (!ok) fail("sealing a record");
        ++seq;
        return rec;
    }
};

// ---- the model: what the server must make of each record ------------------------------

struct Model {
    std::string app;       // application data the server must deliver, in order
    Bytes hs;              // handshake bytes received, not yet a whole message
    bool closed = false;   // close_notify taken
    bool invalid = false;  // a record the server must reject

    /// One record that arrived intact with this inner plaintext; true if it
    /// ends with a valid KeyUpdate (the next records are under the next key).
    bool take(const Bytes& inner) {
        if (inner.size() + tag_len > max_ciphertext) return invalid = true, false;
        std::size_t i = inner.size();
        while (i > 0 && inner[i - 1] == 0) --i;  // padding (5.4)
        if (i == 0) return invalid = true, false;
        const unsigned char type = inner[i - 1];
        const std::size_t n = i - 1;
        if (n > max_content) return invalid = true, false;
        // No other record between the pieces of a handshake message (5.1).
        if (type != type_handshake && !hs.empty()) return invalid = true, false;
        if (type == type_application) {
            app.append(reinterpret_cast<const char*>(inner.data()), n);
            return false;
        }
        if (type == type_alert) {
            if (n != 2) return invalid = true, false;
            if (inner[1] == 0) return closed = true, false;  // close_notify
            if (inner[1] == 90) return false;                // user_canceled: a closure alert (6.1)
            return invalid = true, false;                    // every other alert ends it (6.2)
        }
        if (type != type_handshake || n == 0) return invalid = true, false;
        hs.insert(hs.end(), inner.begin(), inner.begin() + static_cast<long>(n));
        bool key_update = false;
        while (hs.size() >= 4) {
            const std::size_t mlen = (std::size_t{hs[1]} << 16) | (std::size_t{hs[2]} << 8) | hs[3];
            if (mlen > max_handshake_message) return invalid = true, false;
            if (hs.size() < 4 + mlen) break;
            if (hs[0] == 24) {
                // A KeyUpdate must end its record (5.1) and ask 0 or 1 (4.6.3).
                if (mlen != 1 || hs.size() != 5 || hs[4] > 1) return invalid = true, false;
                key_update = true;
            } else {
                return invalid = true, false;  // a NewSessionTicket too: the server gets none
            }
            hs.erase(hs.begin(), hs.begin() + 4 + static_cast<long>(mlen));
        }
        return key_update;
    }
};

// ---- the process-wide contexts ---------------------------------------------------------

std::string keylog_secret;  // CLIENT_TRAFFIC_SECRET_0 of the handshake under way, hex

void client_keylog(const SSL*, const char* line) {
    const char* prefix = "CLIENT_TRAFFIC_SECRET_0 ";
    if (std::strncmp(line, prefix, std::strlen(prefix)) != 0) return;
    const char* secret = std::strrchr(line, ' ');
    if (secret) keylog_secret = secret + 1;
}

Bytes from_hex(const std::string& hex) {
    Bytes out;
    for (std::size_t i = 0; i + 1 < hex.size(); i += 2)
        out.push_back(static_cast<unsigned char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
    return out;
}

struct Contexts {
    std::shared_ptr<TlsContext> server;
    SSL_CTX* client[3] = {};  // TLS_AES_128_GCM_SHA256, _256_GCM_SHA384, CHACHA20_POLY1305
    Contexts() {
        const auto& files = support::tls_files();
        TlsServerOptions so;
        so.cert_chain_file = files.server_cert;
        so.key_file = files.server_key;
        so.records = TlsRecords::evmux;
        server = TlsContext::server(so);
        const char* suites[3] = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                                 "TLS_CHACHA20_POLY1305_SHA256"};
        for (int i = 0; i < 3; ++i) {
            SSL_CTX* c = SSL_CTX_new(TLS_client_method());
            if (!c || SSL_CTX_set_min_proto_version(c, TLS1_3_VERSION) != 1 ||
                SSL_CTX_set_ciphersuites(c, suites[i]) != 1)
                fail("client SSL_CTX");
            SSL_CTX_set_verify(c, SSL_VERIFY_NONE, nullptr);
            SSL_CTX_set_keylog_callback(c, client_keylog);
            client[i] = c;
        }
    }
};

Contexts& contexts() {
    static Contexts c;
    return c;
}

// ---- one input -------------------------------------------------------------------------

/// A pattern that a byte lost, doubled or moved shows up in.
char app_byte(std::size_t pos) {
    return static_cast<char>((pos * 0x9E3779B1u) >> 13);
}

struct Run {
    EventLoop loop;
    ConnectionPtr conn;
    int peer = -1;
    SSL* client = nullptr;
    Sealer sealer;
    Model model;
    std::string got;  // what on_message saw
    int closes = 0;
    CloseReason reason = CloseReason::local;
    std::string close_message;
    bool connected = false;
    std::size_t app_made = 0;  // application bytes sealed so far (for app_byte())
    Bytes hs_out;              // handshake messages queued to go out in pieces
    Bytes unsent;              // records kept to go with the next ones

    Run(const char* backend, IoMode io, std::size_t read_budget, int suite_index)
        : loop(make_selector(backend), io) {
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
            fail("socketpair");
        peer = sv[1];
        Callbacks cb;
        cb.on_connect = [this, io](const ConnectionPtr& c) {
            connected = true;
            if (c->tls_records() != TlsRecords::evmux) fail("not evmux's record layer");
            if (c->io_mode() != io) fail("not on the I/O path asked for");
        };
        cb.on_message = [this](const ConnectionPtr&, Buffer& in) {
            got.append(in.view());
            in.consume_all();
        };
        cb.on_close = [this](const ConnectionPtr& c, CloseReason r, int) {
            ++closes;
            reason = r;
            close_message = c->close_message();
        };
        ConnectionOptions opt;
        opt.read_budget = read_budget;
        opt.tls = contexts().server;
        conn = Connection::adopt(loop, sv[0], std::move(cb), opt);
        client = SSL_new(contexts().client[suite_index]);
        if (!client || SSL_set_fd(client, peer) != 1) fail("SSL_new");
        SSL_set_connect_state(client);
    }
    ~Run() {
        if (conn->is_open()) conn->close();
        loop.run_once(0ns);
        conn.reset();
        SSL_free(client);
        ::close(peer);
    }

    /// Discard what the server sends (tickets, its KeyUpdate, alerts).
    void drain_client() {
        char buf[4096];
        for (int i = 0; i < 1000 && ::recv(peer, buf, sizeof buf, MSG_DONTWAIT) > 0; ++i) {
        }
    }

    void pump(int rounds) {
        for (int i = 0; i < rounds; ++i) loop.run_once(0ns);
        drain_client();
    }

    void handshake(unsigned suite) {
        keylog_secret.clear();
        bool done = false;
        for (int i = 0; i < 2000 && !(done && connected); ++i) {
            if (!done) {
                ERR_clear_error();
                const int r = SSL_connect(client);
                if (r == 1) {
                    done = true;
                } else {
                    const int e = SSL_get_error(client, r);
                    if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
                        fail("client handshake", static_cast<unsigned>(e));
                }
            }
            loop.run_once(1ms);
        }
        if (!done || !connected) fail("handshake did not finish");
        const SSL_CIPHER* c = SSL_get_current_cipher(client);
        if (!c || SSL_CIPHER_get_protocol_id(c) != suite)
            fail("suite", c ? SSL_CIPHER_get_protocol_id(c) : 0, suite);
        if (keylog_secret.empty()) fail("no CLIENT_TRAFFIC_SECRET_0");
        sealer.set(suite, from_hex(keylog_secret));
        drain_client();
    }

    /// Write `bytes` raw to the socket, waiting for the server to read when full.
    void send_all(const unsigned char* p, std::size_t n) {
        for (int i = 0; n > 0; ++i) {
            if (i > 200000) fail("the server does not read");
            const ssize_t r = ::send(peer, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (r > 0) {
                p += r;
                n -= static_cast<std::size_t>(r);
            } else if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                return;  // the server closed: what it had must have decided it
            } else {
                loop.run_once(1ms);
                drain_client();
            }
        }
    }

    /// Send the kept records and `rec` in chunks of `chunk` bytes (0: at once),
    /// letting the server read between them.
    void send(const Bytes& rec, std::size_t chunk) {
        unsent.insert(unsent.end(), rec.begin(), rec.end());
        if (chunk == 0) chunk = unsent.size();
        chunk = std::max(chunk, unsent.size() / 64 + 1);  // bounded sends per record
        for (std::size_t at = 0; at < unsent.size(); at += chunk) {
            send_all(unsent.data() + at, std::min(chunk, unsent.size() - at));
            pump(2);
        }
        unsent.clear();
    }

    /// Wait for on_close (the client has shut down its side).
    void finish() {
        ::shutdown(peer, SHUT_WR);
        for (int i = 0; i < 400000 && closes == 0; ++i) {
            loop.run_once(closes == 0 && i > 1000 ? 1ms : 0ns);
            drain_client();
        }
        loop.run_once(0ns);
        if (closes != 1) fail("on_close count", static_cast<unsigned>(closes));
    }
};

std::size_t read_budget_of(std::uint8_t b) {
    static constexpr std::size_t budgets[8] = {1, 5, 16, 100, 1000, 4096, 16383, 256 * 1024};
    return budgets[b % 8];
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    Input in{data, size};
    const std::uint8_t config = in.next();
    static const bool completion_usable = [] {
        try {
            EventLoop probe(make_selector("io_uring"), IoMode::completion);
            return probe.io_mode() == IoMode::completion;
        } catch (const std::exception&) {
            return false;  // io_uring not compiled in, or not usable here
        }
    }();
    const bool completion = (config & 0x80) && completion_usable;
    const char* backend = completion ? "io_uring" : (config & 1) ? "poll" : "epoll";
    const int suite_index = (config >> 1) % 3;
    const unsigned suite = 0x1301 + static_cast<unsigned>(suite_index);
    Run run(backend, completion ? IoMode::completion : IoMode::readiness, read_budget_of(in.next()),
            suite_index);
    run.handshake(suite);

    bool refused = false;
    for (int records = 0; records < 64 && !in.done() && !run.model.invalid && !run.model.closed;
         ++records) {
        const std::uint8_t op = in.next();
        Bytes inner;  // TLSInnerPlaintext: content, type, zeros
        unsigned char type = type_application;
        switch (op & 7) {
            case 0:
            case 7: {
                std::size_t n = (op & 7) == 7 ? 0 : in.next();
                if ((op & 7) == 0 && (op & 0x80)) n = n << 8 | in.next();  // up to 65 535
                n = std::min<std::size_t>(n, max_content + 16);  // a little over, sometimes
                for (std::size_t i = 0; i < n; ++i) inner.push_back(app_byte(run.app_made + i));
                break;
            }
            case 1:
                type = type_alert;
                inner.push_back(in.next());
                inner.push_back(in.next());
                break;
            case 2: {
                type = type_handshake;
                std::uint8_t request = in.next();
                if (!(op & 0x80)) request &= 1;
                inner = {24, 0, 0, 1, request};
                break;
            }
            case 3: {
                // A message queued for op 4: NewSessionTicket-shaped, KeyUpdate, or any.
                const std::uint8_t kind = in.next();
                const std::size_t n = in.next();
                if (kind % 3 == 1) {
                    run.hs_out.insert(run.hs_out.end(), {24, 0, 0, 1, std::uint8_t(n & 1)});
                } else {
                    const unsigned char t = kind % 3 == 0 ? 4 : kind;
                    run.hs_out.insert(run.hs_out.end(),
                                      {t, 0, std::uint8_t(n >> 8), std::uint8_t(n)});
                    for (std::size_t i = 0; i < n; ++i)
                        run.hs_out.push_back(static_cast<unsigned char>(i * 7));
                }
                continue;  // no record
            }
            case 4: {
                type = type_handshake;
                std::size_t n = in.next();
                if (n == 0 || n > run.hs_out.size()) n = run.hs_out.size();
                inner.assign(run.hs_out.begin(), run.hs_out.begin() + static_cast<long>(n));
                run.hs_out.erase(run.hs_out.begin(), run.hs_out.begin() + static_cast<long>(n));
                break;
            }
            case 5: {
                type = in.next();
                const std::size_t n = in.next();
                for (std::size_t i = 0; i < n; ++i) inner.push_back(static_cast<unsigned char>(i));
                break;
            }
            case 6:
                type = 0;  // padding only: no content type at all
                break;
        }
        if ((op & 7) != 6) inner.push_back(type);
        if ((op & 8) || (op & 7) == 6) {
            const std::size_t b = in.next();
            const std::size_t pad = b < 200 ? b : (b - 199) * 300;  // up to 16 800
            inner.insert(inner.end(), pad, 0);
        }
        Bytes rec = run.sealer.seal(inner);
        if (op & 0x10) {
            const std::uint8_t how = in.next();
            const std::size_t at = (std::size_t{in.next()} << 8 | in.next());
            switch (how % 4) {
                case 0:  // a header byte after the type, or the ciphertext
                    rec[1 + at % (rec.size() - 1)] ^= static_cast<unsigned char>(how | 1);
                    break;
                case 1:  // the tag
                    rec[rec.size() - 1 - at % tag_len] ^= static_cast<unsigned char>(how | 1);
                    break;
                case 2: {  // a header length that is not the record's
                    const std::size_t len = (rec[3] << 8 | rec[4]) ^ (at | 1);
                    rec[3] = static_cast<unsigned char>(len >> 8);
                    rec[4] = static_cast<unsigned char>(len);
                    break;
                }
                default:  // an outer type that is not application_data
                    rec[0] = static_cast<unsigned char>(at) == type_application
                                 ? type_handshake
                                 : static_cast<unsigned char>(at);
                    break;
            }
            run.model.invalid = true;
        } else {
            const std::size_t app_before = run.model.app.size();
            if (run.model.take(inner)) run.sealer.update();
            refused = run.model.invalid;  // intact, but not allowed: refused for what it is
            run.app_made += run.model.app.size() - app_before;
        }
        std::size_t chunk = 0;
        switch ((op >> 5) & 3) {
            case 0:
                run.unsent.insert(run.unsent.end(), rec.begin(), rec.end());
                continue;  // goes with the next record
            case 1:
                chunk = 0;
                break;
            case 2:
                chunk = std::size_t{in.next()} * 16 + 1;
                break;
            case 3:
                chunk = in.next() % 16 + 1;
                break;
        }
        run.send(rec, chunk);
    }
    if (!run.unsent.empty()) run.send({}, 0);
    run.finish();

    if (run.got != run.model.app) {
        std::size_t same = 0;
        while (same < run.got.size() && same < run.model.app.size() &&
               run.got[same] == run.model.app[same])
            ++same;
        std::fprintf(stderr, "tls_records_fuzz: the first %zu bytes agree\n", same);
        fail("application data differs (got, want)", run.got.size(), run.model.app.size());
    }
    const CloseReason want = run.model.closed ? CloseReason::peer_closed : CloseReason::tls;
    if (run.reason != want)
        fail("close reason (got, want)", static_cast<unsigned>(run.reason),
             static_cast<unsigned>(want));
    if (want == CloseReason::tls && run.close_message.empty()) fail("no close_message");
    // An intact record the RFC forbids is an error of its own, not the end of
    // file that follows it (which would be all an ignored one leads to).
    if (refused && run.close_message == "TLS: unexpected eof while reading")
        fail("a forbidden record was let through: closed only by the end of file");
    return 0;
}
