// Fuzz target: coro::Stream::read_frame() on a real Unix socket connection fed a
// byte stream in chunks of the input's choosing, the reading task destroyed
// (cancelled) and started again between chunks when the input says so, every
// outcome checked against a naive reference parser of the whole stream.
//
// Input: byte 0 picks the prefix (u16 or u32), bytes 1-2 the limit, then
// steps: a byte c; c % 8 == 0 cancels the reader and starts another, else the
// next c % 64 + 1 bytes are sent. At the end the client shuts down its side.
//
// Checked:
//  - after every chunk, the frames read are exactly the reference's complete
//    frames of the bytes sent so far (none held back, none early), in order,
//    whatever reads were cancelled in between: a cancelled read's bytes are
//    the next read's;
//  - a prefix announcing more than the limit is a FrameError (size, limit)
//    as soon as that prefix has been sent;
//  - at the end of the stream: nothing after the last whole frame, or
//    IncompleteRead with every byte of the unfinished frame counted.
//
// Built as a libFuzzer target with -Dfuzz=enabled (clang), and otherwise as a
// replay program that runs the stored corpus as a regression test.
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <coroutine>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "evmux/buffer.hpp"
#include "evmux/coro.hpp"
#include "evmux/event_loop.hpp"
#include "fuzz_input.hpp"

using namespace evmux;
using namespace std::chrono_literals;

namespace {

using fuzz::Input;

[[noreturn]] void fail(const char* what, unsigned long long a = 0, unsigned long long b = 0) {
    std::fprintf(stderr, "stream_frame_fuzz: %s (%llu, %llu)\n", what, a, b);
    std::abort();
}

/// The stream's frames worked out the slow and obvious way.
struct Reference {
    std::vector<std::string> frames;  // every complete frame, in order
    bool too_large = false;           // then: the prefix at the end of `frames` announces
    std::size_t announced = 0;        //   this many bytes, over the limit
    std::size_t rest = 0;             // bytes of an unfinished frame after the last one
};

Reference reference(std::string_view in, std::size_t head, std::size_t limit) {
    Reference r;
    for (;;) {
        if (in.size() < head) break;
        std::size_t len = 0;
        for (std::size_t i = 0; i < head; ++i) len = len << 8 | static_cast<unsigned char>(in[i]);
        if (len > limit) {
            r.too_large = true;
            r.announced = len;
            return r;
        }
        if (in.size() - head < len) break;
        r.frames.emplace_back(in.substr(head, len));
        in.remove_prefix(head + len);
    }
    r.rest = in.size();
    return r;
}

/// What the reading tasks saw.
struct Seen {
    std::vector<std::string> frames;
    bool ended = false;  // read_frame() gave nothing: the end between frames
    bool too_large = false;
    std::size_t error_size = 0, error_limit = 0;
    bool incomplete = false;
    std::size_t incomplete_got = 0;
    bool finished() const { return ended || too_large || incomplete; }
};

coro::Task<void> reader(coro::Stream& s, Prefix prefix, std::size_t limit, Seen* seen) {
    for (;;) {
        std::optional<std::string> f;
        try {
            f = co_await s.read_frame(prefix, limit);
        } catch (const FrameError& e) {
            seen->too_large = true;
            seen->error_size = e.size();
            seen->error_limit = e.limit();
            co_return;
        } catch (const coro::IncompleteRead& e) {
            seen->incomplete = true;
            seen->incomplete_got = e.got();
            co_return;
        }
        if (!f) {
            seen->ended = true;
            co_return;
        }
        seen->frames.push_back(std::move(*f));
    }
}

coro::Task<void> accept_into(coro::Acceptor& acceptor, std::optional<coro::Stream>* stream) {
    stream->emplace(co_await acceptor.accept());
}

/// Starts a task the caller owns up to its first suspension, as a co_await
/// would; destroying it cancels it where it waits.
void start(coro::Task<void>& task) {
    auto awaiter = std::move(task).operator co_await();
    awaiter.await_suspend(std::noop_coroutine()).resume();
}

template <class Pred>
bool run_until(EventLoop& loop, Pred done) {
    for (int i = 0; i < 500 && !done(); ++i) loop.run_once(10ms);
    return done();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    Input in{data, size};
    const Prefix prefix = in.next() % 2 ? Prefix::u32_be : Prefix::u16_be;
    const std::size_t head = prefix == Prefix::u16_be ? 2 : 4;
    std::size_t limit = in.next();
    limit = limit * (1 + in.next() % 64);  // up to 16 065; mostly small

    EventLoop loop(make_selector("epoll"));
    // A Unix socket: a TCP port per input would run out of ports at fuzzing speed.
    static const Address path =
        Address::parse("unix:/tmp/evmux-stream-frame-fuzz-" + std::to_string(::getpid()) + ".sock");
    coro::Acceptor acceptor(loop, path);
    const int client = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (client < 0 || ::connect(client, static_cast<const sockaddr*>(path.sockaddr_ptr()),
                                path.sockaddr_len()) < 0)
        fail("connect", static_cast<unsigned long long>(errno));
    std::optional<coro::Stream> stream;
    coro::Task<void> accepting = accept_into(acceptor, &stream);
    start(accepting);
    if (!run_until(loop, [&] { return stream.has_value(); })) fail("accept");
    const auto bytes_in = [&] { return stream->connection()->bytes_in(); };

    Seen seen;
    coro::Task<void> task = reader(*stream, prefix, limit, &seen);
    start(task);
    std::string sent;
    for (int steps = 0; steps < 256 && !in.done() && !seen.finished(); ++steps) {
        const std::uint8_t c = in.next();
        if (c % 8 == 0) {  // cancel the waiting read, read on with a new task
            task = reader(*stream, prefix, limit, &seen);
            start(task);
            continue;
        }
        std::string chunk(c % 64 + 1, '\0');
        for (char& ch : chunk) ch = static_cast<char>(in.next());
        if (::send(client, chunk.data(), chunk.size(), MSG_NOSIGNAL) !=
            static_cast<ssize_t>(chunk.size()))
            fail("send");
        sent += chunk;
        if (!run_until(loop, [&] { return bytes_in() == sent.size(); }))
            fail("the connection did not read the chunk", bytes_in(), sent.size());
        loop.run_once(0ms);
        const Reference want = reference(sent, head, limit);
        if (seen.frames != want.frames)
            fail("frames differ", seen.frames.size(), want.frames.size());
        if (seen.too_large != want.too_large) fail("FrameError differs", seen.too_large);
        if (seen.too_large && (seen.error_size != want.announced || seen.error_limit != limit))
            fail("FrameError's numbers", seen.error_size, want.announced);
        if (seen.ended || seen.incomplete) fail("an end before the stream ended");
    }
    if (!seen.finished()) {  // the end of the stream
        ::shutdown(client, SHUT_WR);
        if (!run_until(loop, [&] { return seen.finished(); })) fail("no outcome at the end");
        const Reference want = reference(sent, head, limit);
        if (seen.frames != want.frames) fail("frames differ at the end");
        if (want.rest == 0 && !seen.ended) fail("no clean end after the last frame");
        if (want.rest != 0 && (!seen.incomplete || seen.incomplete_got != want.rest))
            fail("IncompleteRead's count", seen.incomplete_got, want.rest);
    }
    task = coro::Task<void>();
    stream.reset();
    ::close(client);
    loop.run_once(0ms);
    return 0;
}
