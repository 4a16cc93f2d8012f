// TLS with OpenSSL: TlsContext (an SSL_CTX with evmux's settings) and
// TlsSession (one connection's SSL over its socket, through a BIO of ours).
#include <arpa/inet.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <climits>
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
SSL_CTX* new_context(const SSL_METHOD* method) {
    SSL_CTX* ctx = SSL_CTX_new(method);
    if (!ctx) fail_setup("SSL_CTX_new");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_read_ahead(ctx, 1);
    return ctx;
}

void use_certificate(SSL_CTX* ctx, const std::string& chain_file, const std::string& key_file) {
    if (SSL_CTX_use_certificate_chain_file(ctx, chain_file.c_str()) != 1)
        fail_setup("certificate chain file " + chain_file);
    if (SSL_CTX_use_PrivateKey_file(ctx, key_file.c_str(), SSL_FILETYPE_PEM) != 1) {
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
    return std::make_shared<TlsContext>(Private{}, holder.release(), false, options.server_name,
                                        options.handshake_timeout);
}

TlsContext::~TlsContext() {
    SSL_CTX_free(ctx_);
}

// ---- TlsSession -------------------------------------------------------------------

namespace detail {

TlsSession::TlsSession(const TlsContext& context, int fd, const std::string& server_name,
                       const std::string& peer_ip)
    : fd_(fd) {
    ssl_ = SSL_new(context.native_handle());
    if (!ssl_) fail_setup("SSL_new");
    BIO* bio = BIO_new(socket_method());
    if (!bio) {
        SSL_free(ssl_);
        fail_setup("BIO_new");
    }
    BIO_set_data(bio, this);
    SSL_set_bio(ssl_, bio, bio);  // the SSL owns it now
    if (context.is_server()) {
        SSL_set_accept_state(ssl_);
        return;
    }
    SSL_set_connect_state(ssl_);
    wants_write_ = true;  // the ClientHello goes first
    std::string name = !server_name.empty() ? server_name : context.server_name();
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
        return 1;
    }
    if (outcome(r, "TLS handshake") == -1) return errno == EAGAIN ? 0 : -1;
    failed_ = true;  // close_notify in the middle of the handshake
    error_ = "TLS handshake: the peer closed the connection";
    errno = EPROTO;
    return -1;
}

ssize_t TlsSession::read(char* buf, std::size_t len) {
    if (failed_) return errno = EPROTO, -1;
    clear_stale_errors();
    int n = SSL_read(ssl_, buf, static_cast<int>(std::min<std::size_t>(len, INT_MAX)));
    if (n > 0) return n;
    return outcome(n, "TLS");
}

ssize_t TlsSession::write(const char* buf, std::size_t len) {
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
    return SSL_has_pending(ssl_) == 1;
}

void TlsSession::close_notify() {
    if (failed_ || !handshake_done_) return;
    ERR_clear_error();
    SSL_shutdown(ssl_);  // 0: sent, the peer's not seen yet; -1 (full socket): dropped
    ERR_clear_error();
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
TlsSession::TlsSession(const TlsContext&, int fd, const std::string&, const std::string&)
    : fd_(fd) {
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
void TlsSession::close_notify() {}
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
