// Shared by the micro-benchmarks: real fds to register.
#pragma once

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <system_error>
#include <vector>

namespace evmux::bench {

/// n non-blocking AF_UNIX socketpairs, closed on destruction. fds[2i] and
/// fds[2i+1] are the two ends of pair i.
struct Pairs {
    std::vector<int> fds;
    explicit Pairs(int n) {
        fds.reserve(2 * static_cast<std::size_t>(n));
        for (int i = 0; i < n; ++i) {
            int sv[2];
            if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
                throw std::system_error(errno, std::generic_category(), "socketpair");
            fds.push_back(sv[0]);
            fds.push_back(sv[1]);
        }
    }
    ~Pairs() {
        for (int fd : fds) ::close(fd);
    }
    Pairs(const Pairs&) = delete;
    Pairs& operator=(const Pairs&) = delete;
};

}  // namespace evmux::bench
