// What evmux promises when user code fails and at shutdown, shown with the
// public API only (one loop, servers and clients on it):
//   1. an on_message that throws closes only its own connection (reason
//      "exception"), no byte of its input reaches anyone, its on_close runs,
//      its max_connections slot is freed, and the loop's exception handler
//      gets the exception;
//   2. connections still open when their server and loop are destroyed get
//      their on_close, before the destructors return;
//   3. peer_address() and local_address() answer inside on_close;
//   4. sending the next chunk from on_drain never stalls, whatever the size.
//
//     contracts [--self-test]      (prints each check; exit 0 if all hold, else 1)
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/server.hpp"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    if (!ok) ++failures;
}

// Run the loop until `done()` (at most ~10 s).
template <class F>
bool run_until(evmux::EventLoop& loop, F done) {
    for (int i = 0; i < 2000 && !done(); ++i) loop.run_once(std::chrono::milliseconds(5));
    return done();
}

// A client on the loop that collects what it receives.
struct Client {
    std::string got;
    bool closed = false;
    evmux::ConnectionPtr conn;
};

std::shared_ptr<Client> open_client(evmux::EventLoop& loop, const evmux::Address& to) {
    auto c = std::make_shared<Client>();
    evmux::Callbacks cb;
    cb.on_connect = [c](const evmux::ConnectionPtr& conn) { c->conn = conn; };
    cb.on_message = [c](const evmux::ConnectionPtr&, evmux::Buffer& in) {
        c->got += in.take_all();
    };
    cb.on_close = [c](const evmux::ConnectionPtr&, evmux::CloseReason, int) { c->closed = true; };
    evmux::connect(loop, to, cb);
    return c;
}

void exceptions(evmux::EventLoop& loop) {
    std::vector<std::string> handled;
    loop.set_exception_handler([&](std::exception_ptr e) {
        try {
            std::rethrow_exception(e);
        } catch (const std::exception& ex) {
            handled.push_back(ex.what());
        }
    });
    std::vector<std::string> reasons;
    evmux::Callbacks cb;
    cb.on_message = [](const evmux::ConnectionPtr& conn, evmux::Buffer& in) {
        if (in.view().starts_with("boom")) throw std::runtime_error("on_message: boom");
        conn->send(in.take_all());
    };
    cb.on_close = [&](const evmux::ConnectionPtr&, evmux::CloseReason why, int) {
        reasons.push_back(evmux::to_string(why));
    };
    evmux::ServerOptions opt;
    opt.max_connections = 2;
    evmux::TcpServer server(loop, evmux::Address::parse("127.0.0.1:0"), cb, opt);

    auto bad = open_client(loop, server.local_address());
    auto good = open_client(loop, server.local_address());
    run_until(loop, [&] { return server.connection_count() == 2 && bad->conn && good->conn; });
    bad->conn->send("boom");
    run_until(loop, [&] { return bad->closed; });
    good->conn->send("hello world");
    run_until(loop, [&] { return good->got.size() >= 11; });
    check(good->got == "hello world",
          "another connection's bytes are intact: \"" + good->got + "\"");
    check(bad->closed && bad->got.empty(), "the thrower's peer sees a close and no echo");
    check(reasons == std::vector<std::string>{"exception"},
          "its on_close ran once, reason \"exception\"");
    check(handled == std::vector<std::string>{"on_message: boom"},
          "the loop's exception handler got it");
    check(server.stats().connections_now == 1, "the server forgot it (connections_now 1)");

    auto third = open_client(loop, server.local_address());
    run_until(loop, [&] { return third->conn != nullptr; });
    third->conn->send("third");
    run_until(loop, [&] { return third->got.size() >= 5 || third->closed; });
    check(third->got == "third", "its max_connections slot is free again (2 allowed)");
    loop.set_exception_handler(nullptr);
}

void shutdown_and_addresses() {
    std::vector<std::string> closes;
    auto loop = std::make_unique<evmux::EventLoop>();
    std::string client_addresses;
    {
        evmux::Callbacks cb;
        cb.on_close = [&](const evmux::ConnectionPtr& conn, evmux::CloseReason why, int) {
            closes.push_back(std::string(evmux::to_string(why)) + " peer " +
                             conn->peer_address().to_string() + " local " +
                             conn->local_address().to_string());
        };
        evmux::TcpServer server(*loop, evmux::Address::parse("127.0.0.1:0"), cb);
        std::vector<std::shared_ptr<Client>> clients;
        for (int i = 0; i < 3; ++i) clients.push_back(open_client(*loop, server.local_address()));
        run_until(*loop, [&] { return server.connection_count() == 3; });
        for (auto& c : clients)
            if (c->conn) client_addresses += c->conn->local_address().to_string() + " ";
        // `server` is destroyed here, then the loop: the end of an ordinary main().
    }
    check(closes.size() == 3, "3 open connections, 3 on_close before ~TcpServer returned");
    bool addresses_ok = !closes.empty();
    for (const std::string& line : closes) {
        std::printf("     on_close: %s\n", line.c_str());
        const auto peer =
            line.substr(line.find(" peer ") + 6, line.find(" local ") - line.find(" peer ") - 6);
        addresses_ok = addresses_ok && line.starts_with("local ") &&
                       client_addresses.find(peer + " ") != std::string::npos &&
                       line.find("(none)") == std::string::npos;
    }
    check(addresses_ok, "reason local; peer_address() and local_address() answer inside on_close");
    loop.reset();  // the clients' connections close here, with their own on_close
}

void chunked_send(evmux::EventLoop& loop, std::size_t chunk) {
    const int chunks = 5;
    int sent = 0;
    evmux::Callbacks cb;
    auto next = [&, chunk](const evmux::ConnectionPtr& conn) {
        if (sent < chunks) {
            ++sent;
            conn->send(std::string(chunk, static_cast<char>('a' + sent)));
        }
    };
    cb.on_connect = next;
    cb.on_drain = next;  // write-complete: also after a send the kernel took whole
    evmux::TcpServer server(loop, evmux::Address::parse("127.0.0.1:0"), cb);
    auto client = open_client(loop, server.local_address());
    run_until(loop, [&] { return client->got.size() >= chunk * chunks; });
    check(client->got.size() == chunk * chunks,
          "on_drain-driven sending of 5 x " + std::to_string(chunk) +
              " B: " + std::to_string(client->got.size()) + " B arrived");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc > 1 && std::strcmp(argv[1], "--self-test") != 0) {
        std::fprintf(stderr, "usage: contracts [--self-test]\n");
        return 2;
    }
    evmux::EventLoop loop;
    std::printf("backend %s\n", loop.backend_name().c_str());
    exceptions(loop);
    shutdown_and_addresses();
    for (std::size_t chunk : {std::size_t{1000}, std::size_t{4} << 20}) chunked_send(loop, chunk);
    std::printf("%d failed\n", failures);
    return failures != 0 ? 1 : 0;
}
