// A line-based chat server on evmux::TcpServer: every line a client sends is
// broadcast to every other client, prefixed with the sender's address.
//
// The point is the slow peer. One client that does not read must not make the
// server buffer without limit, nor slow the others down. Each connection's
// outgoing message queue has a high-water mark; a message for a peer whose
// queue is above it is dropped *for that peer only*, counted, and the peer is
// told how many it missed once its queue has drained. Everyone else gets
// every message.
//
// Usage:
//   chat_server [--port N] [--backend NAME]   serve on 127.0.0.1:N until SIGINT/SIGTERM
//                                             (try: nc 127.0.0.1 9000, in several terminals)
//   chat_server --self-test [--backend NAME]  three clients on a Unix socket, one of them
//                                             not reading; exit 0 if nothing is lost but
//                                             what was dropped for it
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <string_view>

#include "evmux/evmux.hpp"

namespace {

using namespace std::chrono_literals;

/// Longest line accepted; a client that sends more without a newline is cut off.
constexpr std::size_t max_line = 4096;

/// The chat room: who is connected, and how many messages each one missed.
class ChatRoom {
  public:
    /// Messages for a peer with more than this queued are dropped for it.
    explicit ChatRoom(std::size_t high_water) : high_water_(high_water) {}

    evmux::Callbacks callbacks() {
        evmux::Callbacks cb;
        cb.on_connect = [this](const evmux::ConnectionPtr& c) {
            members_[c.get()] = Member{c, c->peer_address().to_string(), 0};
            broadcast(nullptr, "*** " + members_[c.get()].name + " joined\n");
        };
        cb.on_message = [this](const evmux::ConnectionPtr& c, evmux::Buffer& in) {
            // Whole lines only; a partial line stays in the buffer for next time.
            for (std::size_t nl; (nl = in.view().find('\n')) != std::string_view::npos;) {
                broadcast(c.get(), members_[c.get()].name + ": " + in.take(nl + 1));
            }
            if (in.size() > max_line) c->close();
        };
        cb.on_drain = [this](const evmux::ConnectionPtr& c) {
            // The peer caught up: tell it what it missed.
            Member& m = members_[c.get()];
            if (m.dropped == 0) return;
            c->send("*** " + std::to_string(m.dropped) + " messages dropped: you were too slow\n");
            m.dropped = 0;
        };
        cb.on_close = [this](const evmux::ConnectionPtr& c, evmux::CloseReason, int) {
            std::string name = members_[c.get()].name;
            members_.erase(c.get());
            broadcast(nullptr, "*** " + name + " left\n");
        };
        return cb;
    }

    /// Messages dropped for slow peers since the start.
    std::uint64_t total_dropped() const { return total_dropped_; }
    /// The largest outgoing queue any peer has had at a broadcast.
    std::size_t max_queued() const { return max_queued_; }

  private:
    struct Member {
        evmux::ConnectionPtr conn;
        std::string name;
        std::uint64_t dropped = 0;  // since it was last told
    };

    void broadcast(const evmux::Connection* from, const std::string& line) {
        for (auto& [ptr, m] : members_) {
            if (ptr == from || !m.conn->is_open()) continue;
            if (m.conn->queued_bytes() > max_queued_) max_queued_ = m.conn->queued_bytes();
            if (m.conn->queued_bytes() > high_water_) {
                ++m.dropped;  // this peer is not keeping up: skip it, not everyone
                ++total_dropped_;
                continue;
            }
            m.conn->send(line);
        }
    }

    std::size_t high_water_;
    std::map<evmux::Connection*, Member> members_;
    std::uint64_t total_dropped_ = 0;
    std::size_t max_queued_ = 0;
};

/// Three clients on the server's loop: `talker` sends `lines` lines, one
/// after the other as `fast` receives each; `slow` does not read until the
/// talker is done. `fast` must get every line in order, `slow` a prefix, a
/// "dropped" notice and nothing else, and the server's queue for `slow` must
/// have stayed bounded.
int self_test(evmux::EventLoop& loop, evmux::TcpServer& server, const ChatRoom& room,
              std::size_t high_water) {
    constexpr int lines = 2000;
    const std::string filler(900, 'x');  // ~1 KiB a line: 2 MB in all
    evmux::ConnectionPtr talker, fast, slow;
    int sent = 0, fast_got = 0, slow_got = 0;
    long long slow_dropped = -1;
    bool in_order = true;
    auto line = [&](int i) { return "line " + std::to_string(i) + " " + filler + "\n"; };
    auto send_next = [&] {
        if (sent < lines) talker->send(line(sent++));
    };
    auto finish_if_done = [&] {
        if (fast_got == lines && slow_dropped >= 0) loop.stop();
    };

    evmux::Callbacks fast_cb;
    fast_cb.on_message = [&](const evmux::ConnectionPtr&, evmux::Buffer& in) {
        for (std::size_t nl; (nl = in.view().find('\n')) != std::string_view::npos;) {
            std::string got = in.take(nl + 1);
            if (got.starts_with("***")) continue;  // joined/left notices
            in_order = in_order && got.ends_with(": " + line(fast_got));
            ++fast_got;
            if (fast_got == lines) slow->resume_reading();  // now let the slow one catch up
            send_next();
        }
        finish_if_done();
    };
    evmux::Callbacks slow_cb;
    slow_cb.on_message = [&](const evmux::ConnectionPtr&, evmux::Buffer& in) {
        for (std::size_t nl; (nl = in.view().find('\n')) != std::string_view::npos;) {
            std::string got = in.take(nl + 1);
            if (got.find(" messages dropped") != std::string::npos) {
                slow_dropped = std::strtoll(got.c_str() + 4, nullptr, 10);
            } else if (!got.starts_with("***")) {
                // Whatever reaches the slow peer is in order: a prefix of the lines.
                in_order = in_order && got.ends_with(": " + line(slow_got));
                ++slow_got;
            }
        }
        finish_if_done();
    };

    // Connect one after the other so that all three are members before the
    // first line is sent.
    evmux::Callbacks talker_cb;
    talker_cb.on_message = [](const evmux::ConnectionPtr&, evmux::Buffer& in) { in.consume_all(); };
    slow_cb.on_connect = [&](const evmux::ConnectionPtr& c) {
        slow = c;
        slow->pause_reading();  // the slow peer: reads nothing for now
        talker_cb.on_connect = [&](const evmux::ConnectionPtr& t) {
            talker = t;
            // Let the server see the talker join before it talks.
            loop.call_after(10ms, send_next);
        };
        evmux::connect(loop, server.local_address(), talker_cb);
    };
    fast_cb.on_connect = [&](const evmux::ConnectionPtr& c) {
        fast = c;
        evmux::connect(loop, server.local_address(), slow_cb);
    };
    evmux::connect(loop, server.local_address(), fast_cb);
    loop.call_after(20s, [&] { loop.stop(); });  // bound the test
    loop.run();
    // Close the clients while the loop is alive, and let their on_close run.
    for (const evmux::ConnectionPtr& c : {talker, fast, slow})
        if (c) c->close();
    for (int i = 0; i < 3; ++i) loop.run_once(std::chrono::milliseconds(0));

    const bool ok = in_order && fast_got == lines && slow_dropped > 0 &&
                    slow_got + slow_dropped == lines &&
                    room.total_dropped() == static_cast<std::uint64_t>(slow_dropped) &&
                    room.max_queued() <= high_water + line(0).size() + 64;
    std::printf(
        "chat_server self-test: fast peer got %d/%d lines, slow peer %d + %lld dropped, "
        "largest queue %zu bytes (high water %zu), %s: %s\n",
        fast_got, lines, slow_got, slow_dropped, room.max_queued(), high_water,
        in_order ? "in order" : "OUT OF ORDER", ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    std::string backend;
    long port = 9000;
    bool test = false;
    for (int i = 1; i < argc; ++i) {
        std::string_view arg = argv[i];
        if (arg == "--self-test") {
            test = true;
        } else if (arg == "--backend" && i + 1 < argc) {
            backend = argv[++i];
        } else if (arg == "--port" && i + 1 < argc) {
            port = std::strtol(argv[++i], nullptr, 10);
            if (port <= 0 || port > 65535) {
                std::fprintf(stderr, "chat_server: bad port %s\n", argv[i]);
                return 2;
            }
        } else {
            std::printf("usage: chat_server [--port N] [--backend NAME] [--self-test]\n");
            return arg == "--help" || arg == "-h" ? 0 : 2;
        }
    }
    constexpr std::size_t high_water = 64 * 1024;
    std::string dir;
    try {
        evmux::EventLoop loop(backend.empty() ? evmux::make_selector()
                                              : evmux::make_selector(backend));
        ChatRoom room(high_water);
        evmux::Address address = evmux::Address::ip("127.0.0.1", static_cast<std::uint16_t>(port));
        if (test) {
            // A Unix socket: its buffers are small and fixed (TCP's grow to
            // megabytes), so the slow peer's queue reaches the mark quickly.
            char tmpl[] = "/tmp/evmux-chat.XXXXXX";
            if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
            dir = tmpl;
            address = evmux::Address::unix_path(dir + "/chat.sock");
        }
        int rc = 0;
        {
            evmux::TcpServer server(loop, address, room.callbacks());
            std::printf("chat_server: %s, backend %s\n", server.local_address().to_string().c_str(),
                        loop.backend_name().c_str());
            if (test) {
                rc = self_test(loop, server, room, high_water);
            } else {
                loop.on_signal(SIGINT, [&](int) { loop.stop(); });
                loop.on_signal(SIGTERM, [&](int) { loop.stop(); });
                loop.run();
            }
        }  // the server unlinks its socket file
        if (!dir.empty()) ::rmdir(dir.c_str());
        return rc;
    } catch (const std::exception& e) {
        if (!dir.empty()) ::rmdir(dir.c_str());
        std::fprintf(stderr, "chat_server: %s\n", e.what());
        return 1;
    }
}
