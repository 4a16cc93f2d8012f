// gevent's tutorial echo server, ported straight-line to evmux coroutines:
// one coroutine per connection that reads a line, writes it back and says
// goodbye on "quit"; each co_await switches to the loop, as a gevent greenlet
// switches to the hub. The Python original:
//
//     def echo(socket, address):
//         print('New connection from %s:%s' % address)
//         socket.sendall(b'Welcome to the echo server! Type quit to exit.\r\n')
//         rfileobj = socket.makefile(mode='rb')
//         while True:
//             line = rfileobj.readline()
//             if not line:
//                 print("client disconnected")
//                 break
//             if line.strip().lower() == b'quit':
//                 print("client quit")
//                 break
//             socket.sendall(line)
//             print("echoed %r" % line)
//         rfileobj.close()
//
//     server = StreamServer(('0.0.0.0', 16000), echo)
//     server.serve_forever()
//
// Usage:
//   coro_echo_server [--port N] [--backend NAME]  serve on 127.0.0.1:N until SIGINT/SIGTERM
//   coro_echo_server --self-test [--backend NAME] serve on a free port, talk to itself with
//                                                 coroutine clients, exit 0 on success
#include <signal.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "evmux/evmux.hpp"
#include "example_args.hpp"

namespace {

using namespace std::chrono_literals;
using evmux::coro::Stream;
using evmux::coro::Task;

bool quiet = false;  // the self-test's many clients would flood the output

std::string_view strip(std::string_view s) {
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
    while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
    return s;
}

bool is_quit(std::string_view line) {
    line = strip(line);
    if (line.size() != 4) return false;
    for (std::size_t i = 0; i < 4; ++i)
        if (std::tolower(static_cast<unsigned char>(line[i])) != "quit"[i]) return false;
    return true;
}

/// The handler: the same lines as the Python, one co_await where gevent
/// would switch. Returning closes the connection (after what is queued).
Task<void> echo(Stream socket) {
    const std::string address = socket.connection()->peer_address().to_string();
    if (!quiet) std::printf("New connection from %s\n", address.c_str());
    co_await socket.write("Welcome to the echo server! Type quit to exit.\r\n");
    std::string line;
    for (;;) {
        const bool got = co_await socket.read_line(line);  // not inside the if: see README
        if (!got) {
            if (!quiet) std::printf("client disconnected\n");
            break;
        }
        if (is_quit(line)) {
            if (!quiet) std::printf("client quit\n");
            break;
        }
        co_await socket.write(line);
        if (!quiet) std::printf("echoed %s", line.c_str());
    }
}

/// A self-test client: read the welcome, send `lines` lines and check each
/// echo, then "quit" (or just half-close) and expect the end of the stream.
Task<bool> client(evmux::EventLoop& loop, evmux::Address server, int id, int lines) {
    Stream s = co_await evmux::coro::connect(loop, server);
    std::string welcome = co_await s.read_line();
    if (welcome != "Welcome to the echo server! Type quit to exit.\r\n") co_return false;
    for (int i = 0; i < lines; ++i) {
        std::string line = "client " + std::to_string(id) + " line " + std::to_string(i) + "\n";
        co_await s.write(line);
        std::string echoed = co_await s.read_line();
        if (echoed != line) co_return false;
        if (i % 7 == 0) co_await evmux::coro::sleep(loop, 1ms);  // interleave the clients
    }
    if (id % 2 == 0)
        co_await s.write("QUIT\r\n");
    else
        s.shutdown_write();  // "client disconnected"
    std::string_view rest = co_await s.read_some();
    co_return rest.empty();  // the server closed
}

Task<void> self_test_clients(evmux::EventLoop& loop, evmux::Address server, int* passed) {
    std::vector<Task<bool>> clients;
    for (int id = 0; id < 20; ++id) clients.push_back(client(loop, server, id, 50));
    // One after another here; when_all() runs them side by side (below).
    for (auto& c : clients) {
        const bool ok = co_await std::move(c);
        if (ok) ++*passed;
    }
}

Task<void> concurrent_clients(evmux::EventLoop& loop, evmux::Address server, int* passed) {
    std::vector<Task<bool>> clients;
    for (int id = 100; id < 120; ++id) clients.push_back(client(loop, server, id, 50));
    for (const bool ok : co_await evmux::coro::when_all(std::move(clients)))
        if (ok) ++*passed;
}

int self_test(evmux::EventLoop& loop, const evmux::TcpServer& server) {
    quiet = true;
    int sequential = 0, concurrent = 0;
    evmux::coro::spawn(loop, self_test_clients(loop, server.local_address(), &sequential));
    evmux::coro::spawn(loop, concurrent_clients(loop, server.local_address(), &concurrent));
    auto deadline = std::chrono::steady_clock::now() + 20s;  // bound the test
    while (sequential + concurrent < 40 && std::chrono::steady_clock::now() < deadline)
        loop.run_once(10ms);
    const bool ok = sequential == 20 && concurrent == 20;
    std::printf(
        "coro_echo_server self-test: %d of 20 sequential and %d of 20 concurrent clients "
        "echoed, %s\n",
        sequential, concurrent, ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    example::Args args;
    const example::Spec spec{"coro_echo_server",
                             "usage: coro_echo_server [--port N] [--backend NAME] [--self-test] "
                             "[--version]\n",
                             "--port", 16000};
    if (const auto status = example::parse_args(spec, argc, argv, args)) return *status;
    try {
        evmux::EventLoop loop(example::make_selector(args));
        auto address = evmux::Address::ip(
            "127.0.0.1", args.self_test ? 0 : static_cast<std::uint16_t>(args.number));
        auto server = evmux::coro::serve(loop, address, echo);  // StreamServer(address, echo)
        std::printf("coro_echo_server: %s, backend %s\n",
                    server->local_address().to_string().c_str(), loop.backend_name().c_str());
        std::fflush(stdout);
        if (args.self_test) return self_test(loop, *server);

        loop.on_signal(SIGINT, [&](int) { loop.stop(); });
        loop.on_signal(SIGTERM, [&](int) { loop.stop(); });
        loop.run();  // serve_forever()
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "coro_echo_server: %s\n", e.what());
        return 1;
    }
}
