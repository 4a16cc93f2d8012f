// The uppercase server of select_server.cpp again, on evmux::TcpServer and
// evmux::Connection: the message queue, write interest, the high-water pause
// and the drain-then-close are all the connection's job now.
//
// Usage:
//   uppercase_server [--port N] [--backend NAME]  serve on 127.0.0.1:N until SIGINT/SIGTERM
//   uppercase_server --self-test [--backend NAME] serve on a free port, connect to itself with
//                                                 evmux::connect(), exit 0 on success
#include <signal.h>

#include <cctype>
#include <chrono>
#include <cstdio>
#include <string>

#include "evmux/evmux.hpp"
#include "example_args.hpp"

namespace {

using namespace std::chrono_literals;

void to_upper(std::string& s) {
    for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
}

/// The whole server: uppercase what arrives, send it back. When the peer
/// shuts down its side, the connection sends what is queued and closes.
evmux::Callbacks uppercase_callbacks() {
    evmux::Callbacks cb;
    cb.on_message = [](const evmux::ConnectionPtr& conn, evmux::Buffer& input) {
        std::string reply = input.take_all();
        to_upper(reply);
        conn->send(std::move(reply));
    };
    return cb;
}

/// A client on the same loop sends 1 MiB, half-closes, and checks the reply.
int self_test(evmux::EventLoop& loop, const evmux::TcpServer& server) {
    std::string payload;
    for (int i = 0; payload.size() < (1u << 20); ++i)
        payload += "hello evmux " + std::to_string(i) + "\n";
    std::string expected = payload;
    to_upper(expected);
    std::string reply;
    bool closed_cleanly = false;

    evmux::Callbacks client;
    client.on_connect = [&](const evmux::ConnectionPtr& conn) {
        conn->send(payload);
        conn->shutdown_write();  // FIN after the queue has drained
    };
    client.on_message = [&](const evmux::ConnectionPtr&, evmux::Buffer& in) {
        reply += in.take_all();
    };
    client.on_close = [&](const evmux::ConnectionPtr&, evmux::CloseReason why, int) {
        closed_cleanly = why == evmux::CloseReason::peer_closed;
        loop.stop();
    };
    client.on_error = [&](std::error_code, const std::string& message) {
        std::fprintf(stderr, "uppercase_server: %s\n", message.c_str());
        loop.stop();
    };
    evmux::connect(loop, server.local_address(), client);
    loop.call_after(20s, [&] { loop.stop(); });  // bound the test
    loop.run();

    const bool ok = closed_cleanly && reply == expected;
    std::printf("uppercase_server self-test: sent %zu bytes, got %zu back, %s\n", payload.size(),
                reply.size(), ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    example::Args args;
    const example::Spec spec{"uppercase_server",
                             "usage: uppercase_server [--port N] [--backend NAME] [--self-test] "
                             "[--version]\n"};
    if (const auto status = example::parse_args(spec, argc, argv, args)) return *status;
    try {
        evmux::EventLoop loop(example::make_selector(args));
        auto address = evmux::Address::ip(
            "127.0.0.1", args.self_test ? 0 : static_cast<std::uint16_t>(args.number));
        evmux::TcpServer server(loop, address, uppercase_callbacks());
        std::printf("uppercase_server: %s, backend %s\n",
                    server.local_address().to_string().c_str(), loop.backend_name().c_str());
        if (args.self_test) return self_test(loop, server);

        loop.on_signal(SIGINT, [&](int) { loop.stop(); });
        loop.on_signal(SIGTERM, [&](int) { loop.stop(); });
        loop.run();
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "uppercase_server: %s\n", e.what());
        return 1;
    }
}
