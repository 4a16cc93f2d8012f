// Fuzz target: Buffer::take_line() and take_frame() on a real Connection fed
// a byte stream in chunks of the input's choosing, every call checked against
// a naive reference parser that sees the same unconsumed bytes.
//
// Input: byte 0 picks the mode (LF, CRLF, LF or CRLF lines; u16, u32 frames),
// bytes 1-2 the limit (max_len or max_size), then chunks: a length byte n and
// the next n % 64 + 1 bytes of the stream.
//
// Checked:
//  - each call's outcome is the reference's: the same line or payload with
//    the same number of bytes consumed, nullopt with nothing consumed, or
//    FrameError (kind, size, limit) with nothing consumed. So no line or
//    frame over the limit comes out, an incomplete one never errs before the
//    bytes prove it too long, and an oversize one errs at the first call
//    whose bytes prove it (fail fast);
//  - the bytes consumed, call after call, followed by what is left, are the
//    stream fed so far: nothing lost, doubled or reordered;
//  - for frames, frame(prefix, payload) gives back the bytes consumed;
//  - every view taken in one on_message call still reads the same at its end.
//
// Built as a libFuzzer target with -Dfuzz=enabled (clang), and otherwise as a
// replay program that runs the stored corpus as a regression test.
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "evmux/buffer.hpp"
#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "fuzz_input.hpp"

using namespace evmux;
using namespace std::chrono_literals;

namespace {

using fuzz::Input;

[[noreturn]] void fail(const char* what, unsigned long long a = 0, unsigned long long b = 0) {
    std::fprintf(stderr, "frame_fuzz: %s (%llu, %llu)\n", what, a, b);
    std::abort();
}

enum class Mode { lf, crlf, lf_or_crlf, u16, u32 };

/// What one take should give, worked out the slow and obvious way.
struct Expected {
    enum { item, incomplete, error } outcome = incomplete;
    std::string item_bytes;      // the line or payload
    std::size_t consumed = 0;    // with its line end or prefix
    std::size_t error_size = 0;  // FrameError::size()
};

Expected reference(Mode mode, std::string_view in, std::size_t limit) {
    Expected e;
    if (mode == Mode::u16 || mode == Mode::u32) {
        const std::size_t head = mode == Mode::u16 ? 2 : 4;
        if (in.size() < head) return e;
        std::uint64_t len = 0;
        for (std::size_t i = 0; i < head; ++i) len = len * 256 + static_cast<unsigned char>(in[i]);
        if (len > limit) {
            e.outcome = Expected::error;
            e.error_size = len;
        } else if (in.size() - head >= len) {
            e.outcome = Expected::item;
            e.item_bytes = in.substr(head, len);
            e.consumed = head + len;
        }
        return e;
    }
    // The first line end of the whole input, however far.
    std::size_t end = std::string_view::npos, end_len = 0;
    if (mode == Mode::crlf) {
        end = in.find("\r\n");
        end_len = 2;
    } else {
        end = in.find('\n');
        end_len = 1;
        if (mode == Mode::lf_or_crlf && end != std::string_view::npos && end > 0 &&
            in[end - 1] == '\r') {
            --end;
            end_len = 2;
        }
    }
    if (end != std::string_view::npos) {
        if (end > limit) {
            e.outcome = Expected::error;
            e.error_size = in.size();
        } else {
            e.outcome = Expected::item;
            e.item_bytes = in.substr(0, end);
            e.consumed = end + end_len;
        }
        return e;
    }
    // No line end yet: the line has at least this many bytes (a CR at the
    // very end may still begin the line end).
    std::size_t at_least = in.size();
    if (mode != Mode::lf && !in.empty() && in.back() == '\r') --at_least;
    if (at_least > limit) {
        e.outcome = Expected::error;
        e.error_size = in.size();
    }
    return e;
}

struct Run {
    Mode mode;
    std::size_t limit;
    EventLoop loop;
    ConnectionPtr conn;
    int peer = -1;
    std::string fed;       // the stream written so far
    std::string consumed;  // the bytes the takes consumed, in order
    bool errored = false;

    Run(Mode m, std::size_t l) : mode(m), limit(l), loop(make_selector("epoll")) {
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0)
            fail("socketpair");
        peer = sv[1];
        Callbacks cb;
        cb.on_message = [this](const ConnectionPtr&, Buffer& in) { parse(in); };
        conn = Connection::adopt(loop, sv[0], std::move(cb));
    }
    ~Run() {
        conn->close();
        loop.run_once(0ns);
        conn.reset();
        ::close(peer);
    }

    std::optional<std::string_view> take(Buffer& in) {
        switch (mode) {
            case Mode::lf:
                return in.take_line(limit, LineEnd::lf);
            case Mode::crlf:
                return in.take_line(limit, LineEnd::crlf);
            case Mode::lf_or_crlf:
                return in.take_line(limit, LineEnd::lf_or_crlf);
            case Mode::u16:
                return in.take_frame(Prefix::u16_be, limit);
            case Mode::u32:
                break;
        }
        return in.take_frame(Prefix::u32_be, limit);
    }

    void parse(Buffer& in) {
        std::vector<std::pair<std::string_view, std::string>> taken;  // the view, a copy
        for (int guard = 0; guard < 100000; ++guard) {
            const std::string before(in.view());
            const Expected want = reference(mode, before, limit);
            std::optional<std::string_view> got;
            try {
                got = take(in);
            } catch (const FrameError& e) {
                if (want.outcome != Expected::error) fail("FrameError the reference does not see");
                const auto kind = mode == Mode::u16 || mode == Mode::u32
                                      ? FrameError::Kind::frame_too_large
                                      : FrameError::Kind::line_too_long;
                if (e.kind() != kind || e.limit() != limit || e.size() != want.error_size)
                    fail("FrameError with wrong details", e.size(), want.error_size);
                if (in.view() != before) fail("FrameError consumed bytes");
                errored = true;
                break;
            }
            if (!got) {
                if (want.outcome != Expected::incomplete)
                    fail("nullopt where the reference has an outcome", want.outcome);
                if (in.view() != before) fail("nullopt consumed bytes");
                break;
            }
            if (want.outcome != Expected::item) fail("an item the reference does not see");
            if (*got != want.item_bytes) fail("item differs", got->size(), want.item_bytes.size());
            if (got->size() > limit) fail("item over the limit", got->size(), limit);
            const std::size_t used = before.size() - in.size();
            if (used != want.consumed) fail("consumed differs", used, want.consumed);
            if (in.view() != std::string_view(before).substr(used)) fail("rest changed");
            if (mode == Mode::u16 || mode == Mode::u32) {
                const Prefix p = mode == Mode::u16 ? Prefix::u16_be : Prefix::u32_be;
                if (frame(p, *got) != std::string_view(before).substr(0, used))
                    fail("frame() does not give back the bytes");
            }
            consumed.append(before, 0, used);
            taken.emplace_back(*got, std::string(*got));
        }
        for (const auto& [view, copy] : taken)
            if (view != copy) fail("a view changed before on_message returned");
        if (consumed + std::string(in.view()) != fed.substr(0, conn->bytes_in()))
            fail("consumed + rest is not the stream", consumed.size(), fed.size());
    }

    /// Write `chunk` and let the connection read all of it.
    void feed(std::string_view chunk) {
        fed.append(chunk);
        while (!chunk.empty()) {
            ssize_t n = ::send(peer, chunk.data(), chunk.size(), MSG_NOSIGNAL);
            if (n <= 0) fail("send to the socketpair");
            chunk.remove_prefix(static_cast<std::size_t>(n));
        }
        for (int i = 0; i < 1000 && conn->bytes_in() < fed.size() && conn->is_open(); ++i)
            loop.run_once(10ms);
        if (conn->bytes_in() != fed.size()) fail("the connection did not read the chunk");
    }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    Input in{data, size};
    const auto mode = static_cast<Mode>(in.next() % 5);
    std::size_t limit = in.next();
    limit = limit * (1 + in.next() % 64);  // up to 16 065; mostly small
    Run run(mode, limit);
    for (int chunks = 0; chunks < 256 && !in.done() && !run.errored; ++chunks) {
        std::string chunk(in.next() % 64 + 1, '\0');
        for (char& c : chunk) c = static_cast<char>(in.next());
        run.feed(chunk);
    }
    return 0;
}
