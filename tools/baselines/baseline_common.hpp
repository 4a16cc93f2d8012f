// What the baseline echo servers share: the command line, the fd limit, the
// stop signals, the listening socket and the "NAME listening on HOST:PORT" line.
// Nothing of evmux in it: each baseline is a self-contained executable. The
// command line is parsed in baseline_common.cpp, compiled once for all of them
// (CLI11 is header-only and takes ~17 s of compiling per file that includes it).
#pragma once

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

#include "fd_limit.hpp"

namespace evmux::baseline {

/// The flags every baseline takes.
struct ServerOptions {
    std::string host = "127.0.0.1";
    int port = 0;  // 0: the kernel picks one; the line printed says which
};

/// Parses --port/--host. Exits 2 with a one-line error on bad flags, 0 after
/// --help. `name` is the program name used in messages. (baseline_common.cpp)
ServerOptions parse_options(const char* name, const char* what, int argc, char** argv);

/// Prints "what: strerror(errno)" and exits 1.
[[noreturn]] inline void die_errno(const char* name, const char* what) {
    std::fprintf(stderr, "%s: %s: %s\n", name, what, std::strerror(errno));
    std::exit(1);
}

/// Raises the soft RLIMIT_NOFILE to the hard limit: a server under a
/// many-connection benchmark must not be capped at the default 1024.
using support::raise_fd_limit;

/// What every baseline does first: parses --port/--host (as parse_options),
/// raises the fd limit and ignores SIGPIPE (a peer that hangs up mid-echo
/// is an EPIPE, not the end of the server).
inline ServerOptions start(const char* name, const char* what, int argc, char** argv) {
    const ServerOptions opt = parse_options(name, what, argc, argv);
    raise_fd_limit();
    ::signal(SIGPIPE, SIG_IGN);
    return opt;
}

/// Blocks `signals` and returns a signalfd (close-on-exec, plus `flags`) that
/// reads them, so that they arrive as a readable fd between two events and
/// never inside a half-done write. Call it before any thread exists: every
/// thread inherits the mask. `old_mask`, if given, receives the mask before
/// (for a child to restore). Exits 1 if either call fails.
inline int stop_signal_fd(const char* name, std::initializer_list<int> signals, int flags,
                          sigset_t* old_mask = nullptr) {
    sigset_t set;
    sigemptyset(&set);
    for (int s : signals) sigaddset(&set, s);
    if (const int rc = ::pthread_sigmask(SIG_BLOCK, &set, old_mask); rc != 0) {
        errno = rc;
        die_errno(name, "pthread_sigmask");
    }
    const int fd = ::signalfd(-1, &set, SFD_CLOEXEC | flags);
    if (fd < 0) die_errno(name, "signalfd");
    return fd;
}

/// Sets TCP_NODELAY: an echo must leave at once, not wait for Nagle.
inline void set_nodelay(int fd) {
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/// Opens a socket of `type` (SOCK_STREAM, SOCK_DGRAM; plus `flags`, e.g.
/// SOCK_NONBLOCK) bound to host:port (SO_REUSEADDR for a stream socket) and
/// returns it (the caller owns it). Exits 2 if the host does not resolve, 1
/// if binding fails.
inline int bind_on(const char* name, const ServerOptions& opt, int type, int flags) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = type;
    hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
    addrinfo* res = nullptr;
    const std::string port = std::to_string(opt.port);
    if (const int rc = ::getaddrinfo(opt.host.c_str(), port.c_str(), &hints, &res); rc != 0) {
        std::fprintf(stderr, "%s: --host %s: %s\n", name, opt.host.c_str(), ::gai_strerror(rc));
        std::exit(2);
    }
    const int fd = ::socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC | flags, 0);
    if (fd < 0) die_errno(name, "socket");
    const int one = 1;
    if (type == SOCK_STREAM) ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, res->ai_addr, res->ai_addrlen) < 0) die_errno(name, "bind");
    ::freeaddrinfo(res);
    return fd;
}

/// Opens a listening TCP socket on host:port (bind_on, backlog SOMAXCONN).
inline int listen_on(const char* name, const ServerOptions& opt, int flags) {
    const int fd = bind_on(name, opt, SOCK_STREAM, flags);
    if (::listen(fd, SOMAXCONN) < 0) die_errno(name, "listen");
    return fd;
}

/// The port the kernel bound fd to.
inline int bound_port(int fd) {
    sockaddr_storage ss{};
    socklen_t len = sizeof ss;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) < 0) return -1;
    if (ss.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port);
    return ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
}

/// Prints the one line a harness waits for: "NAME listening on HOST:PORT",
/// HOST as given on the command line, PORT the real one (never 0).
inline void announce(const char* name, const ServerOptions& opt, int listen_fd) {
    std::fprintf(stderr, "%s listening on %s:%d\n", name, opt.host.c_str(), bound_port(listen_fd));
    std::fflush(stderr);
}

}  // namespace evmux::baseline
