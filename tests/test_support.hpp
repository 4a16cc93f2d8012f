// Shared helpers for the test suites: real fds, the backend under test, limits.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <utility>

#include "evmux/selector.hpp"

namespace evmux::test {

/// The backend under test: EVMUX_BACKEND, or the default.
std::string backend_name();

/// make_selector() for the backend under test. If that backend is compiled in
/// but not usable on this kernel, the calling test is skipped with the reason
/// (use EVMUX_SELECTOR_OR_SKIP).
std::unique_ptr<Selector> selector_or_null(std::string* why);
#define EVMUX_SELECTOR_OR_SKIP(var)                         \
    std::string var##_why;                                  \
    auto var = ::evmux::test::selector_or_null(&var##_why); \
    if (!var) GTEST_SKIP() << var##_why

/// An owned fd, closed on destruction.
class Fd {
public:
    Fd() = default;
    explicit Fd(int fd) : fd_(fd) {}
    Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
    Fd& operator=(Fd&& o) noexcept {
        reset(std::exchange(o.fd_, -1));
        return *this;
    }
    ~Fd() { reset(); }
    int get() const { return fd_; }
    int release() { return std::exchange(fd_, -1); }
    void reset(int fd = -1);
    explicit operator bool() const { return fd_ >= 0; }

private:
    int fd_ = -1;
};

/// A non-blocking AF_UNIX stream socketpair.
std::pair<Fd, Fd> socket_pair();
/// A pipe: {read end, write end}, non-blocking.
std::pair<Fd, Fd> make_pipe();
/// A connected TCP pair over 127.0.0.1: {client, server side}, non-blocking.
std::pair<Fd, Fd> tcp_pair();
/// dup the fd to a number >= min (fcntl F_DUPFD), close the old one.
Fd move_above(Fd fd, int min);
/// Raise RLIMIT_NOFILE's soft limit towards `want` (up to the hard limit);
/// returns the soft limit now in force.
long raise_fd_limit(long want);
/// Write one byte; ASSERT-style failure if it does not go through.
void write_byte(int fd, char c = 'x');
/// Read everything available (non-blocking); returns the byte count.
std::size_t drain(int fd);

}  // namespace evmux::test
