// evmux socket addresses: IPv4, IPv6 and Unix stream sockets, parsed from and
// printed as text ("127.0.0.1:80", "[::1]:80", "unix:/run/app.sock").
//
// This header includes only the standard library.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace evmux {

/// A socket address of one of the families evmux serves on: AF_INET, AF_INET6
/// or AF_UNIX (a filesystem path). A plain value: copyable, no resources.
/// Any thread.
class Address {
  public:
    /// The unspecified address (family() == 0); to_string() gives "(none)".
    Address() = default;

    /// Parses "1.2.3.4:port", "[v6]:port" (scope allowed: "[fe80::1%eth0]:80")
    /// or "unix:/path". Hosts must be numeric: a name ("localhost:80") is
    /// refused with a message pointing to evmux::Resolver (resolver.hpp) and
    /// to connect(), TcpServer and LoopGroup::listen(), which take
    /// "host:port" text. Throws std::invalid_argument naming the text if it
    /// is not one of these forms (a host with a NUL byte included; brackets
    /// around anything but an IPv6 address, "[127.0.0.1]:80"), the port
    /// is not 0..65535, or the Unix path is empty or too long for sockaddr_un.
    static Address parse(std::string_view text);
    /// A numeric IPv4 or IPv6 host ("127.0.0.1", "::1", "[::1]") and a port.
    /// Throws std::invalid_argument like parse().
    static Address ip(std::string_view host, std::uint16_t port);
    /// A Unix stream socket path. Throws std::invalid_argument if the path is
    /// empty or longer than sockaddr_un allows.
    static Address unix_path(std::string_view path);
    /// Copies a kernel address (from accept, getsockname...). `addr` points to
    /// a sockaddr of `len` bytes; an unsupported family gives Address().
    static Address from_sockaddr(const void* addr, unsigned len);
    /// The local (getsockname) or peer (getpeername) address of a socket, or
    /// Address() if the call fails.
    static Address local_of(int fd);
    /// The peer address of a socket (getpeername), or Address() if the call fails.
    static Address peer_of(int fd);

    /// AF_INET, AF_INET6, AF_UNIX, or 0 for Address().
    int family() const;
    /// True for a Unix stream socket address.
    bool is_unix() const;
    /// The numeric host of an IP address ("127.0.0.1", "::1": no brackets, no
    /// zone, no port), empty otherwise.
    std::string host() const;
    /// The port (host byte order) for IP addresses, 0 otherwise.
    std::uint16_t port() const;
    /// The filesystem path of a Unix address, empty otherwise (and for unnamed
    /// or abstract Unix sockets).
    std::string path() const;
    /// "127.0.0.1:80", "[::1]:80", "unix:/path", "unix:(unnamed)" or "(none)".
    std::string to_string() const;

    /// The raw sockaddr and its length, for bind/connect.
    const void* sockaddr_ptr() const { return storage_; }
    /// Length in bytes of the sockaddr at sockaddr_ptr(); 0 for Address().
    unsigned sockaddr_len() const { return len_; }

    /// Byte-for-byte the same kernel address (family, host, port or path).
    friend bool operator==(const Address& a, const Address& b);

  private:
    // Large enough for sockaddr_storage (128 bytes); aligned like it.
    alignas(8) unsigned char storage_[128] = {};
    unsigned len_ = 0;
};

namespace detail {
/// `host` without its brackets ("[::1]" -> "::1", "[fe80::1%eth0]" ->
/// "fe80::1%eth0"; "localhost" as it is). Brackets hold an IPv6 address only
/// (RFC 3986's IP-literal): "[localhost]", "[127.0.0.1]", "[]" or "[::1"
/// throw std::invalid_argument naming `text` (the whole text the host came
/// from). Address::ip(), Resolver::resolve() and split_host_port() read
/// hosts through it.
std::string_view unbracketed_host(std::string_view host, std::string_view text);

/// Host and port of "host:port" or "[v6]:port" text, the host's brackets
/// kept; the checks Address::parse() and split_host_port() share. Throws
/// std::invalid_argument naming `text` for a bracket not closed or not
/// followed by ':', no ':' (`expected` says what is), a bare IPv6 host, or a
/// bracketed host that is not IPv6 (unbracketed_host()).
struct HostPortText {
    std::string_view host;
    std::string_view port;
};
HostPortText split_host_port_text(std::string_view text, const char* expected);

/// The socket file a bind() made at a Unix path, known by its device and
/// inode: removed when its owner closes only if the path still names that
/// file, so that a server which took the path over meanwhile (a restart
/// without downtime: the file removed and bound again) keeps its socket.
/// Empty for IP addresses and abstract Unix sockets.
struct UnixSocketFile {
    std::string path;
    std::uint64_t device = 0;
    std::uint64_t inode = 0;

    /// The file at `bound`'s path, right after a successful bind().
    static UnixSocketFile of(const Address& bound);
    /// Unlinks the path if it still names this file; empties this either way.
    void remove() noexcept;
};
}  // namespace detail

}  // namespace evmux
