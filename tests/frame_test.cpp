// Framing: Buffer::take_line(), take_frame(), frame() and append_frame(), run
// once per backend (EVMUX_BACKEND). The helpers are tested on real
// connections: first over a socketpair
// fed one chunk at a time (each chunk one on_message call: the edge cases),
// then on a TcpServer over loopback with clients writing byte by byte, in big
// batches, and over the limits; and on Buffers of the test's own, filled with
// append().
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "evmux/buffer.hpp"
#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/server.hpp"
#include "test_support.hpp"

namespace evmux {
namespace {

using namespace std::chrono_literals;
using namespace std::string_literals;
using namespace std::string_view_literals;
using test::Fd;
using test::run_until;
using test::send_all;

// ---- the helpers, one chunk per on_message -------------------------------------

/// What one parse of the input gave: the lines or payloads taken, in order,
/// and whether it stopped at an incomplete one (nullopt) or a FrameError.
struct Parsed {
    std::vector<std::string> taken;
    int incomplete = 0;  // calls that ended in nullopt
    std::optional<FrameError> error;
};

/// A Connection over a socketpair whose on_message runs `take` until it
/// returns nullopt or throws, recording everything in `parsed`. feed() sends
/// one chunk and waits until the connection has read it, so every chunk is
/// one on_message call.
class Feed {
  public:
    using Take = std::function<std::optional<std::string_view>(Buffer&)>;

    Feed(EventLoop& loop, Take take) : loop_(loop), take_(std::move(take)) {
        auto [ours, theirs] = test::socket_pair();
        peer_ = std::move(ours);
        Callbacks cb;
        cb.on_message = [this](const ConnectionPtr&, Buffer& in) {
            try {
                while (auto item = take_(in)) parsed.taken.emplace_back(*item);
                ++parsed.incomplete;
            } catch (const FrameError& e) {
                parsed.error = e;
            }
        };
        conn_ = Connection::adopt(loop, theirs.release(), std::move(cb));
    }
    ~Feed() {
        conn_->close();
        loop_.run_once(0ms);
    }

    /// Send `chunk`; true once the connection has read it all.
    bool feed(std::string_view chunk) {
        const std::uint64_t want = conn_->bytes_in() + chunk.size();
        send_all(loop_, peer_.get(), chunk);
        return run_until(loop_, [&] { return conn_->bytes_in() >= want; });
    }
    /// The bytes held unconsumed.
    std::size_t held() const { return conn_->input_bytes(); }

    Parsed parsed;

  private:
    EventLoop& loop_;
    Take take_;
    Fd peer_;
    ConnectionPtr conn_;
};

Feed::Take lines(std::size_t max_len, LineEnd end = LineEnd::lf) {
    return [=](Buffer& in) { return in.take_line(max_len, end); };
}

Feed::Take frames(Prefix prefix, std::size_t max_size) {
    return [=](Buffer& in) { return in.take_frame(prefix, max_size); };
}

using Strings = std::vector<std::string>;

TEST(Framing, LinesWithoutTheirEnds) {
    EVMUX_LOOP_OR_SKIP(loop);
    Feed f(loop, lines(100));
    ASSERT_TRUE(f.feed("abc\n\nx\r\n"));
    EXPECT_EQ(f.parsed.taken, (Strings{"abc", "", "x\r"})) << "LF: a CR before it stays";
    EXPECT_EQ(f.held(), 0u);
    EXPECT_EQ(f.parsed.incomplete, 1);
    EXPECT_FALSE(f.parsed.error);
}

TEST(Framing, LineSplitAcrossReads) {
    EVMUX_LOOP_OR_SKIP(loop);
    Feed f(loop, lines(100));
    ASSERT_TRUE(f.feed("hel"));
    EXPECT_TRUE(f.parsed.taken.empty());
    EXPECT_EQ(f.held(), 3u) << "nothing is consumed while the line is incomplete";
    ASSERT_TRUE(f.feed("lo\nwor"));
    ASSERT_TRUE(f.feed("ld\n"));
    EXPECT_EQ(f.parsed.taken, (Strings{"hello", "world"}));
    EXPECT_EQ(f.held(), 0u);
}

TEST(Framing, CrlfSplitBetweenCrAndLf) {
    EVMUX_LOOP_OR_SKIP(loop);
    for (LineEnd end : {LineEnd::crlf, LineEnd::lf_or_crlf}) {
        Feed f(loop, lines(100, end));
        ASSERT_TRUE(f.feed("abc\r"));
        EXPECT_TRUE(f.parsed.taken.empty());
        EXPECT_EQ(f.held(), 4u);
        ASSERT_TRUE(f.feed("\n"));
        EXPECT_EQ(f.parsed.taken, Strings{"abc"}) << "the CR is part of the line end";
        EXPECT_EQ(f.held(), 0u);
    }
}

TEST(Framing, CrlfOnlyEndsAtCrlf) {
    EVMUX_LOOP_OR_SKIP(loop);
    Feed f(loop, lines(100, LineEnd::crlf));
    ASSERT_TRUE(f.feed("a\nb\rc\r\r\nd\r\n"));
    EXPECT_EQ(f.parsed.taken, (Strings{"a\nb\rc\r", "d"}));
}

TEST(Framing, LfOrCrlfDropsTheCr) {
    EVMUX_LOOP_OR_SKIP(loop);
    Feed f(loop, lines(100, LineEnd::lf_or_crlf));
    ASSERT_TRUE(f.feed("a\r\nb\nc\r\r\n\r\n"));
    EXPECT_EQ(f.parsed.taken, (Strings{"a", "b", "c\r", ""}));
}

TEST(Framing, LineExactlyAtTheLimitIsTaken) {
    EVMUX_LOOP_OR_SKIP(loop);
    for (LineEnd end : {LineEnd::lf, LineEnd::crlf, LineEnd::lf_or_crlf}) {
        Feed f(loop, lines(8, end));
        const std::string eol = end == LineEnd::lf ? "\n" : "\r\n";
        // Split so the line end of the full-length line arrives on its own.
        ASSERT_TRUE(f.feed("12345678"));
        ASSERT_TRUE(f.feed(eol.substr(0, 1)));
        if (eol.size() == 2) {
            ASSERT_TRUE(f.feed(eol.substr(1)));
        }
        ASSERT_TRUE(f.feed(eol));
        EXPECT_EQ(f.parsed.taken, (Strings{"12345678", ""})) << static_cast<int>(end);
        EXPECT_FALSE(f.parsed.error) << f.parsed.error->what();
    }
}

TEST(Framing, LineOverTheLimitFailsFast) {
    EVMUX_LOOP_OR_SKIP(loop);
    for (LineEnd end : {LineEnd::lf, LineEnd::crlf, LineEnd::lf_or_crlf}) {
        Feed f(loop, lines(8, end));
        ASSERT_TRUE(f.feed(end == LineEnd::lf ? "ok\n12345678" : "ok\r\n12345678"));
        EXPECT_FALSE(f.parsed.error) << "8 bytes may still be a line";
        // The 9th byte proves the line too long: no waiting for its end.
        ASSERT_TRUE(f.feed("9"));
        ASSERT_TRUE(f.parsed.error);
        EXPECT_EQ(f.parsed.taken, Strings{"ok"});
        EXPECT_EQ(f.parsed.error->kind(), FrameError::Kind::line_too_long);
        EXPECT_EQ(f.parsed.error->size(), 9u);
        EXPECT_EQ(f.parsed.error->limit(), 8u);
        EXPECT_EQ(f.held(), 9u) << "the error consumes nothing";
        const std::string expected =
            "evmux: line longer than the limit of 8 bytes (9 bytes received, no "s +
            (end == LineEnd::lf     ? "LF"
             : end == LineEnd::crlf ? "CRLF"
                                    : "LF or CRLF") +
            " within the limit)";
        EXPECT_EQ(f.parsed.error->what(), expected);
    }
}

TEST(Framing, LineOverTheLimitWithItsEndInTheSameRead) {
    EVMUX_LOOP_OR_SKIP(loop);
    for (const char* input : {"123456789\n", "123456789\r\n", "12345678\r\r\n"}) {
        for (LineEnd end : {LineEnd::lf, LineEnd::crlf, LineEnd::lf_or_crlf}) {
            Feed f(loop, lines(8, end));
            ASSERT_TRUE(f.feed(input));
            EXPECT_TRUE(f.parsed.taken.empty()) << input;
            ASSERT_TRUE(f.parsed.error) << input << " " << static_cast<int>(end);
            EXPECT_EQ(f.held(), std::string_view(input).size());
        }
    }
}

TEST(Framing, CrAtTheLimitWaitsForItsLf) {
    EVMUX_LOOP_OR_SKIP(loop);
    for (LineEnd end : {LineEnd::crlf, LineEnd::lf_or_crlf}) {
        Feed f(loop, lines(8, end));
        ASSERT_TRUE(f.feed("12345678\r"));
        EXPECT_FALSE(f.parsed.error) << "a CR right after 8 bytes may begin the line end";
        ASSERT_TRUE(f.feed("x"));
        ASSERT_TRUE(f.parsed.error) << "it did not";
        EXPECT_EQ(f.held(), 10u);
    }
    // For LF the CR is a 9th byte of the line.
    Feed f(loop, lines(8, LineEnd::lf));
    ASSERT_TRUE(f.feed("12345678\r"));
    EXPECT_TRUE(f.parsed.error);
}

TEST(Framing, ZeroMaxLen) {
    EVMUX_LOOP_OR_SKIP(loop);
    Feed f(loop, lines(0));
    ASSERT_TRUE(f.feed("\n\n"));
    EXPECT_EQ(f.parsed.taken, (Strings{"", ""}));
    ASSERT_TRUE(f.feed("x"));
    EXPECT_TRUE(f.parsed.error);
}

TEST(Framing, ViewsStayValidUntilOnMessageReturns) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto [ours, theirs] = test::socket_pair();
    std::vector<std::string> seen;
    int calls = 0;
    Callbacks cb;
    cb.on_message = [&](const ConnectionPtr&, Buffer& in) {
        ++calls;
        // Keep the views of every line of this call, and read them only at
        // the end: consuming must not have moved or overwritten them.
        std::vector<std::string_view> views;
        while (auto line = in.take_line(100)) views.push_back(*line);
        for (std::string_view v : views) seen.emplace_back(v);
    };
    ConnectionPtr conn = Connection::adopt(loop, theirs.release(), std::move(cb));
    // First call: from the loop's scratch buffer; the partial line is stored.
    send_all(loop, ours.get(), "one\ntwo\nthr");
    ASSERT_TRUE(run_until(loop, [&] { return conn->bytes_in() == 11; }));
    EXPECT_EQ(conn->input_bytes(), 3u);
    // Second call: from the connection's own storage, consumed to the end.
    send_all(loop, ours.get(), "ee\nfour\n");
    ASSERT_TRUE(run_until(loop, [&] { return conn->bytes_in() == 19; }));
    EXPECT_GE(calls, 2);
    EXPECT_EQ(seen, (Strings{"one", "two", "three", "four"}));
    EXPECT_EQ(conn->input_bytes(), 0u);
    conn->close();
    loop.run_once(0ms);
}

TEST(Framing, FramesZeroLengthAndPrefixSplitAcrossReads) {
    EVMUX_LOOP_OR_SKIP(loop);
    Feed f(loop, frames(Prefix::u32_be, 100));
    ASSERT_TRUE(f.feed("\0\0\0\0"s));
    EXPECT_EQ(f.parsed.taken, Strings{""}) << "an empty payload is a frame, not nullopt";
    // A prefix of 5, one byte per read, then the payload in two reads.
    for (std::string_view b : {"\0"sv, "\0"sv, "\0"sv}) {
        ASSERT_TRUE(f.feed(b));
        EXPECT_EQ(f.parsed.taken.size(), 1u);
    }
    ASSERT_TRUE(f.feed("\x05he"));
    EXPECT_EQ(f.parsed.taken.size(), 1u);
    EXPECT_EQ(f.held(), 6u) << "nothing consumed while the payload is incomplete";
    ASSERT_TRUE(f.feed("llo\0\0"s));
    ASSERT_TRUE(f.feed("\0\x02!?"s));
    EXPECT_EQ(f.parsed.taken, (Strings{"", "hello", "!?"}));
    EXPECT_EQ(f.held(), 0u);
    EXPECT_FALSE(f.parsed.error);
}

TEST(Framing, U16FramesBigEndian) {
    EVMUX_LOOP_OR_SKIP(loop);
    Feed f(loop, frames(Prefix::u16_be, 65535));
    const std::string big(0x0102, 'b');
    ASSERT_TRUE(f.feed("\x01\x02"s + big + "\0\0"s + "\0\x01z"s));
    EXPECT_EQ(f.parsed.taken, (Strings{big, "", "z"}));
}

TEST(Framing, FrameExactlyAtTheLimitIsTaken) {
    EVMUX_LOOP_OR_SKIP(loop);
    Feed f(loop, frames(Prefix::u16_be, 3));
    ASSERT_TRUE(
        f.feed("\0\x03"
               "abc"s));
    EXPECT_EQ(f.parsed.taken, Strings{"abc"});
    EXPECT_FALSE(f.parsed.error);
}

TEST(Framing, FrameOverTheLimitFailsAtItsPrefix) {
    EVMUX_LOOP_OR_SKIP(loop);
    for (Prefix prefix : {Prefix::u16_be, Prefix::u32_be}) {
        Feed f(loop, frames(prefix, 1000));
        ASSERT_TRUE(f.feed(frame(prefix, "ok")));
        const std::size_t prefix_len = prefix == Prefix::u16_be ? 2 : 4;
        const std::string head = frame(prefix, std::string(1001, 'x')).substr(0, prefix_len);
        ASSERT_TRUE(f.feed(head.substr(0, head.size() - 1)));
        EXPECT_FALSE(f.parsed.error) << "an incomplete prefix announces nothing yet";
        ASSERT_TRUE(f.feed(head.substr(head.size() - 1)));
        ASSERT_TRUE(f.parsed.error) << "the prefix alone proves the frame too large";
        EXPECT_EQ(f.parsed.taken, Strings{"ok"});
        EXPECT_EQ(f.parsed.error->kind(), FrameError::Kind::frame_too_large);
        EXPECT_EQ(f.parsed.error->size(), 1001u);
        EXPECT_EQ(f.parsed.error->limit(), 1000u);
        EXPECT_EQ(f.held(), head.size()) << "the error consumes nothing";
        EXPECT_EQ(f.parsed.error->what(), "evmux: frame of 1001 bytes over the limit of 1000 ("s +
                                              (prefix == Prefix::u16_be ? "u16_be" : "u32_be") +
                                              " length prefix)");
    }
}

TEST(Framing, LargestU32PrefixIsAnErrorNotAnOverflow) {
    EVMUX_LOOP_OR_SKIP(loop);
    Feed f(loop, frames(Prefix::u32_be, 1 << 20));
    ASSERT_TRUE(f.feed("\xff\xff\xff\xff"));
    ASSERT_TRUE(f.parsed.error);
    EXPECT_EQ(f.parsed.error->size(), 0xffffffffu);
}

TEST(Framing, FrameWritesTheBigEndianPrefix) {
    EXPECT_EQ(frame(Prefix::u32_be, "abc"),
              "\0\0\0\x03"
              "abc"s);
    EXPECT_EQ(frame(Prefix::u16_be, ""), "\0\0"s);
    EXPECT_EQ(frame(Prefix::u16_be, std::string(0x0102, 'x')).substr(0, 2), "\x01\x02");
    EXPECT_EQ(frame(Prefix::u32_be, std::string(0x010203, 'x')).substr(0, 4), "\0\x01\x02\x03"s);
    EXPECT_EQ(frame(Prefix::u16_be, std::string(65535, 'x')).size(), 65537u);
    std::string batch;
    append_frame(batch, Prefix::u16_be, "a");
    append_frame(batch, Prefix::u16_be, "");
    append_frame(batch, Prefix::u16_be, "bc");
    EXPECT_EQ(batch,
              "\0\x01"
              "a"
              "\0\0"
              "\0\x02"
              "bc"s);
}

TEST(Framing, FrameTooLongForItsPrefixIsALengthError) {
    try {
        frame(Prefix::u16_be, std::string(65536, 'x'));
        FAIL() << "no exception";
    } catch (const std::length_error& e) {
        EXPECT_STREQ(e.what(),
                     "evmux::frame: a payload of 65536 bytes does not fit a u16_be length prefix "
                     "(at most 65535)");
    }
    std::string out = "kept";
    EXPECT_THROW(append_frame(out, Prefix::u16_be, std::string(70000, 'x')), std::length_error);
    EXPECT_EQ(out, "kept") << "nothing appended";
}

// ---- a Buffer of one's own -------------------------------------------------------

TEST(Framing, OwnBufferFedByteByByte) {
    // A parser tested without a socket: the bytes fed one at a time, lines and
    // frames taken as they complete, the partial rest kept.
    Buffer b;
    std::vector<std::string> lines;
    for (char c : "one\r\ntwo\nthree"sv) {
        b.append(&c, 1);
        while (auto line = b.take_line(8, LineEnd::lf_or_crlf)) lines.emplace_back(*line);
    }
    EXPECT_EQ(lines, (Strings{"one", "two"}));
    EXPECT_EQ(b.view(), "three");

    Buffer f;
    f.append(frame(Prefix::u16_be, "ab") + frame(Prefix::u16_be, "") + "\0"s);
    EXPECT_EQ(f.take_frame(Prefix::u16_be, 16), "ab");
    EXPECT_EQ(f.take_frame(Prefix::u16_be, 16), "");
    EXPECT_EQ(f.take_frame(Prefix::u16_be, 16), std::nullopt);
    f.append("\x03xyz"sv);
    EXPECT_EQ(f.take_frame(Prefix::u16_be, 16), "xyz");
    EXPECT_TRUE(f.empty());
}

TEST(Framing, OwnBufferFedForeverStaysSmall) {
    // Fed and drained in a loop with a partial frame always held: the consumed
    // prefix is dropped when the storage would grow, so it never creeps.
    Buffer b;
    const std::string msg = frame(Prefix::u32_be, std::string(100, 'x'));
    for (int i = 0; i < 10000; ++i) {
        b.append(msg.data(), 60);  // a message in two halves: a partial one is held
        while (b.take_frame(Prefix::u32_be, 1000)) {
        }
        b.append(msg.data() + 60, msg.size() - 60);
        while (b.take_frame(Prefix::u32_be, 1000)) {
        }
    }
    EXPECT_TRUE(b.empty());
    EXPECT_LE(b.capacity(), 2 * msg.size());
}

TEST(Framing, OwnBufferLineTooLongLeavesItAsItWas) {
    Buffer b;
    b.append("0123456789"sv);
    EXPECT_THROW(b.take_line(4), FrameError);
    EXPECT_EQ(b.view(), "0123456789") << "nothing consumed";
}

// ---- a server ------------------------------------------------------------------

std::string upper(std::string_view s) {
    std::string out(s);
    for (char& c : out) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return out;
}

/// A TcpServer on `loop` that answers each line (or frame) with it in upper
/// case, and a peer that breaks the framing with "ERR <what>" (a line, or a
/// frame) and a graceful close.
class UpperServer {
  public:
    enum class Mode { lines, frames_u16, frames_u32 };

    UpperServer(EventLoop& loop, Mode mode, std::size_t limit) : mode_(mode), limit_(limit) {
        Callbacks cb;
        cb.on_message = [this](const ConnectionPtr& c, Buffer& in) {
            try {
                while (auto item = take(in)) c->send(reply(upper(*item)));
            } catch (const FrameError& e) {
                errors.emplace_back(e.what());
                c->send(reply("ERR "s + e.what()));
                c->close(CloseMode::graceful);
            }
        };
        cb.on_close = [this](const ConnectionPtr&, CloseReason why, int) {
            reasons.push_back(why);
        };
        server_.emplace(loop, Address::ip("127.0.0.1", 0), std::move(cb));
    }

    const TcpServer& server() const { return *server_; }
    std::string reply(std::string_view s) const {
        switch (mode_) {
            case Mode::lines:
                return std::string(s) + "\n";
            case Mode::frames_u16:
                return frame(Prefix::u16_be, s);
            case Mode::frames_u32:
                break;
        }
        return frame(Prefix::u32_be, s);
    }

    std::vector<std::string> errors;
    std::vector<CloseReason> reasons;

  private:
    std::optional<std::string_view> take(Buffer& in) const {
        switch (mode_) {
            case Mode::lines:
                return in.take_line(limit_, LineEnd::lf_or_crlf);
            case Mode::frames_u16:
                return in.take_frame(Prefix::u16_be, limit_);
            case Mode::frames_u32:
                break;
        }
        return in.take_frame(Prefix::u32_be, limit_);
    }

    Mode mode_;
    std::size_t limit_;
    std::optional<TcpServer> server_;
};

/// A non-blocking TCP client on the test thread: pump() writes what is
/// pending in `out` and reads what arrived into `got`.
struct Client {
    Fd fd;
    std::string out;
    std::string got;
    bool eof = false;

    explicit Client(const Address& a) : fd(::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0)) {
        if (!fd) throw std::system_error(errno, std::generic_category(), "socket");
        if (::connect(fd.get(), static_cast<const sockaddr*>(a.sockaddr_ptr()), a.sockaddr_len()))
            throw std::system_error(errno, std::generic_category(), "connect");
        int one = 1;
        ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        ::fcntl(fd.get(), F_SETFL, O_NONBLOCK);
    }
    void pump() {
        while (!out.empty()) {
            ssize_t n = ::send(fd.get(), out.data(), out.size(), MSG_NOSIGNAL);
            if (n <= 0) break;
            out.erase(0, static_cast<std::size_t>(n));
        }
        char buf[65536];
        for (;;) {
            ssize_t n = ::recv(fd.get(), buf, sizeof buf, 0);
            if (n <= 0) {
                eof = eof || n == 0;
                return;
            }
            got.append(buf, static_cast<std::size_t>(n));
        }
    }
};

/// Run `loop`, pumping `clients`, until `done()` (false after 10 s).
template <class Done>
bool serve_until(EventLoop& loop, std::initializer_list<Client*> clients, Done done) {
    return run_until(loop, [&] {
        for (Client* c : clients) c->pump();
        return done();
    });
}

/// `n` requests of varied sizes up to `most` bytes, some of them empty.
std::vector<std::string> requests(int n, std::size_t most, unsigned seed) {
    std::vector<std::string> out;
    for (int i = 0; i < n; ++i) {
        std::string s = "r";  // appended: GCC 12's false -Wrestrict on "r" + ... at -O3
        s += std::to_string(i) + ":";
        const std::size_t len = (static_cast<std::size_t>(i) * 7919 + seed) % (most + 1);
        if (len > s.size()) s.resize(len, 'q');
        out.push_back(i % 17 == 5 ? "" : s);
    }
    return out;
}

/// The items encoded as `srv` reads them (lines end in LF, or CRLF if `crlf`).
std::string encode(const UpperServer& srv, const std::vector<std::string>& items,
                   bool crlf = false) {
    std::string out;
    for (const std::string& it : items) {
        out += srv.reply(it);
        if (crlf && out.back() == '\n') out.insert(out.size() - 1, "\r");
    }
    return out;
}

/// The replies `srv` sends to the items.
std::string replies(const UpperServer& srv, const std::vector<std::string>& items) {
    std::string out;
    for (const std::string& it : items) out += srv.reply(upper(it));
    return out;
}

class FramedServer : public testing::TestWithParam<UpperServer::Mode> {};

TEST_P(FramedServer, ByteByByteAndInBigBatches) {
    EVMUX_LOOP_OR_SKIP(loop);
    const bool lines = GetParam() == UpperServer::Mode::lines;
    UpperServer srv(loop, GetParam(), 300);
    Client slow(srv.server().local_address()), bulk(srv.server().local_address());
    const auto few = requests(12, 40, 1), many = requests(5000, 300, 2);
    // The slow client's requests one byte at a time, each byte read by the
    // server before the next is sent (its lines end in CRLF: a CR and its LF
    // always in different reads). Halfway, with a partial item of the slow
    // one held, the bulk client's requests in one go: the server reads them
    // in pieces of up to 64 KiB, items split anywhere.
    const std::string slow_in = encode(srv, few, lines);
    const std::string slow_want = replies(srv, few), bulk_want = replies(srv, many);
    for (std::size_t i = 0; i < slow_in.size(); ++i) {
        if (i == slow_in.size() / 2) {
            bulk.out = encode(srv, many);
            ASSERT_TRUE(serve_until(loop, {&slow, &bulk},
                                    [&] { return bulk.got.size() >= bulk_want.size(); }));
        }
        const std::uint64_t want = srv.server().stats().bytes_in + 1;
        slow.out.assign(1, slow_in[i]);
        ASSERT_TRUE(serve_until(loop, {&slow, &bulk},
                                [&] { return srv.server().stats().bytes_in >= want; }));
    }
    ASSERT_TRUE(
        serve_until(loop, {&slow, &bulk}, [&] { return slow.got.size() >= slow_want.size(); }));
    EXPECT_TRUE(slow.got == slow_want);
    EXPECT_TRUE(bulk.got == bulk_want) << bulk.got.size() << " of " << bulk_want.size() << " bytes";
    EXPECT_TRUE(srv.errors.empty());
    EXPECT_EQ(srv.server().connections_now(), 2u);
}

TEST_P(FramedServer, OversizeClosesOnlyThatConnection) {
    EVMUX_LOOP_OR_SKIP(loop);
    const bool lines = GetParam() == UpperServer::Mode::lines;
    UpperServer srv(loop, GetParam(), 300);
    Client good(srv.server().local_address()), bad(srv.server().local_address());
    good.out = srv.reply("before");
    ASSERT_TRUE(serve_until(loop, {&good}, [&] { return good.got == srv.reply("BEFORE"); }));
    // The bad client's second item is one byte over: a line of 301 bytes
    // without its end, or only a prefix announcing 301. The server must not
    // wait for more.
    const std::string over = srv.reply(std::string(301, 'x'));
    bad.out = srv.reply("fine") + (lines ? over.substr(0, 301) : over.substr(0, over.size() - 301));
    ASSERT_TRUE(serve_until(loop, {&good, &bad}, [&] { return bad.eof; }))
        << "the bad connection is closed";
    const std::string message =
        lines ? "evmux: line longer than the limit of 300 bytes (301 bytes received, no LF or "
                "CRLF within the limit)"
              : "evmux: frame of 301 bytes over the limit of 300 ("s +
                    (GetParam() == UpperServer::Mode::frames_u16 ? "u16_be" : "u32_be") +
                    " length prefix)";
    EXPECT_EQ(srv.errors, Strings{message});
    EXPECT_EQ(bad.got, srv.reply("FINE") + srv.reply("ERR " + message))
        << "served up to the bad item, then told why";
    EXPECT_EQ(srv.reasons, std::vector<CloseReason>{CloseReason::local});
    // The other connection is still served.
    good.got.clear();
    good.out = srv.reply("after");
    ASSERT_TRUE(serve_until(loop, {&good}, [&] { return good.got == srv.reply("AFTER"); }));
    EXPECT_EQ(srv.server().connections_now(), 1u);
}

INSTANTIATE_TEST_SUITE_P(Modes, FramedServer,
                         testing::Values(UpperServer::Mode::lines, UpperServer::Mode::frames_u16,
                                         UpperServer::Mode::frames_u32),
                         [](const testing::TestParamInfo<UpperServer::Mode>& info) {
                             switch (info.param) {
                                 case UpperServer::Mode::lines:
                                     return "lines";
                                 case UpperServer::Mode::frames_u16:
                                     return "frames_u16";
                                 case UpperServer::Mode::frames_u32:
                                     break;
                             }
                             return "frames_u32";
                         });

}  // namespace
}  // namespace evmux
