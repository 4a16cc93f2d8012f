// A TCP proxy with coroutines, the classic of asyncio's and Trio's tutorials:
// every client connection gets its own connection to the upstream server, and
// two copies run side by side under when_all(), client to upstream and
// upstream to client. The end of the stream one way is passed on as a
// half-close (shutdown_write()), so a protocol that half-closes (send the
// request, shut down, read the answer to the end) works through the proxy;
// writes wait while the other side's queue is over its high-water mark, so a
// slow reader slows its writer instead of growing the proxy's memory. An
// error one way (a reset) ends the other copy (when_all() destroys it) and
// both connections close.
//
// Usage:
//   coro_proxy [--port N] [--backend NAME]   listen on 127.0.0.1:N (default 16001) and forward
//                                            to 127.0.0.1:16000 (coro_echo_server's default
//                                            port) until SIGINT/SIGTERM
//   coro_proxy --self-test [--backend NAME]  an echo server behind the proxy on free ports,
//                                            coroutine clients through it, exit 0 on success
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "evmux/evmux.hpp"
#include "example_args.hpp"

namespace {

using namespace std::chrono_literals;
using evmux::coro::Stream;
using evmux::coro::Task;

bool quiet = false;  // the self-test's clients would flood the output

/// Copy `from` to `to` until `from` ends, then pass the end on.
Task<void> copy(Stream& from, Stream& to) {
    for (;;) {
        std::string_view bytes = co_await from.read_some();  // empty: the end of the stream
        if (bytes.empty()) break;
        co_await to.write(bytes);  // queued at once; waits while `to` is over its high-water mark
    }
    to.shutdown_write();
}

/// One client: connect upstream, then copy both ways at once. Returning (or
/// an exception, which serve() takes as the end of the handler) closes both.
Task<void> proxy(evmux::Address upstream, Stream client) {
    evmux::EventLoop& loop = client.connection()->loop();
    evmux::ConnectOptions options;
    options.timeout = 5s;  // a silent upstream ends the client's connection too
    Stream server;
    try {
        server = co_await evmux::coro::connect(loop, upstream, options);
    } catch (const std::system_error& e) {
        if (!quiet) std::printf("%s\n", e.what());  // "connect 127.0.0.1:16000: Connection refused"
        co_return;                                  // the client sees its connection close
    }
    if (!quiet)
        std::printf("%s <-> %s\n", client.connection()->peer_address().to_string().c_str(),
                    upstream.to_string().c_str());
    co_await evmux::coro::when_all(copy(client, server), copy(server, client));
}

// ---- the self-test ------------------------------------------------------------------

/// The upstream: an echo server that ends its side when the client has.
Task<void> echo(Stream s) {
    for (;;) {
        std::string_view bytes = co_await s.read_some();
        if (bytes.empty()) break;
        co_await s.write(bytes);
    }
}

/// Writes `bytes` in pieces, then half-closes.
Task<void> write_all(Stream& s, const std::string& bytes) {
    for (std::size_t at = 0; at < bytes.size(); at += 4096)
        co_await s.write(std::string_view(bytes).substr(at, 4096));
    s.shutdown_write();
}

/// Everything until the end of the stream.
Task<std::string> read_all(Stream& s) {
    std::string got;
    for (;;) {
        std::string_view bytes = co_await s.read_some();
        if (bytes.empty()) co_return got;
        got += bytes;
    }
}

/// A client through the proxy: `size` bytes, a half-close, then everything
/// echoed must come back before the end of the stream. The writer and the
/// reader run side by side: the echo of a large transfer comes back while it
/// is still being sent.
Task<bool> client(evmux::EventLoop& loop, evmux::Address proxy_address, int id, std::size_t size) {
    Stream s = co_await evmux::coro::connect(loop, proxy_address);
    std::string sent;
    for (std::size_t i = 0; sent.size() < size; ++i)
        sent += "client " + std::to_string(id) + " piece " + std::to_string(i) + "\n";
    auto [written, got] = co_await evmux::coro::when_all(write_all(s, sent), read_all(s));
    (void)written;  // std::monostate: write_all() returns nothing
    co_return got == sent;
}

/// A client through a proxy whose upstream refuses: its connection ends
/// (the proxy closes it), it does not hang.
Task<bool> refused_client(evmux::EventLoop& loop, evmux::Address proxy_address) {
    Stream s = co_await evmux::coro::connect(loop, proxy_address);
    try {
        std::string_view bytes = co_await s.read_some();
        co_return bytes.empty();
    } catch (const evmux::coro::ConnectionClosed&) {
        co_return true;  // a reset is an end too
    }
}

Task<void> self_test_clients(evmux::EventLoop& loop, evmux::Address proxy_address,
                             evmux::Address refusing_proxy, int* passed, bool* done) {
    std::vector<Task<bool>> clients;
    for (int id = 0; id < 20; ++id) clients.push_back(client(loop, proxy_address, id, 2000));
    clients.push_back(client(loop, proxy_address, 20, 1 << 20));  // 1 MiB: backpressure
    clients.push_back(refused_client(loop, refusing_proxy));
    for (const bool ok : co_await evmux::coro::when_all(std::move(clients)))
        if (ok) ++*passed;
    *done = true;
}

int self_test(evmux::EventLoop& loop) {
    quiet = true;
    auto upstream = evmux::coro::serve(loop, evmux::Address::parse("127.0.0.1:0"), echo);
    const evmux::Address any = evmux::Address::parse("127.0.0.1:0");
    auto proxy_server =
        evmux::coro::serve(loop, any, std::bind_front(proxy, upstream->local_address()));
    // A port with nobody listening: bound, then closed again.
    evmux::Address refusing = [&] {
        evmux::TcpServer probe(loop, any, evmux::Callbacks{});
        return probe.local_address();
    }();
    auto refusing_proxy = evmux::coro::serve(loop, any, std::bind_front(proxy, refusing));
    int passed = 0;
    bool done = false;
    evmux::coro::spawn(loop, self_test_clients(loop, proxy_server->local_address(),
                                               refusing_proxy->local_address(), &passed, &done));
    const auto deadline = std::chrono::steady_clock::now() + 30s;  // bound the test
    while (!done && std::chrono::steady_clock::now() < deadline) loop.run_once(10ms);
    const bool ok = passed == 22;
    std::printf(
        "coro_proxy self-test: %d of 22 clients (20 small, 1 MiB, 1 with the upstream refusing) "
        "got what they should through the proxy, %s\n",
        passed, ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    example::Args args;
    const example::Spec spec{"coro_proxy",
                             "usage: coro_proxy [--port N] [--backend NAME] [--self-test] "
                             "[--version]\n",
                             "--port", 16001};
    if (const auto status = example::parse_args(spec, argc, argv, args)) return *status;
    try {
        evmux::EventLoop loop(example::make_selector(args));
        if (args.self_test) return self_test(loop);
        const auto upstream = evmux::Address::ip("127.0.0.1", 16000);
        auto server = evmux::coro::serve(
            loop, evmux::Address::ip("127.0.0.1", static_cast<std::uint16_t>(args.number)),
            std::bind_front(proxy, upstream));
        std::printf("coro_proxy: %s -> %s, backend %s\n",
                    server->local_address().to_string().c_str(), upstream.to_string().c_str(),
                    loop.backend_name().c_str());
        std::fflush(stdout);
        loop.on_signal(SIGINT, [&](int) { loop.stop(); });
        loop.on_signal(SIGTERM, [&](int) { loop.stop(); });
        loop.run();
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "coro_proxy: %s\n", e.what());
        return 1;
    }
}
