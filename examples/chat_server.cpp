// A line-based chat server on evmux::TcpServer: every line a client sends is
// broadcast to every other client, prefixed with the sender's name (its
// address, until it sends "/nick NAME").
//
// Each member's own state, its name and how many messages it missed, lives
// on its connection (Connection::emplace_state in on_connect, state() in the
// other callbacks); the room keeps only the list it broadcasts to. Lines are
// cut with Buffer::take_line(): a client that sends more than max_line bytes
// without a line end is told so and disconnected.
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
//   chat_server --self-test [--backend NAME]  four clients on a Unix socket, one of them
//                                             not reading, one sending an endless line;
//                                             exit 0 if nothing is lost but what was
//                                             dropped for the slow one
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <list>
#include <string>
#include <string_view>

#include "evmux/evmux.hpp"
#include "example_args.hpp"

namespace {

using namespace std::chrono_literals;

/// Longest line accepted; a client that sends more without a line end is cut off.
constexpr std::size_t max_line = 4096;
/// Longest nickname.
constexpr std::size_t max_name = 32;

/// The chat room: the members' connections, to broadcast to. What the room
/// knows of each member is that connection's state (a Member).
class ChatRoom {
  public:
    /// Messages for a peer with more than this queued are dropped for it.
    explicit ChatRoom(std::size_t high_water) : high_water_(high_water) {}

    evmux::Callbacks callbacks() {
        evmux::Callbacks cb;
        cb.on_connect = [this](const evmux::ConnectionPtr& c) {
            members_.push_back(c);
            Member& m =
                c->emplace_state<Member>(c->peer_address().to_string(), std::prev(members_.end()));
            broadcast(nullptr, "*** " + m.name + " joined\n");
        };
        cb.on_message = [this](const evmux::ConnectionPtr& c, evmux::Buffer& in) {
            Member& m = *c->state<Member>();
            try {
                // Whole lines only; a partial line stays in the buffer for next time.
                while (auto line = in.take_line(max_line, evmux::LineEnd::lf_or_crlf)) {
                    if (line->starts_with("/nick "))
                        rename(*c, m, line->substr(6));
                    else
                        broadcast(c.get(), m.name + ": " + std::string(*line) + "\n");
                }
            } catch (const evmux::FrameError&) {  // max_line bytes and no line end
                c->send("*** line too long (over " + std::to_string(max_line) + " bytes), bye\n");
                c->close(evmux::CloseMode::graceful);
            }
        };
        cb.on_drain = [](const evmux::ConnectionPtr& c) {
            // The peer caught up: tell it what it missed.
            Member& m = *c->state<Member>();
            if (m.dropped == 0) return;
            c->send("*** " + std::to_string(m.dropped) + " messages dropped: you were too slow\n");
            m.dropped = 0;
        };
        cb.on_close = [this](const evmux::ConnectionPtr& c, evmux::CloseReason, int) {
            // The state is still there in on_close, and destroyed right after.
            Member& m = *c->state<Member>();
            members_.erase(m.place);
            broadcast(nullptr, "*** " + m.name + " left\n");
        };
        return cb;
    }

    /// Messages dropped for slow peers since the start.
    std::uint64_t total_dropped() const { return total_dropped_; }
    /// The largest outgoing queue any peer has had at a broadcast.
    std::size_t max_queued() const { return max_queued_; }

  private:
    using Members = std::list<evmux::ConnectionPtr>;
    /// One member's state, on its connection.
    struct Member {
        Member(std::string n, Members::iterator p) : name(std::move(n)), place(p) {}
        std::string name;
        Members::iterator place;    // its entry in members_
        std::uint64_t dropped = 0;  // since it was last told
    };

    void rename(evmux::Connection& c, Member& m, std::string_view name) {
        if (name.empty() || name.size() > max_name || name.find(' ') != std::string_view::npos) {
            c.send("*** a nickname is 1 to " + std::to_string(max_name) + " bytes, no spaces\n");
            return;
        }
        broadcast(nullptr, "*** " + m.name + " is now " + std::string(name) + "\n");
        m.name = name;
    }

    void broadcast(const evmux::Connection* from, const std::string& line) {
        for (const evmux::ConnectionPtr& c : members_) {
            if (c.get() == from || !c->is_open()) continue;
            if (c->queued_bytes() > max_queued_) max_queued_ = c->queued_bytes();
            if (c->queued_bytes() > high_water_) {
                // This peer is not keeping up: skip it, not everyone.
                ++c->state<Member>()->dropped;
                ++total_dropped_;
                continue;
            }
            c->send(line);
        }
    }

    std::size_t high_water_;
    Members members_;
    std::uint64_t total_dropped_ = 0;
    std::size_t max_queued_ = 0;
};

/// Four clients on the server's loop, joining one after the other: `fast`;
/// `slow`, which does not read until the talker is done; `rude`, which sends
/// a line longer than max_line and must be told so and disconnected; and
/// `talker`, which names itself "talker" and sends `lines` lines, one after
/// the other as `fast` receives each. `fast` must get every line in order,
/// `slow` a prefix, a "dropped" notice and nothing else, and the server's
/// queue for `slow` must have stayed bounded.
int self_test(evmux::EventLoop& loop, evmux::TcpServer& server, const ChatRoom& room,
              std::size_t high_water) {
    constexpr int lines = 2000;
    const std::string filler(900, 'x');  // ~1 KiB a line: 2 MB in all
    evmux::ConnectionPtr talker, fast, slow;
    int sent = 0, fast_got = 0, slow_got = 0;
    long long slow_dropped = -1;
    bool in_order = true, rude_told = false, rude_closed = false;
    auto line = [&](int i) { return "line " + std::to_string(i) + " " + filler; };
    auto send_next = [&] {
        if (sent < lines) talker->send(line(sent++) + "\n");
    };
    auto finish_if_done = [&] {
        if (fast_got == lines && slow_dropped >= 0) loop.stop();
    };

    evmux::Callbacks fast_cb;
    fast_cb.on_message = [&](const evmux::ConnectionPtr&, evmux::Buffer& in) {
        while (auto got = in.take_line(2 * max_line)) {
            if (got->starts_with("***")) continue;  // joined/left/renamed notices
            in_order = in_order && *got == "talker: " + line(fast_got);
            ++fast_got;
            if (fast_got == lines) slow->resume_reading();  // now let the slow one catch up
            send_next();
        }
        finish_if_done();
    };
    evmux::Callbacks slow_cb;
    slow_cb.on_message = [&](const evmux::ConnectionPtr&, evmux::Buffer& in) {
        while (auto got = in.take_line(2 * max_line)) {
            if (got->find(" messages dropped") != std::string_view::npos) {
                slow_dropped = std::strtoll(std::string(got->substr(4)).c_str(), nullptr, 10);
            } else if (!got->starts_with("***")) {
                // Whatever reaches the slow peer is in order: a prefix of the lines.
                in_order = in_order && *got == "talker: " + line(slow_got);
                ++slow_got;
            }
        }
        finish_if_done();
    };

    // Connect one after the other so that all are members before the first
    // line is sent, and the rude one has come and gone.
    evmux::Callbacks talker_cb;
    talker_cb.on_connect = [&](const evmux::ConnectionPtr& t) {
        talker = t;
        talker->send("/nick talker\n");
        // Let the server see the talker join and rename before it talks.
        loop.call_after(10ms, send_next);
    };
    talker_cb.on_message = [](const evmux::ConnectionPtr&, evmux::Buffer& in) { in.consume_all(); };
    evmux::Callbacks rude_cb;
    rude_cb.on_connect = [](const evmux::ConnectionPtr& r) {
        r->send(std::string(max_line + 1, 'x'));
    };
    rude_cb.on_message = [&](const evmux::ConnectionPtr&, evmux::Buffer& in) {
        while (auto got = in.take_line(2 * max_line))
            rude_told = rude_told || got->starts_with("*** line too long");
    };
    rude_cb.on_close = [&](const evmux::ConnectionPtr&, evmux::CloseReason why, int) {
        rude_closed = why == evmux::CloseReason::peer_closed;
        evmux::connect(loop, server.local_address(), talker_cb);
    };
    slow_cb.on_connect = [&](const evmux::ConnectionPtr& c) {
        slow = c;
        slow->pause_reading();  // the slow peer: reads nothing for now
        evmux::connect(loop, server.local_address(), rude_cb);
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

    const bool ok =
        in_order && fast_got == lines && slow_dropped > 0 && slow_got + slow_dropped == lines &&
        room.total_dropped() == static_cast<std::uint64_t>(slow_dropped) &&
        room.max_queued() <= high_water + line(0).size() + 64 && rude_told && rude_closed;
    std::printf(
        "chat_server self-test: fast peer got %d/%d lines, slow peer %d + %lld dropped, "
        "largest queue %zu bytes (high water %zu), %s, endless line %s: %s\n",
        fast_got, lines, slow_got, slow_dropped, room.max_queued(), high_water,
        in_order ? "in order" : "OUT OF ORDER",
        rude_told && rude_closed ? "refused" : "NOT REFUSED", ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    example::Args args;
    const example::Spec spec{"chat_server",
                             "usage: chat_server [--port N] [--backend NAME] [--self-test] "
                             "[--version]\n"};
    if (const auto status = example::parse_args(spec, argc, argv, args)) return *status;
    constexpr std::size_t high_water = 64 * 1024;
    std::string dir;
    try {
        evmux::EventLoop loop(example::make_selector(args));
        ChatRoom room(high_water);
        evmux::Address address =
            evmux::Address::ip("127.0.0.1", static_cast<std::uint16_t>(args.number));
        if (args.self_test) {
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
            if (args.self_test) {
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
