// Names on an evmux::EventLoop: look names up without blocking (Resolver,
// c-ares on the loop), serve on a name and connect to one.
//
// Usage:
//   resolve NAME [NAME...]     print each name's addresses (or why not), all looked up at once
//   resolve --self-test        a server on "localhost:0", a connect to it by name; exit 0 on
//                              success
//
// Only the installed evmux headers are used.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "evmux/event_loop.hpp"
#include "evmux/resolver.hpp"
#include "evmux/server.hpp"

namespace {

int print_addresses(int argc, char** argv) {
    evmux::EventLoop loop;
    evmux::Resolver resolver(loop);  // /etc/hosts, then /etc/resolv.conf's servers
    int failed = 0;
    for (int i = 1; i < argc; ++i) {
        std::string name = argv[i];
        resolver.resolve(name, "", [&, name](std::error_code ec, std::vector<evmux::Address> all) {
            if (ec) {
                std::printf("%s\n", evmux::resolve_message(name, ec).c_str());
                ++failed;
            }
            for (const evmux::Address& a : all)
                std::printf("%s %s\n", name.c_str(), a.to_string().c_str());
            if (resolver.pending() == 0) loop.stop();
        });
    }
    loop.run();
    return failed == 0 ? 0 : 1;
}

int self_test() {
    evmux::EventLoop loop;
    evmux::Callbacks echo;
    echo.on_message = [](const evmux::ConnectionPtr& c, evmux::Buffer& in) {
        c->send(in.data(), in.size());
        in.consume_all();
    };
    evmux::TcpServer server(loop, "localhost:0", echo);  // resolved here, blocking, once
    std::string reply, error;
    evmux::Callbacks client;
    client.on_connect = [](const evmux::ConnectionPtr& c) { c->send("by name"); };
    client.on_message = [&](const evmux::ConnectionPtr& c, evmux::Buffer& in) {
        reply += in.take_all();
        if (reply.size() >= 7) {
            c->close();
            loop.stop();
        }
    };
    client.on_error = [&](std::error_code, const std::string& message) {
        error = message;
        loop.stop();
    };
    evmux::ConnectOptions options;
    options.timeout = std::chrono::seconds(10);
    evmux::connect(loop, "localhost:" + std::to_string(server.local_address().port()), client,
                   options);
    loop.run();
    std::printf("server on %s, reply \"%s\"%s%s\n", server.local_address().to_string().c_str(),
                reply.c_str(), error.empty() ? "" : ", error: ", error.c_str());
    return reply == "by name" ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    const char* usage = "usage: resolve NAME [NAME...] | resolve --self-test\n";
    if (argc == 2 && std::strcmp(argv[1], "--self-test") == 0) return self_test();
    if (argc == 2 && std::strcmp(argv[1], "--help") == 0) {
        std::printf("%s", usage);
        return 0;
    }
    if (argc < 2) {
        std::fprintf(stderr, "%s", usage);
        return 2;
    }
    return print_addresses(argc, argv);
}
