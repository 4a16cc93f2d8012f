// A chat server with coroutines, the asyncio way: every member has an outbox
// (a coro::Queue of lines) and two tasks side by side under when_all(), a
// reader that puts each line it reads into every other member's outbox and a
// writer that sends what its own outbox holds. An outbox is bounded: a member
// that does not read loses lines (counted, and told how many when it reads
// again) instead of growing the server's memory or slowing the others, who
// never wait for it. The end of a member's input closes its outbox: the
// writer sends what is left, then the connection closes.
//
// Usage:
//   coro_chat_server [--port N] [--backend NAME]   serve on 127.0.0.1:N (default 16002) until
//                                                  SIGINT/SIGTERM; try it with nc
//   coro_chat_server --self-test [--backend NAME]  serve on a free port, chat with coroutine
//                                                  clients (and one that does not read), exit 0
#include <signal.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "evmux/evmux.hpp"
#include "example_args.hpp"

namespace {

using namespace std::chrono_literals;
using evmux::coro::Queue;
using evmux::coro::Stream;
using evmux::coro::Task;

// A member's backlog before it loses lines. Its writer runs between the
// loop's turns, so one turn's burst of lines from the room must fit: the
// self-test's is 350 (7 chatters x 50 lines at once).
constexpr std::size_t outbox_lines = 1024;
constexpr std::size_t max_line = 4096;  // a longer line ends the member (LineTooLong)

struct Member {
    Member(evmux::EventLoop& loop, std::string n)
        : name(std::move(n)), outbox(loop, outbox_lines) {}
    std::string name;
    Queue<std::string> outbox;
    std::uint64_t missed = 0;  // lines dropped since it last heard
};

struct Room {
    std::vector<Member*> members;
    std::uint64_t next_id = 1;
    std::uint64_t dropped = 0;  // lines lost to full outboxes, all members

    // A line to everyone but `from`; a full outbox loses it (no one waits).
    void broadcast(const Member* from, const std::string& line) {
        for (Member* m : members) {
            if (m == from || m->outbox.closed() || m->outbox.try_put(line)) continue;
            ++m->missed;
            ++dropped;
        }
    }
};

// In the room for as long as a member's handler runs, however it ends.
class Membership {
  public:
    Membership(Room& room, Member& me) : room_(room), me_(me) {
        room_.members.push_back(&me_);
        room_.broadcast(&me_, "*** " + me_.name + " joined\n");
    }
    Membership(const Membership&) = delete;
    Membership& operator=(const Membership&) = delete;
    ~Membership() {
        std::erase(room_.members, &me_);
        room_.broadcast(&me_, "*** " + me_.name + " left\n");
    }

  private:
    Room& room_;
    Member& me_;
};

Task<void> reader(Stream& s, Member& me, Room& room) {
    std::string line;
    while (co_await s.read_line(line, max_line)) {
        if (line.back() != '\n') line += '\n';  // the last line, cut short by the end
        room.broadcast(&me, me.name + ": " + line);
    }
    me.outbox.close();  // the member is done: the writer sends what is left, then ends
}

Task<void> writer(Stream& s, Member& me) {
    for (;;) {
        std::string line = co_await me.outbox.get();  // QueueClosed once closed and sent
        if (me.missed != 0) {
            co_await s.write("*** you missed " + std::to_string(me.missed) + " lines\n");
            me.missed = 0;
        }
        co_await s.write(std::move(line));  // waits while the connection's queue is high
    }
}

/// The handler: one per connection. Returning closes the connection (after
/// what is queued); so does a reset (ConnectionClosed ends a handler
/// quietly). Any other exception would reach the loop's exception handler,
/// and by default end run(): a line too long is caught here.
Task<void> member(Room* room, Stream s) {
    Member me(s.connection()->loop(), "guest" + std::to_string(room->next_id++));
    co_await s.write("*** welcome, you are " + me.name + "\n");
    Membership in(*room, me);
    bool too_long = false;
    try {
        co_await evmux::coro::when_all(reader(s, me, *room), writer(s, me));
    } catch (const evmux::coro::QueueClosed&) {  // the writer's ordinary end
    } catch (const evmux::coro::LineTooLong&) {  // uncaught, it would end the server's run()
        too_long = true;
    }
    if (too_long)
        co_await s.write("*** a line of over " + std::to_string(max_line) + " bytes, bye\n");
}

// ---- the self-test ------------------------------------------------------------------

/// Chats: waits for everyone to be in, sends `lines` lines, reads until it
/// has every other chatter's lines (checked in order), then leaves.
Task<bool> chatter(evmux::EventLoop& loop, evmux::Address server, int chatters, int lines,
                   int* joined, evmux::coro::Event* all_in) {
    Stream s = co_await evmux::coro::connect(loop, server);
    const std::string welcome = co_await s.read_line();
    if (!welcome.starts_with("*** welcome, you are guest")) co_return false;
    const std::string me = welcome.substr(21, welcome.size() - 22);
    if (++*joined == chatters) all_in->set();
    co_await all_in->wait();
    for (int i = 0; i < lines; ++i) co_await s.write("line " + std::to_string(i) + "\n");
    std::vector<std::pair<std::string, int>> seen;  // each other chatter's next line
    int heard = 0;
    while (heard < (chatters - 1) * lines) {
        std::string line = co_await s.read_line();
        if (line.empty()) co_return false;       // closed early
        if (line.starts_with("*** ")) continue;  // joined, left
        const auto colon = line.find(": line ");
        if (colon == std::string::npos) co_return false;
        const std::string who = line.substr(0, colon);
        if (who == me) co_return false;  // its own line came back
        auto it = std::find_if(seen.begin(), seen.end(), [&](auto& p) { return p.first == who; });
        if (it == seen.end()) it = seen.insert(seen.end(), {who, 0});
        if (line != who + ": line " + std::to_string(it->second++) + "\n") co_return false;
        ++heard;
    }
    s.shutdown_write();  // done: the server closes once it has sent what is left
    while (!(co_await s.read_line()).empty()) {
    }
    co_return true;
}

/// Lines of 201 bytes enough to flood a member that does not read: more than
/// the server's socket send buffer can take (the kernel grows it up to
/// net.ipv4.tcp_wmem's maximum, 4 MB by default, while the completion I/O
/// sends wait on it), with 4 MB to spare.
int flood_lines() {
    long max = 4 << 20;
    if (std::FILE* f = std::fopen("/proc/sys/net/ipv4/tcp_wmem", "r")) {
        long low = 0, initial = 0;
        if (std::fscanf(f, "%ld %ld %ld", &low, &initial, &max) != 3) max = 4 << 20;
        std::fclose(f);
    }
    return static_cast<int>(std::min(2 * max + (4 << 20), 64L << 20) / 201);
}

/// A member that does not read while another floods the room: the flood
/// never waits for it, and its outbox loses lines instead of growing.
Task<bool> slow_reader(evmux::EventLoop& loop, evmux::Address server, const Room* room) {
    Stream silent = co_await evmux::coro::connect(loop, server);
    // A small receive buffer, fixed: the kernel would otherwise grow it (up to
    // net.ipv4.tcp_rmem's maximum, 32 MB here) and take the whole flood.
    const int small = 4096;
    ::setsockopt(silent.connection()->fd(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    co_await silent.read_line();  // welcome
    Stream flood = co_await evmux::coro::connect(loop, server);
    co_await flood.read_line();
    const std::string line(200, 'x');
    const std::uint64_t dropped_before = room->dropped;
    const int lines = flood_lines();
    for (int i = 0; i < lines; ++i) co_await flood.write(line + "\n");
    flood.shutdown_write();
    while (!(co_await flood.read_line()).empty()) {  // the server has read it all
    }
    if (!silent.is_open() || room->dropped == dropped_before) co_return false;
    std::printf("coro_chat_server self-test: %llu of %d lines dropped for the silent member\n",
                static_cast<unsigned long long>(room->dropped - dropped_before), lines);
    co_return true;
}

/// A line longer than the server takes: told, disconnected; the server goes on.
Task<bool> long_line(evmux::EventLoop& loop, evmux::Address server) {
    Stream s = co_await evmux::coro::connect(loop, server);
    co_await s.read_line();  // welcome
    co_await s.write(std::string(max_line + 100, 'x'));
    const std::string bye = co_await s.read_line();
    co_return bye.starts_with("*** a line of over ") && (co_await s.read_line()).empty();
}

int self_test(evmux::EventLoop& loop) {
    Room room;
    auto server = evmux::coro::serve(loop, evmux::Address::parse("127.0.0.1:0"),
                                     std::bind_front(member, &room));
    const evmux::Address address = server->local_address();
    constexpr int chatters = 8;
    int joined = 0;
    evmux::coro::Event all_in(loop);
    std::vector<Task<bool>> clients;
    for (int i = 0; i < chatters; ++i)
        clients.push_back(chatter(loop, address, chatters, 50, &joined, &all_in));
    int chatted = 0;
    bool flood_ok = false;
    bool done = false;
    evmux::coro::spawn(
        loop,
        [](evmux::EventLoop& l, evmux::Address a, const Room* r, std::vector<Task<bool>> c, int* ok,
           bool* flood, bool* end) -> Task<void> {
            try {
                for (const bool passed : co_await evmux::coro::when_all(std::move(c)))
                    if (passed) ++*ok;
                *flood = co_await long_line(l, a) && co_await slow_reader(l, a, r);
            } catch (const std::exception& e) {
                std::printf("coro_chat_server self-test: %s\n", e.what());
            }
            *end = true;
        }(loop, address, &room, std::move(clients), &chatted, &flood_ok, &done));
    const auto deadline = std::chrono::steady_clock::now() + 30s;  // bound the test
    while (!done && std::chrono::steady_clock::now() < deadline) loop.run_once(10ms);
    // The server's end closes its connections; their handlers end from the
    // loop, leaving the room before it goes.
    server.reset();
    while (!room.members.empty() && std::chrono::steady_clock::now() < deadline)
        loop.run_once(10ms);
    const bool ok = chatted == chatters && flood_ok;
    std::printf(
        "coro_chat_server self-test: %d of %d chatters heard all the others in order; a line too "
        "long and a member that did not read during a flood: %s; OK: %s\n",
        chatted, chatters, flood_ok ? "handled" : "NOT handled", ok ? "yes" : "FAILED");
    return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    example::Args args;
    const example::Spec spec{"coro_chat_server",
                             "usage: coro_chat_server [--port N] [--backend NAME] [--self-test] "
                             "[--version]\n",
                             "--port", 16002};
    if (const auto status = example::parse_args(spec, argc, argv, args)) return *status;
    try {
        Room room;  // before the loop: the handlers, destroyed with it, leave the room
        evmux::EventLoop loop(example::make_selector(args));
        if (args.self_test) return self_test(loop);
        auto server = evmux::coro::serve(
            loop, evmux::Address::ip("127.0.0.1", static_cast<std::uint16_t>(args.number)),
            std::bind_front(member, &room));
        std::printf("coro_chat_server on %s, backend %s\n",
                    server->local_address().to_string().c_str(), loop.backend_name().c_str());
        std::fflush(stdout);
        loop.on_signal(SIGINT, [&](int) { loop.stop(); });
        loop.on_signal(SIGTERM, [&](int) { loop.stop(); });
        loop.run();
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "coro_chat_server: %s\n", e.what());
        return 1;
    }
}
