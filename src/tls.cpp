// TLS with OpenSSL: TlsContext (an SSL_CTX with evmux's settings) and
// TlsSession (one connection's SSL over its socket, through a BIO of ours).
#include <arpa/inet.h>
#include <sys/socket.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#include "evmux/tls.hpp"
#include "evmux_config.h"
#include "tls_session.hpp"

#if EVMUX_HAVE_TLS
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#endif

namespace evmux {

TlsContext::TlsContext(Private, ssl_ctx_st* ctx, bool is_server, std::string server_name,
                       std::chrono::milliseconds handshake_timeout)
    : ctx_(ctx),
      is_server_(is_server),
      server_name_(std::move(server_name)),
      handshake_timeout_(handshake_timeout) {}

#if EVMUX_HAVE_TLS

namespace {

// The reason of the oldest error on OpenSSL's queue (the root cause: "No such
// file or directory" before "system lib"), and the queue emptied.
std::string openssl_reason() {
    unsigned long first = ERR_get_error();
    ERR_clear_error();
    if (first == 0) return "unknown error";
    if (ERR_SYSTEM_ERROR(first)) return std::strerror(ERR_GET_REASON(first));  // fopen's errno
    if (const char* r = ERR_reason_error_string(first)) return r;
    char buf[256];
    ERR_error_string_n(first, buf, sizeof buf);
    return buf;
}

[[noreturn]] void fail_setup(const std::string& what) {
    throw std::runtime_error("TLS: " + what + ": " + openssl_reason());
}

// "h2", "http/1.1" -> "\x02h2\x08http/1.1".
std::string alpn_wire(const std::vector<std::string>& protocols) {
    std::string wire;
    for (const std::string& p : protocols) {
        if (p.empty() || p.size() > 255)
            throw std::invalid_argument("TLS: ALPN protocol names must be 1 to 255 bytes long");
        wire += static_cast<char>(p.size());
        wire += p;
    }
    return wire;
}

// Settings every evmux context shares. SSL_MODE_ENABLE_PARTIAL_WRITE: SSL_write
// returns after each record written, so a full socket never makes it encrypt
// the rest ahead; SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER: its retry may come from
// the queue's copy of the bytes. read_ahead: one recv() takes what is there,
// not a record header and then its body.
void keylog(const SSL* ssl, const char* line);

SSL_CTX* new_context(const SSL_METHOD* method) {
    SSL_CTX* ctx = SSL_CTX_new(method);
    if (!ctx) fail_setup("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_read_ahead(ctx, 1);
    // The application traffic secrets, for evmux's record layer.
    SSL_CTX_set_keylog_callback(ctx, keylog);
    return ctx;
}

// EVMUX_TLS_RECORDS and EVMUX_TLS_KEY_UPDATE_RECORDS over the options'.
TlsRecords records_from_env(TlsRecords fallback) {
    const char* env = std::getenv("EVMUX_TLS_RECORDS");
    if (!env || !*env) return fallback;
    const std::string v = env;
    if (v == "evmux") return TlsRecords::evmux;
    if (v == "openssl") return TlsRecords::openssl;
    throw std::invalid_argument("EVMUX_TLS_RECORDS must be evmux or openssl, not '" + v + "'");
}

std::uint64_t key_update_records_from_env(std::uint64_t fallback) {
    const char* env = std::getenv("EVMUX_TLS_KEY_UPDATE_RECORDS");
    if (!env || !*env) return fallback;
    char* end = nullptr;
    errno = 0;
    unsigned long long n = std::strtoull(env, &end, 10);
    // strtoull takes "-1" (as 2^64 - 1) and leading blanks: digits only.
    if (!std::isdigit(static_cast<unsigned char>(env[0])) || errno != 0 || *end != '\0' || n == 0)
        throw std::invalid_argument(
            std::string("EVMUX_TLS_KEY_UPDATE_RECORDS must be a count > 0, not '") + env + "'");
    return n;
}

// OpenSSL's default for an encrypted key prompts on the terminal (and blocks
// a server): evmux gives no passphrase, and notes that one was asked for.
int no_passphrase(char*, int, int, void* asked) {
    *static_cast<bool*>(asked) = true;
    return -1;
}

void use_certificate(SSL_CTX* ctx, const std::string& chain_file, const std::string& key_file) {
    if (SSL_CTX_use_certificate_chain_file(ctx, chain_file.c_str()) != 1)
        fail_setup("certificate chain file " + chain_file);
    bool asked = false;
    SSL_CTX_set_default_passwd_cb(ctx, no_passphrase);
    SSL_CTX_set_default_passwd_cb_userdata(ctx, &asked);
    const bool loaded = SSL_CTX_use_PrivateKey_file(ctx, key_file.c_str(), SSL_FILETYPE_PEM) == 1;
    SSL_CTX_set_default_passwd_cb_userdata(ctx, nullptr);
    SSL_CTX_set_default_passwd_cb(ctx, nullptr);
    if (!loaded && asked) {
        ERR_clear_error();
        throw std::runtime_error("TLS: key file " + key_file +
                                 ": encrypted, and evmux takes no passphrase (decrypt it first: "
                                 "openssl pkey -in ENCRYPTED -out PLAIN)");
    }
    if (!loaded) {
        const unsigned long e = ERR_peek_error();
        if (ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH)
            fail_setup("key file " + key_file + " does not match the certificate");
        fail_setup("key file " + key_file);
    }
    if (SSL_CTX_check_private_key(ctx) != 1)
        fail_setup("key file " + key_file + " does not match the certificate");
}

int select_alpn(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in,
                unsigned inlen, void* arg) {
    const auto* ours = static_cast<const std::string*>(arg);
    unsigned char* chosen = nullptr;
    unsigned char len = 0;
    if (SSL_select_next_proto(&chosen, &len, reinterpret_cast<const unsigned char*>(ours->data()),
                              static_cast<unsigned>(ours->size()), in,
                              inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_ALERT_FATAL;  // "no application protocol"
    *out = chosen;
    *outlen = len;
    return SSL_TLSEXT_ERR_OK;
}

// SSL_get_error() reads the thread's OpenSSL error queue, so it must be empty
// before each call (user code may have left errors there). ERR_clear_error()
// walks all 16 slots (about 840 instructions under callgrind, twice per
// echoed message); a look first costs about 210.
inline void clear_stale_errors() {
    if (ERR_peek_error() != 0) ERR_clear_error();
}

// Owns an SSL_CTX until a TlsContext takes it.
struct CtxHolder {
    SSL_CTX* ctx;
    ~CtxHolder() { SSL_CTX_free(ctx); }
    SSL_CTX* release() { return std::exchange(ctx, nullptr); }
};

// ---- the BIO: the socket, with MSG_NOSIGNAL ----------------------------------------

int bio_write(BIO* bio, const char* data, int len) {
    auto* s = static_cast<detail::TlsSession*>(BIO_get_data(bio));
    BIO_clear_retry_flags(bio);
    ssize_t n = ::send(s->fd(), data, static_cast<std::size_t>(len), MSG_NOSIGNAL);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            BIO_set_retry_write(bio);
        else
            s->note_errno(errno);
    }
    return static_cast<int>(n);
}

int bio_read(BIO* bio, char* buf, int len) {
    auto* s = static_cast<detail::TlsSession*>(BIO_get_data(bio));
    BIO_clear_retry_flags(bio);
    ssize_t n = ::recv(s->fd(), buf, static_cast<std::size_t>(len), 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            BIO_set_retry_read(bio);
            s->note_read(errno != EINTR);
        } else {
            s->note_errno(errno);
        }
    } else {
        s->note_read(n < len);
        if (n == 0) s->note_eof();
    }
    return static_cast<int>(n);
}

long bio_ctrl(BIO* bio, int cmd, long, void*) {
    switch (cmd) {
        case BIO_CTRL_FLUSH:
            return 1;  // writes are never buffered here
        case BIO_CTRL_EOF:
            // Asked after a read of 0: a true EOF (not a retry) becomes
            // "unexpected eof while reading" unless close_notify came first.
            return static_cast<detail::TlsSession*>(BIO_get_data(bio))->at_eof() ? 1 : 0;
        default:
            return 0;
    }
}

int bio_create(BIO* bio) {
    BIO_set_init(bio, 1);
    return 1;
}

BIO_METHOD* socket_method() {
    static BIO_METHOD* method = [] {
        BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "evmux socket");
        if (!m || BIO_meth_set_write(m, bio_write) != 1 || BIO_meth_set_read(m, bio_read) != 1 ||
            BIO_meth_set_ctrl(m, bio_ctrl) != 1 || BIO_meth_set_create(m, bio_create) != 1)
            fail_setup("BIO_meth_new");
        return m;
    }();
    return method;
}

detail::TlsSession* session_of(const SSL* ssl) {
    BIO* bio = SSL_get_rbio(ssl);
    return bio ? static_cast<detail::TlsSession*>(BIO_get_data(bio)) : nullptr;
}

int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// "CLIENT_TRAFFIC_SECRET_0 <client random> <secret>" (NSS key log format).
void keylog(const SSL* ssl, const char* line) {
    const bool client = std::strncmp(line, "CLIENT_TRAFFIC_SECRET_0 ", 24) == 0;
    if (!client && std::strncmp(line, "SERVER_TRAFFIC_SECRET_0 ", 24) != 0) return;
    const char* hex = std::strrchr(line, ' ');
    detail::TlsSession* s = session_of(ssl);
    if (!hex || !s) return;
    ++hex;
    unsigned char secret[detail::TlsRecordLayer::max_secret];
    std::size_t len = 0;
    for (; hex[0] && hex[1] && len < sizeof secret; hex += 2) {
        int hi = hex_value(hex[0]);
        int lo = hex_value(hex[1]);
        if (hi < 0 || lo < 0) return;
        secret[len++] = static_cast<unsigned char>(hi << 4 | lo);
    }
    if (*hex == '\0') s->note_secret(client, secret, len);
    OPENSSL_cleanse(secret, sizeof secret);
}

void message(int write_p, int, int content_type, const void* buf, std::size_t len, SSL*,
             void* arg) {
    static_cast<detail::TlsSession*>(arg)->note_message(
        write_p != 0, content_type, static_cast<const unsigned char*>(buf), len);
}

bool is_ip(const std::string& name) {
    unsigned char buf[sizeof(in6_addr)];
    return ::inet_pton(AF_INET, name.c_str(), buf) == 1 ||
           ::inet_pton(AF_INET6, name.c_str(), buf) == 1;
}

}  // namespace

bool tls_available() {
    return true;
}

std::shared_ptr<TlsContext> TlsContext::server(const TlsServerOptions& options) {
    if (options.cert_chain_file.empty() || options.key_file.empty())
        throw std::invalid_argument("TLS: a server needs cert_chain_file and key_file");
    CtxHolder holder{new_context(TLS_server_method())};
    SSL_CTX* ctx = holder.ctx;
    use_certificate(ctx, options.cert_chain_file, options.key_file);
    if (!options.client_ca_file.empty()) {
        if (SSL_CTX_load_verify_locations(ctx, options.client_ca_file.c_str(), nullptr) != 1)
            fail_setup("client CA file " + options.client_ca_file);
        STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(options.client_ca_file.c_str());
        if (!names) fail_setup("client CA file " + options.client_ca_file);
        SSL_CTX_set_client_CA_list(ctx, names);
        SSL_CTX_set_verify(
            ctx,
            SSL_VERIFY_PEER | (options.require_client_cert ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
            nullptr);
    }
    auto context = std::make_shared<TlsContext>(Private{}, holder.release(), true, std::string(),
                                                options.handshake_timeout);
    context->records_ = records_from_env(options.records);
    context->key_update_records_ = key_update_records_from_env(context->key_update_records_);
    context->alpn_wire_ = alpn_wire(options.alpn);
    if (!context->alpn_wire_.empty())
        SSL_CTX_set_alpn_select_cb(context->ctx_, select_alpn, &context->alpn_wire_);
    return context;
}

std::shared_ptr<TlsContext> TlsContext::client(const TlsClientOptions& options) {
    CtxHolder holder{new_context(TLS_client_method())};
    SSL_CTX* ctx = holder.ctx;
    if (options.verify_peer) {
        if (!options.ca_file.empty() || !options.ca_dir.empty()) {
            const char* file = options.ca_file.empty() ? nullptr : options.ca_file.c_str();
            const char* dir = options.ca_dir.empty() ? nullptr : options.ca_dir.c_str();
            if (SSL_CTX_load_verify_locations(ctx, file, dir) != 1)
                fail_setup("CA " + (file ? "file " + options.ca_file : "dir " + options.ca_dir));
        } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
            fail_setup("the system's CA store");
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
    } else {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);
    }
    if (!options.cert_chain_file.empty() || !options.key_file.empty())
        use_certificate(ctx, options.cert_chain_file, options.key_file);
    const std::string wire = alpn_wire(options.alpn);
    // SSL_CTX_set_alpn_protos returns 0 on success.
    if (!wire.empty() &&
        SSL_CTX_set_alpn_protos(ctx, reinterpret_cast<const unsigned char*>(wire.data()),
                                static_cast<unsigned>(wire.size())) != 0)
        fail_setup("ALPN protocols");
    auto context = std::make_shared<TlsContext>(Private{}, holder.release(), false,
                                                options.server_name, options.handshake_timeout);
    context->records_ = records_from_env(options.records);
    context->key_update_records_ = key_update_records_from_env(context->key_update_records_);
    return context;
}

TlsContext::~TlsContext() {
    SSL_CTX_free(ctx_);
}

// ---- TlsSession -------------------------------------------------------------------

namespace detail {

TlsSession::TlsSession(const TlsContext& context, int fd, const std::string& host_name,
                       const std::string& peer_ip)
    : fd_(fd), context_(&context), want_records_(context.records() == TlsRecords::evmux) {
    ssl_ = SSL_new(context.native_handle());
    if (!ssl_) fail_setup("SSL_new");
    BIO* bio = BIO_new(socket_method());
    if (!bio) {
        SSL_free(ssl_);
        fail_setup("BIO_new");
    }
    BIO_set_data(bio, this);
    SSL_set_bio(ssl_, bio, bio);  // the SSL owns it now
    if (want_records_) {
        // OpenSSL reads no record past the handshake's, so all that follows
        // comes to evmux's record layer; its callback counts records.
        SSL_set_read_ahead(ssl_, 0);
        SSL_set_msg_callback(ssl_, message);
        SSL_set_msg_callback_arg(ssl_, this);
    }
    if (context.is_server()) {
        SSL_set_accept_state(ssl_);
        return;
    }
    SSL_set_connect_state(ssl_);
    wants_write_ = true;  // the ClientHello goes first
    // The name given explicitly; else the one connected to (as curl, Python
    // and Go do); else the address.
    std::string name = !context.server_name().empty() ? context.server_name() : host_name;
    if (name.empty()) name = peer_ip;
    if (name.empty()) return;  // a Unix socket without a name: the chain alone is checked
    bool ok = true;
    if (is_ip(name)) {
        ok = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl_), name.c_str()) == 1;
    } else {
        SSL_set_hostflags(ssl_, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        ok = SSL_set_tlsext_host_name(ssl_, name.c_str()) == 1 && SSL_set1_host(ssl_, name.c_str());
    }
    if (!ok) {
        SSL_free(ssl_);
        fail_setup("server name " + name);
    }
}

TlsSession::~TlsSession() {
    SSL_free(ssl_);
    OPENSSL_cleanse(client_secret_, sizeof client_secret_);
    OPENSSL_cleanse(server_secret_, sizeof server_secret_);
}

void TlsSession::note_secret(bool client, const unsigned char* secret, std::size_t len) {
    std::memcpy(client ? client_secret_ : server_secret_, secret, len);
    (client ? client_secret_len_ : server_secret_len_) = len;
}

void TlsSession::note_message(bool written, int content_type, const unsigned char* p,
                              std::size_t len) {
    // A record's header is reported before the handshake message in it, so
    // the records counted after a Finished are those under the next keys.
    if (content_type == SSL3_RT_HEADER) {
        if (written && own_finished_) ++own_records_;
        if (!written && peer_finished_) ++peer_records_;
    } else if (content_type == SSL3_RT_HANDSHAKE && len > 0 && p[0] == SSL3_MT_FINISHED) {
        (written ? own_finished_ : peer_finished_) = true;
    }
}

void TlsSession::take_records() {
    if (!want_records_) return;
    SSL_set_msg_callback(ssl_, nullptr);
    const SSL_CIPHER* cipher = SSL_get_current_cipher(ssl_);
    const unsigned suite = cipher ? SSL_CIPHER_get_protocol_id(cipher) : 0;
    const bool server = context_->is_server();
    const std::size_t len = client_secret_len_;
    if (SSL_version(ssl_) == TLS1_3_VERSION && TlsRecordLayer::supports(suite) && len > 0 &&
        len == server_secret_len_ && own_finished_ && peer_finished_ &&
        SSL_has_pending(ssl_) == 0) {
        std::size_t max_plain = 16384;
        if (SSL_SESSION* session = SSL_get_session(ssl_)) {
            const uint8_t mfl = SSL_SESSION_get_max_fragment_length(session);
            if (mfl >= TLSEXT_max_fragment_length_512 && mfl <= TLSEXT_max_fragment_length_4096)
                max_plain = std::size_t{256} << mfl;
        }
        try {
            records_ = std::make_unique<TlsRecordLayer>(
                fd_, suite, server ? client_secret_ : server_secret_,
                server ? server_secret_ : client_secret_, len, peer_records_, own_records_,
                max_plain, context_->key_update_records(), server);
            SSL_free_buffers(ssl_);  // OpenSSL's record buffers are not needed any more
        } catch (const std::runtime_error&) {
            records_.reset();  // OpenSSL's record layer goes on
        }
    }
    OPENSSL_cleanse(client_secret_, sizeof client_secret_);
    OPENSSL_cleanse(server_secret_, sizeof server_secret_);
    if (!records_) SSL_set_read_ahead(ssl_, 1);
}

ssize_t TlsSession::outcome(int ret, const char* during) {
    switch (SSL_get_error(ssl_, ret)) {
        case SSL_ERROR_WANT_READ:
            wants_write_ = false;
            errno = EAGAIN;
            return -1;
        case SSL_ERROR_WANT_WRITE:
            wants_write_ = true;
            errno = EAGAIN;
            return -1;
        case SSL_ERROR_ZERO_RETURN:
            return 0;  // close_notify
        case SSL_ERROR_SYSCALL:
            failed_ = true;
            if (ERR_peek_error() == 0) {
                if (last_errno_ != 0) {
                    errno = last_errno_;  // the socket's own error: reset, or another
                    return -1;
                }
                error_ = std::string(during) + ": unexpected EOF";
                errno = EPROTO;
                return -1;
            }
            break;
        default:
            failed_ = true;
            break;
    }
    error_ = std::string(during) + ": " + openssl_reason();
    long verify = SSL_get_verify_result(ssl_);
    if (verify != X509_V_OK)
        error_ += std::string(" (") + X509_verify_cert_error_string(verify) + ")";
    errno = EPROTO;
    return -1;
}

int TlsSession::handshake() {
    if (failed_) return errno = EPROTO, -1;
    clear_stale_errors();
    int r = SSL_do_handshake(ssl_);
    if (r == 1) {
        handshake_done_ = true;
        take_records();
        return 1;
    }
    if (outcome(r, "TLS handshake") == -1) return errno == EAGAIN ? 0 : -1;
    failed_ = true;  // close_notify in the middle of the handshake
    error_ = "TLS handshake: the peer closed the connection";
    errno = EPROTO;
    return -1;
}

ssize_t TlsSession::read(char* buf, std::size_t len) {
    if (records_) return records_->read(buf, len);
    if (failed_) return errno = EPROTO, -1;
    clear_stale_errors();
    read_wants_write_ = false;
    int n = SSL_read(ssl_, buf, static_cast<int>(std::min<std::size_t>(len, INT_MAX)));
    if (n > 0) return n;
    ssize_t r = outcome(n, "TLS");
    // OpenSSL answering the peer (a KeyUpdate) into a full socket.
    if (r < 0 && errno == EAGAIN && wants_write_) read_wants_write_ = true;
    return r;
}

ssize_t TlsSession::write(const char* buf, std::size_t len) {
    if (records_) {
        // Its write() seals a batch of records at a time: on until the socket
        // is full, as SSL_write below, so that what the kernel takes is taken.
        std::size_t done = 0;
        while (done < len) {
            ssize_t n = records_->write(buf + done, len - done);
            if (n > 0) {
                done += static_cast<std::size_t>(n);
                continue;
            }
            if (done > 0 && (n == 0 || errno == EAGAIN)) break;  // the records so far went out
            return n;
        }
        return static_cast<ssize_t>(done);
    }
    if (failed_) return errno = EPROTO, -1;
    std::size_t done = 0;
    while (done < len) {
        clear_stale_errors();
        int n = SSL_write(ssl_, buf + done,
                          static_cast<int>(std::min<std::size_t>(len - done, INT_MAX)));
        if (n > 0) {
            done += static_cast<std::size_t>(n);
            continue;
        }
        ssize_t r = outcome(n, "TLS");
        if (done > 0 && errno == EAGAIN) break;  // the records so far went out
        return r;
    }
    return static_cast<ssize_t>(done);
}

bool TlsSession::has_pending() const {
    return records_ ? records_->has_pending() : SSL_has_pending(ssl_) == 1;
}

bool TlsSession::has_unsent() const {
    return records_ ? records_->has_unsent() : shutdown_pending_;
}

int TlsSession::flush() {
    if (records_) return records_->flush();
    if (!shutdown_pending_) return 1;
    ERR_clear_error();
    int r = SSL_shutdown(ssl_);  // 0: sent, the peer's not seen yet
    ERR_clear_error();
    if (r >= 0) {
        shutdown_pending_ = false;
        return 1;
    }
    if (SSL_get_error(ssl_, r) == SSL_ERROR_WANT_WRITE) return 0;
    shutdown_pending_ = false;  // a socket error: nothing more will go out
    errno = last_errno_ != 0 ? last_errno_ : EPIPE;
    return -1;
}

int TlsSession::close_notify() {
    if (failed() || !handshake_done_ || notify_done_) return 1;
    notify_done_ = true;
    if (records_) {
        int r = records_->close_notify();
        // Told the peer: the session stays resumable.
        if (r >= 0) SSL_set_shutdown(ssl_, SSL_get_shutdown(ssl_) | SSL_SENT_SHUTDOWN);
        return r;
    }
    shutdown_pending_ = true;
    return flush();
}

std::string TlsSession::alpn() const {
    const unsigned char* p = nullptr;
    unsigned len = 0;
    SSL_get0_alpn_selected(ssl_, &p, &len);
    return p ? std::string(reinterpret_cast<const char*>(p), len) : std::string();
}

std::string TlsSession::peer_subject() const {
    X509* cert = SSL_get0_peer_certificate(ssl_);
    if (!cert) return {};
    BIO* mem = BIO_new(BIO_s_mem());
    if (!mem) return {};
    X509_NAME_print_ex(mem, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253);
    char* data = nullptr;
    long len = BIO_get_mem_data(mem, &data);
    std::string out(data, static_cast<std::size_t>(len > 0 ? len : 0));
    BIO_free(mem);
    return out;
}

std::string TlsSession::version() const {
    return SSL_get_version(ssl_);
}

}  // namespace detail

#else  // !EVMUX_HAVE_TLS: contexts cannot be made, so no session ever is.

bool tls_available() {
    return false;
}

std::shared_ptr<TlsContext> TlsContext::server(const TlsServerOptions&) {
    throw std::runtime_error("TLS: not compiled in (needs libssl-dev; meson -Dtls=enabled)");
}

std::shared_ptr<TlsContext> TlsContext::client(const TlsClientOptions&) {
    return server({});
}

TlsContext::~TlsContext() = default;

namespace detail {
// Unreachable without a context; defined so the connection links.
TlsSession::TlsSession(const TlsContext& context, int fd, const std::string&, const std::string&)
    : fd_(fd), context_(&context), want_records_(false) {
    throw std::runtime_error("TLS: not compiled in");
}
TlsSession::~TlsSession() = default;
int TlsSession::handshake() {
    return errno = EPROTO, -1;
}
ssize_t TlsSession::read(char*, std::size_t) {
    return errno = EPROTO, -1;
}
ssize_t TlsSession::write(const char*, std::size_t) {
    return errno = EPROTO, -1;
}
bool TlsSession::has_pending() const {
    return false;
}
bool TlsSession::has_unsent() const {
    return false;
}
int TlsSession::flush() {
    return 1;
}
int TlsSession::close_notify() {
    return 1;
}
std::string TlsSession::alpn() const {
    return {};
}
std::string TlsSession::peer_subject() const {
    return {};
}
std::string TlsSession::version() const {
    return {};
}
}  // namespace detail

#endif

}  // namespace evmux
