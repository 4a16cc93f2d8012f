// evmux TLS: a context (certificates, verification, ALPN) made once and shared
// by many connections, which then speak TLS (OpenSSL) over their socket.
//
// This header includes only evmux's public headers and the standard library;
// OpenSSL is a private dependency of the library (native_handle() gives its
// SSL_CTX to a user who includes <openssl/ssl.h> himself).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct ssl_ctx_st;  // OpenSSL's SSL_CTX

namespace evmux {

/// True when the library was built with TLS (meson option `tls`, OpenSSL).
/// Without it TlsContext::server() and client() throw std::runtime_error.
bool tls_available();

/// Who protects the application data's records once the handshake is done.
/// OpenSSL always does the handshake (certificates, key schedule).
enum class TlsRecords {
    /// TLS 1.3 with AES-GCM or ChaCha20-Poly1305: evmux, with the keys
    /// OpenSSL made, straight between the socket and the connection's
    /// buffers (OpenSSL's own record layer costs about as much again as the
    /// cipher). Anything else (TLS 1.2, a keylog callback of the user's): OpenSSL.
    evmux,
    /// OpenSSL's SSL_read/SSL_write throughout.
    openssl,
};

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
    /// Who protects the records after the handshake (environment variable
    /// EVMUX_TLS_RECORDS=evmux|openssl overrides it).
    TlsRecords records = TlsRecords::evmux;
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
    /// Empty: connect() to "host:port" text whose host is a name sends and
    /// checks that name; otherwise the connection's peer IP address is checked.
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
    /// As TlsServerOptions::records.
    TlsRecords records = TlsRecords::evmux;
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
    /// Who protects the records (the options', or EVMUX_TLS_RECORDS).
    TlsRecords records() const { return records_; }
    /// With TlsRecords::evmux, a connection sends a KeyUpdate after this
    /// many records under one key (AES-GCM's margin, RFC 8446 5.5, is about
    /// 2^24.5): 2^23, or EVMUX_TLS_KEY_UPDATE_RECORDS (a diagnostic knob).
    std::uint64_t key_update_records() const { return key_update_records_; }

  private:
    ssl_ctx_st* ctx_;
    bool is_server_;
    std::string server_name_;
    std::chrono::milliseconds handshake_timeout_;
    std::string alpn_wire_;  // a server's ALPN list in wire format, for its select callback
    TlsRecords records_ = TlsRecords::evmux;
    std::uint64_t key_update_records_ = std::uint64_t{1} << 23;
};

}  // namespace evmux
