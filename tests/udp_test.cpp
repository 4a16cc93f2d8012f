// UdpEndpoint on real loopback UDP (IPv4 and IPv6) and Unix datagram
// sockets, run once per backend (EVMUX_BACKEND). Everything runs on the test
// thread, the loop pumped with run_once, so batches are under exact control.
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "evmux/address.hpp"
#include "evmux/datagram.hpp"
#include "evmux/event_loop.hpp"
#include "test_support.hpp"

namespace evmux {
namespace {

using namespace std::chrono_literals;
using test::Fd;
using test::run_until;

using test::pattern;

/// A plain non-blocking datagram socket of `family`, bound to `local` if given.
Fd raw_socket(int family, const Address* local = nullptr) {
    Fd fd(::socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd) throw std::system_error(errno, std::generic_category(), "socket");
    if (local != nullptr && ::bind(fd.get(), static_cast<const sockaddr*>(local->sockaddr_ptr()),
                                   local->sockaddr_len()) < 0)
        throw std::system_error(errno, std::generic_category(), "bind");
    return fd;
}

void raw_send(int fd, const Address& to, std::string_view data) {
    ssize_t n = ::sendto(fd, data.data(), data.size(), 0,
                         static_cast<const sockaddr*>(to.sockaddr_ptr()), to.sockaddr_len());
    ASSERT_EQ(n, static_cast<ssize_t>(data.size())) << std::strerror(errno);
}

/// An endpoint on `at` that sends every datagram back to its sender.
UdpEndpointPtr echo_endpoint(EventLoop& loop, const Address& at, UdpOptions options = {}) {
    UdpCallbacks cb;
    cb.on_datagram = [](UdpEndpoint& ep, std::string_view data, const Address& from) {
        ep.send_to(from, data);
    };
    return UdpEndpoint::bind(loop, at, std::move(cb), options);
}

/// A connected client that keeps what comes back.
UdpEndpointPtr collecting_client(EventLoop& loop, const Address& server,
                                 std::vector<std::string>& got) {
    UdpCallbacks cb;
    cb.on_datagram = [&got](UdpEndpoint&, std::string_view data, const Address&) {
        got.emplace_back(data);
    };
    return UdpEndpoint::connect(loop, server, std::move(cb));
}

/// Every size in `sizes` to the echo server and back, byte for byte.
void echo_sizes(EventLoop& loop, const Address& at, const std::vector<std::size_t>& sizes) {
    auto server = echo_endpoint(loop, at);
    std::vector<std::string> got;
    auto client = collecting_client(loop, server->local_address(), got);
    for (std::size_t i = 0; i < sizes.size(); ++i) {
        const std::string payload = pattern(sizes[i], static_cast<unsigned>(i));
        ASSERT_TRUE(client->send(payload)) << sizes[i];
        ASSERT_TRUE(run_until(loop, [&] { return got.size() == i + 1; })) << "size " << sizes[i];
        ASSERT_EQ(got[i].size(), sizes[i]);
        EXPECT_TRUE(got[i] == payload) << "size " << sizes[i] << " differs";
    }
    EXPECT_EQ(server->stats().received, sizes.size());
    EXPECT_EQ(server->stats().sent, sizes.size());
    EXPECT_EQ(client->stats().received, sizes.size());
    EXPECT_EQ(server->stats().truncated, 0u);
    EXPECT_EQ(server->stats().dropped, 0u);
    EXPECT_EQ(server->stats().errors, 0u);
    server->close();
    client->close();
}

// ---- round trips ----------------------------------------------------------------

TEST(Udp, EchoEverySizeUpToTheIpv4MaximumByteForByte) {
    EVMUX_LOOP_OR_SKIP(loop);
    echo_sizes(loop, Address::parse("127.0.0.1:0"),
               {0, 1, 2, 100, 1471, 1472, 1473, 8192, 65506, 65507});
}

TEST(Udp, EchoEverySizeUpToTheIpv6MaximumByteForByte) {
    EVMUX_LOOP_OR_SKIP(loop);
    echo_sizes(loop, Address::parse("[::1]:0"), {0, 1, 1232, 1233, 1452, 1453, 65527});
}

TEST(Udp, SenderAddressIsTheClientsOwnV4AndV6) {
    EVMUX_LOOP_OR_SKIP(loop);
    for (const char* host : {"127.0.0.1:0", "[::1]:0"}) {
        std::vector<Address> senders;
        UdpCallbacks cb;
        cb.on_datagram = [&](UdpEndpoint&, std::string_view, const Address& from) {
            senders.push_back(from);
        };
        auto server = UdpEndpoint::bind(loop, Address::parse(host), std::move(cb));
        auto client = UdpEndpoint::connect(loop, server->local_address(), {});
        EXPECT_TRUE(client->is_connected());
        EXPECT_FALSE(server->is_connected());
        EXPECT_EQ(client->peer_address(), server->local_address());
        client->send("who");
        ASSERT_TRUE(run_until(loop, [&] { return senders.size() == 1; }));
        EXPECT_EQ(senders[0], client->local_address()) << senders[0].to_string();
        server->close();
        client->close();
    }
}

TEST(Udp, DatagramsOverTheMaximumAreTheCallersMistake) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto v4 = UdpEndpoint::bind(loop, Address::parse("127.0.0.1:0"), {});
    auto to = v4->local_address();
    try {
        v4->send_to(to, std::string(65508, 'x'));
        FAIL() << "no exception";
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code().value(), EMSGSIZE);
        EXPECT_EQ(std::string(e.what()), "sendto " + to.to_string() + ": Message too long");
    }
    // An IPv6 address on an IPv4 socket.
    EXPECT_THROW(v4->send_to(Address::parse("[::1]:9"), "x"), std::system_error);
    // send() needs a connected endpoint.
    EXPECT_THROW(v4->send("x"), std::logic_error);
    EXPECT_EQ(v4->stats().sent, 0u);
    EXPECT_TRUE(v4->is_open());
    v4->close();
}

// Address() is the caller's mistake, not the kernel's: it was handed to
// sendto() (std::system_error, EDESTADDRREQ or EINVAL), and with a queue
// formed on a connected endpoint it was queued and went to the peer.
TEST(Udp, SendToNoAddressIsTheCallersMistake) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto v4 = UdpEndpoint::bind(loop, Address::parse("127.0.0.1:0"), {});
    try {
        v4->send_to(Address(), "x");
        FAIL() << "no exception";
    } catch (const std::invalid_argument& e) {
        EXPECT_EQ(std::string(e.what()), "evmux::UdpEndpoint::send_to: no address (Address())");
    } catch (const std::exception& e) {
        FAIL() << "not invalid_argument: " << e.what();
    }
    EXPECT_EQ(v4->stats().sent, 0u);
    EXPECT_EQ(v4->stats().errors, 0u);
    EXPECT_TRUE(v4->is_open());
    v4->close();

    // A connected endpoint with datagrams queued (a Unix pair whose reader
    // does not read): refused all the same, nothing queued for the peer.
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    Fd reader(sv[1]);
    auto ep = UdpEndpoint::adopt(loop, sv[0], {});
    while (ep->queued_datagrams() == 0) ASSERT_TRUE(ep->send(std::string(1000, 'q')));
    const std::size_t queued = ep->queued_datagrams();
    EXPECT_THROW(ep->send_to(Address(), "x"), std::invalid_argument);
    EXPECT_EQ(ep->queued_datagrams(), queued);
    ep->close();
}

// ---- truncation ----------------------------------------------------------------

TEST(Udp, LongerThanMaxDatagramIsCountedAndNotDelivered) {
    EVMUX_LOOP_OR_SKIP(loop);
    UdpOptions small;
    small.max_datagram = 100;
    std::vector<std::string> got;
    UdpCallbacks cb;
    cb.on_datagram = [&](UdpEndpoint&, std::string_view data, const Address&) {
        got.emplace_back(data);
    };
    auto server = UdpEndpoint::bind(loop, Address::parse("127.0.0.1:0"), std::move(cb), small);
    Fd client = raw_socket(AF_INET);
    const std::vector<std::size_t> sizes = {50, 100, 101, 1000, 65507, 7};
    for (std::size_t n : sizes) raw_send(client.get(), server->local_address(), pattern(n, 3));
    ASSERT_TRUE(run_until(loop, [&] { return server->stats().received == 3; }));
    loop.run_once(20ms);  // nothing more comes
    ASSERT_EQ(got.size(), 3u);
    EXPECT_EQ(got[0], pattern(50, 3));
    EXPECT_EQ(got[1], pattern(100, 3));
    EXPECT_EQ(got[2], pattern(7, 3));
    EXPECT_EQ(server->stats().truncated, 3u);
    EXPECT_EQ(server->stats().bytes_received, 157u);
}

// ---- ICMP errors ------------------------------------------------------------------

TEST(Udp, ConnectedToAClosedPortReportsConnRefusedAndStaysUsable) {
    EVMUX_LOOP_OR_SKIP(loop);
    Address closed;
    {
        Address any = Address::parse("127.0.0.1:0");
        Fd probe = raw_socket(AF_INET, &any);
        closed = Address::local_of(probe.get());
    }  // closed: nobody listens on that port now
    std::vector<std::error_code> errors;
    std::vector<std::string> got;
    bool in_send = false;
    UdpCallbacks cb;
    cb.on_error = [&](UdpEndpoint& ep, std::error_code ec) {
        EXPECT_FALSE(in_send) << "on_error ran inside send()";
        EXPECT_TRUE(ep.is_open());
        errors.push_back(ec);
    };
    cb.on_datagram = [&](UdpEndpoint&, std::string_view data, const Address&) {
        got.emplace_back(data);
    };
    auto client = UdpEndpoint::connect(loop, closed, std::move(cb));
    in_send = true;
    EXPECT_TRUE(client->send("anyone?"));  // the ICMP answer comes after
    // The error is reported by whichever comes first, this send or the
    // receive the error event triggers; never inside send().
    client->send("still there?");
    in_send = false;
    ASSERT_TRUE(run_until(loop, [&] { return !errors.empty(); }));
    loop.run_once(20ms);
    for (const std::error_code& ec : errors) EXPECT_EQ(ec.value(), ECONNREFUSED) << ec.message();
    EXPECT_EQ(client->stats().errors, errors.size());
    EXPECT_TRUE(client->is_open());

    // Still usable: a server appears on that port and answers.
    auto server = echo_endpoint(loop, closed);
    ASSERT_TRUE(client->send("now?"));
    ASSERT_TRUE(run_until(loop, [&] { return got.size() == 1; }));
    EXPECT_EQ(got[0], "now?");
}

// ---- batching and budget ------------------------------------------------------------

TEST(Udp, RecvmmsgReadsABatchPerCallAndTheBudgetPerWakeup) {
    EVMUX_LOOP_OR_SKIP(loop);
    UdpOptions opt;
    opt.recv_batch = 8;
    opt.read_budget = 16;
    std::size_t seen = 0;
    UdpCallbacks cb;
    cb.on_datagram = [&](UdpEndpoint&, std::string_view data, const Address&) {
        EXPECT_EQ(data, pattern(32, static_cast<unsigned>(seen)));
        ++seen;
    };
    auto server = UdpEndpoint::bind(loop, Address::parse("127.0.0.1:0"), std::move(cb), opt);
    Fd client = raw_socket(AF_INET);
    // 60 small datagrams wait in the socket before the loop looks (well
    // within the default receive buffer).
    for (unsigned i = 0; i < 60; ++i)
        raw_send(client.get(), server->local_address(), pattern(32, i));
    // One wake-up reads the budget, 16, in two recvmmsg calls of 8; the
    // rest waits for the next wake-ups (fairness with the loop's other fds).
    loop.run_once(1s);
    EXPECT_EQ(seen, 16u);
    EXPECT_EQ(server->stats().receive_calls, 2u);
    ASSERT_TRUE(run_until(loop, [&] { return seen == 60; }));
    // 16 + 16 + 16 + 12: 2 + 2 + 2 + 2 calls (the last batch, 8 then 4).
    EXPECT_EQ(server->stats().receive_calls, 8u);
    EXPECT_EQ(server->stats().received, 60u);
    EXPECT_EQ(server->stats().kernel_dropped, 0u);
}

// ---- floods -------------------------------------------------------------------------

long resident_kib() {
    FILE* f = std::fopen("/proc/self/statm", "r");
    long size = 0, resident = 0;
    if (f != nullptr) {
        if (std::fscanf(f, "%ld %ld", &size, &resident) != 2) resident = 0;
        std::fclose(f);
    }
    return resident * (::sysconf(_SC_PAGESIZE) / 1024);
}

// A client floods an echo endpoint and never reads the replies. The
// endpoint's memory stays flat: UDP on loopback never refuses a send, so the
// replies go to the kernel (which drops them at the full client socket) and
// nothing queues; what the server's own full buffer lost, the kernel counts
// (SO_RXQ_OVFL) and the endpoint reports, exactly.
TEST(Udp, FloodFromAClientThatNeverReadsIsBoundedAndItsDropsCounted) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto server = echo_endpoint(loop, Address::parse("127.0.0.1:0"));
    const Address to = server->local_address();
    Fd client = raw_socket(AF_INET);
    const long rss_before = resident_kib();
    const std::string payload = pattern(512, 1);
    std::uint64_t sent = 0;
    std::size_t most_queued = 0;
    for (int round = 0; round < 20; ++round) {
        for (int i = 0; i < 1000; ++i, ++sent) raw_send(client.get(), to, payload);
        for (int i = 0; i < 50; ++i) {
            loop.run_once(0ms);
            most_queued = std::max(most_queued, server->queued_datagrams());
        }
    }
    for (int i = 0; i < 2000 && loop.run_once(50ms) != 0; ++i) {
    }  // until 50 ms pass with nothing to read
    // Drops after the last datagram queued are learnt from the next one.
    raw_send(client.get(), to, "last");
    ++sent;
    ASSERT_TRUE(run_until(
        loop, [&] { return server->stats().received + server->stats().kernel_dropped == sent; }))
        << "received " << server->stats().received << " kernel_dropped "
        << server->stats().kernel_dropped << " of " << sent;
    EXPECT_GT(server->stats().kernel_dropped, 0u) << "the flood did not overflow the buffer";
    EXPECT_EQ(server->stats().sent, server->stats().received);
    EXPECT_EQ(most_queued, 0u);
    EXPECT_EQ(server->stats().dropped, 0u);
    EXPECT_LT(resident_kib() - rss_before, 4 * 1024) << "KiB grown";
}

// A queue only forms where the kernel refuses: a Unix datagram socket whose
// peer does not read (its send buffer fills). The queue stops at
// max_queued_bytes, the rest is dropped and counted, and once the peer
// reads, the queue drains with sendmmsg, in order, byte for byte.
TEST(Udp, SendQueueIsBoundedAndDrainsInOrderWithSendmmsg) {
    EVMUX_LOOP_OR_SKIP(loop);
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    Fd reader(sv[1]);
    UdpOptions opt;
    opt.max_queued_bytes = 64 * 1024;
    auto ep = UdpEndpoint::adopt(loop, sv[0], {}, opt);
    EXPECT_TRUE(ep->is_connected());
    auto numbered = [](unsigned i) {
        std::string s = pattern(1000, i);
        std::memcpy(s.data(), &i, sizeof i);
        return s;
    };
    std::vector<unsigned> accepted;
    std::size_t most_queued_bytes = 0;
    for (unsigned i = 0; i < 3000; ++i) {
        if (ep->send(numbered(i))) accepted.push_back(i);
        most_queued_bytes = std::max(most_queued_bytes, ep->queued_bytes());
    }
    EXPECT_LE(most_queued_bytes, opt.max_queued_bytes);
    EXPECT_EQ(ep->queued_datagrams(), 65u);  // 65 x 1000 B fit in 64 KiB
    EXPECT_EQ(ep->stats().dropped, 3000u - accepted.size());
    EXPECT_GT(ep->stats().dropped, 0u);
    EXPECT_EQ(loop.interest(ep->fd()), Events::read | Events::write);

    std::vector<unsigned> got;
    char buf[2048];
    ASSERT_TRUE(run_until(loop, [&] {
        for (;;) {
            ssize_t n = ::recv(reader.get(), buf, sizeof buf, 0);
            if (n < 0) break;
            EXPECT_EQ(n, 1000);
            unsigned i;
            std::memcpy(&i, buf, sizeof i);
            EXPECT_EQ(std::string(buf, static_cast<std::size_t>(n)), numbered(i));
            got.push_back(i);
        }
        return got.size() == accepted.size();
    }));
    EXPECT_EQ(got, accepted);
    EXPECT_EQ(ep->queued_datagrams(), 0u);
    EXPECT_EQ(ep->queued_bytes(), 0u);
    EXPECT_EQ(loop.interest(ep->fd()), Events::read);  // write interest only while queued
    EXPECT_EQ(ep->stats().sent, accepted.size());
    // The 65 queued ones went in a few sendmmsg calls, not 65 sends.
    EXPECT_LT(ep->stats().send_calls, ep->stats().sent);
}

// An unconnected Unix datagram socket whose receiver is full gets EAGAIN yet
// polls writable: waiting for writability would spin, so the datagram is
// dropped and counted at once, and no write interest is ever taken.
TEST(Udp, UnconnectedUnixSenderToAFullReceiverDropsWithoutSpinning) {
    EVMUX_LOOP_OR_SKIP(loop);
    char dir_template[] = "/tmp/evmux-udp-XXXXXX";
    ASSERT_NE(::mkdtemp(dir_template), nullptr);
    const std::string dir = dir_template;
    const Address receiver_at = Address::unix_path(dir + "/receiver");
    {
        Fd receiver = raw_socket(AF_UNIX, &receiver_at);  // never reads
        auto ep = UdpEndpoint::bind(loop, Address::unix_path(dir + "/sender"), {});
        std::size_t accepted = 0;
        for (int i = 0; i < 3000; ++i)
            if (ep->send_to(receiver_at, pattern(100, static_cast<unsigned>(i)))) ++accepted;
        EXPECT_LT(accepted, 3000u);
        EXPECT_GT(accepted, 0u);
        EXPECT_EQ(ep->stats().sent, accepted);
        EXPECT_EQ(ep->stats().dropped, 3000u - accepted);
        EXPECT_EQ(ep->queued_datagrams(), 0u);
        EXPECT_EQ(loop.interest(ep->fd()), Events::read);
        // Nothing to do: the loop waits instead of spinning.
        EXPECT_EQ(loop.run_once(20ms), 0u);
        ep->close();
    }
    ::unlink(receiver_at.path().c_str());
    EXPECT_EQ(::rmdir(dir.c_str()), 0) << std::strerror(errno);
}

// ---- callbacks, lifetime -------------------------------------------------------------

TEST(Udp, CloseInsideOnDatagramStopsTheBatchAndFreesTheEndpoint) {
    EVMUX_LOOP_OR_SKIP(loop);
    int calls = 0;
    UdpCallbacks cb;
    cb.on_datagram = [&](UdpEndpoint& ep, std::string_view, const Address& from) {
        ++calls;
        ep.close();
        EXPECT_FALSE(ep.is_open());
        EXPECT_FALSE(ep.send_to(from, "after close"));
    };
    auto server = UdpEndpoint::bind(loop, Address::parse("127.0.0.1:0"), std::move(cb));
    std::weak_ptr<UdpEndpoint> weak = server;
    const Address to = server->local_address();
    server.reset();  // the loop holds it while open
    Fd client = raw_socket(AF_INET);
    for (int i = 0; i < 3; ++i) raw_send(client.get(), to, "x");
    ASSERT_TRUE(run_until(loop, [&] { return calls > 0; }));
    loop.run_once(20ms);
    EXPECT_EQ(calls, 1);
    EXPECT_TRUE(weak.expired()) << "the endpoint outlived its close()";
}

TEST(Udp, CloseBreaksACycleThroughTheCallbacks) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto holder = std::make_shared<UdpEndpointPtr>();
    UdpCallbacks cb;
    cb.on_datagram = [holder](UdpEndpoint&, std::string_view, const Address&) {};
    *holder = UdpEndpoint::bind(loop, Address::parse("127.0.0.1:0"), std::move(cb));
    std::weak_ptr<UdpEndpoint> weak = *holder;
    std::weak_ptr<UdpEndpointPtr> weak_holder = holder;
    holder.reset();
    weak.lock()->close();
    EXPECT_TRUE(weak.expired());
    EXPECT_TRUE(weak_holder.expired());
}

TEST(Udp, AThrowingOnDatagramEndsOnlyThatCall) {
    EVMUX_LOOP_OR_SKIP(loop);
    std::vector<std::string> errors;
    test::collect_exceptions(loop, errors);
    std::vector<std::string> got;
    UdpCallbacks cb;
    cb.on_datagram = [&](UdpEndpoint&, std::string_view data, const Address&) {
        got.emplace_back(data);
        if (data == "bad") throw std::runtime_error("bad datagram");
    };
    auto server = UdpEndpoint::bind(loop, Address::parse("127.0.0.1:0"), std::move(cb));
    Fd client = raw_socket(AF_INET);
    for (const char* s : {"a", "bad", "c"}) raw_send(client.get(), server->local_address(), s);
    ASSERT_TRUE(run_until(loop, [&] { return got.size() == 3; }));
    EXPECT_EQ(got, (std::vector<std::string>{"a", "bad", "c"}));
    EXPECT_EQ(errors, std::vector<std::string>{"bad datagram"});
    EXPECT_TRUE(server->is_open());
    raw_send(client.get(), server->local_address(), "d");
    ASSERT_TRUE(run_until(loop, [&] { return got.size() == 4; }));
}

TEST(Udp, LoopDestroyedWithOpenEndpointsClosesThem) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto loop = std::make_unique<EventLoop>(std::move(sel));
    auto ep = UdpEndpoint::bind(*loop, Address::parse("127.0.0.1:0"), {});
    std::weak_ptr<UdpEndpoint> weak_unheld =
        UdpEndpoint::connect(*loop, ep->local_address(), {});  // held by the loop only
    loop.reset();
    EXPECT_FALSE(ep->is_open());
    EXPECT_TRUE(weak_unheld.expired());
}

// ---- Unix datagram sockets, bad input ---------------------------------------------

TEST(Udp, UnixDatagramEndpointsTalkByPath) {
    EVMUX_LOOP_OR_SKIP(loop);
    char dir_template[] = "/tmp/evmux-udp-XXXXXX";
    ASSERT_NE(::mkdtemp(dir_template), nullptr);
    const std::string dir = dir_template;
    {
        auto server = echo_endpoint(loop, Address::unix_path(dir + "/server"));
        std::vector<std::string> got;
        UdpCallbacks cb;
        cb.on_datagram = [&](UdpEndpoint&, std::string_view data, const Address& from) {
            EXPECT_EQ(from, server->local_address());
            got.emplace_back(data);
        };
        auto client = UdpEndpoint::bind(loop, Address::unix_path(dir + "/client"), std::move(cb));
        const std::string big = pattern(60000, 9);
        ASSERT_TRUE(client->send_to(server->local_address(), "hello"));
        ASSERT_TRUE(client->send_to(server->local_address(), big));
        ASSERT_TRUE(run_until(loop, [&] { return got.size() == 2; }));
        EXPECT_EQ(got[0], "hello");
        EXPECT_TRUE(got[1] == big);
        server->close();
        client->close();
    }
    // close() removed the socket files: the directory is empty.
    EXPECT_EQ(::rmdir(dir.c_str()), 0) << std::strerror(errno);
}

// A second endpoint takes the path over (the file removed, bound again) while
// the first is still open: the first one's close() leaves the new file alone.
TEST(Udp, UnixSocketFileTakenOverIsNotRemovedByTheOldEndpoint) {
    EVMUX_LOOP_OR_SKIP(loop);
    char dir_template[] = "/tmp/evmux-udp-XXXXXX";
    ASSERT_NE(::mkdtemp(dir_template), nullptr);
    const std::string dir = dir_template;
    const Address at = Address::unix_path(dir + "/s");
    auto old_endpoint = UdpEndpoint::bind(loop, at, {});
    ASSERT_EQ(::unlink(at.path().c_str()), 0);
    std::vector<std::string> got;
    UdpCallbacks cb;
    cb.on_datagram = [&](UdpEndpoint&, std::string_view data, const Address&) {
        got.emplace_back(data);
    };
    auto next = UdpEndpoint::bind(loop, at, std::move(cb));
    old_endpoint->close();
    struct stat st {};
    EXPECT_EQ(::lstat(at.path().c_str(), &st), 0) << "the new endpoint's socket file was removed";
    auto sender = UdpEndpoint::bind(loop, Address::unix_path(dir + "/sender"), {});
    ASSERT_TRUE(sender->send_to(at, "still here"));
    ASSERT_TRUE(run_until(loop, [&] { return got.size() == 1; }));
    EXPECT_EQ(got[0], "still here");
    next->close();
    sender->close();
    EXPECT_EQ(::rmdir(dir.c_str()), 0) << std::strerror(errno);
}

// bind() that fails after the kernel made the socket file (here the selector
// refuses to watch the socket) removes the file: the next bind of the path
// succeeds, and no fd is left open.
TEST(Udp, AFailedBindLeavesNoSocketFile) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto refusing = std::make_unique<test::RefusingSelector>(std::move(sel));
    test::RefusingSelector* selector = refusing.get();
    EventLoop loop(std::move(refusing));
    char dir_template[] = "/tmp/evmux-udp-XXXXXX";
    ASSERT_NE(::mkdtemp(dir_template), nullptr);
    const std::string dir = dir_template;
    const Address at = Address::unix_path(dir + "/s");
    const std::size_t fds_before = test::open_fds();
    selector->refusals = 1;
    EXPECT_THROW(UdpEndpoint::bind(loop, at, {}), std::system_error);
    EXPECT_EQ(test::open_fds(), fds_before);
    struct stat st {};
    EXPECT_NE(::lstat(at.path().c_str(), &st), 0) << "the failed bind left its socket file";
    auto ep = UdpEndpoint::bind(loop, at, {});
    ep->close();
    EXPECT_EQ(::rmdir(dir.c_str()), 0) << std::strerror(errno);
}

TEST(Udp, BadInputIsAClearError) {
    EVMUX_LOOP_OR_SKIP(loop);
    auto ep = UdpEndpoint::bind(loop, Address::parse("127.0.0.1:0"), {});
    const Address taken = ep->local_address();
    try {
        UdpEndpoint::bind(loop, taken, {});
        FAIL() << "no exception";
    } catch (const std::system_error& e) {
        EXPECT_EQ(std::string(e.what()), "bind " + taken.to_string() + ": Address already in use");
    }
    EXPECT_THROW(UdpEndpoint::bind(loop, Address(), {}), std::invalid_argument);
    UdpOptions bad;
    bad.max_datagram = 0;
    EXPECT_THROW(UdpEndpoint::bind(loop, Address::parse("127.0.0.1:0"), {}, bad),
                 std::invalid_argument);
    bad = {};
    bad.recv_batch = 1025;
    EXPECT_THROW(UdpEndpoint::bind(loop, Address::parse("127.0.0.1:0"), {}, bad),
                 std::invalid_argument);
    // adopt() takes datagram sockets only (and closes what it refuses).
    int tcp = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    ASSERT_GE(tcp, 0);
    EXPECT_THROW(UdpEndpoint::adopt(loop, tcp, {}), std::invalid_argument);
    EXPECT_EQ(::fcntl(tcp, F_GETFD), -1);
}

}  // namespace
}  // namespace evmux
