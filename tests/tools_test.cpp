// The load client and the baseline echo servers, run as the programs they are:
// each baseline is started on port 0 and loaded by evmux-load; evmux-load is
// run against small in-test servers that misbehave on purpose (corrupt a byte,
// drop an idle connection, hang up mid-reply) and must say so with exit 1;
// every program must reject bad flags with one line and exit 2.
//
// The paths of the programs come from the environment (set by meson):
// EVMUX_LOAD, EVMUX_BENCH, EVMUX_ECHO (what evmux-bench's --io rows should
// say) and EVMUX_BASELINE_<NAME> (EPOLL, LIBEVENT, THREADS, FORK, URING, UDP).
// evmux-bench's CpuModeSampler (tools/bench_processes.cpp, linked in) is
// tested on its own too.
// Not a per-backend suite: none of these programs uses the evmux selector.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "../tools/bench_processes.hpp"

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

/// How long any child program may run before the test kills it and fails.
constexpr auto child_timeout = 30s;

/// Whether evmux-bench was built with TLS rows (meson sets EVMUX_TLS_BUILT).
bool tls_built() {
    const char* v = std::getenv("EVMUX_TLS_BUILT");
    return v && std::string(v) == "1";
}

/// The path of a program under test: from the environment (meson sets it),
/// else the program of that name beside this test binary (both are built into
/// tools/), else "" (the test skips: e.g. libevent not found at build time).
std::string program_path(const char* var) {
    if (const char* p = std::getenv(var)) return p;
    static const std::map<std::string, std::string> names = {
        {"EVMUX_LOAD", "evmux-load"},
        {"EVMUX_BENCH", "evmux-bench"},
        {"EVMUX_ECHO", "evmux-echo"},
        {"EVMUX_BASELINE_EPOLL", "evmux-baseline-epoll"},
        {"EVMUX_BASELINE_LIBEVENT", "evmux-baseline-libevent"},
        {"EVMUX_BASELINE_THREADS", "evmux-baseline-threads"},
        {"EVMUX_BASELINE_FORK", "evmux-baseline-fork"},
        {"EVMUX_BASELINE_URING", "evmux-baseline-uring"},
        {"EVMUX_BASELINE_UDP", "evmux-baseline-udp"}};
    auto it = names.find(var);
    char self[4096];
    const ssize_t n = ::readlink("/proc/self/exe", self, sizeof self - 1);
    if (it == names.end() || n <= 0) return "";
    std::string path(self, static_cast<std::size_t>(n));
    path = path.substr(0, path.rfind('/') + 1) + it->second;
    return ::access(path.c_str(), X_OK) == 0 ? path : "";
}

/// A child process with its stdout and stderr on pipes. Killed (SIGKILL) and
/// reaped on destruction if still running, so a failing test leaves nothing.
class Child {
  public:
    /// Starts argv[0] with the given arguments. Fails the test (and leaves
    /// pid() == -1) if it cannot.
    explicit Child(const std::vector<std::string>& argv) {
        int out[2], err[2];
        if (::pipe2(out, O_CLOEXEC) < 0 || ::pipe2(err, O_CLOEXEC) < 0) {
            ADD_FAILURE() << "pipe2: " << std::strerror(errno);
            return;
        }
        posix_spawn_file_actions_t fa;
        posix_spawn_file_actions_init(&fa);
        posix_spawn_file_actions_adddup2(&fa, out[1], 1);
        posix_spawn_file_actions_adddup2(&fa, err[1], 2);
        std::vector<char*> args;
        for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        const int rc = ::posix_spawn(&pid_, args[0], &fa, nullptr, args.data(), environ);
        posix_spawn_file_actions_destroy(&fa);
        ::close(out[1]);
        ::close(err[1]);
        out_ = out[0];
        err_ = err[0];
        if (rc != 0) {
            pid_ = -1;
            ADD_FAILURE() << "posix_spawn " << argv[0] << ": " << std::strerror(rc);
        }
    }
    ~Child() {
        if (pid_ > 0) {
            ::kill(pid_, SIGKILL);
            ::waitpid(pid_, nullptr, 0);
        }
        if (out_ >= 0) ::close(out_);
        if (err_ >= 0) ::close(err_);
    }
    Child(const Child&) = delete;
    Child& operator=(const Child&) = delete;

    pid_t pid() const { return pid_; }

    /// Reads stderr up to the first newline (without it), or nullopt if none
    /// comes within `timeout`.
    std::optional<std::string> stderr_line(std::chrono::milliseconds timeout) {
        const auto deadline = Clock::now() + timeout;
        while (true) {
            if (auto nl = err_text_.find('\n'); nl != std::string::npos) {
                std::string line = err_text_.substr(0, nl);
                err_text_.erase(0, nl + 1);
                return line;
            }
            const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now());
            if (left.count() <= 0 || !read_some(err_, err_text_, static_cast<int>(left.count())))
                return std::nullopt;
        }
    }

    /// Collects stdout and stderr until both close and waits for the exit.
    /// Returns the exit code, or -1 (test failure) if it does not end in
    /// `timeout` or dies of a signal.
    int finish(std::chrono::milliseconds timeout = child_timeout) {
        const auto deadline = Clock::now() + timeout;
        bool out_open = true, err_open = true;
        while ((out_open || err_open) && Clock::now() < deadline) {
            pollfd fds[2] = {{out_open ? out_ : -1, POLLIN, 0}, {err_open ? err_ : -1, POLLIN, 0}};
            if (::poll(fds, 2, 100) < 0 && errno != EINTR) break;
            if (fds[0].revents) out_open = read_some(out_, out_text_, 0);
            if (fds[1].revents) err_open = read_some(err_, err_text_, 0);
        }
        return wait(deadline);
    }

    /// Sends a signal and waits for the exit code (-1 as in finish()).
    int signal_and_wait(int sig, std::chrono::milliseconds timeout = 10s) {
        ::kill(pid_, sig);
        return wait(Clock::now() + timeout);
    }

    const std::string& out() const { return out_text_; }
    const std::string& err() const { return err_text_; }

  private:
    // Appends what fd has (waiting up to ms); false on EOF or error.
    static bool read_some(int fd, std::string& to, int ms) {
        pollfd p{fd, POLLIN, 0};
        if (ms > 0 && ::poll(&p, 1, ms) <= 0) return ms <= 0;
        char buf[4096];
        const ssize_t n = ::read(fd, buf, sizeof buf);
        if (n <= 0) return n < 0 && errno == EINTR;
        to.append(buf, static_cast<std::size_t>(n));
        return true;
    }
    int wait(Clock::time_point deadline) {
        while (pid_ > 0) {
            int status = 0;
            const pid_t r = ::waitpid(pid_, &status, WNOHANG);
            if (r == pid_) {
                pid_ = -1;
                if (WIFEXITED(status)) return WEXITSTATUS(status);
                ADD_FAILURE() << "child killed by signal " << WTERMSIG(status);
                return -1;
            }
            if (Clock::now() >= deadline) {
                ADD_FAILURE() << "child did not exit in time; killing it";
                return -1;  // the destructor kills and reaps it
            }
            std::this_thread::sleep_for(5ms);
        }
        return -1;
    }

    pid_t pid_ = -1;
    int out_ = -1;
    int err_ = -1;
    std::string out_text_;
    std::string err_text_;
};

/// The numbers of evmux-load's --json object (keys as documented).
struct LoadReport {
    std::map<std::string, double> values;
    double operator[](const std::string& key) const {
        auto it = values.find(key);
        return it == values.end() ? -1 : it->second;
    }
};

/// Parses the one-line JSON object; fails the test if it is not one.
LoadReport parse_report(const std::string& out) {
    LoadReport r;
    EXPECT_EQ(std::count(out.begin(), out.end(), '\n'), 1) << out;
    EXPECT_TRUE(out.starts_with("{") && out.ends_with("}\n")) << out;
    static const std::regex number(R"re("(\w+)":(-?[0-9.]+))re");
    for (auto it = std::sregex_iterator(out.begin(), out.end(), number);
         it != std::sregex_iterator(); ++it)
        r.values[(*it)[1]] = std::stod((*it)[2]);
    for (const char* key :
         {"conns", "active", "size", "duration_s", "round_trips", "round_trips_per_s", "mib_per_s",
          "p50", "p99", "max", "mismatches", "errors"})
        EXPECT_TRUE(r.values.count(key)) << "no \"" << key << "\" in " << out;
    EXPECT_NE(out.find("\"latency_us\":{"), std::string::npos) << out;
    return r;
}

/// Runs evmux-load with args; returns the exit code and fills out/err.
int run_load(const std::vector<std::string>& args, std::string* out = nullptr,
             std::string* err = nullptr) {
    std::vector<std::string> argv{program_path("EVMUX_LOAD")};
    argv.insert(argv.end(), args.begin(), args.end());
    Child c(argv);
    const int rc = c.finish();
    if (out) *out = c.out();
    if (err) *err = c.err();
    return rc;
}

/// A listening socket on 127.0.0.1 with a kernel-chosen port.
struct Listener {
    int fd = -1;
    int port = 0;
    Listener() {
        fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t len = sizeof a;
        if (::bind(fd, reinterpret_cast<sockaddr*>(&a), len) < 0 || ::listen(fd, 64) < 0 ||
            ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) < 0)
            ADD_FAILURE() << "listener: " << std::strerror(errno);
        port = ntohs(a.sin_port);
    }
    ~Listener() { ::close(fd); }
};

/// A small misbehaving server for the negative tests: accepts on a thread,
/// runs handler(fd) on its own thread per connection (blocking socket), until
/// destroyed. Every wait inside is bounded by `stop`.
class TinyServer {
  public:
    using Handler = std::function<void(int fd, const std::atomic<bool>& stop)>;
    explicit TinyServer(Handler h) : handler_(std::move(h)) {
        acceptor_ = std::thread([this] {
            while (!stop_) {
                pollfd p{listener_.fd, POLLIN, 0};
                if (::poll(&p, 1, 20) <= 0) continue;
                const int c = ::accept4(listener_.fd, nullptr, nullptr, SOCK_CLOEXEC);
                if (c < 0) continue;
                std::lock_guard lock(mutex_);
                fds_.push_back(c);
                workers_.emplace_back([this, c] { handler_(c, stop_); });
            }
        });
    }
    ~TinyServer() {
        stop_ = true;
        acceptor_.join();
        for (auto& w : workers_) w.join();
        for (int fd : fds_) ::close(fd);
    }
    int port() const { return listener_.port; }

    /// Reads up to n bytes, waiting at most `ms`; 0 on EOF/timeout/stop.
    static ssize_t read_for(int fd, char* buf, std::size_t n, int ms,
                            const std::atomic<bool>& stop) {
        const auto deadline = Clock::now() + std::chrono::milliseconds(ms);
        while (!stop && Clock::now() < deadline) {
            pollfd p{fd, POLLIN, 0};
            if (::poll(&p, 1, 20) <= 0) continue;
            return ::recv(fd, buf, n, 0);
        }
        return 0;
    }
    /// Echoes, passing every byte through `transform(offset, byte)`.
    static void echo(int fd, const std::atomic<bool>& stop,
                     const std::function<char(std::size_t, char)>& transform) {
        char buf[65536];
        std::size_t offset = 0;
        while (true) {
            const ssize_t n = read_for(fd, buf, sizeof buf, 10000, stop);
            if (n <= 0) return;
            for (ssize_t i = 0; i < n; ++i) buf[i] = transform(offset++, buf[i]);
            if (::send(fd, buf, static_cast<std::size_t>(n), MSG_NOSIGNAL) != n) return;
        }
    }

  private:
    Listener listener_;
    Handler handler_;
    std::atomic<bool> stop_{false};
    std::mutex mutex_;
    std::vector<int> fds_;
    std::vector<std::thread> workers_;
    std::thread acceptor_;
};

// ---------------------------------------------------------------------------
// The baselines under evmux-load.

/// A blocking TCP connection to 127.0.0.1:port, or -1 (errno says why).
int dial_loopback(int port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(port));
    if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) return fd;
    const int err = errno;
    if (fd >= 0) ::close(fd);
    errno = err;
    return -1;
}

struct Baseline {
    const char* name;  // as in the program name evmux-baseline-NAME
    const char* env;   // the variable holding its path
};

class BaselineTest : public ::testing::TestWithParam<Baseline> {
  protected:
    void SetUp() override {
        path_ = program_path(GetParam().env);
        if (path_.empty()) GTEST_SKIP() << GetParam().env << " not set (not built here)";
        ASSERT_FALSE(program_path("EVMUX_LOAD").empty()) << "EVMUX_LOAD not set";
    }
    /// Starts the server on port 0 and returns its port from the line it prints.
    int start(std::unique_ptr<Child>& server) {
        server = std::make_unique<Child>(std::vector<std::string>{path_, "--port", "0"});
        const auto line = server->stderr_line(10s);
        if (!line) {
            ADD_FAILURE() << "no 'listening' line from " << path_;
            return 0;
        }
        const std::regex shape("evmux-baseline-" + std::string(GetParam().name) +
                               R"( listening on 127\.0\.0\.1:([0-9]+))");
        std::smatch m;
        if (!std::regex_match(*line, m, shape)) {
            ADD_FAILURE() << "unexpected line: " << *line;
            return 0;
        }
        const int port = std::stoi(m[1]);
        EXPECT_GT(port, 0);
        return port;
    }
    std::string path_;
};

TEST_P(BaselineTest, EchoesEverySizeUnderLoadAndExitsCleanly) {
    std::unique_ptr<Child> server;
    const int port = start(server);
    ASSERT_GT(port, 0);
    for (const int size : {1, 1000, 100000}) {
        SCOPED_TRACE("size " + std::to_string(size));
        std::string out, err;
        const int rc = run_load({"--port", std::to_string(port), "--conns", "6", "--active", "4",
                                 "--size", std::to_string(size), "--duration", "0.3", "--json"},
                                &out, &err);
        EXPECT_EQ(rc, 0) << err;
        const LoadReport r = parse_report(out);
        EXPECT_EQ(r["conns"], 6);
        EXPECT_EQ(r["active"], 4);
        EXPECT_EQ(r["size"], size);
        EXPECT_EQ(r["mismatches"], 0);
        EXPECT_EQ(r["errors"], 0);
        EXPECT_GE(r["duration_s"], 0.3);
        EXPECT_LT(r["duration_s"], 10);
        EXPECT_GE(r["round_trips"], 4);  // at least one per active connection
        // The derived figures agree with the counts they come from.
        EXPECT_NEAR(r["round_trips_per_s"], r["round_trips"] / r["duration_s"],
                    0.01 * r["round_trips_per_s"] + 1);
        EXPECT_NEAR(r["mib_per_s"], 2.0 * r["round_trips"] * size / r["duration_s"] / 1048576.0,
                    0.01 * r["mib_per_s"] + 0.01);
        EXPECT_GT(r["p50"], 0);
        EXPECT_LE(r["p50"], r["p99"]);
        EXPECT_LE(r["p99"], r["max"]);
    }
    EXPECT_EQ(server->signal_and_wait(SIGTERM), 0) << server->err();
}

TEST_P(BaselineTest, SigintWithOpenConnectionsExitsZero) {
    std::unique_ptr<Child> server;
    const int port = start(server);
    ASSERT_GT(port, 0);
    // An open connection that has echoed once, so a worker (thread, child)
    // exists and is blocked in read when the signal comes.
    const int fd = dial_loopback(port);
    ASSERT_GE(fd, 0) << "connect: " << std::strerror(errno);
    ASSERT_EQ(::send(fd, "ping", 4, 0), 4);
    char buf[4];
    std::size_t got = 0;
    for (int i = 0; i < 100 && got < 4; ++i) {
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, 100) == 1) {
            const ssize_t n = ::recv(fd, buf + got, 4 - got, 0);
            if (n <= 0) break;
            got += static_cast<std::size_t>(n);
        }
    }
    ASSERT_EQ(got, 4u);
    EXPECT_EQ(std::memcmp(buf, "ping", 4), 0);

    // For the fork server: remember the child serving us; it must be gone
    // (terminated and reaped, not orphaned) once the parent has exited.
    std::vector<pid_t> children;
    {
        std::ifstream f("/proc/" + std::to_string(server->pid()) + "/task/" +
                        std::to_string(server->pid()) + "/children");
        for (pid_t p; f >> p;) children.push_back(p);
    }
    if (std::string(GetParam().name) == "fork") {
        EXPECT_EQ(children.size(), 1u);
    }

    EXPECT_EQ(server->signal_and_wait(SIGINT), 0) << server->err();
    for (pid_t p : children) EXPECT_NE(::kill(p, 0), 0) << "child " << p << " outlived its parent";
    // And the connection was closed by the server's exit, not left hanging.
    pollfd p{fd, POLLIN, 0};
    EXPECT_EQ(::poll(&p, 1, 2000), 1);
    EXPECT_LE(::recv(fd, buf, sizeof buf, 0), 0);
    ::close(fd);
}

/// A baseline given bad flags prints one line on stderr and exits 2.
void expect_bad_flags_exit_two(const std::string& path) {
    for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
             {}, {"--port"}, {"--port", "x"}, {"--port", "70000"}, {"--port", "0", "--bogus"}}) {
        std::vector<std::string> argv{path};
        argv.insert(argv.end(), args.begin(), args.end());
        Child c(argv);
        EXPECT_EQ(c.finish(), 2) << "args: " << ::testing::PrintToString(args);
        EXPECT_EQ(std::count(c.err().begin(), c.err().end(), '\n'), 1) << c.err();
        EXPECT_TRUE(c.out().empty()) << c.out();
    }
}

TEST_P(BaselineTest, BadFlagsExitTwoWithOneLine) {
    expect_bad_flags_exit_two(path_);
}

INSTANTIATE_TEST_SUITE_P(Baselines, BaselineTest,
                         ::testing::Values(Baseline{"epoll", "EVMUX_BASELINE_EPOLL"},
                                           Baseline{"libevent", "EVMUX_BASELINE_LIBEVENT"},
                                           Baseline{"threads", "EVMUX_BASELINE_THREADS"},
                                           Baseline{"fork", "EVMUX_BASELINE_FORK"},
                                           Baseline{"uring", "EVMUX_BASELINE_URING"}),
                         [](const auto& info) { return std::string(info.param.name); });

// The io_uring floor's own edges: its buffer ring lent out to more sessions
// than it has buffers, a client that does not read (the floor stops
// receiving from it at 16 buffers and must resume), a half-close.
class UringFloorTest : public BaselineTest {
  protected:
    /// Runs evmux-load for each (size, sessions) against port: every byte back.
    static void load_every(int port, const std::vector<std::pair<int, int>>& shapes) {
        for (const auto& [size, sessions] : shapes) {
            SCOPED_TRACE(std::to_string(sessions) + " x " + std::to_string(size));
            std::string out, err;
            const int rc = run_load({"--port", std::to_string(port), "--conns",
                                     std::to_string(sessions), "--active", std::to_string(sessions),
                                     "--size", std::to_string(size), "--duration", "0.3", "--json"},
                                    &out, &err);
            EXPECT_EQ(rc, 0) << err;
            const LoadReport r = parse_report(out);
            EXPECT_EQ(r["mismatches"], 0);
            EXPECT_EQ(r["errors"], 0);
            EXPECT_GE(r["round_trips"], sessions);
        }
    }
    /// Sets EVMUX_BASELINE_URING_BUFFERS for the servers this test starts.
    static void set_buffers(const char* count) {
        ::setenv("EVMUX_BASELINE_URING_BUFFERS", count, 1);
    }
    void TearDown() override {
        ::unsetenv("EVMUX_BASELINE_URING_BUFFERS");
        ::unsetenv("EVMUX_BASELINE_URING_SEND");
        ::unsetenv("EVMUX_BASELINE_URING_SETUP");
    }
};

TEST_P(UringFloorTest, EchoesEverySizeToManySessions) {
    std::unique_ptr<Child> server;
    const int port = start(server);
    ASSERT_GT(port, 0);
    load_every(port, {{64, 1}, {64, 300}, {16384, 10}, {16384, 1000}});
    EXPECT_EQ(server->signal_and_wait(SIGTERM), 0) << server->err();
}

TEST_P(UringFloorTest, SessionsOutOfBuffersWaitForOneAndNoneStalls) {
    // 4 buffers for 40 sessions: most recvs end with ENOBUFS and must be
    // armed again when a buffer comes back.
    set_buffers("4");
    std::unique_ptr<Child> server;
    const int port = start(server);
    ASSERT_GT(port, 0);
    load_every(port, {{64, 40}, {16384, 40}, {100000, 8}});
    EXPECT_EQ(server->signal_and_wait(SIGTERM), 0) << server->err();
}

// The variants docs/completion-io.md's "Not used, and why" measures:
// zero-copy sends (a buffer back to the ring only at its notification: with
// 4 buffers, sends still waiting for theirs starve the receives unless they
// come back) and evmux's own ring flags. Every byte still comes back.
TEST_P(UringFloorTest, ZeroCopyAndCoopVariantsEchoEveryByte) {
    for (const auto& [var, value] : {std::pair{"EVMUX_BASELINE_URING_SEND", "zc"},
                                     std::pair{"EVMUX_BASELINE_URING_SETUP", "coop"}}) {
        SCOPED_TRACE(std::string(var) + "=" + value);
        ::setenv(var, value, 1);
        for (const char* buffers : {"1024", "4"}) {
            SCOPED_TRACE(std::string("buffers ") + buffers);
            set_buffers(buffers);
            std::unique_ptr<Child> server;
            const int port = start(server);
            ASSERT_GT(port, 0);
            load_every(port, {{64, 1}, {1024, 100}, {16384, 10}, {100000, 4}});
            EXPECT_EQ(server->signal_and_wait(SIGTERM), 0) << server->err();
        }
        ::unsetenv(var);
    }
}

TEST_P(UringFloorTest, BadVariantExitsTwoWithOneLine) {
    for (const auto& [var, good] : {std::pair{"EVMUX_BASELINE_URING_SEND", "zc"},
                                    std::pair{"EVMUX_BASELINE_URING_SETUP", "coop"}}) {
        ::setenv(var, "yes", 1);
        Child c({path_, "--port", "0"});
        EXPECT_EQ(c.finish(), 2) << var;
        EXPECT_EQ(c.err(), "evmux-baseline-uring: " + std::string(var) + "=yes: must be '" + good +
                               "' or unset\n");
        ::unsetenv(var);
    }
}

TEST_P(UringFloorTest, BadBufferCountExitsTwoWithOneLine) {
    for (const char* bad : {"0", "3", "65536", "x", ""}) {
        set_buffers(bad);
        Child c({path_, "--port", "0"});
        EXPECT_EQ(c.finish(), 2) << "EVMUX_BASELINE_URING_BUFFERS=" << bad;
        EXPECT_EQ(c.err(), "evmux-baseline-uring: EVMUX_BASELINE_URING_BUFFERS=" +
                               std::string(bad) + ": not a power of two from 1 to 32768\n");
    }
}

TEST_P(UringFloorTest, AClientThatDoesNotReadGetsEveryByteBackThenEofAfterHalfClose) {
    std::unique_ptr<Child> server;
    const int port = start(server);
    ASSERT_GT(port, 0);
    const int fd = dial_loopback(port);
    ASSERT_GE(fd, 0) << "connect: " << std::strerror(errno);
    // 32 MiB, more than the socket buffers hold: written without reading
    // until the kernel takes no more (the floor has then stopped receiving
    // from us), then written and read in turn, the write side shut once all
    // is sent. The bytes vary with their offset.
    constexpr std::size_t total = 32u << 20;
    auto byte_at = [](std::size_t i) { return static_cast<char>((i * 131 + i / 4099) & 0xff); };
    std::string chunk(64 * 1024, '\0');
    std::size_t sent = 0, got = 0, bad = 0;
    auto send_some = [&] {
        const std::size_t n = std::min(chunk.size(), total - sent);
        for (std::size_t i = 0; i < n; ++i) chunk[i] = byte_at(sent + i);
        const ssize_t w = ::send(fd, chunk.data(), n, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w > 0) sent += static_cast<std::size_t>(w);
        if (sent == total) ::shutdown(fd, SHUT_WR);
        return w > 0;
    };
    bool stalled_once = false;
    for (int quiet = 0; sent < total && quiet < 5;) {  // 5 x 100 ms taking nothing
        if (send_some()) continue;
        ++quiet;
        std::this_thread::sleep_for(100ms);
    }
    stalled_once = sent < total;
    const auto deadline = Clock::now() + 20s;
    while (got < total && Clock::now() < deadline) {
        pollfd p{fd, static_cast<short>(POLLIN | (sent < total ? POLLOUT : 0)), 0};
        if (::poll(&p, 1, 100) <= 0) continue;
        if ((p.revents & POLLOUT) && sent < total) send_some();
        if (!(p.revents & POLLIN)) continue;
        char buf[64 * 1024];
        const ssize_t r = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        if (r == 0) break;
        for (ssize_t i = 0; i < r; ++i) bad += buf[i] != byte_at(got + static_cast<std::size_t>(i));
        if (r > 0) got += static_cast<std::size_t>(r);
    }
    EXPECT_TRUE(stalled_once) << "the socket buffers took all " << total << " bytes";
    EXPECT_EQ(sent, total);
    EXPECT_EQ(got, total);
    EXPECT_EQ(bad, 0u);
    // After everything came back, the half-close is answered with EOF.
    pollfd p{fd, POLLIN, 0};
    EXPECT_EQ(::poll(&p, 1, 5000), 1);
    char c;
    EXPECT_EQ(::recv(fd, &c, 1, 0), 0);
    ::close(fd);
    EXPECT_EQ(server->signal_and_wait(SIGTERM), 0) << server->err();
}

INSTANTIATE_TEST_SUITE_P(Baselines, UringFloorTest,
                         ::testing::Values(Baseline{"uring", "EVMUX_BASELINE_URING"}),
                         [](const auto& info) { return std::string(info.param.name); });

// The UDP floor (evmux-baseline-udp) under evmux-load --udp.
class UdpBaselineTest : public BaselineTest {};

TEST_P(UdpBaselineTest, EchoesEverySizeUnderUdpLoadAndExitsCleanly) {
    std::unique_ptr<Child> server;
    const int port = start(server);
    ASSERT_GT(port, 0);
    for (const int size : {8, 1472, 1473, 65507}) {
        SCOPED_TRACE("size " + std::to_string(size));
        // Several 64 KiB datagrams at once overflow the default receive
        // buffer (about three fit): the kernel drops, as it may. One session
        // at that size, so nothing may be lost.
        const std::string sessions = size > 8192 ? "1" : "4";
        std::string out, err;
        const int rc =
            run_load({"--udp", "--port", std::to_string(port), "--conns", sessions, "--size",
                      std::to_string(size), "--duration", "0.3", "--timeout", "1", "--json"},
                     &out, &err);
        EXPECT_EQ(rc, 0) << err;
        const LoadReport r = parse_report(out);
        EXPECT_GE(r["received"], 1);
        EXPECT_EQ(r["lost"], 0);
        EXPECT_EQ(r["sent"], r["received"]);
        EXPECT_EQ(r["mismatches"], 0);
        EXPECT_EQ(r["errors"], 0);
    }
    EXPECT_EQ(server->signal_and_wait(SIGTERM), 0) << server->err();
}

TEST_P(UdpBaselineTest, BadFlagsExitTwoWithOneLine) {
    expect_bad_flags_exit_two(path_);
}

INSTANTIATE_TEST_SUITE_P(Baselines, UdpBaselineTest,
                         ::testing::Values(Baseline{"udp", "EVMUX_BASELINE_UDP"}),
                         [](const auto& info) { return std::string(info.param.name); });

// ---------------------------------------------------------------------------
// evmux-load against servers that get it wrong: each must be caught.

class LoadTest : public ::testing::Test {
  protected:
    void SetUp() override {
        if (program_path("EVMUX_LOAD").empty()) GTEST_SKIP() << "EVMUX_LOAD not set";
    }
};

TEST_F(LoadTest, DetectsOneCorruptedByte) {
    // Flips one bit of byte 2500 of the stream: in the third message (the
    // first is the unrecorded warm-up, the second the first one counted).
    TinyServer server([](int fd, const std::atomic<bool>& stop) {
        TinyServer::echo(fd, stop, [](std::size_t off, char c) {
            return off == 2500 ? static_cast<char>(c ^ 0x20) : c;
        });
    });
    std::string out, err;
    EXPECT_EQ(run_load({"--port", std::to_string(server.port()), "--conns", "1", "--size", "1000",
                        "--duration", "0.3", "--json"},
                       &out, &err),
              1);
    const LoadReport r = parse_report(out);
    EXPECT_EQ(r["mismatches"], 1);
    EXPECT_EQ(r["round_trips"], 1);  // one good counted round trip; then it stopped
    EXPECT_NE(err.find("at byte 500"), std::string::npos) << err;
}

// A reply that differs and runs long is reported where it first differs,
// not where it ran past the message.
TEST_F(LoadTest, ALongReplyThatDiffersIsReportedWhereItDiffers) {
    TinyServer server([](int fd, const std::atomic<bool>& stop) {
        char buf[65536];
        const ssize_t n = TinyServer::read_for(fd, buf, sizeof buf, 10000, stop);
        if (n <= 0) return;
        const std::string reply = "hello\n" + std::string(buf, static_cast<std::size_t>(n));
        (void)!::send(fd, reply.data(), reply.size(), MSG_NOSIGNAL);
        TinyServer::read_for(fd, buf, sizeof buf, 10000, stop);  // until the client goes
    });
    std::string out, err;
    EXPECT_EQ(run_load({"--port", std::to_string(server.port()), "--conns", "1", "--size", "64",
                        "--duration", "0.3"},
                       &out, &err),
              1);
    EXPECT_NE(err.find("reply differs from the message at byte 0\n"), std::string::npos) << err;
}

// A server that closes a connection while it has no request out (here the
// first connection, after its warm-up echo, while the second's warm-up is
// held back) is said to have closed it, not to have sent data.
TEST_F(LoadTest, AServerClosingWhileNoRequestIsOutIsSaidAsSuch) {
    std::atomic<int> accepted{0};
    TinyServer server([&accepted](int fd, const std::atomic<bool>& stop) {
        const bool first = accepted++ == 0;
        char buf[64];
        std::size_t got = 0;
        while (got < sizeof buf) {
            const ssize_t n = TinyServer::read_for(fd, buf + got, sizeof buf - got, 10000, stop);
            if (n <= 0) return;
            got += static_cast<std::size_t>(n);
        }
        if (!first) std::this_thread::sleep_for(500ms);
        (void)!::send(fd, buf, sizeof buf, MSG_NOSIGNAL);
        if (first) ::shutdown(fd, SHUT_RDWR);
        TinyServer::echo(fd, stop, [](std::size_t, char c) { return c; });
    });
    std::string out, err;
    EXPECT_EQ(run_load({"--port", std::to_string(server.port()), "--conns", "2", "--size", "64",
                        "--duration", "0.3"},
                       &out, &err),
              1);
    EXPECT_NE(err.find("server closed the connection while no request was out"), std::string::npos)
        << err;
}

TEST_F(LoadTest, UpperChecksTheUppercasedReply) {
    TinyServer upper([](int fd, const std::atomic<bool>& stop) {
        TinyServer::echo(fd, stop, [](std::size_t, char c) {
            return (c >= 'a' && c <= 'z') ? static_cast<char>(c - 32) : c;
        });
    });
    std::string out, err;
    EXPECT_EQ(run_load({"--port", std::to_string(upper.port()), "--conns", "2", "--size", "3000",
                        "--duration", "0.2", "--upper", "--json"},
                       &out, &err),
              0)
        << err;
    EXPECT_EQ(parse_report(out)["mismatches"], 0);
    // The same client without --upper sees the uppercased letters as wrong.
    EXPECT_EQ(run_load({"--port", std::to_string(upper.port()), "--conns", "2", "--size", "3000",
                        "--duration", "0.2", "--json"},
                       &out, &err),
              1);
    EXPECT_EQ(parse_report(out)["mismatches"], 2);
}

TEST_F(LoadTest, DetectsAnIdleConnectionDroppedByTheServer) {
    // Echoes on connections that speak within 300 ms, closes the silent ones.
    TinyServer server([](int fd, const std::atomic<bool>& stop) {
        char buf[65536];
        ssize_t n = TinyServer::read_for(fd, buf, sizeof buf, 300, stop);
        if (n <= 0) {
            ::shutdown(fd, SHUT_RDWR);
            return;
        }
        if (::send(fd, buf, static_cast<std::size_t>(n), MSG_NOSIGNAL) != n) return;
        TinyServer::echo(fd, stop, [](std::size_t, char c) { return c; });
    });
    std::string out, err;
    EXPECT_EQ(run_load({"--port", std::to_string(server.port()), "--conns", "3", "--active", "1",
                        "--size", "100", "--duration", "0.6", "--json"},
                       &out, &err),
              1);
    const LoadReport r = parse_report(out);
    EXPECT_EQ(r["errors"], 2) << err;  // both idle ones
    EXPECT_EQ(r["mismatches"], 0);
    EXPECT_GT(r["round_trips"], 0);
    EXPECT_NE(err.find("idle connection closed by the server"), std::string::npos) << err;
}

TEST_F(LoadTest, DetectsAServerThatHangsUpMidReply) {
    // Echoes the stream up to byte `cut`, then hangs up: in the warm-up
    // message (cut 500) and in the second counted one (cut 2500).
    for (const std::size_t cut : {500u, 2500u}) {
        SCOPED_TRACE("cut at " + std::to_string(cut));
        TinyServer server([cut](int fd, const std::atomic<bool>& stop) {
            char buf[1000];
            std::size_t echoed = 0;
            while (echoed < cut) {
                ssize_t n = TinyServer::read_for(fd, buf, sizeof buf, 2000, stop);
                if (n <= 0) return;
                n = std::min<ssize_t>(n, static_cast<ssize_t>(cut - echoed));
                if (::send(fd, buf, static_cast<std::size_t>(n), MSG_NOSIGNAL) != n) return;
                echoed += static_cast<std::size_t>(n);
            }
            ::shutdown(fd, SHUT_RDWR);
        });
        std::string out, err;
        EXPECT_EQ(run_load({"--port", std::to_string(server.port()), "--conns", "1", "--size",
                            "1000", "--duration", "0.2", "--json"},
                           &out, &err),
                  1);
        const LoadReport r = parse_report(out);
        EXPECT_EQ(r["errors"], 1);
        EXPECT_EQ(r["mismatches"], 0);
        EXPECT_EQ(r["round_trips"], cut / 1000 == 0 ? 0 : cut / 1000 - 1);
        EXPECT_NE(err.find("500 of 1000"), std::string::npos) << err;
    }
}

TEST_F(LoadTest, DetectsARefusedConnection) {
    int port;
    {
        Listener gone;  // a port that was free a moment ago, now closed
        port = gone.port;
    }
    std::string out, err;
    EXPECT_EQ(run_load({"--port", std::to_string(port), "--conns", "3", "--size", "10",
                        "--duration", "0.2", "--json"},
                       &out, &err),
              1);
    const LoadReport r = parse_report(out);
    EXPECT_GE(r["errors"], 1);
    EXPECT_EQ(r["round_trips"], 0);
    EXPECT_NE(err.find("Connection refused"), std::string::npos) << err;
}

// evmux-echo takes "[::1]" and prints "[::1]:PORT" when it listens there;
// evmux-load handed the brackets to getaddrinfo and stopped at once with
// "--host [::1]: Name or service not known", exit 2.
TEST_F(LoadTest, ABracketedIpv6HostIsTheAddressInside) {
    int port;
    {
        Listener gone;  // a port that was free a moment ago, now closed
        port = gone.port;
    }
    for (const char* udp : {"", "--udp"}) {
        std::vector<std::string> args = {"--host",     "[::1]", "--port", std::to_string(port),
                                         "--conns",    "1",     "--size", "10",
                                         "--duration", "0.2"};
        if (*udp) args.push_back(udp);
        std::string out, err;
        // Connected (or tried to): refused, or no IPv6 here; never a bad name.
        EXPECT_EQ(run_load(args, &out, &err), 1) << udp << ": " << err;
        EXPECT_EQ(err.find("Name or service not known"), std::string::npos) << err;
    }
}

// The server killed mid-run: evmux-load ran on to the end of --duration with
// nothing to load (10 s here), then exited 1. It now stops at once.
TEST_F(LoadTest, StopsPromptlyWhenTheServerDies) {
    int port;
    {
        Listener gone;  // a port that was free a moment ago
        port = gone.port;
    }
    Child echo({program_path("EVMUX_ECHO"), "--host", "127.0.0.1", "--port", std::to_string(port)});
    ASSERT_GT(echo.pid(), 0);
    bool up = false;  // listening yet?
    for (int i = 0; i < 250 && !up; ++i) {
        const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a.sin_port = htons(static_cast<std::uint16_t>(port));
        up = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
        ::close(fd);
        if (!up) std::this_thread::sleep_for(20ms);
    }
    ASSERT_TRUE(up) << "evmux-echo did not listen on " << port;
    Child load({program_path("EVMUX_LOAD"), "--port", std::to_string(port), "--conns", "4",
                "--size", "64", "--duration", "10"});
    std::this_thread::sleep_for(500ms);
    const auto killed = Clock::now();
    ::kill(echo.pid(), SIGKILL);
    EXPECT_EQ(load.finish(), 1) << load.err();
    EXPECT_LT(Clock::now() - killed, 3s) << "ran on after the server died";
    EXPECT_NE(load.err().find("evmux-load: every active connection failed; stopped after "),
              std::string::npos)
        << load.err();
}

// Brackets hold an IPv6 address only (RFC 3986): "[localhost]" was looked
// up as localhost, "[127.0.0.1]" connected to 127.0.0.1.
TEST_F(LoadTest, BracketsAroundAnythingButIpv6AreRefused) {
    for (const char* host : {"[localhost]", "[127.0.0.1]", "[::1"}) {
        std::string out, err;
        EXPECT_EQ(run_load({"--host", host, "--port", "9", "--conns", "1", "--size", "10",
                            "--duration", "0.2"},
                           &out, &err),
                  2)
            << host << ": " << err;
        EXPECT_EQ(err, std::string("evmux-load: --host ") + host +
                           ": brackets hold an IPv6 address only, as in [::1]\n");
    }
}

TEST_F(LoadTest, TextReportSaysHowThroughputIsCounted) {
    TinyServer server([](int fd, const std::atomic<bool>& stop) {
        TinyServer::echo(fd, stop, [](std::size_t, char c) { return c; });
    });
    std::string out, err;
    EXPECT_EQ(run_load({"--port", std::to_string(server.port()), "--conns", "1", "--size", "10",
                        "--duration", "0.1"},
                       &out, &err),
              0)
        << err;
    EXPECT_NE(out.find("MiB/s (payload, both directions)"), std::string::npos) << out;
    EXPECT_NE(out.find("round trips"), std::string::npos) << out;
}

// --rate: the sends follow the schedule, not the echoes: R round trips per
// second, never more (the schedule holds at most R x duration + one per
// connection); a server slower than the schedule is seen as latency counted
// from when each message was due.
TEST_F(LoadTest, RatePacesTheSendsAndCountsLatencyFromWhenTheyWereDue) {
    TinyServer server([](int fd, const std::atomic<bool>& stop) {
        TinyServer::echo(fd, stop, [](std::size_t, char c) { return c; });
    });
    std::string out, err;
    ASSERT_EQ(run_load({"--port", std::to_string(server.port()), "--conns", "4", "--size", "100",
                        "--duration", "0.5", "--rate", "400", "--json"},
                       &out, &err),
              0)
        << err;
    LoadReport r = parse_report(out);
    EXPECT_EQ(r["rate_requested"], 400);
    EXPECT_LE(r["round_trips"], 400 * 0.5 + 4) << out;
    EXPECT_GE(r["round_trips"], 400 * 0.5 / 2) << out;  // an idle machine gives about 200
    // A server that takes 20 ms per echo, paced at one message per 10 ms:
    // each one goes out later than it was due, and its latency says so.
    TinyServer slow([](int fd, const std::atomic<bool>& stop) {
        TinyServer::echo(fd, stop, [](std::size_t off, char c) {
            if (off % 100 == 0) std::this_thread::sleep_for(20ms);
            return c;
        });
    });
    ASSERT_EQ(run_load({"--port", std::to_string(slow.port()), "--conns", "1", "--size", "100",
                        "--duration", "0.4", "--rate", "100", "--json"},
                       &out, &err),
              0)
        << err;
    r = parse_report(out);
    EXPECT_LE(r["round_trips"], 21) << out;  // 20 ms each: about 20 in 0.4 s
    EXPECT_GT(r["p99"], 100000) << out;      // the last was due ~0.2 s before it went
}

TEST_F(LoadTest, MarkWindowPrintsWindowAndEndBeforeTheJson) {
    TinyServer server([](int fd, const std::atomic<bool>& stop) {
        TinyServer::echo(fd, stop, [](std::size_t, char c) { return c; });
    });
    std::string out, err;
    EXPECT_EQ(run_load({"--port", std::to_string(server.port()), "--conns", "2", "--size", "10",
                        "--duration", "0.1", "--json", "--mark-window"},
                       &out, &err),
              0)
        << err;
    ASSERT_EQ(out.rfind("window\nend\n{", 0), 0u) << out;
    EXPECT_GT(parse_report(out.substr(11))["round_trips"], 0);
}

// ---- --udp ---------------------------------------------------------------------

/// A UDP echo server on a thread for the --udp tests: datagram number k
/// (from 0, over all senders) goes back through `reply(k, bytes)`, which may
/// alter it or return false to drop it.
class TinyUdpServer {
  public:
    using Reply = std::function<bool(std::size_t k, std::string& bytes)>;
    explicit TinyUdpServer(Reply reply) : reply_(std::move(reply)) {
        fd_ = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        sockaddr_in a{};
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t len = sizeof a;
        if (::bind(fd_, reinterpret_cast<sockaddr*>(&a), len) < 0 ||
            ::getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len) < 0)
            ADD_FAILURE() << "udp server: " << std::strerror(errno);
        port_ = ntohs(a.sin_port);
        thread_ = std::thread([this] { serve(); });
    }
    ~TinyUdpServer() {
        stop_ = true;
        thread_.join();
        ::close(fd_);
    }
    int port() const { return port_; }

  private:
    void serve() {
        std::string buf(65536, '\0');
        for (std::size_t k = 0; !stop_;) {
            pollfd p{fd_, POLLIN, 0};
            if (::poll(&p, 1, 20) <= 0) continue;
            sockaddr_storage from{};
            socklen_t len = sizeof from;
            const ssize_t n = ::recvfrom(fd_, buf.data(), buf.size(), 0,
                                         reinterpret_cast<sockaddr*>(&from), &len);
            if (n < 0) continue;
            std::string bytes(buf.data(), static_cast<std::size_t>(n));
            if (reply_(k++, bytes))
                ::sendto(fd_, bytes.data(), bytes.size(), 0, reinterpret_cast<sockaddr*>(&from),
                         len);
        }
    }
    Reply reply_;
    int fd_ = -1;
    int port_ = 0;
    std::atomic<bool> stop_{false};
    std::thread thread_;
};

TEST_F(LoadTest, UdpCountsTheDatagramsNotEchoedAsLost) {
    // Every 10th datagram is not echoed (the warm-up ones are resent).
    TinyUdpServer server([](std::size_t k, std::string&) { return k % 10 != 9; });
    std::string out, err;
    EXPECT_EQ(run_load({"--udp", "--port", std::to_string(server.port()), "--conns", "2", "--size",
                        "64", "--duration", "1", "--timeout", "0.1", "--json"},
                       &out, &err),
              0)
        << err;
    const LoadReport r = parse_report(out);
    EXPECT_GT(r["received"], 20);
    EXPECT_GT(r["lost"], 0);
    EXPECT_EQ(r["sent"], r["received"] + r["lost"]);
    EXPECT_NEAR(r["loss_percent"], 10.0, 4.0);
    EXPECT_EQ(r["round_trips"], r["received"]);
    EXPECT_EQ(r["mismatches"], 0);
    EXPECT_EQ(r["errors"], 0);
}

TEST_F(LoadTest, UdpDetectsACorruptedDatagramAndALateOne) {
    // Datagram 3 comes back with one byte flipped; datagram 5 comes back
    // twice (the second copy is an echo nobody waits for any more: late).
    std::string held;
    TinyUdpServer server([&held](std::size_t k, std::string& bytes) {
        if (k == 3) bytes[40] = static_cast<char>(bytes[40] ^ 0x01);
        if (k == 5) held = bytes;
        if (k == 6) bytes = held;  // an old echo instead of this one's
        return true;
    });
    std::string out, err;
    EXPECT_EQ(run_load({"--udp", "--port", std::to_string(server.port()), "--conns", "1", "--size",
                        "100", "--duration", "0.3", "--timeout", "0.2", "--json"},
                       &out, &err),
              1);
    const LoadReport r = parse_report(out);
    EXPECT_EQ(r["mismatches"], 1) << err;
    EXPECT_EQ(r["late"], 1);
    EXPECT_EQ(r["lost"], 1);  // datagram 6, whose echo never came
    EXPECT_NE(err.find("reply differs from the datagram"), std::string::npos) << err;
}

TEST_F(LoadTest, UdpRefusedPortIsAnError) {
    int port;
    {
        TinyUdpServer gone([](std::size_t, std::string&) { return true; });
        port = gone.port();
    }
    std::string out, err;
    EXPECT_EQ(
        run_load({"--udp", "--port", std::to_string(port), "--conns", "2", "--size", "10",
                  "--duration", "0.2", "--timeout", "0.02", "--connect-timeout", "0.3", "--json"},
                 &out, &err),
        1);
    const LoadReport r = parse_report(out);
    EXPECT_GE(r["errors"], 1);
    EXPECT_EQ(r["received"], 0);
    EXPECT_NE(err.find("Connection refused"), std::string::npos) << err;
}

// A refused datagram (ICMP port unreachable) is an answer: that session is
// done at once. It was taken for a lost one, and the warm-up sent again every
// --timeout until --connect-timeout (10 s by default) had passed.
TEST_F(LoadTest, UdpRefusedPortEndsTheWarmUpAtOnceWithOneErrorPerSession) {
    int port;
    {
        TinyUdpServer gone([](std::size_t, std::string&) { return true; });
        port = gone.port();
    }
    std::string out, err;
    const auto start = Clock::now();
    EXPECT_EQ(run_load({"--udp", "--port", std::to_string(port), "--conns", "3", "--size", "10",
                        "--duration", "0.2", "--json"},
                       &out, &err),
              1);
    EXPECT_LT(Clock::now() - start, 5s) << "waited for the connect timeout: " << err;
    const LoadReport r = parse_report(out);
    EXPECT_EQ(r["errors"], 3) << err;
    EXPECT_EQ(r["sent"], 0);
    for (const char* session : {"session 0: ", "session 1: ", "session 2: "})
        EXPECT_NE(err.find(std::string("evmux-load: ") + session), std::string::npos) << err;
    EXPECT_EQ(err.find("no echo"), std::string::npos) << err;
    EXPECT_NE(err.find("no load sent"), std::string::npos) << err;
}

TEST_F(LoadTest, UdpStopsPromptlyWhenTheServerGoes) {
    auto server = std::make_unique<TinyUdpServer>([](std::size_t, std::string&) { return true; });
    Child load({program_path("EVMUX_LOAD"), "--udp", "--port", std::to_string(server->port()),
                "--conns", "4", "--size", "64", "--duration", "10"});
    std::this_thread::sleep_for(500ms);
    const auto gone = Clock::now();
    server.reset();
    EXPECT_EQ(load.finish(), 1) << load.err();
    EXPECT_LT(Clock::now() - gone, 3s) << "ran on after the server went";
    EXPECT_NE(load.err().find("evmux-load: every session's datagrams were refused (nothing "
                              "listens there any more); stopped after "),
              std::string::npos)
        << load.err();
}

TEST_F(LoadTest, BadFlagsExitTwoWithOneLine) {
    const std::vector<std::vector<std::string>> cases = {
        {},
        {"--port", "1"},                                                     // missing required
        {"--port", "0", "--conns", "1", "--size", "1", "--duration", "1"},   // port 0
        {"--port", "1", "--conns", "0", "--size", "1", "--duration", "1"},   // no connections
        {"--port", "1", "--conns", "1", "--size", "0", "--duration", "1"},   // empty message
        {"--port", "1", "--conns", "1", "--size", "1", "--duration", "-1"},  // negative time
        {"--port", "1", "--conns", "2", "--size", "1", "--duration", "1", "--active", "3"},
        {"--port", "x", "--conns", "1", "--size", "1", "--duration", "1"},
        {"--port", "1", "--conns", "1", "--size", "1", "--duration", "1", "--bogus"},
        {"--udp", "--port", "1", "--conns", "1", "--size", "7", "--duration", "1"},
        {"--udp", "--port", "1", "--conns", "1", "--size", "65508", "--duration", "1"},
        {"--udp", "--port", "1", "--conns", "2", "--active", "1", "--size", "8", "--duration", "1"},
        {"--port", "1", "--conns", "1", "--size", "8", "--duration", "1", "--timeout", "0"},
        {"--port", "1", "--conns", "1", "--size", "8", "--duration", "1", "--rate", "0"},
        {"--udp", "--port", "1", "--conns", "1", "--size", "8", "--duration", "1", "--rate", "10"},
        {"--port", "1", "--conns", "1", "--size", "8", "--duration", "1", "--tls-records", "own"},
        {"--port", "1", "--conns", "1", "--size", "8", "--duration", "1", "--sndbuf", "0"},
        {"--port", "1", "--conns", "1", "--size", "8", "--duration", "1", "--tls-suites", "x"},
        {"--port", "1", "--conns", "1", "--size", "8", "--duration", "1", "--tls", "--tls-suites",
         "x"},
        {"--udp", "--port", "1", "--conns", "1", "--size", "8", "--duration", "1", "--sndbuf",
         "4096"},
        {"--port", "1", "--conns", "1", "--size", "8", "--duration", "1", "--tls", "--tls-records",
         "kernel"},
        {"--port", "1", "--conns", "1", "--size", "8", "--duration", "1", "--timeout", "0.5"},
    };
    for (const auto& args : cases) {
        std::string out, err;
        EXPECT_EQ(run_load(args, &out, &err), 2) << ::testing::PrintToString(args);
        EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
        EXPECT_TRUE(out.empty()) << out;
    }
}

// A --tls-ca file that is not there says so (OpenSSL's error queue has only
// the system error for it; the reason once read "unexpected EOF").
TEST_F(LoadTest, AMissingCaFileSaysSo) {
    if (!tls_built()) GTEST_SKIP() << "TLS not compiled in";
    std::string out, err;
    EXPECT_EQ(run_load({"--port", "1", "--conns", "1", "--size", "8", "--duration", "1", "--tls",
                        "--tls-ca", "/nonexistent/ca.pem"},
                       &out, &err),
              2);
    EXPECT_EQ(err, "evmux-load: --tls-ca /nonexistent/ca.pem: No such file or directory\n");
}

// A number flag's bad value is said as what the flag takes, the whole text
// checked ("5x" is not 5, "nan" is not a number in range), not CLI11's "Value
// 5x not in range".
TEST_F(LoadTest, BadNumbersAreSaidAsWhatTheFlagTakes) {
    const std::vector<std::string> rest = {"--port", "1", "--size", "8", "--duration", "1"};
    for (const auto& [flag, value, line] :
         std::vector<std::tuple<std::string, std::string, std::string>>{
             {"--conns", "5x", "--conns: '5x' is not a whole number from 1 to 1000000"},
             {"--conns", "-5", "--conns: '-5' is not a whole number from 1 to 1000000"},
             {"--timeout", "nan", "--timeout: 'nan' is not a number from 0.001 to 60"},
             {"--rate", "1e10", "--rate: '1e10' is not a number from 1 to 1e+09"}}) {
        std::vector<std::string> args = rest;
        if (flag != "--conns") args.insert(args.end(), {"--conns", "1"});
        args.insert(args.end(), {flag, value});
        std::string out, err;
        EXPECT_EQ(run_load(args, &out, &err), 2) << ::testing::PrintToString(args);
        EXPECT_EQ(err, "evmux-load: " + line + " (see --help)\n");
    }
}

// ---------------------------------------------------------------------------
// evmux-bench's user/sys split: perf samples of the mode a thread runs in.

/// CPU time `pid` has had (user + system), in seconds; -1 if gone.
double cpu_seconds_of(pid_t pid) {
    double t[4];
    return evmux::bench::read_stat_times(pid, t) ? (t[0] + t[1]) / 1e6 : -1;
}

/// What sample_until() saw: the split of the samples taken in its window,
/// and a line saying how much CPU the process had meanwhile, for a failure.
struct Sampled {
    evmux::bench::CpuModeSampler::Split split;
    std::string why;
};

/// Samples `pid` until `want` samples fall in the window or 5 s have gone
/// by, draining every 20 ms as evmux-bench does. What is checked is the
/// split of the samples, not how fast they come: a fixed 0.3 s window once
/// held none, beside other suites on 2 cores (`./run test`'s 2 processes,
/// 1 run in 3 of a `--repeat 3`); the failure message now says how much CPU
/// the process had in the window, to tell a starved process from a sampler
/// that missed one that ran.
Sampled sample_until(evmux::bench::CpuModeSampler& sampler, pid_t pid, std::uint64_t want) {
    const double cpu0 = cpu_seconds_of(pid);
    const auto t0 = Clock::now();
    auto t1 = t0;
    do {
        std::this_thread::sleep_for(20ms);
        sampler.drain();
        t1 = Clock::now();
    } while (sampler.split(t0, t1).total() < want && t1 - t0 < 5s);
    std::this_thread::sleep_for(20ms);
    sampler.drain();
    // Samples after t1 are left out; so are samples before t0 (none here).
    EXPECT_EQ(sampler.split(t1 + 1h, t1 + 2h).total(), 0u);
    Sampled r{sampler.split(t0, t1), {}};
    r.why = std::to_string(r.split.total()) + " samples (lost " + std::to_string(sampler.lost()) +
            ", throttled " + std::to_string(sampler.throttled()) + ") in " +
            std::to_string(std::chrono::duration<double>(t1 - t0).count()) +
            " s, while the process had " + std::to_string(cpu_seconds_of(pid) - cpu0) + " s of CPU";
    return r;
}

/// Whether perf_event_open sampling works here (else the reason, for a skip).
std::optional<std::string> perf_refused() {
    Child sleeper({"/bin/sleep", "5"});
    evmux::bench::CpuModeSampler probe(sleeper.pid());
    if (probe.available()) return std::nullopt;
    return probe.reason();
}

TEST(CpuModeSampler, AProcessSpinningInUserSpaceIsSampledInUserMode) {
    Child spinner({"/bin/sh", "-c", "while :; do :; done"});
    ASSERT_GT(spinner.pid(), 0);
    std::this_thread::sleep_for(100ms);  // past exec, dynamic linking, first page faults
    evmux::bench::CpuModeSampler sampler(spinner.pid());
    if (!sampler.available()) GTEST_SKIP() << "no perf sampling here: " << sampler.reason();
    EXPECT_EQ(sampler.threads(), 1u);
    // 50 ms of its CPU time at 4 kHz.
    const auto [split, why] = sample_until(sampler, spinner.pid(), 200);
    EXPECT_GE(split.total(), 200u) << why;
    // Not 1: interrupts and softirqs (e.g. a concurrent test's loopback
    // traffic) run in kernel mode on whatever thread they interrupt: 0.80
    // was seen beside the evmux_echo suite on 2 cores. A kernel-mode
    // process (the next test) is under 0.2.
    EXPECT_GT(split.user_share(), 0.6) << split.user << " user, " << split.kernel << " kernel";
}

TEST(CpuModeSampler, AProcessCopyingInTheKernelIsSampledInKernelMode) {
    // 8 MiB reads of zeroes: the time goes to the kernel's copies (96-97 %
    // under perf on the AMD EPYC guest; with bs=1 it would be about 60 %, the
    // rest dd's own loop). With 1 MiB reads that guest put 10-14 % in user
    // mode, and 20 % once under a parallel test run: it charges the return
    // from each system call to the first user instructions.
    Child dd({"/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=8M", "count=100000000"});
    ASSERT_GT(dd.pid(), 0);
    // Past exec, dynamic linking and the buffer's first page faults, as the
    // spinner above: sampled from its start, a CI pass once saw 61 % of
    // dd's samples in user mode.
    std::this_thread::sleep_for(200ms);
    evmux::bench::CpuModeSampler sampler(dd.pid());
    if (!sampler.available()) GTEST_SKIP() << "no perf sampling here: " << sampler.reason();
    const auto [split, why] = sample_until(sampler, dd.pid(), 200);
    EXPECT_GE(split.total(), 200u) << why;
    EXPECT_LT(split.user_share(), 0.2) << split.user << " user, " << split.kernel << " kernel";
}

TEST(CpuModeSampler, AGoneProcessIsUnavailableWithAReason) {
    pid_t pid;
    {
        Child gone({"/bin/true"});
        pid = gone.pid();
        gone.finish();  // reaped: the pid names no process now
    }
    evmux::bench::CpuModeSampler sampler(pid);
    EXPECT_FALSE(sampler.available());
    EXPECT_FALSE(sampler.reason().empty());
    sampler.drain();  // harmless
    EXPECT_EQ(sampler.split(Clock::now() - 1h, Clock::now()).total(), 0u);
}

/// A new empty directory under /tmp for a bench's files, or "" (errno set).
std::string make_temp_dir() {
    char dir_template[] = "/tmp/evmux-tools-test-XXXXXX";
    return ::mkdtemp(dir_template) != nullptr ? dir_template : "";
}

/// An evmux-bench run with `args`, writing --json and --csv into a temporary
/// directory: its exit status, the two files' text, stdout and stderr.
struct TinyBench {
    int rc = -1;
    std::string json, csv, out, err;
};
TinyBench bench_with_files(const std::string& bench, std::vector<std::string> args,
                           std::chrono::seconds limit = 60s) {
    TinyBench t;
    const std::string dir = make_temp_dir();
    if (dir.empty()) {
        t.err = std::string("mkdtemp: ") + std::strerror(errno);
        return t;
    }
    args.insert(args.begin(), bench);
    for (const char* f : {"--json", "--csv"})
        args.insert(args.end(), {f, dir + (f[2] == 'j' ? "/bench.json" : "/bench.csv")});
    Child c(args);
    t.rc = c.finish(limit);
    for (auto [file, into] :
         {std::pair{dir + "/bench.json", &t.json}, {dir + "/bench.csv", &t.csv}}) {
        std::ifstream in(file);
        std::stringstream text;
        text << in.rdbuf();
        *into = text.str();
        std::remove(file.c_str());
    }
    t.out = c.out();
    t.err = c.err();
    ::rmdir(dir.c_str());
    return t;
}

/// A tiny evmux-bench run (epoll-floor, one 0.2 s round).
TinyBench tiny_bench(const std::string& bench) {
    return bench_with_files(
        bench, {"--servers", "epoll-floor", "--sizes", "64", "--sessions", "2", "--duration", "0.2",
                "--rounds", "1", "--no-idle", "--no-plots"});
}

TEST(EvmuxBench, JsonAndTableRecordTheEnvironment) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    const TinyBench t = tiny_bench(bench);
    ASSERT_EQ(t.rc, 0) << t.err;
    const auto at = t.json.find("\"environment\": {");
    ASSERT_NE(at, std::string::npos) << t.json;
    const std::string env = t.json.substr(at, t.json.find('}', at) - at);
    for (const char* key :
         {"kernel", "cpu_model", "cores_online", "governor", "mitigations", "load_before",
          "load_after", "libevent", "liburing", "compiler", "build_type"}) {
        // Built by appending: GCC 12 warns falsely (-Wrestrict) on
        // "literal" + std::string at -O3.
        std::string pattern = "\"";
        pattern += key;
        pattern += "\": \"[^\"]+\"";
        const std::regex non_empty(pattern);
        EXPECT_TRUE(std::regex_search(env, non_empty)) << key << " in " << env;
    }
    EXPECT_EQ(env.find("run not finished"), std::string::npos) << env;
    EXPECT_NE(t.out.find("\nenvironment: linux "), std::string::npos) << t.out;
    // The host's speed, to compare runs by: the speed probes before and
    // after its one run (microseconds of a fixed piece of work), median [range].
    std::smatch m;
    ASSERT_TRUE(std::regex_search(
        env, m, std::regex(R"re("speed_probe_us": "([0-9.]+)( \[[0-9.]+-[0-9.]+\])?")re")))
        << env;
    EXPECT_GT(std::stod(m[1]), 0) << env;
    EXPECT_NE(t.out.find("\n  speed probe " + m[1].str() + m[2].str() +
                         " us (median [range] over the runs"),
              std::string::npos)
        << t.out;
}

// A forking server's CPU is its children's in the load window: a total,
// split by their ticks in the window or "unsplit" (user and sys null), never
// a default share; the CSV carries each figure's range over the rounds.
TEST(EvmuxBench, ForkServerIsMeasuredInTheWindowAndUnsplitIsNull) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    const TinyBench t =
        bench_with_files(bench, {"--servers", "fork", "--sizes", "64", "--sessions", "4",
                                 "--duration", "0.3", "--rounds", "2", "--no-idle", "--no-plots"});
    ASSERT_EQ(t.rc, 0) << t.err;
    const std::string &json = t.json, &csv = t.csv;
    static const std::regex split(R"re("cpu_split": "([^"]*)")re");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(json, m, split)) << json;
    const std::string how = m[1];
    static const std::regex cpu(R"re("cpu_us_per_msg": ([0-9.]+))re");
    ASSERT_TRUE(std::regex_search(json, m, cpu)) << json;
    EXPECT_GT(std::stod(m[1]), 0) << json;
    if (how.starts_with("unsplit")) {
        EXPECT_NE(json.find("\"user_us_per_msg\": null"), std::string::npos) << json;
    } else {
        EXPECT_EQ(how, "ticks (children's in the window)") << json;
    }
    EXPECT_NE(csv.find(",msgs_per_s,msgs_per_s_min,msgs_per_s_max,"), std::string::npos) << csv;
    EXPECT_NE(csv.find(",cpu_us_per_msg_ratio_min,"), std::string::npos) << csv;
}

// --instructions: callgrind counts for the floor and evmux; evmux runs more
// instructions per message than the floor's bare loop. Without valgrind the
// JSON says why instead of a figure.
TEST(EvmuxBench, InstructionsPerMessageUnderCallgrind) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    const TinyBench t =
        bench_with_files(bench,
                         {"--servers", "epoll-floor", "evmux", "--backends", "epoll", "--sizes",
                          "64", "--sessions", "2", "--duration", "0.2", "--rounds", "1",
                          "--no-idle", "--no-plots", "--sweep-fds", "10", "--instructions"},
                         120s);
    ASSERT_EQ(t.rc, 0) << t.err;
    const std::string& json = t.json;
    EXPECT_NE(t.out.find("== user-space instructions per echoed message"), std::string::npos)
        << t.out;
    static const std::regex row(
        R"re("server": "([^"]+)", "size": 1024, "sessions": 10, "instructions_per_msg": ([0-9.]+|null))re");
    std::map<std::string, std::string> per_msg;
    for (auto it = std::sregex_iterator(json.begin(), json.end(), row);
         it != std::sregex_iterator(); ++it)
        per_msg[(*it)[1]] = (*it)[2];
    ASSERT_EQ(per_msg.size(), 2u) << json;
    if (::access("/usr/bin/valgrind", X_OK) != 0) {
        EXPECT_NE(json.find("valgrind not found"), std::string::npos) << json;
        return;
    }
    // A sanitized build's servers cannot run under valgrind: each row must
    // then say so, with no figure, and the bench still exit 0.
    const char* sanitize = std::getenv("EVMUX_SANITIZE");
    if (sanitize && *sanitize && std::string(sanitize) != "none") {
        EXPECT_EQ(per_msg["epoll-floor"], "null") << json;
        EXPECT_EQ(per_msg["evmux/epoll"], "null") << json;
        EXPECT_NE(json.find("\"note\": \"server did not report listening"), std::string::npos)
            << json;
        return;
    }
    ASSERT_NE(per_msg["epoll-floor"], "null") << json;
    ASSERT_NE(per_msg["evmux/epoll"], "null") << json;
    EXPECT_GT(std::stod(per_msg["epoll-floor"]), 10) << json;
    EXPECT_GT(std::stod(per_msg["evmux/epoll"]), std::stod(per_msg["epoll-floor"])) << json;
}

// --udp: evmux-echo --udp rows against the UDP floor, ratios to it; sizes a
// datagram cannot have are skipped with the reason, not failed.
TEST(EvmuxBench, UdpRowsRunAgainstTheUdpFloor) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    const TinyBench t =
        bench_with_files(bench, {"--udp", "--servers", "evmux,udp-floor", "--backends", "poll",
                                 "--sizes", "64,100000", "--sessions", "2", "--duration", "0.2",
                                 "--rounds", "1", "--no-idle", "--no-plots", "--sweep-fds", "10"});
    ASSERT_EQ(t.rc, 0) << t.err;
    const std::string& json = t.json;
    // One run per line: the UDP rows at 64 B ran, with their counts and ratios.
    for (const char* server : {"udp-floor", "evmux/poll/udp"}) {
        const std::regex ran(std::string("\\{\"server\": \"") + server +
                             "\", [^\\n]*\"size\": 64, [^\\n]*\"ok\": true, [^\\n]*"
                             "\"udp_sent\": [1-9][0-9]*, \"udp_lost\": [0-9]+");
        EXPECT_TRUE(std::regex_search(json, ran)) << server << " in " << json;
        const std::regex skipped(std::string("\\{\"server\": \"") + server +
                                 "\", [^\\n]*\"size\": 100000, [^\\n]*\"skipped\": true, "
                                 "\"note\": \"UDP rows take sizes 8 to 65507 bytes");
        EXPECT_TRUE(std::regex_search(json, skipped)) << server << " in " << json;
    }
    EXPECT_NE(t.out.find("UDP rows: ratio to udp-floor"), std::string::npos) << t.out;
    EXPECT_NE(t.out.find("\nevmux/poll/udp "), std::string::npos) << t.out;
}

/// The io= of evmux-echo --backend io_uring --io completion's listening line:
/// what evmux makes of the request here ("" if it did not say).
std::string echo_completion_io(const std::string& echo) {
    Child c({echo, "--port", "0", "--backend", "io_uring", "--io", "completion"});
    const auto line = c.stderr_line(10s);
    c.signal_and_wait(SIGTERM);
    std::smatch m;
    static const std::regex io(R"( io=([a-z]+))");
    return line && std::regex_search(*line, m, io) ? std::string(m[1]) : "";
}

// --io completion,readiness: the evmux row on io_uring once per mode, named
// evmux/io_uring+completion and evmux/io_uring, beside both floors; the JSON
// says each run's io and its ratios to uring-floor too. The completion row
// has figures exactly when evmux-echo says io=completion for that request
// here; otherwise it is marked unusable, never measured under its label.
TEST(EvmuxBench, IoModesGetARowEachBesideBothFloors) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    const std::string echo = program_path("EVMUX_ECHO");
    ASSERT_FALSE(echo.empty()) << "EVMUX_ECHO not set";
    const TinyBench t = bench_with_files(
        bench, {"--io", "completion,readiness", "--servers",
                std::string("evmux,uring-floor,epoll-floor") + (tls_built() ? ",evmux-tls" : ""),
                "--backends", "io_uring", "--sizes", "64", "--sessions", "2", "--duration", "0.2",
                "--rounds", "1", "--no-idle", "--no-plots", "--sweep-fds", "10"});
    ASSERT_EQ(t.rc, 0) << t.err;
    const std::string& json = t.json;
    // One run per line.
    auto run = [&](const std::string& server) {
        const auto at = json.find("{\"server\": \"" + server + "\", ");
        return at == std::string::npos ? std::string() : json.substr(at, json.find('\n', at) - at);
    };
    static const std::regex number_ratio(
        R"re("ratio_to_floor": \{[^}]*"cpu_us_per_msg": [0-9.]+[^}]*\}, "ratio_to_uring_floor": \{[^}]*"cpu_us_per_msg": [0-9.]+)re");
    for (const auto& [server, io] : std::vector<std::pair<std::string, std::string>>{
             {"epoll-floor", ""}, {"uring-floor", ""}, {"evmux/io_uring", "readiness"}}) {
        const std::string r = run(server);
        EXPECT_NE(r.find("\"io\": \"" + io + "\", "), std::string::npos) << server << ": " << r;
        EXPECT_NE(r.find("\"ok\": true"), std::string::npos) << server << ": " << r;
        EXPECT_TRUE(std::regex_search(r, number_ratio)) << server << ": " << r;
        EXPECT_NE(t.out.find("\n" + server + " "), std::string::npos) << t.out;
    }
    EXPECT_NE(run("uring-floor").find("\"ratio_to_uring_floor\": {\"msgs_per_s\": 1.000"),
              std::string::npos)
        << json;
    const std::string completion = run("evmux/io_uring+completion");
    EXPECT_NE(completion.find("\"io\": \"completion\", "), std::string::npos) << completion;
    const std::string says = echo_completion_io(echo);
    ASSERT_FALSE(says.empty()) << "evmux-echo's listening line has no io=";
    if (says == "completion") {
        EXPECT_NE(completion.find("\"ok\": true"), std::string::npos) << completion;
        EXPECT_TRUE(std::regex_search(completion, number_ratio)) << completion;
        EXPECT_NE(t.out.find("== completion I/O against both floors"), std::string::npos) << t.out;
        EXPECT_NE(t.out.find(" evmux/io_uring+completion "), std::string::npos) << t.out;
        if (tls_built()) {
            // TLS too: a row per mode, each in the TLS table beside its plain twin.
            for (const char* row : {"evmux/io_uring/tls", "evmux/io_uring+completion/tls"}) {
                EXPECT_NE(run(row).find("\"ok\": true"), std::string::npos) << row << ": " << json;
                EXPECT_NE(t.out.find(" " + std::string(row) + " "), std::string::npos) << t.out;
            }
            EXPECT_NE(run("evmux/io_uring+completion/tls").find("\"io\": \"completion\", "),
                      std::string::npos);
        }
    } else {
        EXPECT_NE(completion.find("\"ok\": false, \"skipped\": true, \"note\": \"unusable: asked "
                                  "for io=completion, the server runs io=" +
                                  says),
                  std::string::npos)
            << completion;
        EXPECT_NE(t.out.find("  evmux/io_uring+completion: unusable: "), std::string::npos)
            << t.out;
    }
    EXPECT_NE(t.csv.find("server,kind,backend,io,size,"), std::string::npos) << t.csv;
    EXPECT_NE(t.csv.find(",cpu_us_per_msg_ratio_uring_floor,"), std::string::npos) << t.csv;
    EXPECT_NE(t.csv.find("\nevmux/io_uring+completion,evmux,io_uring,completion,64,"),
              std::string::npos)
        << t.csv;
}

// The io_uring floor's variants, only when named: a row each, paired with
// uring-floor's rounds, and their table.
TEST(EvmuxBench, UringFloorVariantsRunBesideTheFloor) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    const TinyBench t =
        bench_with_files(bench, {"--servers", "uring-floor,uring-floor-coop,uring-floor-zc",
                                 "--sizes", "1024", "--sessions", "2", "--duration", "0.2",
                                 "--rounds", "1", "--no-idle", "--no-plots", "--sweep-fds", "10"});
    ASSERT_EQ(t.rc, 0) << t.err;
    static const std::regex ratio(
        R"re("ok": true.*"ratio_to_uring_floor": \{[^}]*"cpu_us_per_msg": [0-9.]+)re");
    for (const char* server : {"uring-floor-coop", "uring-floor-zc"}) {
        const auto at = t.json.find(std::string("{\"server\": \"") + server + "\", ");
        ASSERT_NE(at, std::string::npos) << t.json;
        const std::string row = t.json.substr(at, t.json.find('\n', at) - at);
        EXPECT_TRUE(std::regex_search(row, ratio)) << row;
        EXPECT_NE(t.out.find("\n1KiB x 2 "), std::string::npos) << t.out;
        EXPECT_NE(t.out.find(std::string(" ") + server + " "), std::string::npos) << t.out;
    }
    EXPECT_NE(t.out.find("== the io_uring floor's variants against it"), std::string::npos)
        << t.out;
    // Not in a default run: only when named.
    EXPECT_EQ(t.err.find("unknown server"), std::string::npos) << t.err;
}

// The TLS table: EVP alone timed in every round, extra/evp paired round by
// round, with its interval and a verdict that says when the rounds disagree.
TEST(EvmuxBench, TlsTargetPairsEachRoundWithItsOwnEvpTiming) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    if (!tls_built()) GTEST_SKIP() << "built without TLS";
    const TinyBench t =
        bench_with_files(bench, {"--servers", "evmux,evmux-tls", "--backends", "epoll", "--sizes",
                                 "1024", "--sessions", "4", "--duration", "0.2", "--rounds", "2",
                                 "--no-idle", "--no-plots", "--sweep-fds", "10"});
    ASSERT_EQ(t.rc, 0) << t.err;
    EXPECT_NE(t.out.find("== TLS: server CPU us/msg"), std::string::npos) << t.out;
    EXPECT_NE(t.out.find("(timed each round; extra/evp paired by round: median [interval])"),
              std::string::npos)
        << t.out;
    EXPECT_NE(t.out.find("(bare loop: no server; the same seal+open with each message sent over "
                         "loopback TCP"),
              std::string::npos)
        << t.out;
    EXPECT_NE(t.out.find("(hand-written echo: no framework; on the servers' CPU, the sessions' "
                         "loopback connections served in turn"),
              std::string::npos)
        << t.out;
    // "1KiB x 4  evmux/epoll/tls  plain tls evp  median [lo-hi]  verdict
    // bare-median [lo-hi]  echo-median [lo-hi]": two rounds give an interval
    // unless their ratios are equal to the digit; a verdict from runs other
    // work disturbed says so (two rounds: none is left out). The bare loop's
    // and the hand-written echo's extra/evp beside it, explained under the
    // table.
    static const std::regex row(
        R"re(\n1KiB x 4 +evmux/epoll/tls +[0-9.]+ +[0-9.]+ +[0-9.]+ +-?[0-9.]+( \[-?[0-9.]+--?[0-9.]+\])? +(met|missed|unclear)( \(disturbed\))?  -?[0-9.]+( \[-?[0-9.]+--?[0-9.]+\])? +-?[0-9.]+( \[-?[0-9.]+--?[0-9.]+\])?\n)re");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(t.out, m, row)) << t.out;
    // "(disturbed)" exactly when a run it stands on was flagged.
    const bool flagged =
        t.json.find("\"flagged\": true") != std::string::npos && t.out.starts_with("WARNING: ");
    EXPECT_EQ(m[3].matched, flagged) << t.out;
    // The JSON has the row too, with each round's EVP timing (two rounds,
    // none left out) and the same verdict.
    static const std::regex json_row(
        R"re("tls_target": \[\n +\{"server": "evmux/epoll/tls", "plain_server": "evmux/epoll", "size": 1024, "conns": 4, "active": 4, "evp_us": \[[0-9.]+, [0-9.]+\], "evp_us_left_out": \[\], "extra_over_evp": \{"median": -?[0-9.]+, "min": -?[0-9.]+, "max": -?[0-9.]+\}, "limit": 1.3, "verdict": "([a-z ()]+)", "bare_us": \[-?[0-9.]+, -?[0-9.]+\], "bare_us_left_out": \[\], "bare_extra_over_evp": \{"median": -?[0-9.]+, "min": -?[0-9.]+, "max": -?[0-9.]+\}, "handwritten_us": \[-?[0-9.]+, -?[0-9.]+\], "handwritten_us_left_out": \[\], "handwritten_extra_over_evp": \{"median": -?[0-9.]+, "min": -?[0-9.]+, "max": -?[0-9.]+\}\}\n +\])re");
    std::smatch j;
    ASSERT_TRUE(std::regex_search(t.json, j, json_row)) << t.json;
    EXPECT_EQ(j[1].str(), m[2].str() + m[3].str()) << t.json;
}

/// evmux-bench's TLS point alone: evmux and evmux-tls on epoll, one 0.2 s
/// round of `size`-byte messages over `sessions`; run by `runner` (with its
/// arguments) when given, e.g. under prlimit.
TinyBench tls_point(const std::string& bench, const char* size, const char* sessions,
                    std::vector<std::string> runner = {}) {
    std::vector<std::string> args{
        "--servers",  "evmux,evmux-tls", "--backends",  "epoll", "--sizes",  size,
        "--sessions", sessions,          "--duration",  "0.2",   "--rounds", "1",
        "--no-idle",  "--no-plots",      "--sweep-fds", "10"};
    if (runner.empty()) return bench_with_files(bench, args);
    args.insert(args.begin(), bench);
    args.insert(args.begin(), runner.begin() + 1, runner.end());
    return bench_with_files(runner.front(), args);
}

// The bare loop sends each sealed message to itself over loopback TCP: a
// message larger than the socket buffers (4 MiB here, where 1 MiB still
// fits; --sizes takes up to 16 MiB) must not wait on a send for a recv the
// same thread has yet to make. The hand-written echo is not measured there
// ("-": over 64 KiB a message each way might not fit its connections).
TEST(EvmuxBench, TlsBareLoopTakesAMessageLargerThanTheSocketBuffers) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    if (!tls_built()) GTEST_SKIP() << "built without TLS";
    const TinyBench t = tls_point(bench, "4194304", "1");
    ASSERT_EQ(t.rc, 0) << t.err;
    static const std::regex row(
        R"re(\n4096KiB x 1 +evmux/epoll/tls +[0-9.]+ +[0-9.]+ +[0-9.]+ +-?[0-9.]+ +[a-z ()]+  ([0-9.]+) +-\n)re");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(t.out, m, row)) << t.out;
    EXPECT_GT(std::stod(m[1].str()), 0) << t.out;
    EXPECT_NE(t.json.find("\"handwritten_us\": [null], \"handwritten_us_left_out\": [], "
                          "\"handwritten_extra_over_evp\": {\"median\": null"),
              std::string::npos)
        << t.json;
}

// The hand-written echo at its largest message (64 KiB), over many
// connections: a message each way fits every connection, so its passes
// never wait on each other (a stall would be an error after 2 s), and the
// cipher costs it something.
TEST(EvmuxBench, TlsHandWrittenEchoMeasuresItsLargestMessage) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    if (!tls_built()) GTEST_SKIP() << "built without TLS";
    const TinyBench t = tls_point(bench, "65536", "50");
    ASSERT_EQ(t.rc, 0) << t.err;
    static const std::regex row(
        R"re(\n64KiB x 50 +evmux/epoll/tls +[0-9.]+ +[0-9.]+ +[0-9.]+ +-?[0-9.]+ +[a-z ()]+  -?[0-9.]+ +(-?[0-9.]+)\n)re");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(t.out, m, row)) << t.out;
    EXPECT_GT(std::stod(m[1].str()), 0) << t.out;
}

// With a hard fd limit of 400, the hand-written echo has no room for both
// ends of 250 connections (564 fds): not measured ("-", null), while the
// servers, each holding one end, still run and the bench succeeds.
TEST(EvmuxBench, TlsHandWrittenEchoIsLeftOutWithoutFdsForBothEnds) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    if (!tls_built()) GTEST_SKIP() << "built without TLS";
    ASSERT_EQ(::access("/usr/bin/prlimit", X_OK), 0) << "util-linux's prlimit";
    const TinyBench t = tls_point(bench, "1024", "250", {"/usr/bin/prlimit", "--nofile=400:400"});
    ASSERT_EQ(t.rc, 0) << t.err;
    static const std::regex row(
        R"re(\n1KiB x 250 +evmux/epoll/tls +[0-9.]+ +[0-9.]+ +[0-9.]+ +-?[0-9.]+ +[a-z ()]+  -?[0-9.]+ +-\n)re");
    EXPECT_TRUE(std::regex_search(t.out, row)) << t.out;
    EXPECT_NE(t.json.find("\"handwritten_us\": [null], \"handwritten_us_left_out\": [], "
                          "\"handwritten_extra_over_evp\": {\"median\": null"),
              std::string::npos)
        << t.json;
}

// --rate: every TCP point paced (evmux-load --rate), said in the table and
// the JSON; a run whose client fell behind the rate is not counted.
TEST(EvmuxBench, RatePacesEveryPointAndDropsARunThatFellBehind) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    const std::vector<std::string> args{"--servers",  "epoll-floor", "--sizes",    "64",
                                        "--sessions", "2",           "--duration", "0.3",
                                        "--rounds",   "1",           "--no-idle",  "--no-plots"};
    std::vector<std::string> paced = args;
    paced.insert(paced.end(), {"--rate", "300"});
    // 300/s is far below what the floor does, but a run is only 0.3 s: a
    // stall of 10 ms or more (the servers and the load are pinned, and on 2
    // cores a concurrent suite takes their CPUs at times; 268/s was seen)
    // drops it below 97 % of the rate, and the bench rightly says so. Up to
    // three runs, then: each that fell behind must say why, one must keep up.
    TinyBench t;
    for (int attempt = 1; attempt <= 3; ++attempt) {
        t = bench_with_files(bench, paced);
        if (t.rc == 0) break;
        ASSERT_EQ(t.rc, 1) << t.err << t.out;
        ASSERT_NE(t.out.find("epoll-floor: FAILED: did not keep up with --rate 300:"),
                  std::string::npos)
            << t.err << t.out;
    }
    ASSERT_EQ(t.rc, 0) << t.err << t.out;
    EXPECT_NE(t.out.find("ping-pong, paced at 300 round trips/s"), std::string::npos) << t.out;
    EXPECT_NE(t.json.find("\"rate\": 300.0"), std::string::npos) << t.json;
    std::smatch m;
    static const std::regex rate(R"re("msgs_per_s": ([0-9.]+))re");
    ASSERT_TRUE(std::regex_search(t.json, m, rate)) << t.json;
    EXPECT_GE(std::stod(m[1]), 0.97 * 300) << t.json;
    EXPECT_LE(std::stod(m[1]), 300 + 2 / 0.3 + 1) << t.json;  // + a round per session at most
    paced = args;
    paced.insert(paced.end(), {"--rate", "100000000"});
    t = bench_with_files(bench, paced);
    EXPECT_EQ(t.rc, 1) << t.out;
    EXPECT_NE(t.out.find("epoll-floor: FAILED: did not keep up with --rate 100000000"),
              std::string::npos)
        << t.out;
    EXPECT_NE(t.json.find("\"ok\": false"), std::string::npos) << t.json;
}

TEST(EvmuxBench, BadIoModeExitsTwoWithOneLine) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    for (const auto& [args, line] : std::vector<std::pair<std::vector<std::string>, std::string>>{
             {{"--io", "fast"},
              "evmux-bench: --io: unknown mode 'fast'; known: completion, readiness (see "
              "--help)\n"},
             {{"--io", "completion", "--backends", "epoll"},
              "evmux-bench: --io completion: only the io_uring backend has it, and it is not "
              "among the backends run (see --help)\n"},
             // Where the results go is tried first, not after the whole run.
             {{"--json", "/nonexistent/dir/x.json"},
              "evmux-bench: --json /nonexistent/dir/x.json: No such file or directory (see "
              "--help)\n"},
             {{"--csv", "/proc/x.csv"},
              "evmux-bench: --csv /proc/x.csv: No such file or directory (see --help)\n"}}) {
        std::vector<std::string> argv{bench};
        argv.insert(argv.end(), args.begin(), args.end());
        Child c(argv);
        EXPECT_EQ(c.finish(), 2) << ::testing::PrintToString(args);
        EXPECT_EQ(c.err(), line);
    }
    // EVMUX_IO is checked before the run too (it once failed the run's end).
    const char* had = std::getenv("EVMUX_IO");
    const std::string saved = had ? had : "";
    ::setenv("EVMUX_IO", "nope", 1);
    Child c({bench, "--servers", "epoll-floor"});
    if (had)
        ::setenv("EVMUX_IO", saved.c_str(), 1);
    else
        ::unsetenv("EVMUX_IO");
    EXPECT_EQ(c.finish(), 2);
    EXPECT_EQ(c.err(),
              "evmux-bench: EVMUX_IO must be completion or readiness, not 'nope' (see --help)\n");
}

// Without --backends, EVMUX_BACKEND picks the backend, as it does for every
// evmux program, and the bench says so; --backends overrides it; a name it
// does not know is one line naming the variable, exit 2. (It was ignored:
// every usable backend ran.)
TEST(EvmuxBench, EvmuxBackendPicksTheBackendUnlessBackendsIsGiven) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    const char* had = std::getenv("EVMUX_BACKEND");
    const std::string saved = had ? had : "";
    auto run = [&](const char* env, std::vector<std::string> extra) {
        ::setenv("EVMUX_BACKEND", env, 1);
        std::vector<std::string> argv{bench,        "--servers",   "evmux", "--sizes",
                                      "64",         "--sessions",  "1",     "--duration",
                                      "0.2",        "--rounds",    "1",     "--no-idle",
                                      "--no-plots", "--sweep-fds", "100"};
        argv.insert(argv.end(), extra.begin(), extra.end());
        Child c(argv);
        if (had)
            ::setenv("EVMUX_BACKEND", saved.c_str(), 1);
        else
            ::unsetenv("EVMUX_BACKEND");
        const int rc = c.finish();
        return std::tuple{rc, c.out(), c.err()};
    };
    {
        const auto [rc, out, err] = run("poll", {});
        ASSERT_EQ(rc, 0) << err;
        EXPECT_NE(out.find("evmux/poll "), std::string::npos) << out;
        EXPECT_EQ(out.find("evmux/epoll "), std::string::npos) << out;
        EXPECT_NE(err.find("evmux-bench: backend poll from EVMUX_BACKEND (--backends overrides "
                           "it)\n"),
                  std::string::npos)
            << err;
    }
    {
        const auto [rc, out, err] = run("poll", {"--backends", "epoll"});
        ASSERT_EQ(rc, 0) << err;
        EXPECT_NE(out.find("evmux/epoll "), std::string::npos) << out;
        EXPECT_EQ(out.find("evmux/poll "), std::string::npos) << out;
        EXPECT_EQ(err.find("EVMUX_BACKEND"), std::string::npos) << err;
    }
    {
        const auto [rc, out, err] = run("nope", {});
        EXPECT_EQ(rc, 2);
        EXPECT_EQ(
            err.rfind("evmux-bench: EVMUX_BACKEND: unknown backend 'nope'; usable backends: ", 0),
            0u)
            << err;
        EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;
    }
}

// A failed evmux-load is summed up with what it reported (its counts), or
// pointed at its own error above when it made no report: the FAILED note
// once ended in an empty reason or a raw JSON line. A stand-in evmux-load
// (--tools-dir) fails each way.
TEST(EvmuxBench, ALoadFailureIsSaidWithItsCountsOrItsError) {
    const std::string bench = program_path("EVMUX_BENCH");
    const std::string floor = program_path("EVMUX_BASELINE_EPOLL");
    if (bench.empty() || floor.empty()) GTEST_SKIP() << "EVMUX_BENCH or the floor not built here";
    const std::string dir = make_temp_dir();
    ASSERT_FALSE(dir.empty()) << "mkdtemp: " << std::strerror(errno);
    ASSERT_EQ(::symlink(floor.c_str(), (dir + "/evmux-baseline-epoll").c_str()), 0);
    const std::string load = dir + "/evmux-load";
    for (const auto& [script, note] : std::vector<std::pair<std::string, std::string>>{
             {"echo '{\"round_trips\":0,\"mismatches\":1,\"errors\":0}'",
              "FAILED: evmux-load exit 1: 1 mismatches, 0 errors"},
             {"echo 'evmux-load: refused' >&2",
              "FAILED: evmux-load exit 1: no report (its error is above)"}}) {
        std::ofstream(load) << "#!/bin/sh\n" << script << "\nexit 1\n";
        ASSERT_EQ(::chmod(load.c_str(), 0755), 0);
        Child c({bench, "--tools-dir", dir, "--servers", "epoll-floor", "--sizes", "64",
                 "--sessions", "1", "--duration", "0.2", "--rounds", "1", "--no-idle",
                 "--no-plots"});
        EXPECT_EQ(c.finish(), 1);
        EXPECT_NE((c.out() + c.err()).find("epoll-floor: " + note), std::string::npos)
            << c.out() << c.err();
    }
    std::remove(load.c_str());
    std::remove((dir + "/evmux-baseline-epoll").c_str());
    ::rmdir(dir.c_str());
}

/// Pins process `pid` to CPU `cpu`; false (errno set) if it cannot.
bool pin_to_cpu(pid_t pid, int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return ::sched_setaffinity(pid, sizeof set, &set) == 0;
}

/// The text of `file` in the temporary directory `dir`, both removed.
std::string take_file(const std::string& file, const std::string& dir) {
    std::ifstream in(file);
    std::stringstream text;
    text << in.rdbuf();
    std::remove(file.c_str());
    ::rmdir(dir.c_str());
    return text.str();
}

/// The round numbers in a run's JSON array `key` ("rounds" or
/// "rounds_left_out"; no array nests inside either), or nullopt if absent.
std::optional<std::vector<int>> json_round_numbers(const std::string& run, const std::string& key) {
    const auto at = run.find("\"" + key + "\": [");
    if (at == std::string::npos) return std::nullopt;
    const std::string array = run.substr(at, run.find(']', at) - at);
    static const std::regex number(R"re("round": ([0-9]+)\})re");
    std::vector<int> out;
    for (auto it = std::sregex_iterator(array.begin(), array.end(), number);
         it != std::sregex_iterator(); ++it)
        out.push_back(std::stoi((*it)[1]));
    return out;
}

// A round that other work disturbed is replaced by an extra round, and left
// out of every server's figures at its point, so that the paired ratios stay
// paired, while at least half of the rounds (and 3) remain; the report says
// which round and why. A spinner on the servers' CPU through round 2 disturbs
// it for real. (Other work on a busy machine may disturb more rounds; if too
// many are, none is left out and the runs are flagged instead: checked too.)
TEST(EvmuxBench, LeavesOutOfTheFiguresARoundOtherWorkDisturbed) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    const std::string dir = make_temp_dir(), json_file = dir + "/bench.json";
    ASSERT_FALSE(dir.empty()) << "mkdtemp: " << std::strerror(errno);
    constexpr int rounds = 6;
    Child c({bench,
             "--servers",
             "epoll-floor,evmux",
             "--backends",
             "epoll",
             "--sizes",
             "64",
             "--sessions",
             "2",
             "--duration",
             "0.3",
             "--rounds",
             std::to_string(rounds),
             "--interference-threshold",
             "30",
             "--no-idle",
             "--no-plots",
             "--sweep-fds",
             "10",
             "--json",
             json_file});
    ASSERT_GT(c.pid(), 0);
    // "evmux-bench: servers on CPU 0, evmux-load on CPU 1"
    std::optional<std::string> line = c.stderr_line(20s);
    ASSERT_TRUE(line) << c.err();
    std::smatch m;
    ASSERT_TRUE(std::regex_search(*line, m, std::regex("servers on CPU ([0-9]+)"))) << *line;
    const int server_cpu = std::stoi(m[1]);
    // Each run's line ends when it has run: round 1's second run, then round 2's.
    std::string seen;  // stderr as read
    auto wait_for = [&](const std::string& prefix) {
        while ((line = c.stderr_line(30s))) {
            seen += *line + "\n";
            if (line->starts_with(prefix)) return true;
        }
        return false;
    };
    ASSERT_TRUE(wait_for("[2/12] round 1/6 ")) << c.err();
    {
        Child spinner({"/bin/sh", "-c", "while :; do :; done"});
        ASSERT_GT(spinner.pid(), 0);
        ASSERT_TRUE(pin_to_cpu(spinner.pid(), server_cpu)) << std::strerror(errno);
        ASSERT_TRUE(wait_for("[4/12] round 2/6 ")) << c.err();
    }  // the spinner is killed here
    ASSERT_EQ(c.finish(120s), 0) << c.err() << c.out();
    const std::string json = take_file(json_file, dir);

    // Round 2 was flagged as it ran (a line after its run's).
    seen += c.err();
    const auto round2 = seen.find("[3/12] round 2/6 ");
    const std::string text2 = seen.substr(round2, seen.find("[5/12] ") - round2);
    EXPECT_NE(text2.find("\n  WARNING: disturbed: "), std::string::npos) << seen;
    // Each run: its kept rounds and the ones left out; the same for both.
    std::vector<std::vector<int>> kept, left;
    std::vector<std::string> runs;
    for (const char* server : {"epoll-floor", "evmux/epoll"}) {
        const auto at = json.find("{\"server\": \"" + std::string(server) + "\"");
        ASSERT_NE(at, std::string::npos) << json;
        const std::string run = json.substr(at, json.find("\n", at) - at);
        const auto k = json_round_numbers(run, "rounds");
        const auto l = json_round_numbers(run, "rounds_left_out");
        ASSERT_TRUE(k && l) << run;
        runs.push_back(run);
        kept.push_back(*k);
        left.push_back(*l);
        std::vector<int> all = *k;
        all.insert(all.end(), l->begin(), l->end());
        std::sort(all.begin(), all.end());
        // Rounds 1..n, n > 6: at least one extra round ran (round 2's
        // disturbance was seen at once), at most 6 extra.
        ASSERT_FALSE(all.empty()) << run;
        const int n = all.back();
        EXPECT_GT(n, rounds) << run;
        EXPECT_LE(n, 2 * rounds) << run;
        std::vector<int> one_to_n(static_cast<std::size_t>(n));
        std::iota(one_to_n.begin(), one_to_n.end(), 1);
        EXPECT_EQ(all, one_to_n) << run;
    }
    EXPECT_EQ(kept[0], kept[1]) << json;
    EXPECT_EQ(left[0], left[1]) << json;
    EXPECT_NE(seen.find("[extra] round 7, in place of a disturbed one, epoll-floor 64B x 2 ..."),
              std::string::npos)
        << seen;
    const std::string& out = c.out();
    const std::string first_line = out.substr(0, out.find('\n'));
    if (!left[0].empty()) {
        // Left out: round 2 among them, at most half of all run; the figures
        // of the rest are not flagged, and the report says which rounds and why.
        EXPECT_NE(std::find(left[0].begin(), left[0].end(), 2), left[0].end()) << json;
        EXPECT_GE(kept[0].size(), left[0].size()) << json;
        for (const std::string& run : runs)
            EXPECT_EQ(run.find("\"interference\": {"),
                      run.find("\"interference\": {\"flagged\": false"))
                << run;
        EXPECT_NE(out.find("NOTE: 64B x 2: round"), std::string::npos) << out;
        EXPECT_NE(out.find("round 2: "), std::string::npos) << out;
        EXPECT_NE(out.find("left out of every server's figures, disturbed by other work ("),
                  std::string::npos)
            << out;
        EXPECT_TRUE(
            first_line.starts_with("evmux-bench: no figure from a run disturbed by "
                                   "other work (threshold 30.0% of a CPU; "))
            << out;
    } else {
        // More than half disturbed even with the extra rounds: all kept, and
        // the runs flagged.
        EXPECT_GT(kept[0].size(), static_cast<std::size_t>(rounds)) << json;
        EXPECT_TRUE(first_line.starts_with("WARNING: 2 of 2 runs disturbed by other work")) << out;
        EXPECT_EQ(out.find("NOTE: "), std::string::npos) << out;
    }
}

// --keep-disturbed: no extra round and nothing left out, even with every
// round disturbed (a spinner on the servers' CPU throughout); the runs are
// flagged instead.
TEST(EvmuxBench, KeepDisturbedRunsNoExtraRoundAndLeavesNothingOut) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    const std::string dir = make_temp_dir(), json_file = dir + "/bench.json";
    ASSERT_FALSE(dir.empty()) << "mkdtemp: " << std::strerror(errno);
    Child c({bench, "--servers", "epoll-floor", "--sizes", "64", "--sessions", "2", "--duration",
             "0.3", "--rounds", "4", "--keep-disturbed", "--no-idle", "--no-plots", "--sweep-fds",
             "10", "--json", json_file});
    ASSERT_GT(c.pid(), 0);
    const std::optional<std::string> line = c.stderr_line(20s);
    ASSERT_TRUE(line) << c.err();
    std::smatch m;
    ASSERT_TRUE(std::regex_search(*line, m, std::regex("servers on CPU ([0-9]+)"))) << *line;
    Child spinner({"/bin/sh", "-c", "while :; do :; done"});
    ASSERT_GT(spinner.pid(), 0);
    ASSERT_TRUE(pin_to_cpu(spinner.pid(), std::stoi(m[1]))) << std::strerror(errno);
    ASSERT_EQ(c.finish(120s), 0) << c.err() << c.out();
    const std::string json = take_file(json_file, dir);
    EXPECT_EQ(c.err().find("[extra]"), std::string::npos) << c.err();
    EXPECT_NE(json.find("\"keep_disturbed\": true"), std::string::npos) << json;
    const auto kept = json_round_numbers(json, "rounds");
    const auto left = json_round_numbers(json, "rounds_left_out");
    ASSERT_TRUE(kept && left) << json;
    EXPECT_EQ(*kept, (std::vector<int>{1, 2, 3, 4})) << json;
    EXPECT_TRUE(left->empty()) << json;
    EXPECT_TRUE(c.out().starts_with("WARNING: 1 of 1 runs disturbed by other work")) << c.out();
    EXPECT_EQ(c.out().find("NOTE: "), std::string::npos) << c.out();
}

TEST(EvmuxBench, JsonAndTableCountContextSwitchesPerMessage) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    const TinyBench t = tiny_bench(bench);
    ASSERT_EQ(t.rc, 0) << t.err;
    // A ping-pong server blocks in its wait at least once per few messages.
    static const std::regex ctx(R"re("ctx_switches_per_msg": ([0-9.]+))re");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(t.json, m, ctx)) << t.json;
    EXPECT_GT(std::stod(m[1]), 0) << t.json;
    EXPECT_NE(t.out.find("ctx sw/msg"), std::string::npos) << t.out;
}

TEST(EvmuxBench, SyscallsPerMessageAreCountedOrSaidToBeUnavailable) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    const TinyBench t = tiny_bench(bench);
    ASSERT_EQ(t.rc, 0) << t.err;
    static const std::regex run(
        R"re("syscalls_per_msg": ([0-9.]+|null)[^{]*"syscalls": "([^"]*)")re");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(t.json, m, run)) << t.json;
    // Where the counts must work (.ci/run: `./run` mounts tracefs as root),
    // the "unavailable" branch would only hide a broken counter.
    const char* expect = std::getenv("EVMUX_EXPECT_SYSCALL_COUNTS");
    const bool required = expect && *expect;
    if (required) {
        EXPECT_NE(m[1], "null") << "syscalls: " << m[2];
    }
    if (m[1] == "null") {
        // Never a number made up: null, the reason, and the table's footnote.
        EXPECT_TRUE(std::regex_match(m[2].str(), std::regex("unavailable: .+"))) << m[2];
        EXPECT_NE(t.out.find("  syscalls/msg - for epoll-floor: " + m[2].str()), std::string::npos)
            << t.out;
    } else {
        // An echo round trip takes at least a read and a write.
        EXPECT_GE(std::stod(m[1]), 2.0) << t.json;
        EXPECT_TRUE(m[2].str().starts_with("perf_event_open counting")) << m[2];
    }
    // The waits (epoll_wait and kin) likewise.
    static const std::regex waits(R"re("waits_per_msg": ([0-9.]+|null)[^{]*"waits": "([^"]*)")re");
    ASSERT_TRUE(std::regex_search(t.json, m, waits)) << t.json;
    if (required) {
        EXPECT_NE(m[1], "null") << "waits: " << m[2];
    }
    if (m[1] == "null") {
        EXPECT_TRUE(std::regex_match(m[2].str(), std::regex("unavailable: .+"))) << m[2];
        EXPECT_NE(t.out.find("  waits/msg - for epoll-floor: " + m[2].str()), std::string::npos)
            << t.out;
    } else {
        EXPECT_GT(std::stod(m[1]), 0) << t.json;
    }
}

TEST(EvmuxBench, JsonSaysHowUserAndSysWereSplitAndUsesPerfWhenAvailable) {
    const std::string bench = program_path("EVMUX_BENCH");
    if (bench.empty()) GTEST_SKIP() << "EVMUX_BENCH not set (not built here)";
    // epoll-floor (a single loop: sampled) and threads (a thread per
    // connection: ticks), two 1 s rounds of one point each.
    const TinyBench t = bench_with_files(
        bench, {"--servers", "epoll-floor,threads", "--sizes", "1024", "--sessions", "50",
                "--duration", "1", "--rounds", "2", "--no-idle", "--no-plots"});
    ASSERT_EQ(t.rc, 0) << t.err;
    const std::string& json = t.json;

    std::map<std::string, std::string> split;  // server -> cpu_split
    static const std::regex run(R"re("server": "([^"]+)"[^}]*"cpu_split": "([^"]*)")re");
    for (auto it = std::sregex_iterator(json.begin(), json.end(), run);
         it != std::sregex_iterator(); ++it)
        split[(*it)[1]] = (*it)[2];
    ASSERT_EQ(split.size(), 2u) << json;
    // Every run says whether other work disturbed it, and every round.
    static const std::regex interference(
        R"re("interference": \{"flagged": (true|false), "details": "[^"]+"\})re");
    EXPECT_EQ(std::distance(std::sregex_iterator(json.begin(), json.end(), interference),
                            std::sregex_iterator()),
              2 + 2 * 2)
        << json;
    // The report's first and last lines say how many runs were disturbed.
    static const std::regex summary(
        R"(^(WARNING: [0-9]+ of 2 runs disturbed by other work \(.*\); their figures are not comparable|evmux-bench: no run disturbed by other work \(threshold 5.0% of a CPU\))$)");
    const std::string& out = t.out;
    const std::string first_line = out.substr(0, out.find('\n'));
    std::string trimmed = out.substr(0, out.find_last_not_of('\n') + 1);
    const std::string last_line = trimmed.substr(trimmed.rfind('\n') + 1);
    EXPECT_TRUE(std::regex_match(first_line, summary)) << out;
    EXPECT_EQ(first_line, last_line) << out;
    if (first_line.starts_with("WARNING")) {
        // Each run it names has a WARNING line of its own saying why; which
        // runs those are is up to the machine (CI once saw only `threads`
        // disturbed: the hypervisor stole 6% of the client's CPU in a round).
        int named = 0;
        for (const std::string server : {"epoll-floor", "threads"}) {
            const std::string run = server + " at 1KiB x 50";
            if (first_line.find("(" + run) == std::string::npos &&
                first_line.find(", " + run) == std::string::npos)
                continue;
            ++named;
            EXPECT_NE(out.find("\nWARNING: " + run + " disturbed by other work: round "),
                      std::string::npos)
                << out;
        }
        EXPECT_GE(named, 1) << out;
    }
    // Medians, with each round's figures and their minima and maxima.
    static const std::regex rounds(
        R"re("min": \{"round_trips": [0-9]+.*"max": \{"round_trips": [0-9]+.*"rounds": \[\{"round_trips": [0-9]+[^\]]*\}, \{"round_trips": [0-9]+[^\]]*\}\]\})re");
    EXPECT_EQ(std::distance(std::sregex_iterator(json.begin(), json.end(), rounds),
                            std::sregex_iterator()),
              2)
        << json;
    EXPECT_TRUE(split["threads"].starts_with("ticks")) << split["threads"];
    // The table's footnote says it too.
    EXPECT_NE(t.out.find("user/sys split: "), std::string::npos) << t.out;
    if (const auto refused = perf_refused()) {
        EXPECT_TRUE(split["epoll-floor"].starts_with("ticks")) << split["epoll-floor"];
        GTEST_SKIP() << "no perf sampling here (" << *refused << "): the tick split was used";
    }
    // Perf sampled the server. On a machine busy with other work (a parallel
    // test run) the server may get too little CPU for enough samples in 1 s;
    // the tool then falls back to ticks and says how many samples it had.
    static const std::regex too_few(R"(ticks \(only [1-9][0-9]* perf samples\))");
    if (std::regex_match(split["epoll-floor"], too_few)) {
        EXPECT_NE(t.err.find(split["epoll-floor"]), std::string::npos) << t.err;
        return;
    }
    EXPECT_TRUE(std::regex_match(
        split["epoll-floor"],
        std::regex("perf [0-9]+ kHz: [0-9]+ samples, [0-9]+ user(, [0-9]+ lost)?")))
        << split["epoll-floor"] << "\n"
        << t.err;
    EXPECT_NE(t.out.find("perf cpu-clock samples at 4 kHz in the load window"), std::string::npos)
        << t.out;
}

}  // namespace
