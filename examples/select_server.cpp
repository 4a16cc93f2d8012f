// The classic uppercase "select server", written directly on evmux::Selector.
//
// It is the Python select-server recipe (inputs, outputs, message_queues) with
// the holes filled in:
//  - every connection has a message queue; the read path puts the uppercased
//    reply on it and turns write interest on; the write path drains it and
//    turns write interest off once it is empty (no busy wake-ups);
//  - the queue is bounded: over `high_water` bytes the server stops reading
//    from that peer until its replies have been taken (a peer that sends but
//    never reads cannot make the server grow without limit);
//  - a peer that closes its side still gets every queued byte before close.
//
// Usage:
//   select_server [--port N] [--backend NAME]   serve on 127.0.0.1:N until SIGINT/SIGTERM
//   select_server --self-test [--backend NAME]  serve on an ephemeral port, talk to
//                                               itself from a client thread, exit 0 on success
//
// Only the installed evmux headers and POSIX are used.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>

#include "evmux/selector.hpp"
#include "example_args.hpp"

namespace {

using namespace std::chrono_literals;

/// Stop reading from a peer once this many reply bytes wait for it.
constexpr std::size_t high_water = 256 * 1024;

std::atomic<bool> stop_requested{false};

extern "C" void on_stop_signal(int) {
    stop_requested = true;
}

[[noreturn]] void fail(const char* call) {
    throw std::system_error(errno, std::generic_category(), call);
}

/// A non-blocking listening socket on 127.0.0.1:port (0: any free port).
int listen_on(std::uint16_t port) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) fail("socket");
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) fail("bind");
    if (::listen(fd, SOMAXCONN) < 0) fail("listen");
    return fd;
}

std::uint16_t local_port(int fd) {
    sockaddr_in addr{};
    socklen_t len = sizeof addr;
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) < 0) fail("getsockname");
    return ntohs(addr.sin_port);
}

/// The server: one selector, one listener, a message queue per connection.
class SelectServer {
  public:
    SelectServer(std::unique_ptr<evmux::Selector> selector, int listener)
        : sel_(std::move(selector)), listener_(listener) {
        sel_->add(listener_, evmux::Events::read);  // inputs = [server]
    }
    ~SelectServer() {
        for (auto& [fd, queue] : message_queues_) ::close(fd);
        ::close(listener_);
    }

    /// Serve until `stop` becomes true. The wait is bounded so that the flag
    /// (set by a signal handler or another thread) is seen within 200 ms.
    void run(const std::atomic<bool>& stop) {
        while (!stop) {
            for (const evmux::ReadyEvent& ev : sel_->select(200ms)) {
                const int fd = ev.key.fd;
                if (fd == listener_) {
                    accept_all();
                    continue;
                }
                // A ready batch is a copy taken when the wait returned: an
                // earlier event in this batch may have closed this fd, and an
                // accept may even have reused its number. The generation tells
                // this registration from that one.
                const evmux::SelectorKey* now = sel_->get_key(fd);
                if (now == nullptr || now->generation != ev.key.generation) continue;
                if (any(ev.events,
                        evmux::Events::read | evmux::Events::hangup | evmux::Events::error)) {
                    if (!on_readable(fd)) continue;  // closed
                }
                if (any(ev.events, evmux::Events::write)) on_writable(fd);
            }
        }
    }

    std::size_t connections() const { return message_queues_.size(); }

  private:
    struct Queue {
        std::deque<std::string> messages;  // replies not yet written, oldest first
        std::size_t bytes = 0;             // sum of their sizes
        std::size_t offset = 0;            // bytes of messages.front() already sent
        bool peer_done = false;            // peer shut down its side: close when drained
    };

    void accept_all() {
        // Bounded: take what is pending now, at most 64, then let others run.
        for (int i = 0; i < 64; ++i) {
            int fd = ::accept4(listener_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0) {
                // EAGAIN: none left. EMFILE and friends: try again on the next
                // wake-up rather than failing the server.
                return;
            }
            sel_->add(fd, evmux::Events::read);  // inputs.append(connection)
            message_queues_.emplace(fd, Queue{});
        }
    }

    /// Read what is there, queue the uppercased reply. Returns false if the
    /// connection was closed.
    bool on_readable(int fd) {
        Queue& q = message_queues_.at(fd);
        char buf[16 * 1024];
        ssize_t n = ::recv(fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return true;
            close_connection(fd);  // ECONNRESET and the like: nothing to deliver to
            return false;
        }
        if (n == 0) {  // the peer will send no more: finish the replies, then close
            q.peer_done = true;
            if (q.bytes == 0) {
                close_connection(fd);
                return false;
            }
            update_interest(fd, q);
            return true;
        }
        std::string reply(buf, static_cast<std::size_t>(n));
        for (char& c : reply) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
        q.bytes += reply.size();
        q.messages.push_back(std::move(reply));
        update_interest(fd, q);  // outputs.append(s) if it was not there
        return true;
    }

    void on_writable(int fd) {
        Queue& q = message_queues_.at(fd);
        while (!q.messages.empty()) {
            const std::string& front = q.messages.front();
            ssize_t n = ::send(fd, front.data() + q.offset, front.size() - q.offset, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) break;  // wait for the next writable
                close_connection(fd);                          // EPIPE, ECONNRESET
                return;
            }
            q.offset += static_cast<std::size_t>(n);
            q.bytes -= static_cast<std::size_t>(n);
            if (q.offset == front.size()) {
                q.messages.pop_front();
                q.offset = 0;
            }
        }
        if (q.peer_done && q.bytes == 0) {
            close_connection(fd);
            return;
        }
        update_interest(fd, q);
    }

    /// The whole policy in one place: write interest only while there is
    /// something to write, read interest only while the peer may still send
    /// and its queue is below the high-water mark.
    void update_interest(int fd, const Queue& q) {
        evmux::Events want = evmux::Events::none;
        if (!q.peer_done && q.bytes < high_water) want |= evmux::Events::read;
        if (q.bytes > 0) want |= evmux::Events::write;
        // Both off cannot happen: peer_done with an empty queue closes, and a
        // full queue is non-empty.
        if (sel_->get_key(fd)->interest != want) sel_->modify(fd, want);
    }

    void close_connection(int fd) {
        sel_->remove(fd);
        ::close(fd);
        message_queues_.erase(fd);
    }

    std::unique_ptr<evmux::Selector> sel_;
    int listener_;
    std::unordered_map<int, Queue> message_queues_;
};

/// A client on plain poll(2): sends `payload` while reading the reply (both
/// at once, or a large payload would deadlock against the server's bounded
/// queue), then half-closes and reads until the server closes. Returns the
/// reply; gives up after `limit`.
std::string talk(std::uint16_t port, const std::string& payload, std::chrono::seconds limit) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) fail("socket");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) fail("connect");
    std::string reply;
    std::size_t sent = 0;
    bool shut = false;
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < deadline) {
        if (sent == payload.size() && !shut) {
            ::shutdown(fd, SHUT_WR);
            shut = true;
        }
        pollfd p{fd, static_cast<short>(POLLIN | (shut ? 0 : POLLOUT)), 0};
        if (::poll(&p, 1, 100) <= 0) continue;
        if (p.revents & POLLOUT) {
            ssize_t n = ::send(fd, payload.data() + sent, payload.size() - sent,
                               MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n > 0) sent += static_cast<std::size_t>(n);
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            char buf[16 * 1024];
            ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (n == 0) break;  // the server closed after sending everything
            if (n < 0 && errno != EAGAIN) break;
            if (n > 0) reply.append(buf, static_cast<std::size_t>(n));
        }
    }
    ::close(fd);
    return reply;
}

/// Serve in this thread while a client thread sends 1 MiB (more than the
/// high-water mark, so reading is paused and resumed) and checks the reply.
int self_test(std::unique_ptr<evmux::Selector> sel) {
    std::string payload;
    for (std::size_t i = 0; payload.size() < (1u << 20); ++i)
        payload += "hello evmux " + std::to_string(i) + "\n";
    std::string expected = payload;
    for (char& c : expected) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));

    const int listener = listen_on(0);
    const std::uint16_t port = local_port(listener);
    SelectServer server(std::move(sel), listener);
    std::atomic<bool> done{false};
    std::string reply;
    std::thread client([&] {
        reply = talk(port, payload, 20s);
        done = true;
    });
    server.run(done);
    client.join();
    const bool ok = reply == expected && server.connections() == 0;
    std::printf("select_server self-test: sent %zu bytes, got %zu back, %s\n", payload.size(),
                reply.size(), ok ? "OK" : "MISMATCH");
    return ok ? 0 : 1;
}

constexpr const char* usage =
    "usage: select_server [--port N] [--backend NAME] [--self-test] [--version]\n"
    "  Uppercase echo server on 127.0.0.1 (default port 9000), on evmux::Selector.\n"
    "  --backend   select, poll, epoll, io_uring or libevent (default: EVMUX_BACKEND\n"
    "              or the best one here)\n"
    "  --self-test serve on a free port, talk to itself, exit 0 on success\n";

}  // namespace

int main(int argc, char** argv) {
    example::Args args;
    if (const auto status = example::parse_args({"select_server", usage}, argc, argv, args))
        return *status;
    try {
        auto sel = example::make_selector(args);
        std::printf("select_server: backend %s\n", sel->name().c_str());
        if (args.self_test) return self_test(std::move(sel));

        std::signal(SIGINT, on_stop_signal);
        std::signal(SIGTERM, on_stop_signal);
        const int listener = listen_on(static_cast<std::uint16_t>(args.number));
        std::printf("select_server: listening on 127.0.0.1:%ld, Ctrl-C to stop\n", args.number);
        SelectServer server(std::move(sel), listener);
        server.run(stop_requested);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "select_server: %s\n", e.what());
        return 1;
    }
}
