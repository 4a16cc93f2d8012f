// Real fds to register, for the benchmarks: n connected socketpairs.
//
// Internal to the project (tools/support); not installed.
#pragma once

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <system_error>
#include <vector>

namespace evmux::support {

/// n non-blocking AF_UNIX stream socketpairs, closed on destruction. fds[2i]
/// and fds[2i+1] are the two ends of pair i: the benchmarks watch the first
/// and write into the second.
struct SocketPairs {
    std::vector<int> fds;

    /// Throws std::system_error if a pair cannot be made (the ones made are closed).
    explicit SocketPairs(int n) {
        fds.reserve(2 * static_cast<std::size_t>(n));
        for (int i = 0; i < n; ++i) {
            int sv[2];
            if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) {
                const int saved = errno;
                close_all();
                throw std::system_error(saved, std::generic_category(), "socketpair");
            }
            fds.push_back(sv[0]);
            fds.push_back(sv[1]);
        }
    }
    ~SocketPairs() { close_all(); }
    SocketPairs(const SocketPairs&) = delete;
    SocketPairs& operator=(const SocketPairs&) = delete;

    int read_end(int i) const { return fds[2 * static_cast<std::size_t>(i)]; }
    int write_end(int i) const { return fds[2 * static_cast<std::size_t>(i) + 1]; }

  private:
    void close_all() {
        for (int fd : fds) ::close(fd);
        fds.clear();
    }
};

}  // namespace evmux::support
