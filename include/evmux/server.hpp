// evmux servers and clients: TcpServer (listen/accept over IPv4, IPv6 or a
// Unix path, on one loop or spread over the loops of a LoopGroup) and
// connect() (non-blocking connect with a timeout); both take an Address or
// "host:port" text, whose name a Resolver looks up.
//
// This header includes only evmux's public headers and the standard library.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "evmux/address.hpp"
#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/resolver.hpp"

namespace evmux {

namespace detail {
struct IdleLimits;  // src/listener.hpp, not installed
}  // namespace detail

class LoopGroup;

/// How a TcpServer over a LoopGroup spreads accepted connections over its loops.
enum class Distribution {
    /// One SO_REUSEPORT listener per loop; the kernel picks the listener (by a
    /// hash of the connection's addresses), so no thread hands anything over.
    reuse_port,
    /// One listener on loop 0, which accepts and hands each fd to the next
    /// loop in turn (itself included), exactly round-robin.
    round_robin,
};

/// "reuse_port" or "round_robin".
const char* to_string(Distribution distribution);

/// How a TcpServer listens and what it allows; the same for one loop and for
/// a LoopGroup.
struct ServerOptions {
    /// listen() backlog (of each listener).
    int backlog = 1024;
    /// SO_REUSEPORT on a one-loop server's listener, so several processes can
    /// share one port. A LoopGroup server's reuse_port listeners have
    /// SO_REUSEPORT whatever this says (see `distribution`); this lets them
    /// join a port other processes listen on too, which they otherwise
    /// refuse ("Address already in use").
    bool reuse_port = false;
    /// Over a LoopGroup: how connections are spread (a Unix socket address
    /// always uses round_robin). Ignored on one loop. reuse_port is the
    /// default for its design (no hand-off between threads, no single
    /// acceptor), not by measurement: a steady-state benchmark cannot tell
    /// the two apart (README "Many cores").
    Distribution distribution = Distribution::reuse_port;
    /// Connections open at once (over all loops); 0 = no limit. Beyond it a
    /// new connection is accepted and closed at once (the peer sees EOF), and
    /// counted as rejected.
    std::size_t max_connections = 0;
    /// accept4() calls per wake-up of a listener, so a connection storm
    /// cannot starve established connections.
    std::size_t accept_budget = 64;
    /// Close connections that have neither read nor written anything for this
    /// long (reason `timeout`; Netty's all-idle); zero = never. Writing to a
    /// peer that never sends counts as activity: see read_idle_timeout.
    /// The three idle timeouts are checked by one periodic sweep per loop
    /// (every quarter of the shortest), so a connection may live up to a
    /// quarter of its limit longer.
    std::chrono::milliseconds idle_timeout{0};
    /// Close connections that have read nothing for this long (reader-idle),
    /// however much we write to them; zero = never.
    std::chrono::milliseconds read_idle_timeout{0};
    /// Close connections that have written nothing to the kernel for this long
    /// (writer-idle): one with nothing to send, or whose peer stopped reading
    /// so its queue cannot drain; zero = never.
    std::chrono::milliseconds write_idle_timeout{0};
    /// After EMFILE/ENFILE/ENOBUFS/ENOMEM that the spare-fd trick cannot
    /// absorb, stop accepting for this long instead of spinning.
    std::chrono::milliseconds accept_pause{100};
    /// Limits for each accepted connection.
    ConnectionOptions connection;
    /// A server given "host:port" text: how its name is looked up (once, in
    /// the constructor; see TcpServer).
    ResolverOptions resolver;
};

/// Counters of one server, over all its loops. Each is read atomically from
/// any thread; read one by one, so a snapshot taken while connections come
/// and go need not be consistent across fields.
struct ServerStats {
    std::size_t connections_now = 0;      ///< open right now
    std::uint64_t connections_total = 0;  ///< accepted and served since start
    std::uint64_t rejected = 0;           ///< accepted and closed: over max_connections or no fds
    std::uint64_t bytes_in = 0;           ///< read from all connections, open ones included
    std::uint64_t bytes_out = 0;          ///< written to all connections, open ones included
    std::uint64_t accept_calls = 0;       ///< accept4() calls made (to spot spinning)
    std::uint64_t accept_errors = 0;      ///< accept4() or set-up failures other than EAGAIN
};

/// A listening socket and the connections accepted from it, on one loop or
/// spread over the loops of a LoopGroup (muduo's TcpServer with its thread
/// pool): the same accept loop, limits, idle sweep, counters and shutdown
/// either way. Each accepted connection gets the given callbacks and lives on
/// one loop for its whole life. Binds and listens in the constructor (errors
/// are thrown there). Non-copyable, non-movable.
///
/// On one loop: built, used and destroyed on that loop's thread (stats() and
/// connections_now() from any thread). Destroying it stops accepting, closes
/// every connection and runs its on_close (reason `local`) before the
/// destructor returns, and unlinks a Unix socket path (if it still names
/// the file this server bound: not one another server bound there since).
///
/// Over a LoopGroup (LoopGroup::listen()): owned by the group; every member
/// may be called from any thread. The callbacks run on every loop's thread,
/// concurrently (each call only for connections of the calling thread's
/// loop), so they must be safe to call from several threads at once.
/// LoopGroup::stop() closes the connections gracefully and runs each
/// on_close on its loop's thread.
class TcpServer {
  public:
    /// Bind `address` (SO_REUSEADDR; SO_REUSEPORT per options) and listen on
    /// `loop`. Port 0 picks a free port (see local_address()). A stale Unix
    /// socket file (nobody listening) is replaced. Throws std::system_error
    /// whose what() reads like "bind 127.0.0.1:5555: Address already in use",
    /// std::invalid_argument for an address without a family.
    TcpServer(EventLoop& loop, const Address& address, Callbacks callbacks,
              ServerOptions options = {});
    /// The same on "host:port" text: an address Address::parse() reads
    /// ("127.0.0.1:0", "[::1]:80", "unix:/run/app.sock"), ":8080" for every
    /// IPv4 interface (0.0.0.0:8080, as Go's net.Listen reads it), or a name
    /// ("localhost:0", "example.org:http"), which is resolved here, blocking
    /// (resolve_now() with options.resolver; /etc/hosts first), and the first
    /// of its addresses that binds is the one listened on (see
    /// local_address()). Throws std::invalid_argument for text that is not
    /// HOST:PORT, std::system_error for a name that does not resolve ("evmux:
    /// cannot resolve 'nosuch.invalid': Domain name not found") or when no
    /// address binds ("bind localhost:80: tried [::1]:80 (Address already in
    /// use), 127.0.0.1:80: Address already in use").
    TcpServer(EventLoop& loop, std::string_view address, Callbacks callbacks,
              ServerOptions options = {});
    ~TcpServer();
    TcpServer(const TcpServer&) = delete;
    TcpServer& operator=(const TcpServer&) = delete;

    /// The address bound (with the chosen port when 0 was asked).
    const Address& local_address() const { return local_; }
    /// Counters over all loops; see ServerStats. Any thread.
    ServerStats stats() const;
    /// Connections open right now, all loops. Any thread.
    std::size_t connections_now() const { return open_.load(std::memory_order_acquire); }
    /// As connections_now().
    std::size_t connection_count() const { return connections_now(); }
    /// Connections served so far by each loop (index = loop index). Any thread.
    std::vector<std::uint64_t> connections_per_loop() const;
    /// Connections served so far, all loops. Any thread.
    std::uint64_t connections_total() const;
    /// The distribution in use: round_robin for a Unix socket over a
    /// LoopGroup; reuse_port on one loop (trivially).
    Distribution distribution() const { return distribution_; }
    /// Close every open connection (mode as Connection::close); keep
    /// listening. On one loop: on its thread, at once. Over a LoopGroup: from
    /// any thread; each loop does its part when it next runs.
    void close_all(CloseMode mode = CloseMode::immediate);
    /// Stop accepting, keep serving (asyncio's Server.close(), the first step
    /// of a graceful shutdown): the listening socket is closed, so new clients
    /// are refused (ECONNREFUSED; those still in the backlog see the end),
    /// while the open connections go on to their own end, under the same
    /// limits and idle timeout; connections_now() says when the last one has
    /// gone, and close_all() ends the rest. Accepting does not resume; a Unix
    /// socket file stays until the server is destroyed. Idempotent. On one
    /// loop: on its thread, and the port is closed when it returns. Over a
    /// LoopGroup: from any thread; each loop closes its listener when it next
    /// runs (accepting() is false at once).
    void stop_accepting();
    /// True until stop_accepting() (or LoopGroup::stop()). Any thread.
    bool accepting() const { return accepting_.load(std::memory_order_acquire); }
    /// The loop a one-loop server runs on (over a LoopGroup: loop 0).
    EventLoop& loop() const;

  private:
    friend class LoopGroup;
    struct Shard;
    // On `loop`, or over the loops of `group` (LoopGroup::listen(); accepting
    // starts when the group runs start_shard() on each loop): listens on the
    // first of `candidates` that binds; `text` is what the user wrote.
    TcpServer(EventLoop* loop, LoopGroup* group, const std::vector<Address>& candidates,
              std::string_view text, Callbacks callbacks, ServerOptions options);
    void bind_first(const std::vector<Address>& candidates, std::string_view text);
    void bind_listeners(const Address& address, bool reuse_port);
    bool reserve_slot();
    void release_slot();
    detail::IdleLimits idle_limits() const;
    // For LoopGroup, each on loop `index`'s thread.
    void start_shard(std::size_t index);
    void begin_stop(std::size_t index);  // stop accepting, close gracefully
    bool drained(std::size_t index) const;
    void close_rest(std::size_t index);  // close now, on_close here

    Callbacks cb_;
    ServerOptions opt_;
    Distribution distribution_;
    Address local_;
    bool on_group_ = false;
    std::atomic<std::size_t> open_{0};  // all loops: the max_connections count
    std::atomic<bool> accepting_{true};
    std::vector<std::unique_ptr<Shard>> shards_;
};

/// Options of connect().
struct ConnectOptions {
    /// Give up after this long (on_error with ETIMEDOUT); zero = never. For a
    /// name it covers the whole attempt: the lookup and every address tried.
    /// Over TLS it covers the handshake too, until on_connect would run
    /// ("connect 127.0.0.1:443: timed out during the TLS handshake"); the
    /// context's handshake_timeout applies as well, whichever ends first.
    std::chrono::milliseconds timeout{0};
    /// Limits for the connection once established.
    ConnectionOptions connection;
    /// connect() by name: the Resolver to ask, on the same loop. nullptr: a
    /// Resolver with default options is made for this connect.
    Resolver* resolver = nullptr;
};

/// A connect() in progress: over TLS until the handshake is done (on_connect
/// about to run). The loop holds it (EventLoop::tie) until its outcome has
/// been reported, so the handle need not be kept; a loop destroyed first
/// ends the attempt as cancel() does, running on_error in its destructor.
/// Thread rule: loop thread only.
class Connector : public std::enable_shared_from_this<Connector> {
    struct Private {};

  public:
    /// Use connect(). (Public only for std::make_shared.)
    Connector(Private, EventLoop& loop, std::string target, Callbacks callbacks,
              ConnectOptions options);
    ~Connector();
    Connector(const Connector&) = delete;
    Connector& operator=(const Connector&) = delete;

    /// Abandon the attempt (the lookup, the connect or the TLS handshake):
    /// on_error runs (from the loop) with ECANCELED, unless the attempt
    /// already finished; then a no-op. Closes the socket (a connection whose
    /// handshake runs: at once, without on_close) and cancels the timer.
    void cancel();
    /// True until the attempt has succeeded or failed.
    bool connecting() const { return active_; }
    /// The address being tried (or the last one tried); Address() while a
    /// name is being looked up.
    const Address& address() const { return address_; }
    /// What was asked for: the Address as text, or the "host:port" text.
    const std::string& target() const { return target_; }

  private:
    friend std::shared_ptr<Connector> connect(EventLoop&, const Address&, Callbacks,
                                              ConnectOptions);
    friend std::shared_ptr<Connector> connect(EventLoop&, std::string_view, Callbacks,
                                              ConnectOptions);
    void start(std::vector<Address> candidates);
    void start_lookup(const std::string& host, const std::string& service);
    void on_resolved(const std::string& host, std::error_code error,
                     std::vector<Address> addresses);
    void try_next(bool defer);
    void attempt_failed(int err);
    void on_writable();
    void close_socket();
    void fail(std::error_code error, const std::string& message, bool defer);
    void deliver_deferred();
    void end_with_loop();
    void finish();
    void end_attempt();
    void handshake_ended(const ConnectionPtr& conn, std::error_code error);

    EventLoop& loop_;
    std::string target_;
    std::string host_;  // the name looked up (connect() by name), for TLS
    Address address_;
    std::vector<Address> candidates_;  // in the order to try them
    std::size_t next_ = 0;             // the next candidate
    std::string tried_;                // "127.0.0.2:80: Connection refused; ..."
    std::error_code last_error_;       // the last candidate's
    bool by_name_ = false;
    Callbacks cb_;
    ConnectOptions opt_;
    int fd_ = -1;
    bool active_ = false;
    bool watching_ = false;
    EventLoop::TimerId timer_ = 0;
    std::unique_ptr<Resolver> own_resolver_;  // when options.resolver is null
    std::shared_ptr<ResolveQuery> query_;     // while looking up
    EventLoop::TieId tie_ = 0;                // the loop's reference, until the outcome is told
    std::function<void()> deferred_;          // an on_error posted, not run yet
    ConnectionPtr conn_;                      // over TLS: connected, handshaking
};

/// Connect to `address` without blocking. On success a Connection is made
/// with `callbacks` (on_connect runs); on failure on_error runs once with the
/// error and a message like "connect 127.0.0.1:1: Connection refused"
/// (ETIMEDOUT after options.timeout, ECANCELED after cancel() or when the
/// loop is destroyed first: then inside ~EventLoop, with the socket closed).
/// With a client TLS context (options.connection.tls) connecting includes
/// the handshake: on_connect runs once it is done, and a failed handshake
/// is this on_error (EPROTO, "connect 127.0.0.1:443: TLS handshake:
/// certificate verify failed (hostname mismatch)"; ETIMEDOUT for the
/// handshake's time limit; the socket's errno for a reset), never on_close. Without
/// an on_error, a failure other than ECANCELED goes to the loop's exception
/// handler instead (see Callbacks::on_error).
/// Callbacks never run inside connect() itself. Returns a handle to cancel with; it
/// need not be kept. Throws std::invalid_argument for an address without a
/// family. Loop thread only.
std::shared_ptr<Connector> connect(EventLoop& loop, const Address& address, Callbacks callbacks,
                                   ConnectOptions options = {});

/// Connect to "host:port" text: an address Address::parse() reads
/// ("127.0.0.1:80", "[::1]:80", "unix:/run/app.sock"; connected as above),
/// or a name ("localhost:80", "example.org:http"), looked up without
/// blocking by options.resolver (or a Resolver made for it; /etc/hosts
/// first), whose addresses are then tried one after the other, in the
/// resolver's order, until one connects. on_error runs once if none does,
/// with the last address's error and every one tried: "connect
/// localhost:1: 127.0.0.1:1: Connection refused"; if the name does not
/// resolve, with the resolver's error: "connect nosuch.invalid:80: cannot
/// resolve 'nosuch.invalid': Domain name not found". options.timeout and
/// cancel() cover the lookup too. With a client TLS context
/// (options.connection.tls) that names no server, the name is the one sent
/// as SNI and checked against the certificate (numeric text: the address is
/// checked). Throws std::invalid_argument for text that
/// is not HOST:PORT, or a resolver on another loop. Loop thread only.
std::shared_ptr<Connector> connect(EventLoop& loop, std::string_view address, Callbacks callbacks,
                                   ConnectOptions options = {});

}  // namespace evmux
