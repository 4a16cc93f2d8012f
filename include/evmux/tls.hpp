// evmux TLS: a context (certificates, verification, ALPN) made once and shared
// by many connections, which then speak TLS (OpenSSL) over their socket.
//
// This header includes only evmux's public headers and the standard library;
// OpenSSL is a private dependency of the library (native_handle() gives its
// SSL_CTX to a user who includes <openssl/ssl.h> himself).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

struct ssl_ctx_st;  // OpenSSL's SSL_CTX

namespace evmux {

/// True when the library was built with TLS (meson option `tls`, OpenSSL).
/// Without it TlsContext::server() and client() throw std::runtime_error.
bool tls_available();

/// What a server presents and whom it accepts.
struct TlsServerOptions {
    /// PEM: the server's certificate followed by its intermediates (required).
    std::string cert_chain_file;
    /// PEM: the private key of that certificate (required).
    std::string key_file;
    /// PEM: CAs whose client certificates are accepted. Empty: no client
    /// certificate is asked for.
    std::string client_ca_file;
    /// With client_ca_file: a client without a certificate fails the
    /// handshake (otherwise it is let in, and peer_subject() is empty).
    bool require_client_cert = true;
    /// ALPN protocols this server speaks, preferred first ("h2", "http/1.1").
    /// Empty: ALPN is ignored. A client offering only others is refused
    /// ("no application protocol").
    std::vector<std::string> alpn;
    /// A connection whose handshake has not finished after this long closes
    /// with CloseReason::timeout; zero = never.
    std::chrono::milliseconds handshake_timeout{10000};
};

/// How a client checks the server.
struct TlsClientOptions {
    /// PEM file of trusted CAs. With ca_dir also empty: the system store
    /// (OpenSSL's default verify paths).
    std::string ca_file;
    /// Directory of hashed CA certificates (c_rehash), as ca_file.
    std::string ca_dir;
    /// The name sent as SNI and checked against the certificate (DNS name,
    /// or an IP address: then checked against its IP SANs, and no SNI).
    /// Empty: the connection's peer IP address is checked.
    std::string server_name;
    /// Verify the server's certificate chain and name. false only for tests
    /// and load tools: the connection is then open to any impostor.
    bool verify_peer = true;
    /// Optional client certificate chain (PEM), for servers that ask.
    std::string cert_chain_file;
    /// The private key of cert_chain_file (PEM).
    std::string key_file;
    /// ALPN protocols to offer, preferred first. Empty: none offered.
    std::vector<std::string> alpn;
    /// As TlsServerOptions::handshake_timeout.
    std::chrono::milliseconds handshake_timeout{10000};
};

/// An OpenSSL SSL_CTX with evmux's settings: TLS 1.2 or 1.3 (1.3 preferred),
/// no renegotiation, no compression. Made once (certificates are read here)
/// and shared (std::shared_ptr) by every connection that uses it, on any
/// thread: it is not changed after creation. Non-copyable.
class TlsContext {
    struct Private {};

  public:
    /// A server context. Throws std::runtime_error naming the file and giving
    /// OpenSSL's reason for an unreadable or bad PEM file or a key that does
    /// not match the certificate ("TLS: key file k.pem does not match the
    /// certificate: key values mismatch").
    static std::shared_ptr<TlsContext> server(const TlsServerOptions& options);
    /// A client context. Throws std::runtime_error as server().
    static std::shared_ptr<TlsContext> client(const TlsClientOptions& options);

    /// Use server() or client(). (Public only for std::make_shared.)
    TlsContext(Private, ssl_ctx_st* ctx, bool is_server, std::string server_name,
               std::chrono::milliseconds handshake_timeout);
    ~TlsContext();
    TlsContext(const TlsContext&) = delete;
    TlsContext& operator=(const TlsContext&) = delete;

    /// True for a server context.
    bool is_server() const { return is_server_; }
    /// TlsClientOptions::server_name ("" for a server).
    const std::string& server_name() const { return server_name_; }
    /// The handshake time limit (zero: none).
    std::chrono::milliseconds handshake_timeout() const { return handshake_timeout_; }
    /// OpenSSL's SSL_CTX (for settings evmux does not offer; change it only
    /// before the first connection uses it).
    ssl_ctx_st* native_handle() const { return ctx_; }

  private:
    ssl_ctx_st* ctx_;
    bool is_server_;
    std::string server_name_;
    std::chrono::milliseconds handshake_timeout_;
    std::string alpn_wire_;  // a server's ALPN list in wire format, for its select callback
};

}  // namespace evmux
