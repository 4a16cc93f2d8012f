// evmux-echo: a TCP / Unix / UDP echo server on evmux, on any backend.
//
//   evmux-echo --port P [--host H [--dns SERVERS]] [--backend NAME] [--upper]
//              [--unix PATH] [--threads N [--distribution reuse_port|round_robin]]
//              [--model callbacks|coroutines] [--tls-cert FILE --tls-key FILE
//              [--tls-records evmux|openssl]] [--io completion|readiness]
//   evmux-echo --udp --port P [--host H [--dns SERVERS]] [--backend NAME] [--upper]
//   evmux-echo --list-backends
//
// A --host name is resolved by evmux's Resolver (/etc/hosts, then the DNS
// servers: /etc/resolv.conf's or --dns), and the first of its addresses that
// binds is served on (--udp too). --io sets EVMUX_IO for the process before
// any loop exists. Prints "evmux-echo listening on HOST:PORT backend=NAME
// ... io=MODE" to stderr once it accepts (MODE the first loop's io_mode(): a
// loop that fell back to readiness says so; ending in " tls" when it speaks
// TLS; "protocol=udp" with --udp, which sends each datagram back to its
// sender); SIGINT/SIGTERM stop it with a one-line
// summary. Errors in the command line or the setup (port in use, unknown
// backend or host, missing Unix socket directory, a bad PEM file for
// --tls-cert/--tls-key) are one line on stderr and exit code 2. It raises its
// soft RLIMIT_NOFILE to the hard limit at start: a server for thousands of
// connections must not stop at the usual soft 1024.
#include <pthread.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <CLI/CLI.hpp>
#include <cctype>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "cli_number.hpp"
#include "evmux/address.hpp"
#include "evmux/connection.hpp"
#include "evmux/coro.hpp"
#include "evmux/datagram.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/loop_group.hpp"
#include "evmux/resolver.hpp"
#include "evmux/selector.hpp"
#include "evmux/server.hpp"
#include "evmux/tls.hpp"
#include "fd_limit.hpp"

namespace {

constexpr int exit_usage = 2;

int fail(const std::string& message) {
    std::fprintf(stderr, "evmux-echo: %s\n", message.c_str());
    return exit_usage;
}

int list_backends() {
    for (const evmux::BackendInfo& b : evmux::backends()) {
        std::string line = b.name;
        if (b.usable)
            line += b.reason.empty() ? " usable" : " usable (" + b.reason + ")";
        else
            line += " unusable: " + (b.reason.empty() ? std::string("unknown") : b.reason);
        std::printf("%s\n", line.c_str());
    }
    return 0;
}

// "host:port" text for the server, which resolves a name itself (once, at
// start-up, where blocking is harmless); a bare IPv6 host gets its brackets.
std::string host_port(const std::string& host, int port) {
    const bool bare_v6 = host.find(':') != std::string::npos && !host.starts_with('[');
    return (bare_v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

// Once the server is listening: the line the tests and tools wait for. io=
// is what the first loop does, not what was asked (a fallback shows).
void say_listening(const evmux::TcpServer& server, const std::string& backend, std::size_t threads,
                   const std::string& model, bool tls) {
    std::fprintf(stderr,
                 "evmux-echo listening on %s backend=%s threads=%zu distribution=%s model=%s "
                 "io=%s%s\n",
                 server.local_address().to_string().c_str(), backend.c_str(), threads,
                 evmux::to_string(server.distribution()), model.c_str(),
                 evmux::to_string(server.loop().io_mode()), tls ? " tls" : "");
    // Completion asked for, readiness given: the loop's reason, on a line of its own.
    const evmux::EventLoop& loop = server.loop();
    if (loop.io_mode() == evmux::IoMode::readiness && !loop.io_note().empty())
        std::fprintf(stderr, "evmux-echo: io=readiness: %s\n", loop.io_note().c_str());
    std::fflush(stderr);
}

// After the stop: the one-line summary.
void say_stopped(const evmux::TcpServer& server) {
    const evmux::ServerStats s = server.stats();
    std::string per_loop;
    for (std::uint64_t n : server.connections_per_loop())
        per_loop += (per_loop.empty() ? "" : ",") + std::to_string(n);
    std::fprintf(stderr,
                 "evmux-echo: stopped: connections=%llu open=%zu bytes_in=%llu bytes_out=%llu "
                 "per_loop=%s rejected=%llu accept_errors=%llu\n",
                 static_cast<unsigned long long>(s.connections_total), s.connections_now,
                 static_cast<unsigned long long>(s.bytes_in),
                 static_cast<unsigned long long>(s.bytes_out), per_loop.c_str(),
                 static_cast<unsigned long long>(s.rejected),
                 static_cast<unsigned long long>(s.accept_errors));
}

// Connections the server could not take (out of file descriptors: each is
// accepted and closed at once, the peer sees EOF, or, when even that fails,
// accept errors, and accepting pauses a moment) are said on stderr within a
// second, at most a line a second, not only in the counters at the end.
// Driven by SIGALRM each second (setitimer), not a loop timer: a timer in
// the loop would read the clock every iteration, ~11 instructions per echoed
// message in evmux-bench --instructions.
class RefusalReport {
  public:
    explicit RefusalReport(const evmux::TcpServer& server) : server_(server) {
        const itimerval every{{1, 0}, {1, 0}};
        ::setitimer(ITIMER_REAL, &every, nullptr);
    }
    ~RefusalReport() {
        const itimerval off{};
        ::setitimer(ITIMER_REAL, &off, nullptr);
    }
    RefusalReport(const RefusalReport&) = delete;
    RefusalReport& operator=(const RefusalReport&) = delete;

    // On each SIGALRM; stats() may be read from any thread.
    void tick() {
        const evmux::ServerStats s = server_.stats();
        const std::uint64_t rejected = s.rejected - rejected_;
        const std::uint64_t errors = s.accept_errors - errors_;
        if (rejected == 0 && errors == 0) return;
        rejected_ = s.rejected;
        errors_ = s.accept_errors;
        rlimit fds{};
        ::getrlimit(RLIMIT_NOFILE, &fds);
        std::fprintf(stderr,
                     "evmux-echo: in the last second %llu connections closed as accepted and "
                     "%llu accept errors (out of file descriptors? ulimit -n is %llu)\n",
                     static_cast<unsigned long long>(rejected),
                     static_cast<unsigned long long>(errors),
                     static_cast<unsigned long long>(fds.rlim_cur));
    }

  private:
    const evmux::TcpServer& server_;
    std::uint64_t rejected_ = 0;
    std::uint64_t errors_ = 0;
};

// The echo as a coroutine per connection (--model coroutines): straight-line,
// one co_await per read and per write. The bytes are a view of the loop's
// scratch buffer (no copy), handed to write() before the coroutine suspends.
evmux::coro::Task<void> echo_coroutine(evmux::coro::Stream stream) {
    for (;;) {
        std::string_view bytes = co_await stream.read_some();
        if (bytes.empty()) co_return;  // the peer's end: closes after the queue
        co_await stream.write(bytes);
    }
}

// --upper as a coroutine: the uppercased copy reuses one buffer per connection.
evmux::coro::Task<void> upper_coroutine(evmux::coro::Stream stream) {
    std::string upper;
    for (;;) {
        std::string_view bytes = co_await stream.read_some();
        if (bytes.empty()) co_return;
        upper.assign(bytes);
        for (char& c : upper)
            if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
        co_await stream.write(upper);
    }
}

// `n` bytes at `p` with ASCII letters uppercased, in a buffer reused per
// thread (--threads runs the callbacks on several at once).
const std::string& uppercased(const char* p, std::size_t n) {
    thread_local std::string upper_buf;
    upper_buf.assign(p, n);
    for (char& c : upper_buf)
        if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
    return upper_buf;
}

// --udp: one UdpEndpoint on one loop on this thread, bound to the first of
// `addresses` that binds (a --host name resolves as the TCP server's does);
// every datagram goes back to its sender (uppercased with --upper), straight
// from the receive area.
int serve_udp(const std::string& backend, const std::vector<evmux::Address>& addresses,
              bool upper) {
    evmux::EventLoop loop(backend.empty() ? evmux::make_selector() : evmux::make_selector(backend));
    evmux::UdpCallbacks callbacks;
    if (upper) {
        callbacks.on_datagram = [](evmux::UdpEndpoint& ep, std::string_view data,
                                   const evmux::Address& from) {
            ep.send_to(from, uppercased(data.data(), data.size()));
        };
    } else {
        callbacks.on_datagram = [](evmux::UdpEndpoint& ep, std::string_view data,
                                   const evmux::Address& from) { ep.send_to(from, data); };
    }
    std::shared_ptr<evmux::UdpEndpoint> endpoint;
    std::string tried;
    for (const evmux::Address& address : addresses) {
        try {
            endpoint = evmux::UdpEndpoint::bind(loop, address, callbacks);
            break;
        } catch (const std::system_error& e) {
            tried += (tried.empty() ? "" : "; ") + address.to_string() + ": " + e.what();
        }
    }
    if (!endpoint) return fail("--udp: no address binds: " + tried);
    auto stop = [&loop](int) { loop.stop(); };
    loop.on_signal(SIGINT, stop);
    loop.on_signal(SIGTERM, stop);
    std::fprintf(stderr, "evmux-echo listening on %s backend=%s threads=1 protocol=udp\n",
                 endpoint->local_address().to_string().c_str(), loop.backend_name().c_str());
    std::fflush(stderr);
    loop.run();
    const evmux::UdpStats& s = endpoint->stats();
    auto u = [](std::uint64_t v) { return static_cast<unsigned long long>(v); };
    std::fprintf(stderr,
                 "evmux-echo: stopped: datagrams_in=%llu datagrams_out=%llu bytes_in=%llu "
                 "bytes_out=%llu dropped=%llu truncated=%llu kernel_dropped=%llu errors=%llu\n",
                 u(s.received), u(s.sent), u(s.bytes_received), u(s.bytes_sent), u(s.dropped),
                 u(s.truncated), u(s.kernel_dropped), u(s.errors));
    return 0;
}

// One TcpServer, whatever the thread count; only who runs its loops differs.
// One thread: the loop on this thread, signals through it (the process stays
// single-threaded, which glibc's system call wrappers reward: no
// cancellation-point bookkeeping around each recv/send, ~90 instructions per
// echoed message under callgrind). N threads: a LoopGroup, with SIGINT/SIGTERM
// blocked in this thread and taken here by sigwait (the group's threads block
// them themselves: before the group or after, no loop thread takes them).
int serve(std::size_t threads, const std::string& backend, const std::string& address,
          evmux::Callbacks callbacks, const evmux::ServerOptions& options,
          const std::string& model) {
    const bool tls = options.connection.tls != nullptr;
    if (threads == 1) {
        evmux::EventLoop loop(backend.empty() ? evmux::make_selector()
                                              : evmux::make_selector(backend));
        auto server =
            std::make_unique<evmux::TcpServer>(loop, address, std::move(callbacks), options);
        auto stop = [&loop](int) { loop.stop(); };
        loop.on_signal(SIGINT, stop);
        loop.on_signal(SIGTERM, stop);
        say_listening(*server, loop.backend_name(), threads, model, tls);
        RefusalReport refusals(*server);
        loop.on_signal(SIGALRM, [&refusals](int) { refusals.tick(); });
        loop.run();
        say_stopped(*server);
        return 0;
    }
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGALRM);  // RefusalReport's, taken here too
    ::pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
    evmux::LoopGroup group(threads, backend);
    evmux::TcpServer& server = group.listen(address, std::move(callbacks), options);
    say_listening(server, group.backend_name(), threads, model, tls);
    int signo = 0;
    {
        RefusalReport refusals(server);
        while (::sigwait(&stop_signals, &signo) != 0 || signo == SIGALRM)
            if (signo == SIGALRM) refusals.tick();
    }
    group.stop();
    say_stopped(server);
    return 0;
}

// --tls-cert FILE --tls-key FILE: both or neither (CLI11 says which is missing).
void add_tls_flags(CLI::App& app, evmux::TlsServerOptions& tls, std::string& records) {
    auto* cert = app.add_option("--tls-cert", tls.cert_chain_file,
                                "speak TLS: PEM certificate chain (the server's first)");
    auto* key = app.add_option("--tls-key", tls.key_file, "PEM private key of --tls-cert");
    cert->needs(key);
    key->needs(cert);
    // A string checked by name: CLI11's mapping transformer words its
    // refusal in the enum's numbers.
    app.add_option("--tls-records", records,
                   "who protects TLS 1.3 records after the handshake: evmux (default) or "
                   "openssl (its SSL_read/SSL_write)")
        ->check(CLI::IsMember({"evmux", "openssl"}))
        ->needs(cert);
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"evmux-echo: echo every byte back, on any evmux backend."};
    std::optional<int> port;
    std::string host = "127.0.0.1";
    std::string backend;
    std::string unix_path;
    bool upper = false;
    bool udp = false;
    bool list = false;
    std::size_t threads = 1;
    std::string distribution = evmux::to_string(evmux::ServerOptions{}.distribution);
    std::string model = "callbacks";
    std::string dns;
    std::string io;
    evmux::TlsServerOptions tls;
    std::string tls_records = "evmux";
    add_tls_flags(app, tls, tls_records);
    app.add_option("--port", port, "TCP port (0: any free port)")
        ->check(evmux::support::number_in(0, 65535));
    app.add_option("--host", host, "numeric address or name to bind (default 127.0.0.1)");
    app.add_option("--dns", dns,
                   "DNS servers for a --host name, e.g. 127.0.0.1:5353 (default: "
                   "/etc/resolv.conf's; /etc/hosts is read first)");
    app.add_option("--backend", backend, "selector backend (default: EVMUX_BACKEND or the best)");
    app.add_flag("--upper", upper, "echo ASCII letters uppercased");
    app.add_option("--unix", unix_path, "listen on this Unix socket path instead of TCP");
    app.add_flag("--udp", udp, "echo UDP datagrams (each back to its sender) instead of TCP");
    app.add_option("--threads", threads, "event loops, one per thread (default 1)")
        ->check(evmux::support::number_in(1, 1024));
    app.add_option("--distribution", distribution,
                   "how connections are spread over the threads: reuse_port (a listener "
                   "per loop) or round_robin (one acceptor hands connections out)")
        ->check(CLI::IsMember({"reuse_port", "round_robin"}));
    app.add_option("--model", model,
                   "how each connection is served: callbacks (on_message, the default) or "
                   "coroutines (a straight-line coroutine per connection, evmux/coro.hpp)")
        ->check(CLI::IsMember({"callbacks", "coroutines"}));
    app.add_option("--io", io,
                   "how connections move bytes: completion (io_uring requests; the io_uring "
                   "backend only, else readiness) or readiness (default: EVMUX_IO, else completion "
                   "where the backend has it)")
        ->check(CLI::IsMember({"completion", "readiness"}));
    app.add_flag("--list-backends", list, "list the backends and whether they are usable here");
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        if (e.get_exit_code() == 0) return app.exit(e);  // --help
        return fail(e.what());
    }
    if (list) return list_backends();
    // Given but empty: not "no --unix", which served TCP beside --port.
    if (app.count("--unix") > 0 && unix_path.empty()) return fail("--unix: an empty path");
    if (!port && unix_path.empty()) return fail("--port or --unix is required (see --help)");
    if (port && !unix_path.empty()) return fail("--port and --unix exclude each other");
    if (udp && !unix_path.empty()) return fail("--udp and --unix exclude each other");
    if (udp && threads != 1) return fail("--udp serves on one loop: --threads must be 1");
    if (udp && !tls.cert_chain_file.empty())
        return fail("--udp and --tls-cert exclude each other (no DTLS)");
    if (udp && model != "callbacks")
        return fail("--udp serves with callbacks: --model coroutines is TCP-only");
    if (udp && io == "completion")
        return fail("--udp moves datagrams by readiness: --io completion is TCP-only");
    // Before any loop exists: every loop reads it (requested_io_mode()).
    if (!io.empty()) ::setenv("EVMUX_IO", io.c_str(), 1);
    evmux::support::raise_fd_limit();

    try {
        evmux::ResolverOptions names;
        names.servers = dns;
        if (udp)
            return serve_udp(backend, evmux::resolve_address_now(host_port(host, *port), names),
                             upper);
        const std::string address =
            unix_path.empty() ? host_port(host, *port) : "unix:" + unix_path;
        evmux::ServerOptions options;
        options.distribution = distribution == "round_robin" ? evmux::Distribution::round_robin
                                                             : evmux::Distribution::reuse_port;
        options.resolver = names;
        tls.records =
            tls_records == "openssl" ? evmux::TlsRecords::openssl : evmux::TlsRecords::evmux;
        if (!tls.cert_chain_file.empty()) options.connection.tls = evmux::TlsContext::server(tls);

        evmux::Callbacks callbacks;
        if (model == "coroutines") {
            callbacks = evmux::coro::handler_callbacks(upper ? upper_coroutine : echo_coroutine);
        } else if (upper) {
            callbacks.on_message = [](const evmux::ConnectionPtr& conn, evmux::Buffer& in) {
                // --upper copies once per read, plain echo never.
                conn->send(uppercased(in.data(), in.size()));
                in.consume_all();
            };
        } else {
            // Straight from the scratch-backed input: when the kernel takes it
            // all (the usual case), no copy and no allocation.
            callbacks.on_message = [](const evmux::ConnectionPtr& conn, evmux::Buffer& in) {
                conn->send(in.data(), in.size());
                in.consume_all();
            };
        }

        return serve(threads, backend, address, std::move(callbacks), options, model);
    } catch (const std::exception& e) {
        return fail(e.what());
    }
}
