// The message queue's cost: a Connection on one end of an AF_UNIX socketpair
// sends a batch of messages; the other end is read by a plain watcher on the
// same loop; one iteration ends when every byte of the batch has arrived.
// Small messages (64 B) mostly take the direct-write path (queue empty, the
// kernel takes all); large ones (64 KiB, more than the socket buffer takes at
// once) go through the queue and the writable callback's writev drain.
//
// Usage: evmux_bench_queue [google benchmark flags]
#include <benchmark/benchmark.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <string>
#include <system_error>
#include <vector>

#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"

namespace {

using namespace std::chrono_literals;

void send_drain(benchmark::State& state, std::string backend) {
    const auto size = static_cast<std::size_t>(state.range(0));
    const long batch = state.range(1);
    evmux::EventLoop loop(evmux::make_selector(backend));
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
        throw std::system_error(errno, std::generic_category(), "socketpair");
    const int reader = sv[1];
    // The connection owns sv[0]; the reader end is ours.
    bool closed = false;
    evmux::Callbacks callbacks;
    callbacks.on_close = [&closed](const evmux::ConnectionPtr&, evmux::CloseReason, int) {
        closed = true;
    };
    // The queue must hold a whole batch without closing for overflow.
    evmux::ConnectionOptions options;
    options.max_buffered = size * static_cast<std::size_t>(batch) * 2 + (1 << 20);
    options.high_water = options.max_buffered;
    auto conn = evmux::Connection::adopt(loop, sv[0], callbacks, options);

    std::size_t received = 0;
    std::vector<char> sink(256 * 1024);
    loop.watch(reader, evmux::Events::read, [&](evmux::Events) {
        for (;;) {
            ssize_t n = ::read(reader, sink.data(), sink.size());
            if (n <= 0) break;
            received += static_cast<std::size_t>(n);
        }
    });
    const std::string message(size, 'm');
    for (auto _ : state) {
        std::size_t want = received + size * static_cast<std::size_t>(batch);
        for (long i = 0; i < batch; ++i) conn->send(message);
        // Bounded: 100 000 loop iterations is far more than any batch needs.
        for (int tries = 0; received < want && !closed && tries < 100000; ++tries)
            loop.run_once(100ms);
        if (received < want) {
            state.SkipWithError(closed ? "connection closed" : "batch not delivered");
            break;
        }
    }
    state.SetBytesProcessed(state.iterations() * batch * static_cast<long>(size));
    state.SetItemsProcessed(state.iterations() * batch);
    loop.unwatch(reader);
    conn->close();
    loop.run_once(0ns);  // lets on_close run and the connection go
    ::close(reader);
}

}  // namespace

int main(int argc, char** argv) {
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
    for (const auto& b : evmux::backends()) {
        if (!b.usable) continue;
        benchmark::RegisterBenchmark(("queue_send_drain/" + b.name).c_str(), send_drain, b.name)
            ->ArgNames({"size", "batch"})
            ->Args({64, 64})
            ->Args({64 * 1024, 16});
    }
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
