// The README's echo server: every byte back, on 127.0.0.1:PORT (default 7000;
// 0 picks a free port), until SIGINT or SIGTERM. Public headers only.
#include <csignal>
#include <cstdio>
#include <exception>
#include <string>

#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/server.hpp"

int main(int argc, char** argv) try {
    evmux::EventLoop loop;  // EVMUX_BACKEND, or the best backend here
    evmux::Callbacks cb;
    cb.on_message = [](const evmux::ConnectionPtr& conn, evmux::Buffer& input) {
        conn->send(input.data(), input.size());  // written now, or queued
        input.consume_all();
    };
    cb.on_close = [](const evmux::ConnectionPtr&, evmux::CloseReason why, int) {
        std::printf("connection closed: %s\n", evmux::to_string(why));
    };
    std::string port = argc > 1 ? argv[1] : "7000";
    evmux::TcpServer server(loop, evmux::Address::parse("127.0.0.1:" + port), cb);
    loop.on_signal(SIGINT, [&](int) { loop.stop(); });
    loop.on_signal(SIGTERM, [&](int) { loop.stop(); });
    std::printf("echo server on %s, backend %s\n", server.local_address().to_string().c_str(),
                loop.backend_name().c_str());
    std::fflush(stdout);
    loop.run();
} catch (const std::exception& e) {  // a bad port, the port in use, an unknown backend
    std::fprintf(stderr, "echo_server: %s\n", e.what());
    return 1;
}
