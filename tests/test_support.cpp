#include "test_support.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string_view>
#include <system_error>

namespace evmux::test {

namespace {
[[noreturn]] void fail(const char* what) {
    throw std::system_error(errno, std::generic_category(), what);
}
void set_nonblock(int fd) {
    if (::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) fail("fcntl");
}
}  // namespace

std::string backend_name() {
    return default_backend_name();
}

std::string backend_unusable_reason() {
    const std::string name = backend_name();
    for (const BackendInfo& b : backends())
        if (b.name == name && (!b.compiled_in || !b.usable))
            return "backend " + b.name + " unusable here: " + b.reason;
    return {};
}

std::unique_ptr<Selector> selector_or_null(std::string* why) {
    *why = backend_unusable_reason();
    if (!why->empty()) return nullptr;
    return make_selector();
}

void Fd::reset(int fd) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
}

std::pair<Fd, Fd> socket_pair() {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        fail("socketpair");
    return {Fd(sv[0]), Fd(sv[1])};
}

std::pair<Fd, Fd> make_pipe() {
    int p[2];
    if (::pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) fail("pipe2");
    return {Fd(p[0]), Fd(p[1])};
}

std::pair<Fd, Fd> tcp_pair() {
    Fd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!listener) fail("socket");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) fail("bind");
    if (::listen(listener.get(), 16) < 0) fail("listen");
    socklen_t len = sizeof addr;
    if (::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len) < 0)
        fail("getsockname");
    Fd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!client) fail("socket");
    if (::connect(client.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0)
        fail("connect");
    Fd server(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
    if (!server) fail("accept4");
    set_nonblock(client.get());
    int one = 1;
    ::setsockopt(client.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ::setsockopt(server.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return {std::move(client), std::move(server)};
}

Fd move_above(Fd fd, int min) {
    int high = ::fcntl(fd.get(), F_DUPFD_CLOEXEC, min);
    if (high < 0) fail("fcntl(F_DUPFD)");
    return Fd(high);  // `fd` closes the old number
}

void write_byte(int fd, char c) {
    if (::write(fd, &c, 1) != 1) fail("write");
}

std::size_t drain(int fd) {
    char buf[65536];
    std::size_t total = 0;
    for (;;) {
        ssize_t n = ::read(fd, buf, sizeof buf);
        if (n <= 0) return total;
        total += static_cast<std::size_t>(n);
    }
}

std::size_t open_fds() {
    std::size_t n = 0;
    for ([[maybe_unused]] auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
    return n;
}

void send_all(EventLoop& loop, int fd, std::string_view data) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!data.empty()) {
        ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
        if (n > 0) {
            data.remove_prefix(static_cast<std::size_t>(n));
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            if (std::chrono::steady_clock::now() > end) throw std::runtime_error("send_all: stuck");
            loop.run_once(std::chrono::milliseconds(1));
        } else {
            throw std::system_error(errno, std::generic_category(), "send");
        }
    }
}

std::string pattern(std::size_t n, unsigned seed) {
    std::string s(n, '\0');
    for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 31 + seed) % 251);
    return s;
}

void collect_exceptions(EventLoop& loop, std::vector<std::string>& texts) {
    loop.set_exception_handler([&texts](std::exception_ptr e) {
        try {
            std::rethrow_exception(e);
        } catch (const std::exception& x) {
            texts.emplace_back(x.what());
        }
    });
}

}  // namespace evmux::test
