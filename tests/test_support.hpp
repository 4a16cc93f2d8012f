// Shared helpers for the test suites: real fds, the backend under test, limits.
#pragma once

#include <gtest/gtest.h>

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "evmux/address.hpp"
#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/selector.hpp"
#include "fd_limit.hpp"

namespace evmux::test {

/// The backend under test: EVMUX_BACKEND, or the default.
std::string backend_name();

/// Why the backend under test cannot run here ("backend io_uring unusable
/// here: io_uring_setup: Operation not permitted"), or "" if it can (or if
/// its name is unknown: make_selector() then throws, naming the usable ones).
/// The suites' main (test_main.cpp) exits 77, meson's skip code, with this
/// reason before running any test, so an unusable backend's suite is reported
/// as skipped, never as passed.
std::string backend_unusable_reason();

/// make_selector() for the backend under test. If that backend is compiled in
/// but not usable on this kernel, the calling test is skipped with the reason
/// (use EVMUX_SELECTOR_OR_SKIP): the main has already skipped the whole suite
/// then, but a test may be run by other means (another main, a changed
/// environment).
std::unique_ptr<Selector> selector_or_null(std::string* why);
#define EVMUX_SELECTOR_OR_SKIP(var)                         \
    std::string var##_why;                                  \
    auto var = ::evmux::test::selector_or_null(&var##_why); \
    if (!var) GTEST_SKIP() << var##_why

/// An EventLoop on the backend under test, or skip the test (as
/// EVMUX_SELECTOR_OR_SKIP). `var` names an EventLoop&.
#define EVMUX_LOOP_OR_SKIP(var)                                         \
    EVMUX_SELECTOR_OR_SKIP(var##_sel);                                  \
    auto var##_ptr = std::make_unique<EventLoop>(std::move(var##_sel)); \
    EventLoop& var = *var##_ptr

/// Run `loop` (run_once(step) a turn) until `done()` or `limit` passes;
/// false on time-out.
template <class F>
bool run_until(EventLoop& loop, F done, std::chrono::milliseconds limit = std::chrono::seconds(10),
               std::chrono::milliseconds step = std::chrono::milliseconds(5)) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (!done()) {
        if (std::chrono::steady_clock::now() >= end) return false;
        loop.run_once(step);
    }
    return true;
}

/// Run `loop` for `span`, whatever happens.
inline void pump_for(EventLoop& loop, std::chrono::milliseconds span) {
    auto deadline = std::chrono::steady_clock::now() + span;
    while (std::chrono::steady_clock::now() < deadline) loop.run_once(std::chrono::milliseconds(5));
}

/// Callbacks that send every byte back.
inline Callbacks echo_callbacks() {
    Callbacks cb;
    cb.on_message = [](const ConnectionPtr& c, Buffer& in) {
        c->send(in.data(), in.size());
        in.consume_all();
    };
    return cb;
}

/// What a connect() reported: callbacks() counts on_connect and on_error,
/// keeps the error, the connection, its peer and what it received (it sends
/// `hello` once connected).
struct ConnectResult {
    int connects = 0;
    int errors = 0;
    std::error_code ec;
    std::string message;
    std::string echoed;
    Address peer;
    ConnectionPtr conn;

    Callbacks callbacks(std::string hello = "") {
        Callbacks cb;
        cb.on_connect = [this, hello](const ConnectionPtr& c) {
            ++connects;
            conn = c;
            peer = c->peer_address();
            if (!hello.empty()) c->send(hello);
        };
        cb.on_message = [this](const ConnectionPtr&, Buffer& in) { echoed += in.take_all(); };
        cb.on_error = [this](std::error_code e, const std::string& m) {
            ++errors;
            ec = e;
            message = m;
        };
        return cb;
    }
};

/// n bytes whose value depends on their position, (i * 31 + seed) % 251: a
/// lost, reordered or duplicated byte shows in a comparison.
std::string pattern(std::size_t n, unsigned seed = 7);

/// Sets `loop`'s exception handler to append each exception's what() to
/// `texts` (which must outlive the loop's use of it).
void collect_exceptions(EventLoop& loop, std::vector<std::string>& texts);

/// The backend it wraps, except that it refuses to watch the next `refusals`
/// fds as epoll does out of watches (max_user_watches: ENOSPC), which no test
/// can bring about on the real selector without changing the machine.
class RefusingSelector : public Selector {
  public:
    explicit RefusingSelector(std::unique_ptr<Selector> inner) : inner_(std::move(inner)) {}
    std::string name() const override { return inner_->name(); }
    int refusals = 0;

  protected:
    void backend_add(const SelectorKey& key) override {
        if (refusals > 0) {
            --refusals;
            throw std::system_error(ENOSPC, std::generic_category(), "epoll_ctl");
        }
        inner_->add(key.fd, key.interest);
    }
    void backend_modify(const SelectorKey&, const SelectorKey& key) override {
        inner_->modify(key.fd, key.interest);
    }
    void backend_remove(const SelectorKey& key) override { inner_->remove(key.fd); }
    bool backend_wait(Timeout timeout) override {
        for (const ReadyEvent& e : inner_->select(timeout)) report(e.key.fd, e.events);
        return true;
    }

  private:
    std::unique_ptr<Selector> inner_;
};

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
/// Raise RLIMIT_NOFILE's soft limit to `want` (as far as the hard limit goes,
/// unless privileged); returns the soft limit now in force (tools/support).
using support::raise_fd_limit;
/// Write one byte; ASSERT-style failure if it does not go through.
void write_byte(int fd, char c = 'x');
/// Read everything available (non-blocking); returns the byte count.
std::size_t drain(int fd);
/// The fds this process has open now (/proc/self/fd).
std::size_t open_fds();
/// Send all of `data` on the non-blocking socket `fd`, running `loop`
/// whenever the socket buffer is full (the loop's side drains it). Throws
/// std::system_error if send() fails, std::runtime_error if stuck for 10 s.
void send_all(EventLoop& loop, int fd, std::string_view data);

}  // namespace evmux::test
