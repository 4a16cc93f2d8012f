// Address: parsing and printing of IPv4, IPv6 and Unix socket addresses.
#include "evmux/address.hpp"

#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cctype>
#include <charconv>
#include <cstring>
#include <stdexcept>

namespace evmux {

namespace {

static_assert(sizeof(sockaddr_storage) <= 128, "Address storage too small");

[[noreturn]] void bad(std::string_view text, const char* why) {
    std::string shown;  // a NUL byte shown as \0, not ending the message there
    for (char c : text) shown += c == '\0' ? std::string("\\0") : std::string(1, c);
    throw std::invalid_argument("bad address \"" + shown + "\": " + why);
}

}  // namespace

Address Address::ip(std::string_view host, std::uint16_t port) {
    // inet_pton reads a C string: "127.0.0.1\0junk" would be 127.0.0.1.
    if (host.find('\0') != std::string_view::npos) bad(host, "contains a NUL byte");
    std::string h(detail::unbracketed_host(host, host));
    Address a;
    sockaddr_in v4{};
    if (::inet_pton(AF_INET, h.c_str(), &v4.sin_addr) == 1) {
        v4.sin_family = AF_INET;
        v4.sin_port = htons(port);
        std::memcpy(a.storage_, &v4, sizeof v4);
        a.len_ = sizeof v4;
        return a;
    }
    sockaddr_in6 v6{};
    std::string scope;
    if (auto pct = h.find('%'); pct != std::string::npos) {
        scope = h.substr(pct + 1);
        h.resize(pct);
    }
    if (::inet_pton(AF_INET6, h.c_str(), &v6.sin6_addr) == 1) {
        v6.sin6_family = AF_INET6;
        v6.sin6_port = htons(port);
        if (!scope.empty()) {
            unsigned id = ::if_nametoindex(scope.c_str());
            if (id == 0) {
                auto [p, ec] = std::from_chars(scope.data(), scope.data() + scope.size(), id);
                if (ec != std::errc() || p != scope.data() + scope.size())
                    bad(host, "unknown scope");
            }
            v6.sin6_scope_id = id;
        }
        std::memcpy(a.storage_, &v6, sizeof v6);
        a.len_ = sizeof v6;
        return a;
    }
    bad(host, "not a numeric IPv4 or IPv6 host");
}

Address Address::unix_path(std::string_view path) {
    sockaddr_un un{};
    if (path.empty()) bad("unix:", "empty path");
    // sun_path needs room for the terminating NUL that bind() expects.
    if (path.size() >= sizeof un.sun_path) bad(path, "Unix socket path too long");
    un.sun_family = AF_UNIX;
    std::memcpy(un.sun_path, path.data(), path.size());
    Address a;
    std::memcpy(a.storage_, &un, sizeof un);
    a.len_ = static_cast<unsigned>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
    return a;
}

Address Address::parse(std::string_view text) {
    if (text.starts_with("unix:")) return unix_path(text.substr(5));
    if (text.find('\0') != std::string_view::npos) bad(text, "contains a NUL byte");
    const auto [host, port_text] =
        detail::split_host_port_text(text, "expected HOST:PORT, [HOST]:PORT or unix:PATH");
    // A service name ("http"): what the text-taking calls resolve.
    if (!port_text.empty() && std::isalpha(static_cast<unsigned char>(port_text.front())))
        bad(text,
            ("the port is not a number (a service name such as '" + std::string(port_text) +
             "' is looked up by evmux::Resolver; connect(), TcpServer and LoopGroup::listen() "
             "take \"host:port\" text)")
                .c_str());
    unsigned port = 0;
    auto [p, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (port_text.empty() || ec != std::errc() || p != port_text.data() + port_text.size() ||
        port > 65535)
        bad(text, "port must be 0..65535");
    try {
        return ip(host, static_cast<std::uint16_t>(port));
    } catch (const std::invalid_argument&) {
        bad(text,
            "not a numeric IPv4 or IPv6 host (names are looked up by evmux::Resolver; "
            "connect(), TcpServer and LoopGroup::listen() take \"host:port\" text)");
    }
}

Address Address::from_sockaddr(const void* addr, unsigned len) {
    Address a;
    if (addr == nullptr || len < sizeof(sa_family_t) || len > sizeof a.storage_) return a;
    sa_family_t family;
    std::memcpy(&family, addr, sizeof family);
    if (family != AF_INET && family != AF_INET6 && family != AF_UNIX) return a;
    std::memcpy(a.storage_, addr, len);
    a.len_ = len;
    return a;
}

Address Address::local_of(int fd) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return {};
    return from_sockaddr(&ss, len);
}

Address Address::peer_of(int fd) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return {};
    return from_sockaddr(&ss, len);
}

int Address::family() const {
    if (len_ < sizeof(sa_family_t)) return 0;
    sa_family_t family;
    std::memcpy(&family, storage_, sizeof family);
    return family;
}

bool Address::is_unix() const {
    return family() == AF_UNIX;
}

std::uint16_t Address::port() const {
    if (family() == AF_INET) {
        sockaddr_in v4;
        std::memcpy(&v4, storage_, sizeof v4);
        return ntohs(v4.sin_port);
    }
    if (family() == AF_INET6) {
        sockaddr_in6 v6;
        std::memcpy(&v6, storage_, sizeof v6);
        return ntohs(v6.sin6_port);
    }
    return 0;
}

std::string Address::path() const {
    if (family() != AF_UNIX) return {};
    const std::size_t offset = offsetof(sockaddr_un, sun_path);
    if (len_ <= offset) return {};
    const char* p = reinterpret_cast<const char*>(storage_) + offset;
    if (p[0] == '\0') return {};  // abstract namespace
    return std::string(p, ::strnlen(p, len_ - offset));
}

std::string Address::host() const {
    char host[INET6_ADDRSTRLEN] = {};
    if (family() == AF_INET) {
        sockaddr_in v4;
        std::memcpy(&v4, storage_, sizeof v4);
        ::inet_ntop(AF_INET, &v4.sin_addr, host, sizeof host);
    } else if (family() == AF_INET6) {
        sockaddr_in6 v6;
        std::memcpy(&v6, storage_, sizeof v6);
        ::inet_ntop(AF_INET6, &v6.sin6_addr, host, sizeof host);
    }
    return host;
}

std::string Address::to_string() const {
    switch (family()) {
        case AF_INET:
            return host() + ":" + std::to_string(port());
        case AF_INET6: {
            sockaddr_in6 v6;
            std::memcpy(&v6, storage_, sizeof v6);
            // Appended piece by piece: GCC 12 at -O3 warns falsely
            // (-Wrestrict, its bug 105651) on "literal" + std::string.
            std::string s = "[";
            s += host();
            if (v6.sin6_scope_id != 0) {
                s += '%';
                s += std::to_string(v6.sin6_scope_id);
            }
            s += "]:";
            s += std::to_string(ntohs(v6.sin6_port));
            return s;
        }
        case AF_UNIX: {
            std::string p = path();
            return p.empty() ? "unix:(unnamed)" : "unix:" + p;
        }
        default:
            return "(none)";
    }
}

bool operator==(const Address& a, const Address& b) {
    return a.len_ == b.len_ && std::memcmp(a.storage_, b.storage_, a.len_) == 0;
}

namespace detail {

std::string_view unbracketed_host(std::string_view host, std::string_view text) {
    if (!host.starts_with('[')) return host;
    if (!host.ends_with(']')) bad(text, "no closing bracket: [HOST]:PORT");
    const std::string_view inside = host.substr(1, host.size() - 2);
    // The zone ("%eth0") is no part of the address inet_pton reads.
    const std::string address(inside.substr(0, inside.find('%')));
    in6_addr v6{};
    if (::inet_pton(AF_INET6, address.c_str(), &v6) != 1)
        bad(text, "brackets hold an IPv6 address only, as in [::1]:80");
    return inside;
}

HostPortText split_host_port_text(std::string_view text, const char* expected) {
    // A bracketed host first: the last ':' would be inside the brackets when
    // the port or the ']' is missing, and "[::1]" told to use brackets.
    if (text.starts_with('[')) {
        const auto close = text.find(']');
        if (close == std::string_view::npos) bad(text, "no closing bracket: [HOST]:PORT");
        if (close + 1 == text.size()) bad(text, "no port: [HOST]:PORT");
        if (text[close + 1] != ':') bad(text, "no ':' after the bracket: [HOST]:PORT");
    }
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos) bad(text, expected);
    const std::string_view host = text.substr(0, colon);
    // A bare IPv6 host must be bracketed, or its last group would read as the port.
    if (host.find(':') != std::string_view::npos && !(host.starts_with('[') && host.ends_with(']')))
        bad(text, "IPv6 hosts are written in brackets: [::1]:80");
    unbracketed_host(host, text);
    return {host, text.substr(colon + 1)};
}

UnixSocketFile UnixSocketFile::of(const Address& bound) {
    UnixSocketFile file;
    file.path = bound.path();
    struct stat st {};
    if (file.path.empty() || ::lstat(file.path.c_str(), &st) != 0) return UnixSocketFile{};
    file.device = static_cast<std::uint64_t>(st.st_dev);
    file.inode = static_cast<std::uint64_t>(st.st_ino);
    return file;
}

void UnixSocketFile::remove() noexcept {
    struct stat st {};
    if (!path.empty() && ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) &&
        static_cast<std::uint64_t>(st.st_dev) == device &&
        static_cast<std::uint64_t>(st.st_ino) == inode)
        ::unlink(path.c_str());
    path.clear();
}

}  // namespace detail

}  // namespace evmux
