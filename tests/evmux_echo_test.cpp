// evmux-echo end to end: start the binary (path in EVMUX_ECHO) on the backend
// under test, parse its "listening on" line, talk to it, stop it with SIGTERM
// and check the exit code and summary; bad command lines exit 2.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "dns_responder.hpp"
#include "evmux/address.hpp"
#include "evmux/event_loop.hpp"
#include "test_support.hpp"
#if EVMUX_TEST_TLS
#include "test_certs.hpp"
#endif

extern char** environ;

namespace evmux {
namespace {

using namespace std::chrono_literals;
using test::Fd;

std::string echo_binary() {
    const char* p = std::getenv("EVMUX_ECHO");
    return p ? p : "";
}

/// A running evmux-echo with its stderr on a pipe.
class EchoProcess {
  public:
    /// Run evmux-echo with `args`; its stderr (and stdout too if
    /// `with_stdout`) is read with line().
    explicit EchoProcess(std::vector<std::string> args, bool with_stdout = false,
                         const char* program = nullptr) {
        int p[2];
        if (::pipe2(p, O_CLOEXEC) != 0)
            throw std::system_error(errno, std::generic_category(), "pipe2");
        err_ = Fd(p[0]);
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_adddup2(&fa, p[1], 2);
        if (with_stdout)
            posix_spawn_file_actions_adddup2(&fa, p[1], 1);
        else
            posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
        args.insert(args.begin(), program != nullptr ? std::string(program) : echo_binary());
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        int rc = ::posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ);
        posix_spawn_file_actions_destroy(&fa);
        ::close(p[1]);
        if (rc != 0) throw std::system_error(rc, std::generic_category(), "posix_spawn");
    }
    ~EchoProcess() {
        if (pid_ > 0) {
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, nullptr, 0);
        }
    }
    /// Next stderr line, or "" after `limit` / EOF.
    std::string line(std::chrono::milliseconds limit = 10000ms) {
        auto deadline = std::chrono::steady_clock::now() + limit;
        for (;;) {
            if (auto nl = buf_.find('\n'); nl != std::string::npos) {
                std::string l = buf_.substr(0, nl);
                buf_.erase(0, nl + 1);
                return l;
            }
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                deadline - std::chrono::steady_clock::now());
            if (left.count() <= 0) return "";
            pollfd pfd{err_.get(), POLLIN, 0};
            if (::poll(&pfd, 1, static_cast<int>(left.count())) <= 0) return "";
            char b[4096];
            ssize_t n = ::read(err_.get(), b, sizeof b);
            if (n <= 0) return std::exchange(buf_, std::string());
            buf_.append(b, static_cast<std::size_t>(n));
        }
    }
    /// Wait (at most 10 s) for exit; the exit code, or -signal, or -1000 on timeout.
    int wait() {
        for (int i = 0; i < 1000; ++i) {
            int status = 0;
            pid_t r = ::waitpid(pid_, &status, WNOHANG);
            if (r == pid_) {
                pid_ = -1;
                return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
            }
            std::this_thread::sleep_for(10ms);
        }
        return -1000;
    }
    pid_t pid() const { return pid_; }

  private:
    pid_t pid_ = -1;
    Fd err_;
    std::string buf_;
};

class EvmuxEcho : public ::testing::Test {
  protected:
    void SetUp() override {
        if (echo_binary().empty()) GTEST_SKIP() << "EVMUX_ECHO not set";
        std::string why;
        if (!test::selector_or_null(&why)) GTEST_SKIP() << why;
    }
};

/// "evmux-echo listening on ADDR backend=NAME" -> ADDR ("" if not that form).
std::string listening_address(const std::string& line, std::string* backend) {
    const std::string head = "evmux-echo listening on ";
    if (line.rfind(head, 0) != 0) return "";
    std::string rest = line.substr(head.size());
    auto sp = rest.find(" backend=");
    if (sp == std::string::npos) return "";
    *backend = rest.substr(sp + 9);
    return rest.substr(0, sp);
}

Fd dial(const Address& a) {
    Fd fd(::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    timeval tv{5, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int rc = ::connect(fd.get(), static_cast<const sockaddr*>(a.sockaddr_ptr()), a.sockaddr_len());
    if (rc != 0 && errno == EINTR) {
        // Interrupted (with io_uring in this process, task work can do that
        // without a signal): the connect goes on; wait for its outcome.
        pollfd p{fd.get(), POLLOUT, 0};
        int err = ::poll(&p, 1, 5000) == 1 ? 0 : ETIMEDOUT;
        socklen_t len = sizeof err;
        if (err == 0) ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
        errno = err;
        rc = err == 0 ? 0 : -1;
    }
    if (rc != 0) ADD_FAILURE() << "connect " << a.to_string() << ": " << std::strerror(errno);
    return fd;
}

// Send `msg`, read as many bytes back. Blocking calls with SO_RCVTIMEO /
// SO_SNDTIMEO are not restarted after an interruption, and io_uring's task
// work in this process (the SetUp probes the backend) interrupts them now and
// then without a signal: EINTR is retried. Other failures say what happened.
std::string roundtrip(int fd, const std::string& msg) {
    std::size_t sent = 0;
    while (sent < msg.size()) {
        ssize_t n = ::send(fd, msg.data() + sent, msg.size() - sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return std::string("(send failed: ") + std::strerror(errno) + ")";
        sent += static_cast<std::size_t>(n);
    }
    std::string got;
    char b[4096];
    while (got.size() < msg.size()) {
        ssize_t n = ::recv(fd, b, sizeof b, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n == 0) return got + "(EOF)";
        if (n < 0) return got + "(recv: " + std::strerror(errno) + ")";
        got.append(b, static_cast<std::size_t>(n));
    }
    return got;
}

TEST_F(EvmuxEcho, EchoesAndStopsCleanlyOnSigterm) {
    EchoProcess echo({"--port", "0", "--backend", test::backend_name()});
    std::string backend;
    std::string addr = listening_address(echo.line(), &backend);
    ASSERT_FALSE(addr.empty());
    EXPECT_TRUE(backend.starts_with(test::backend_name())) << backend;
    Address a = Address::parse(addr);
    EXPECT_EQ(a.to_string().rfind("127.0.0.1:", 0), 0u);
    {
        Fd c1 = dial(a);
        Fd c2 = dial(a);
        EXPECT_EQ(roundtrip(c1.get(), "hello, echo"), "hello, echo");
        EXPECT_EQ(roundtrip(c2.get(), std::string(10000, 'z')), std::string(10000, 'z'));
    }
    ASSERT_EQ(::kill(echo.pid(), SIGTERM), 0);
    std::string summary = echo.line();
    EXPECT_EQ(echo.wait(), 0);
    EXPECT_NE(summary.find("connections=2"), std::string::npos) << summary;
    EXPECT_NE(summary.find("bytes_in=10011"), std::string::npos) << summary;
    EXPECT_NE(summary.find("bytes_out=10011"), std::string::npos) << summary;
}

// Its port is free again the moment evmux-echo has exited cleanly (SIGTERM),
// on every backend: with io_uring, no poll request outlives the process and
// keeps the listener alive (after SIGKILL the kernel's asynchronous teardown of
// the ring does, for a few milliseconds: README, io_uring backend). The
// re-bind sets SO_REUSEADDR as any server does: the server closed its side of
// the connection first, which leaves it in FIN_WAIT/TIME_WAIT on the port; a
// listener still in LISTEN would fail the bind even so. 50 rounds on io_uring,
// 10 on the others.
TEST_F(EvmuxEcho, PortRebindableAtOnceAfterCleanExit) {
    const int rounds = test::backend_name() == "io_uring" ? 50 : 10;
    for (int round = 0; round < rounds; ++round) {
        EchoProcess echo({"--port", "0", "--backend", test::backend_name()});
        std::string backend;
        const std::string addr = listening_address(echo.line(), &backend);
        ASSERT_FALSE(addr.empty()) << "round " << round;
        const Address a = Address::parse(addr);
        Fd client = dial(a);
        ASSERT_EQ(roundtrip(client.get(), "x"), "x") << "round " << round;
        ASSERT_EQ(::kill(echo.pid(), SIGTERM), 0);
        ASSERT_EQ(echo.wait(), 0) << "round " << round;
        Fd again(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
        const int one = 1;
        ASSERT_EQ(::setsockopt(again.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one), 0);
        ASSERT_EQ(
            ::bind(again.get(), static_cast<const sockaddr*>(a.sockaddr_ptr()), a.sockaddr_len()),
            0)
            << "round " << round << ": bind " << addr << ": " << std::strerror(errno);
        ASSERT_EQ(::listen(again.get(), 1), 0) << "round " << round;
    }
}

TEST_F(EvmuxEcho, UpperOverUnixSocketAndSigint) {
    char dir[] = "/tmp/evmux-echo-XXXXXX";
    ASSERT_NE(::mkdtemp(dir), nullptr);
    const std::string path = std::string(dir) + "/e.sock";
    {
        EchoProcess echo({"--unix", path, "--upper", "--backend", test::backend_name()});
        std::string backend;
        std::string addr = listening_address(echo.line(), &backend);
        ASSERT_EQ(addr, "unix:" + path);
        Fd c = dial(Address::parse(addr));
        EXPECT_EQ(roundtrip(c.get(), "Mixed case 123 xyz!"), "MIXED CASE 123 XYZ!");
        ASSERT_EQ(::kill(echo.pid(), SIGINT), 0);
        EXPECT_EQ(echo.wait(), 0);
        struct stat st {};
        EXPECT_NE(::lstat(path.c_str(), &st), 0) << "socket file left behind";
    }
    ::rmdir(dir);
}

// --model coroutines: the same echo as a coroutine per connection (one loop
// and a LoopGroup), --upper too; the client's half-close ends the handler,
// which closes after the echo.
TEST_F(EvmuxEcho, CoroutineModelEchoesAndStops) {
    for (const char* threads : {"1", "2"}) {
        SCOPED_TRACE(std::string("--threads ") + threads);
        EchoProcess echo({"--port", "0", "--backend", test::backend_name(), "--model", "coroutines",
                          "--threads", threads});
        const std::string line = echo.line();
        std::string backend;
        std::string addr = listening_address(line, &backend);
        ASSERT_FALSE(addr.empty()) << line;
        EXPECT_NE(line.find(" model=coroutines"), std::string::npos) << line;
        Address a = Address::parse(addr);
        {
            Fd c1 = dial(a);
            Fd c2 = dial(a);
            EXPECT_EQ(roundtrip(c1.get(), "hello, coroutine"), "hello, coroutine");
            EXPECT_EQ(roundtrip(c2.get(), std::string(100000, 'z')), std::string(100000, 'z'));
            ::shutdown(c1.get(), SHUT_WR);
            char b;
            EXPECT_EQ(::recv(c1.get(), &b, 1, 0), 0);  // the handler ended: EOF
        }
        ASSERT_EQ(::kill(echo.pid(), SIGTERM), 0);
        std::string summary = echo.line();
        EXPECT_EQ(echo.wait(), 0);
        EXPECT_NE(summary.find("connections=2"), std::string::npos) << summary;
        EXPECT_NE(summary.find("bytes_out=100016"), std::string::npos) << summary;
    }
    EchoProcess upper(
        {"--port", "0", "--backend", test::backend_name(), "--model", "coroutines", "--upper"});
    std::string backend;
    Fd c = dial(Address::parse(listening_address(upper.line(), &backend)));
    EXPECT_EQ(roundtrip(c.get(), "Mixed case 123 xyz!"), "MIXED CASE 123 XYZ!");
}

TEST_F(EvmuxEcho, ErrorsAreOneLineAndExitTwo) {
    // Port in use: a listener of ours holds it.
    Fd holder(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    Address any = Address::parse("127.0.0.1:0");
    ASSERT_EQ(
        ::bind(holder.get(), static_cast<const sockaddr*>(any.sockaddr_ptr()), any.sockaddr_len()),
        0);
    ASSERT_EQ(::listen(holder.get(), 1), 0);
    const std::string port = std::to_string(Address::local_of(holder.get()).port());
    // A UDP port in use: a UDP socket of ours holds it.
    Fd udp_holder(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    ASSERT_EQ(::bind(udp_holder.get(), static_cast<const sockaddr*>(any.sockaddr_ptr()),
                     any.sockaddr_len()),
              0);
    const std::string udp_port = std::to_string(Address::local_of(udp_holder.get()).port());

    struct Case {
        std::vector<std::string> args;
        std::string expect;  // a substring of the one line
    };
    const std::vector<Case> cases = {
        {{"--port", port}, "Address already in use"},
        {{"--bogus"}, "--bogus"},
        {{"--port", "70000"}, "--port: '70000' is not a whole number from 0 to 65535"},
        {{"--port", "80abc"}, "--port: '80abc' is not a whole number from 0 to 65535"},
        {{"--port", "0", "--backend", "no-such-backend"}, "no-such-backend"},
        {{"--unix", "/nonexistent-evmux-dir/x.sock"}, "No such file or directory"},
        {{}, "--port"},
        {{"--port", "0", "--model", "greenlets"}, "greenlets"},
        {{"--udp", "--port", udp_port}, "bind 127.0.0.1:" + udp_port + ": Address already in use"},
        {{"--udp", "--unix", "/tmp/x.sock"}, "--udp and --unix exclude each other"},
        {{"--udp", "--port", "0", "--threads", "2"}, "--threads must be 1"},
        {{"--udp", "--port", "0", "--model", "coroutines"}, "--model coroutines is TCP-only"},
        {{"--port", "0", "--io", "completions"}, "--io: completions not in {completion,readiness}"},
        {{"--udp", "--port", "0", "--io", "completion"}, "--io completion is TCP-only"},
        // An empty --unix was taken for none: "--port or --unix is required"
        // alone, and beside --port it served TCP.
        {{"--unix", ""}, "--unix: an empty path"},
        {{"--port", "0", "--unix", ""}, "--unix: an empty path"},
        // Brackets are for IPv6 only: this was looked up as localhost.
        {{"--port", "0", "--host", "[localhost]"}, "brackets hold an IPv6 address only"},
        {{"--udp", "--port", "0", "--host", "[127.0.0.1]"}, "brackets hold an IPv6 address only"},
    };
    for (const Case& c : cases) {
        EchoProcess echo(c.args);
        std::string first = echo.line();
        std::string second = echo.line(2000ms);
        EXPECT_EQ(echo.wait(), 2) << first;
        EXPECT_NE(first.find(c.expect), std::string::npos) << first;
        EXPECT_EQ(first.rfind("evmux-echo: ", 0), 0u) << first;
        EXPECT_EQ(second, "") << "more than one line";
    }
}

// --io: the listening line says the mode the first loop uses, which is what
// an EventLoop in this process makes of the same request on this backend
// (completion on io_uring where the kernel has the pieces; else readiness,
// and the next line says why); the echo works either way, on one loop and
// on two.
TEST_F(EvmuxEcho, IoFlagShowsTheModeOfTheLoopInTheListeningLine) {
    for (const IoMode asked : {IoMode::readiness, IoMode::completion}) {
        const EventLoop probe(make_selector(test::backend_name()), asked);
        const std::string expect = std::string(" io=") + to_string(probe.io_mode());
        for (const char* threads : {"1", "2"}) {
            SCOPED_TRACE(std::string("--io ") + to_string(asked) + " --threads " + threads);
            EchoProcess echo({"--port", "0", "--backend", test::backend_name(), "--io",
                              to_string(asked), "--threads", threads});
            const std::string line = echo.line();
            std::string backend;
            const std::string addr = listening_address(line, &backend);
            ASSERT_FALSE(addr.empty()) << line;
            EXPECT_TRUE(line.ends_with(expect)) << line;
            if (asked == IoMode::completion && probe.io_mode() == IoMode::readiness) {
                EXPECT_EQ(echo.line(), "evmux-echo: io=readiness: " + probe.io_note());
            }
            Fd c = dial(Address::parse(addr));
            EXPECT_EQ(roundtrip(c.get(), std::string(70000, 'q')), std::string(70000, 'q'));
            ASSERT_EQ(::kill(echo.pid(), SIGTERM), 0);
            EXPECT_EQ(echo.wait(), 0);
        }
    }
}

// --host takes a name, resolved by evmux's Resolver: "localhost" from
// /etc/hosts, another from the DNS server --dns names (the tests' responder);
// an unknown one is a one-line error and exit 2.
TEST_F(EvmuxEcho, HostNamesResolveThroughTheResolver) {
    test::DnsResponder dns({{"echo.test", {{"127.0.0.1"}, {}}}});
    for (const std::vector<std::string>& host :
         {std::vector<std::string>{"--host", "localhost"},
          std::vector<std::string>{"--host", "echo.test", "--dns", dns.server()}}) {
        std::vector<std::string> args = {"--port", "0", "--backend", test::backend_name()};
        args.insert(args.end(), host.begin(), host.end());
        EchoProcess echo(args);
        std::string backend;
        const std::string line = echo.line();
        const std::string addr = listening_address(line, &backend);
        ASSERT_EQ(addr.rfind("127.0.0.1:", 0), 0u) << host[1] << ": " << line;
        {
            Fd c = dial(Address::parse(addr));
            EXPECT_EQ(roundtrip(c.get(), "named"), "named");
        }
        ASSERT_EQ(::kill(echo.pid(), SIGTERM), 0);
        echo.line();
        EXPECT_EQ(echo.wait(), 0);
    }
    std::vector<std::string> asked = dns.asked();
    std::sort(asked.begin(), asked.end());
    EXPECT_EQ(asked, (std::vector<std::string>{"A echo.test", "AAAA echo.test"}))
        << "localhost was not asked of the server";

    for (const char* udp : {"", "--udp"}) {
        std::vector<std::string> args = {"--port",         "0",     "--host",
                                         "nosuch.invalid", "--dns", dns.server()};
        if (*udp) args.push_back(udp);
        EchoProcess unknown(args);
        EXPECT_EQ(unknown.line(),
                  "evmux-echo: evmux: cannot resolve 'nosuch.invalid': Domain name not found")
            << udp;
        EXPECT_EQ(unknown.line(2000ms), "") << "more than one line";
        EXPECT_EQ(unknown.wait(), 2);
    }

    // --udp names go through the same Resolver (the DNS server is asked).
    EchoProcess named({"--udp", "--port", "0", "--host", "echo.test", "--dns", dns.server(),
                       "--backend", test::backend_name()});
    const std::string line = named.line();
    std::string named_backend;
    EXPECT_EQ(listening_address(line, &named_backend).rfind("127.0.0.1:", 0), 0u) << line;
    EXPECT_NE(line.find("protocol=udp"), std::string::npos) << line;
    ASSERT_EQ(::kill(named.pid(), SIGTERM), 0);
    named.line();
    EXPECT_EQ(named.wait(), 0);
}

// ---- --udp ------------------------------------------------------------------------

/// A datagram to `to` from `fd` (a blocking UDP socket with a 5 s receive
/// timeout) and the one that comes back; "(recv: ...)" if none does.
std::string udp_roundtrip(int fd, const Address& to, const std::string& msg) {
    ssize_t n = ::sendto(fd, msg.data(), msg.size(), 0,
                         static_cast<const sockaddr*>(to.sockaddr_ptr()), to.sockaddr_len());
    if (n != static_cast<ssize_t>(msg.size()))
        return std::string("(sendto: ") + std::strerror(errno) + ")";
    std::string back(65536, '\0');
    do {
        n = ::recv(fd, back.data(), back.size(), 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return std::string("(recv: ") + std::strerror(errno) + ")";
    back.resize(static_cast<std::size_t>(n));
    return back;
}

Fd udp_client(int family) {
    Fd fd(::socket(family, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    timeval tv{5, 0};
    ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

/// The payload of `n` bytes used below: every byte value, lower-case letters too.
std::string udp_payload(std::size_t n) {
    std::string s(n, '\0');
    for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 7 + n) % 256);
    return s;
}

TEST_F(EvmuxEcho, UdpEchoesEveryDatagramToItsSender) {
    EchoProcess echo({"--udp", "--port", "0", "--backend", test::backend_name()});
    const std::string line = echo.line();
    EXPECT_NE(line.find(" protocol=udp"), std::string::npos) << line;
    std::string backend;
    const std::string addr = listening_address(line, &backend);
    ASSERT_FALSE(addr.empty()) << line;
    const Address a = Address::parse(addr);
    EXPECT_EQ(a.to_string().rfind("127.0.0.1:", 0), 0u);
    Fd c1 = udp_client(AF_INET);
    Fd c2 = udp_client(AF_INET);
    std::uint64_t bytes = 0;
    for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{1472}, std::size_t{1473},
                          std::size_t{65507}}) {
        const std::string msg = udp_payload(n);
        EXPECT_TRUE(udp_roundtrip(c1.get(), a, msg) == msg) << n << " bytes";
        EXPECT_EQ(udp_roundtrip(c2.get(), a, "two"), "two");
        bytes += n + 3;
    }
    ASSERT_EQ(::kill(echo.pid(), SIGTERM), 0);
    const std::string summary = echo.line();
    EXPECT_EQ(echo.wait(), 0);
    EXPECT_NE(summary.find("datagrams_in=10 datagrams_out=10 bytes_in=" + std::to_string(bytes) +
                           " bytes_out=" + std::to_string(bytes)),
              std::string::npos)
        << summary;
    EXPECT_NE(summary.find("dropped=0 truncated=0"), std::string::npos) << summary;
}

TEST_F(EvmuxEcho, UdpWithHostLocalhostAndUpper) {
    EchoProcess echo({"--udp", "--upper", "--host", "localhost", "--port", "0", "--backend",
                      test::backend_name()});
    const std::string line = echo.line();
    std::string backend;
    const std::string addr = listening_address(line, &backend);
    ASSERT_FALSE(addr.empty()) << line;
    const Address a = Address::parse(addr);  // 127.0.0.1 or ::1, as localhost resolves here
    EXPECT_TRUE(addr.starts_with("127.0.0.1:") || addr.starts_with("[::1]:")) << addr;
    Fd c = udp_client(a.family());
    EXPECT_EQ(udp_roundtrip(c.get(), a, "Mixed case 123 xyz!"), "MIXED CASE 123 XYZ!");
    ASSERT_EQ(::kill(echo.pid(), SIGINT), 0);
    EXPECT_EQ(echo.wait(), 0);
}

// evmux-load --udp against it: every datagram echoed and verified, none lost
// (loopback, 4 sessions, 1 s to answer each).
TEST_F(EvmuxEcho, UdpUnderEvmuxLoad) {
    const char* load = std::getenv("EVMUX_LOAD");
    if (load == nullptr) GTEST_SKIP() << "EVMUX_LOAD not set";
    EchoProcess echo({"--udp", "--port", "0", "--backend", test::backend_name()});
    std::string backend;
    const std::string addr = listening_address(echo.line(), &backend);
    ASSERT_FALSE(addr.empty());
    const Address a = Address::parse(addr);
    std::string out;
    {
        EchoProcess client({"--udp", "--port", std::to_string(a.port()), "--conns", "4", "--size",
                            "512", "--duration", "0.3", "--timeout", "1", "--json"},
                           true, load);
        out = client.line(20000ms);
        EXPECT_EQ(client.wait(), 0) << out;
    }
    EXPECT_NE(out.find("\"udp\":true"), std::string::npos) << out;
    EXPECT_NE(out.find("\"lost\":0,"), std::string::npos) << out;
    EXPECT_NE(out.find("\"mismatches\":0,\"errors\":0}"), std::string::npos) << out;
    EXPECT_EQ(out.find("\"received\":0,"), std::string::npos) << out;
    ASSERT_EQ(::kill(echo.pid(), SIGTERM), 0);
    const std::string summary = echo.line();
    EXPECT_EQ(echo.wait(), 0);
    EXPECT_NE(summary.find("dropped=0 truncated=0 kernel_dropped=0 errors=0"), std::string::npos)
        << summary;
}

/// The soft and hard "Max open files" of a process, from /proc/PID/limits.
std::pair<std::string, std::string> open_files_limits(pid_t pid) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/limits");
    for (std::string l; std::getline(in, l);) {
        if (!l.starts_with("Max open files")) continue;
        std::istringstream fields(l.substr(std::strlen("Max open files")));
        std::string soft, hard;
        fields >> soft >> hard;
        return {soft, hard};
    }
    return {};
}

TEST_F(EvmuxEcho, RaisesItsSoftFdLimitToTheHardLimit) {
    rlimit ours{};
    ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &ours), 0);
    if (ours.rlim_max != RLIM_INFINITY && ours.rlim_max <= 256)
        GTEST_SKIP() << "hard RLIMIT_NOFILE " << ours.rlim_max << ": nothing to raise";
    // Started with a soft limit of 256 (inherited), it must run with the hard one.
    rlimit low = ours;
    low.rlim_cur = 256;
    ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
    EchoProcess echo({"--port", "0", "--backend", test::backend_name()});
    ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &ours), 0);
    std::string backend;
    ASSERT_FALSE(listening_address(echo.line(), &backend).empty());
    auto [soft, hard] = open_files_limits(echo.pid());
    EXPECT_FALSE(hard.empty());
    EXPECT_EQ(soft, hard);
    ASSERT_EQ(::kill(echo.pid(), SIGTERM), 0);
    EXPECT_EQ(echo.wait(), 0);
}

// Out of file descriptors, each new connection is accepted and closed at
// once (the peer sees EOF): said on stderr within a second, and counted in
// the stopped line, not only seen by the clients. A second server on the
// port is refused with --threads too (SO_REUSEPORT would have let it join).
//
// Under UBSan the echo runs without its vptr reports: UBSan's vptr check
// reads the object through a pipe it opens (sanitizer_common's
// IsAccessibleMemoryRange), so with every descriptor taken it finds no
// readable vtable and reports "invalid vptr" for sound objects (CI saw it for
// std::thread's state as a group thread ends, and for a shared_ptr's control
// block as a closing socket lingers), and halt_on_error ends the process.
// Only this process; every other test keeps the check; a build without UBSan
// ignores the variable.
TEST_F(EvmuxEcho, ConnectionsRefusedForWantOfFdsAreSaid) {
    ASSERT_EQ(::access("/usr/bin/prlimit", X_OK), 0) << "util-linux's prlimit";
    char dir[] = "/tmp/evmux-echo-XXXXXX";
    ASSERT_NE(::mkdtemp(dir), nullptr);
    const struct RemoveAfter {
        std::string dir;
        ~RemoveAfter() { std::filesystem::remove_all(dir); }
    } remove_after{dir};
    const std::string suppressions = std::string(dir) + "/ubsan.supp";
    std::ofstream(suppressions) << "vptr:*\n";
    const char* ubsan = std::getenv("UBSAN_OPTIONS");
    const std::string ubsan_options = "UBSAN_OPTIONS=" + std::string(ubsan ? ubsan : "") +
                                      (ubsan && *ubsan ? ":" : "") + "suppressions=" + suppressions;
    // Each I/O path (--io completion is readiness where the backend has none).
    for (const char* io : {"readiness", "completion"}) {
        SCOPED_TRACE(std::string("--io ") + io);
        // The hard limit too: evmux-echo raises its soft limit to the hard one.
        // (env, then prlimit, exec in turn: the pid is evmux-echo's.)
        EchoProcess echo(
            {ubsan_options, "/usr/bin/prlimit", "--nofile=32:32", echo_binary(), "--port", "0",
             "--backend", test::backend_name(), "--threads", "2", "--io", io},
            false, "/usr/bin/env");
        std::string backend;
        const std::string where = listening_address(echo.line(), &backend);
        ASSERT_FALSE(where.empty());
        EchoProcess second({"--port", where.substr(where.rfind(':') + 1), "--backend",
                            test::backend_name(), "--threads", "2", "--io", io});
        EXPECT_NE(second.line().find("Address already in use"), std::string::npos);
        EXPECT_EQ(second.wait(), 2);
        std::vector<Fd> clients;
        for (int i = 0; i < 40; ++i) clients.push_back(dial(Address::parse(where)));
        std::string said;
        for (std::string l; said.empty() && !(l = echo.line(5000ms)).empty();)
            if (l.find("connections closed as accepted") != std::string::npos) said = l;
        EXPECT_NE(said.find("accept errors (out of file descriptors? ulimit -n is 32)"),
                  std::string::npos)
            << said;
        ASSERT_EQ(::kill(echo.pid(), SIGTERM), 0);
        // Everything said after SIGTERM, to show on failure (a sanitizer's
        // report, say, when the stopped line never comes).
        std::string stopped, after;
        while (stopped.find("stopped:") == std::string::npos && !(stopped = echo.line()).empty())
            after += stopped + "\n";
        // Closed as accepted (the spare fd's trick) or, when even that fails,
        // accept errors: some of either.
        std::smatch m;
        ASSERT_TRUE(
            std::regex_search(stopped, m, std::regex(" rejected=([0-9]+) accept_errors=([0-9]+)")))
            << "said after SIGTERM:\n"
            << after << "exit: " << echo.wait();
        EXPECT_GT(std::stoull(m[1]) + std::stoull(m[2]), 0u) << stopped;
        EXPECT_EQ(echo.wait(), 0);
    }
}

// --threads N runs N loops and no other: N epoll instances in the process
// (there was once an unused one on the main thread as well).
TEST_F(EvmuxEcho, ThreadsMakeOneLoopEach) {
    if (test::backend_name() != "epoll") GTEST_SKIP() << "counts epoll instances: epoll suite";
    EchoProcess echo({"--port", "0", "--backend", "epoll", "--threads", "2"});
    std::string backend;
    ASSERT_FALSE(listening_address(echo.line(), &backend).empty());
    int epolls = 0;
    const std::string dir = "/proc/" + std::to_string(echo.pid()) + "/fd";
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
        std::error_code ec;
        if (std::filesystem::read_symlink(entry.path(), ec).string() == "anon_inode:[eventpoll]")
            ++epolls;
    }
    EXPECT_EQ(epolls, 2);
    ASSERT_EQ(::kill(echo.pid(), SIGTERM), 0);
    EXPECT_EQ(echo.wait(), 0);
}

TEST_F(EvmuxEcho, ListBackends) {
    EchoProcess echo({"--list-backends"}, true);
    std::vector<std::string> lines;
    for (std::string l = echo.line(); !l.empty(); l = echo.line()) lines.push_back(l);
    EXPECT_EQ(echo.wait(), 0);
    ASSERT_GE(lines.size(), 3u);  // select, poll and epoll are always compiled in
    bool saw_current = false;
    for (const std::string& l : lines) {
        auto sp = l.find(' ');
        ASSERT_NE(sp, std::string::npos) << l;
        std::string rest = l.substr(sp + 1);
        EXPECT_TRUE(rest.starts_with("usable") || rest.starts_with("unusable: ")) << l;
        if (l.substr(0, sp) == test::backend_name()) saw_current = rest.starts_with("usable");
    }
    EXPECT_TRUE(saw_current) << "the backend under test is listed as usable";
}

#if EVMUX_TEST_TLS
/// Runs `args` with stdin and stdout on pipes: writes `input`, reads until as
/// many bytes came back (or 10 s), then closes stdin and waits for the exit.
/// Returns what it printed; `status` gets the exit code (-1: no exit).
std::string through_pipes(std::vector<std::string> args, const std::string& input, int* status) {
    int in[2], out[2];
    if (::pipe2(in, O_CLOEXEC) != 0 || ::pipe2(out, O_CLOEXEC) != 0)
        throw std::system_error(errno, std::generic_category(), "pipe2");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, in[0], 0);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    int rc = ::posix_spawnp(&pid, argv[0], &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    ::close(in[0]);
    ::close(out[1]);
    Fd to(in[1]), from(out[0]);
    if (rc != 0) throw std::system_error(rc, std::generic_category(), "posix_spawn " + args[0]);
    EXPECT_EQ(::write(to.get(), input.data(), input.size()), static_cast<ssize_t>(input.size()));
    std::string got;
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (got.size() < input.size() && std::chrono::steady_clock::now() < deadline) {
        pollfd p{from.get(), POLLIN, 0};
        if (::poll(&p, 1, 100) <= 0) continue;
        char b[4096];
        ssize_t n = ::read(from.get(), b, sizeof b);
        if (n <= 0) break;
        got.append(b, static_cast<std::size_t>(n));
    }
    to.reset();  // EOF: s_client sends close_notify and exits
    *status = -1;
    for (int i = 0; i < 500 && *status == -1; ++i) {
        int st = 0;
        if (::waitpid(pid, &st, WNOHANG) == pid)
            *status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        else
            std::this_thread::sleep_for(10ms);
    }
    if (*status == -1) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
    }
    return got;
}

void serve_tls_to_openssl_and_python(const std::string& records);

// --tls-cert/--tls-key: the listening line says tls; openssl s_client and
// Python's ssl module (neither written here) get every byte back; the
// summary counts plaintext.
// Both record layers (--tls-records): evmux's (the default) and OpenSSL's.
TEST_F(EvmuxEcho, TlsCertAndKeyServeOpensslAndPython) {
    for (const char* records : {"evmux", "openssl"}) {
        SCOPED_TRACE(std::string("--tls-records ") + records);
        serve_tls_to_openssl_and_python(records);
    }
}

void serve_tls_to_openssl_and_python(const std::string& records) {
    const support::TlsFiles& f = support::tls_files();
    EchoProcess echo({"--port", "0", "--backend", test::backend_name(), "--tls-cert", f.server_cert,
                      "--tls-key", f.server_key, "--tls-records", records});
    const std::string line = echo.line();
    EXPECT_TRUE(line.ends_with(" tls")) << line;
    std::string backend;
    const std::string addr = listening_address(line, &backend);
    ASSERT_FALSE(addr.empty()) << line;
    const std::string port = std::to_string(Address::parse(addr).port());

    std::string input(20000, '\0');
    for (std::size_t i = 0; i < input.size(); ++i) input[i] = static_cast<char>(i * 7 % 256);
    int status = 0;
    std::string got = through_pipes({"openssl", "s_client", "-connect", "127.0.0.1:" + port,
                                     "-CAfile", f.ca, "-verify_return_error", "-verify_hostname",
                                     "localhost", "-quiet", "-no_ign_eof", "-nocommands"},
                                    input, &status);
    EXPECT_EQ(status, 0);
    EXPECT_EQ(got.size(), input.size());
    EXPECT_TRUE(got == input) << "s_client got other bytes back";

    const char* script = std::getenv("EVMUX_TLS_CLIENT_PY");
    ASSERT_TRUE(script) << "EVMUX_TLS_CLIENT_PY not set (tools/meson.build sets it)";
    got =
        through_pipes({"/usr/bin/python3", script, port, f.ca, "localhost", "30000"}, "", &status);
    // Nothing was written, so through_pipes read nothing yet: the rest now.
    EXPECT_EQ(status, 0);
    ASSERT_EQ(::kill(echo.pid(), SIGTERM), 0);
    const std::string summary = echo.line();
    EXPECT_EQ(echo.wait(), 0);
    EXPECT_NE(summary.find("connections=2"), std::string::npos) << summary;
    EXPECT_NE(summary.find("bytes_in=50000 bytes_out=50000"), std::string::npos) << summary;
}

// evmux-load --tls with each client record layer (its own, the default, and
// OpenSSL's) against each server record layer, small and multi-record
// messages (these also through a 4 KiB send buffer, so that the socket takes
// part of a record and the rest waits for it, and in the two suites other
// than the default AES-256-GCM), every byte verified; against
// evmux's records also with a KeyUpdate from the server every 3 records (the
// client must follow it).
// evmux-load's own records must take over: a connection left on OpenSSL's
// would say so on stderr, the first line read here instead of the JSON.
TEST_F(EvmuxEcho, TlsUnderEvmuxLoadWithEachRecordLayer) {
    const char* load = std::getenv("EVMUX_LOAD");
    if (load == nullptr) GTEST_SKIP() << "EVMUX_LOAD not set";
    const support::TlsFiles& f = support::tls_files();
    for (const char* key_updates : {"", "3"}) {
        for (const char* server : {"evmux", "openssl"}) {
            if (*key_updates && std::string(server) == "openssl") continue;  // evmux's own knob
            ::setenv("EVMUX_TLS_KEY_UPDATE_RECORDS", key_updates, 1);
            EchoProcess echo({"--port", "0", "--backend", test::backend_name(), "--tls-cert",
                              f.server_cert, "--tls-key", f.server_key, "--tls-records", server});
            ::unsetenv("EVMUX_TLS_KEY_UPDATE_RECORDS");
            std::string backend;
            const std::string addr = listening_address(echo.line(), &backend);
            ASSERT_FALSE(addr.empty());
            const std::string port = std::to_string(Address::parse(addr).port());
            for (const char* client : {"own", "openssl"}) {
                for (const char* size : {"1", "40000", "40000 --sndbuf 4096",
                                         "40000 --tls-suites TLS_AES_128_GCM_SHA256",
                                         "40000 --tls-suites TLS_CHACHA20_POLY1305_SHA256"}) {
                    SCOPED_TRACE(std::string("server ") + server + ", client " + client +
                                 ", size " + size + ", key updates every " + key_updates);
                    std::vector<std::string> args = {
                        "--port",   port, "--conns",       "3",    "--duration", "0.2",   "--tls",
                        "--tls-ca", f.ca, "--tls-records", client, "--json",     "--size"};
                    std::istringstream words(size);
                    for (std::string w; words >> w;) args.push_back(w);
                    EchoProcess run(args, true, load);
                    const std::string out = run.line(20000ms);
                    EXPECT_EQ(run.wait(), 0) << out;
                    EXPECT_TRUE(out.starts_with("{")) << out;
                    EXPECT_NE(out.find("\"mismatches\":0,\"errors\":0"), std::string::npos) << out;
                    EXPECT_EQ(out.find("\"round_trips\":0,"), std::string::npos) << out;
                }
            }
        }
    }
}

/// A relay between one client and `server_port` that, once `at` bytes have
/// gone from the server to the client, either flips a bit of the next byte or
/// closes the client's side (a man in the middle, or a peer that vanishes).
class TamperingRelay {
  public:
    TamperingRelay(int server_port, std::size_t at, bool close_instead)
        : listener_(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) {
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t len = sizeof a;
        if (::bind(listener_.get(), reinterpret_cast<sockaddr*>(&a), len) != 0 ||
            ::listen(listener_.get(), 4) != 0 ||
            ::getsockname(listener_.get(), reinterpret_cast<sockaddr*>(&a), &len) != 0)
            throw std::system_error(errno, std::generic_category(), "relay listen");
        port_ = ntohs(a.sin_port);
        thread_ = std::thread([this, server_port, at, close_instead] {
            Fd client(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
            const Fd server = dial(Address::parse("127.0.0.1:" + std::to_string(server_port)));
            std::size_t down = 0;  // bytes relayed from the server to the client
            pollfd fds[2] = {{client.get(), POLLIN, 0}, {server.get(), POLLIN, 0}};
            while (client.get() >= 0 && ::poll(fds, 2, 10000) > 0) {
                for (int k = 0; k < 2; ++k) {
                    if (!(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
                    char b[4096];
                    const ssize_t n = ::read(fds[k].fd, b, sizeof b);
                    if (n <= 0) return;
                    std::size_t len = static_cast<std::size_t>(n);
                    if (k == 1 && down + len > at) {
                        if (close_instead) {
                            len = at - down;
                        } else {
                            b[at - down] ^= 0x10;
                        }
                    }
                    if (::write(fds[1 - k].fd, b, len) != static_cast<ssize_t>(len)) return;
                    if (k == 1) down += len;
                    if (k == 1 && close_instead && down == at) return;  // closes both
                }
            }
        });
    }
    ~TamperingRelay() {
        ::shutdown(listener_.get(), SHUT_RDWR);
        thread_.join();
    }
    int port() const { return port_; }

  private:
    Fd listener_;
    int port_ = 0;
    std::thread thread_;
};

// evmux-load's own TLS records against a peer that goes wrong mid-stream,
// well after the handshake (byte 20 000 of the server's side, 1 000-byte
// messages): a bit flipped there fails the record's authentication, a
// close there is an EOF without close_notify. Either is a counted error,
// its reason on stderr and exit 1, not a hang or a crash.
TEST_F(EvmuxEcho, TlsUnderEvmuxLoadReportsATamperedOrCutStream) {
    const char* load = std::getenv("EVMUX_LOAD");
    if (load == nullptr) GTEST_SKIP() << "EVMUX_LOAD not set";
    const support::TlsFiles& f = support::tls_files();
    EchoProcess echo({"--port", "0", "--backend", test::backend_name(), "--tls-cert", f.server_cert,
                      "--tls-key", f.server_key});
    std::string backend;
    const std::string addr = listening_address(echo.line(), &backend);
    ASSERT_FALSE(addr.empty());
    const int server_port = Address::parse(addr).port();
    for (const bool cut : {false, true}) {
        SCOPED_TRACE(cut ? "cut" : "tampered");
        TamperingRelay relay(server_port, 20000, cut);
        EchoProcess run({"--port", std::to_string(relay.port()), "--conns", "1", "--size", "1000",
                         "--duration", "2", "--tls", "--tls-ca", f.ca, "--json"},
                        true, load);
        std::string out;
        for (std::string l; !(l = run.line(20000ms)).empty();) out += l + "\n";
        EXPECT_EQ(run.wait(), 1) << out;
        EXPECT_NE(out.find(cut ? "TLS: unexpected eof while reading"
                               : "TLS: decryption failed or bad record mac"),
                  std::string::npos)
            << out;
        EXPECT_NE(out.find("\"errors\":1}"), std::string::npos) << out;
    }
}

TEST_F(EvmuxEcho, TlsFlagErrorsAreOneLine) {
    const support::TlsFiles& f = support::tls_files();
    struct Case {
        std::vector<std::string> args;
        std::string expect;
    };
    const std::vector<Case> cases = {
        {{"--port", "0", "--tls-cert", f.server_cert}, "--tls-cert requires --tls-key"},
        {{"--port", "0", "--tls-key", f.server_key}, "--tls-key requires --tls-cert"},
        {{"--port", "0", "--tls-cert", f.dir + "/none.crt", "--tls-key", f.server_key},
         "evmux-echo: TLS: certificate chain file " + f.dir + "/none.crt: "},
        {{"--port", "0", "--tls-cert", f.server_cert, "--tls-key", f.other_key},
         "does not match the certificate: key values mismatch"},
        {{"--port", "0", "--tls-records", "openssl"}, "--tls-records requires --tls-cert"},
        {{"--port", "0", "--tls-cert", f.server_cert, "--tls-key", f.server_key, "--tls-records",
          "kernel"},
         "evmux-echo: --tls-records: kernel not in {evmux,openssl}"},
    };
    for (const Case& c : cases) {
        EchoProcess echo(c.args);
        const std::string first = echo.line();
        EXPECT_EQ(echo.line(2000ms), "") << "more than one line";
        EXPECT_EQ(echo.wait(), 2) << first;
        EXPECT_NE(first.find(c.expect), std::string::npos) << first;
    }
}
#endif

}  // namespace
}  // namespace evmux
