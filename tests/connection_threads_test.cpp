// Connection's calls from other threads (send, shutdown_write, close,
// pause_reading, resume_reading): posted to the loop, in post order, no-ops
// once closed or once the loop is gone. The loop runs on a thread of its own
// for its whole life (made, run and destroyed there); the test thread and
// workers call the connection from outside, and the peer is a blocking
// socket read on the test thread. Run per backend and I/O mode, and under
// TSan (./run tsan).
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "test_support.hpp"

namespace evmux {
namespace {

using namespace std::chrono_literals;
using test::Fd;

// A loop made, run and destroyed on a thread of its own. call() runs `fn`
// there (posted) and waits for it; end() stops the loop and destroys it on
// its thread, closing what is still open (on_close, reason `local`).
class LoopThread {
  public:
    LoopThread() {
        // (Shared: the waiter may return, and destroy its copy, while
        // set_value() is still returning.)
        auto started = std::make_shared<std::promise<void>>();
        auto running = started->get_future();
        thread_ = std::thread([this, started] {
            std::string why;
            auto loop = std::make_unique<EventLoop>(test::selector_or_null(&why));
            loop_ = loop.get();
            loop->post([started] { started->set_value(); });  // run() has claimed the loop
            loop->run();
            released_.get_future().wait();  // stop() has returned: no one touches the loop
            loop.reset();
        });
        running.wait();
    }
    ~LoopThread() { end(); }
    LoopThread(const LoopThread&) = delete;
    LoopThread& operator=(const LoopThread&) = delete;

    EventLoop& loop() { return *loop_; }
    void call(std::function<void()> fn) {
        auto done = std::make_shared<std::promise<void>>();
        auto finished = done->get_future();
        loop_->post([&fn, done] {
            fn();
            done->set_value();
        });
        finished.wait();
    }
    void end() {
        if (!thread_.joinable()) return;
        loop_->stop();
        released_.set_value();
        thread_.join();
        loop_ = nullptr;
    }

  private:
    EventLoop* loop_ = nullptr;
    std::promise<void> released_;
    std::thread thread_;
};

// A connected Unix stream pair: {the connection's end, the peer's end,
// blocking, with 10 s timeouts so that a lost byte fails instead of hanging}.
std::pair<Fd, Fd> pair_with_blocking_peer() {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
        throw std::system_error(errno, std::generic_category(), "socketpair");
    timeval tv{10, 0};
    ::setsockopt(sv[1], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(sv[1], SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return {Fd(sv[0]), Fd(sv[1])};
}

// Everything the peer reads until EOF (or the timeout, an error, `limit`).
std::string read_to_eof(int fd, std::size_t limit = std::size_t(-1)) {
    std::string got;
    char buf[65536];
    while (got.size() < limit) {
        const ssize_t n = ::read(fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got.append(buf, static_cast<std::size_t>(n));
    }
    return got;
}

struct Closes {
    std::atomic<int> count{0};
    std::atomic<CloseReason> reason{CloseReason::peer_closed};
};

// Adopt `fd` on the loop's thread; on_close counted into `closes`.
ConnectionPtr adopt_there(LoopThread& lt, Fd& fd, Callbacks cb, Closes& closes) {
    cb.on_close = [&closes](const ConnectionPtr&, CloseReason reason, int) {
        closes.reason = reason;
        ++closes.count;
    };
    ConnectionPtr conn;
    lt.call([&] { conn = Connection::adopt(lt.loop(), fd.release(), std::move(cb)); });
    return conn;
}

// Message `seq` of thread `t`: "<t> <seq> <len>:" then len bytes that depend
// on both, then '\n'; lengths from 1 to ~6 KB, so that the queue fills and
// partial writes happen while other threads go on sending.
std::string message(int t, int seq) {
    const std::size_t len = 1 + static_cast<std::size_t>((seq * 977 + t * 131) % 6000);
    char head[48];
    std::snprintf(head, sizeof head, "%d %d %zu:", t, seq, len);
    return head + test::pattern(len, static_cast<unsigned>(t * 100000 + seq)) + "\n";
}

TEST(ConnectionThreads, SendsFromManyThreadsArriveWholeAndInEachThreadsOrder) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    probe.reset();
    auto [mine, peer] = pair_with_blocking_peer();
    LoopThread lt;
    Closes closes;
    ConnectionPtr conn = adopt_there(lt, mine, Callbacks{}, closes);

    constexpr int threads = 4, per_thread = 400;
    std::size_t expected = 0;
    for (int t = 0; t < threads; ++t)
        for (int seq = 0; seq < per_thread; ++seq) expected += message(t, seq).size();

    std::atomic<bool> go{false};
    std::vector<std::thread> senders;
    for (int t = 0; t < threads; ++t)
        senders.emplace_back([&, t] {
            while (!go.load()) std::this_thread::yield();
            for (int seq = 0; seq < per_thread; ++seq) {
                std::string m = message(t, seq);
                switch (seq % 3) {  // every overload
                    case 0:
                        conn->send(m.data(), m.size());
                        break;
                    case 1:
                        conn->send(std::string_view(m));
                        break;
                    default:
                        conn->send(std::move(m));
                        break;
                }
            }
        });
    // The peer reads only once half the senders are done: the socket buffer
    // fills, the connection queues most of the bytes (as many threads send
    // at once), then writes them as the peer reads while the rest still come.
    go = true;
    for (int t = 0; t < threads / 2; ++t) senders[t].join();
    const std::string got = read_to_eof(peer.get(), expected);
    for (int t = threads / 2; t < threads; ++t) senders[t].join();
    ASSERT_EQ(got.size(), expected)
        << "closes " << closes.count.load() << ", reason " << to_string(closes.reason.load());

    // Each message whole, each thread's in order.
    std::map<int, int> next;
    std::size_t at = 0;
    int messages = 0;
    while (at < got.size()) {
        int t = -1, seq = -1;
        std::size_t len = 0;
        int used = 0;
        ASSERT_EQ(std::sscanf(got.c_str() + at, "%d %d %zu:%n", &t, &seq, &len, &used), 3)
            << "at byte " << at;
        ASSERT_TRUE(t >= 0 && t < threads) << "at byte " << at;
        ASSERT_EQ(seq, next[t]) << "thread " << t << "'s messages out of order";
        const std::string want = message(t, seq);
        ASSERT_EQ(got.compare(at, want.size(), want), 0)
            << "thread " << t << "'s message " << seq << " not whole at byte " << at;
        at += want.size();
        ++next[t];
        ++messages;
    }
    EXPECT_EQ(messages, threads * per_thread);
    EXPECT_EQ(closes.count.load(), 0);
    lt.end();
    EXPECT_EQ(closes.count.load(), 1);  // the loop's destruction closed it
}

TEST(ConnectionThreads, GracefulCloseFromAnotherThreadSendsWhatWasSentBeforeAndClosesOnce) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    probe.reset();
    auto [mine, peer] = pair_with_blocking_peer();
    LoopThread lt;
    Closes closes;
    ConnectionPtr conn = adopt_there(lt, mine, Callbacks{}, closes);

    const std::string big = test::pattern(1 << 20);  // more than the socket takes at once
    std::thread worker([&] {
        conn->send(big);
        conn->close(CloseMode::graceful);
        conn->close(CloseMode::graceful);  // closing already: a no-op
        conn->send("after close");         // a no-op too
    });
    const std::string got = read_to_eof(peer.get());
    worker.join();
    EXPECT_EQ(got.size(), big.size());
    EXPECT_TRUE(got == big);
    lt.call([] {});  // on_close is posted after the close: it has run by now
    EXPECT_EQ(closes.count.load(), 1);
    EXPECT_EQ(closes.reason.load(), CloseReason::local);
    lt.end();
    EXPECT_EQ(closes.count.load(), 1);
}

TEST(ConnectionThreads, ImmediateCloseFromTwoThreadsClosesOnce) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    probe.reset();
    auto [mine, peer] = pair_with_blocking_peer();
    LoopThread lt;
    Closes closes;
    ConnectionPtr conn = adopt_there(lt, mine, Callbacks{}, closes);
    std::thread a([&] { conn->close(); });
    std::thread b([&] { conn->close(); });
    a.join();
    b.join();
    EXPECT_EQ(read_to_eof(peer.get()), "");  // EOF
    lt.call([] {});
    EXPECT_EQ(closes.count.load(), 1);
    EXPECT_EQ(closes.reason.load(), CloseReason::local);
    lt.end();
    EXPECT_EQ(closes.count.load(), 1);
}

TEST(ConnectionThreads, ShutdownWriteFromAnotherThreadSendsFinAndKeepsReading) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    probe.reset();
    auto [mine, peer] = pair_with_blocking_peer();
    LoopThread lt;
    Closes closes;
    auto heard = std::make_shared<std::promise<std::string>>();
    auto f = heard->get_future();
    Callbacks cb;
    cb.on_message = [heard](const ConnectionPtr&, Buffer& in) { heard->set_value(in.take_all()); };
    ConnectionPtr conn = adopt_there(lt, mine, std::move(cb), closes);
    std::thread worker([&] {
        conn->send("last words");
        conn->shutdown_write();
        conn->send("too late");  // after shutdown_write(): a no-op
    });
    worker.join();
    EXPECT_EQ(read_to_eof(peer.get()), "last words");  // then FIN
    // Still open, still reading.
    ASSERT_EQ(::write(peer.get(), "ping", 4), 4);
    ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
    EXPECT_EQ(f.get(), "ping");
    EXPECT_EQ(closes.count.load(), 0);
    // Both sides shut: the connection closes (it reads the FIN's state then).
    ::shutdown(peer.get(), SHUT_WR);
    for (int i = 0; i < 1000 && closes.count.load() == 0; ++i) std::this_thread::sleep_for(10ms);
    EXPECT_EQ(closes.count.load(), 1);
    EXPECT_EQ(closes.reason.load(), CloseReason::peer_closed);
    lt.end();
    EXPECT_EQ(closes.count.load(), 1);
}

TEST(ConnectionThreads, PauseAndResumeReadingFromAnotherThread) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    probe.reset();
    auto [mine, peer] = pair_with_blocking_peer();
    LoopThread lt;
    Closes closes;
    std::atomic<std::size_t> heard{0};
    Callbacks cb;
    cb.on_message = [&heard](const ConnectionPtr&, Buffer& in) {
        heard += in.size();
        in.consume_all();
    };
    ConnectionPtr conn = adopt_there(lt, mine, std::move(cb), closes);
    std::thread([&] { conn->pause_reading(); }).join();
    lt.call([] {});  // posted after the pause: it has been applied
    ASSERT_EQ(::write(peer.get(), "abc", 3), 3);
    std::this_thread::sleep_for(100ms);
    EXPECT_EQ(heard.load(), 0u) << "read while paused";
    std::thread([&] { conn->resume_reading(); }).join();
    for (int i = 0; i < 1000 && heard.load() < 3; ++i) std::this_thread::sleep_for(10ms);
    EXPECT_EQ(heard.load(), 3u);
    lt.end();
    EXPECT_EQ(closes.count.load(), 1);
}

TEST(ConnectionThreads, CallsAfterTheCloseAndAfterTheLoopIsGoneAreNoOps) {
    EVMUX_SELECTOR_OR_SKIP(probe);
    probe.reset();
    auto [mine, peer] = pair_with_blocking_peer();
    Closes closes;
    ConnectionPtr conn;
    {
        LoopThread lt;
        conn = adopt_there(lt, mine, Callbacks{}, closes);
        peer.reset();  // the peer goes: the connection closes
        for (int i = 0; i < 1000 && closes.count.load() == 0; ++i)
            std::this_thread::sleep_for(10ms);
        ASSERT_EQ(closes.count.load(), 1);
        std::thread([&] {
            conn->send("to no one");
            conn->pause_reading();
            conn->close();
        }).join();
        lt.call([] {});
    }
    // The loop is destroyed; `conn` outlives it. Every call is a no-op and
    // touches nothing of the loop's.
    for (int round = 0; round < 2; ++round) {
        std::thread([&] {
            conn->send("to no one");
            conn->send(std::string(100, 'x'));
            conn->shutdown_write();
            conn->pause_reading();
            conn->resume_reading();
            conn->close(CloseMode::graceful);
        }).join();
    }
    EXPECT_EQ(closes.count.load(), 1);
}

}  // namespace
}  // namespace evmux
