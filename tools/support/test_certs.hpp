// Certificates for the TLS tests and evmux-bench's TLS point, made at run time
// with OpenSSL's C API (EC P-256 keys, SHA-256 signatures) into a temporary
// directory that is removed when the process exits. Nothing is checked in,
// nothing expires on disk. Internal to the project (tools/support, with
// OpenSSL: tls_support_dep); not installed.
#pragma once

#include <string>

namespace evmux::support {

/// PEM files, each a path. Every certificate is signed by `ca` unless said.
struct TlsFiles {
    std::string dir;
    std::string ca;                       ///< the test CA's certificate
    std::string server_cert, server_key;  ///< CN=localhost, SAN DNS:localhost, IP:127.0.0.1, IP:::1
    std::string expired_cert, expired_key;      ///< as server, but expired an hour ago
    std::string name_only_cert, name_only_key;  ///< CN=localhost, SAN DNS:localhost only (no IP)
    std::string other_cert, other_key;          ///< CN=other.example, SAN DNS:other.example only
    std::string client_cert, client_key;        ///< CN=evmux test client (clientAuth)
    std::string other_ca;                       ///< a second CA that signed none of these
    std::string garbage;                        ///< a file that is not PEM at all
};

/// The files, made on the first call (throws std::runtime_error if OpenSSL
/// fails). Thread-safe.
const TlsFiles& tls_files();

}  // namespace evmux::support
