// evmux servers and clients: TcpServer (listen/accept over IPv4, IPv6 or a
// Unix path) and connect() (non-blocking connect with a timeout).
//
// This header includes only evmux's public headers and the standard library.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>

#include "evmux/address.hpp"
#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"

namespace evmux {

namespace detail {
class Acceptor;     // src/listener.hpp, not installed
struct IdleLimits;  // likewise
}  // namespace detail

/// How a TcpServer listens and what it allows.
struct ServerOptions {
    /// listen() backlog.
    int backlog = 1024;
    /// SO_REUSEPORT, so several loops/processes can share one port.
    bool reuse_port = false;
    /// Connections open at once; 0 = no limit. Beyond it a new connection is
    /// accepted and closed at once (the peer sees EOF), and counted as rejected.
    std::size_t max_connections = 0;
    /// accept4() calls per wake-up of the listener, so a connection storm
    /// cannot starve established connections.
    std::size_t accept_budget = 64;
    /// Close connections that have neither read nor written anything for this
    /// long (reason `timeout`; Netty's all-idle); zero = never. Writing to a
    /// peer that never sends counts as activity: see read_idle_timeout.
    /// The three idle timeouts are checked by one periodic sweep (every
    /// quarter of the shortest), so a connection may live up to a quarter of
    /// its limit longer.
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
};

/// Counters of one server. Cheap to read (O(open connections)).
struct ServerStats {
    std::size_t connections_now = 0;      ///< open right now
    std::uint64_t connections_total = 0;  ///< accepted and served since start
    std::uint64_t rejected = 0;           ///< accepted and closed: over max_connections or no fds
    std::uint64_t bytes_in = 0;           ///< read from all connections
    std::uint64_t bytes_out = 0;          ///< written to all connections
    std::uint64_t accept_calls = 0;       ///< accept4() calls made (to spot spinning)
    std::uint64_t accept_errors = 0;      ///< accept4() failures other than EAGAIN
};

/// A listening socket on a loop and the connections accepted from it. Binds
/// and listens in the constructor; each accepted connection gets the given
/// callbacks. Owns the listener and its connections: destroying the server
/// stops accepting, closes every connection and runs its on_close (reason
/// `local`) before the destructor returns, and unlinks a Unix socket path.
/// Thread rule: loop thread only. Non-copyable, non-movable.
class TcpServer {
  public:
    /// Bind `address` (SO_REUSEADDR; SO_REUSEPORT per options) and listen.
    /// Port 0 picks a free port (see local_address()). A stale Unix socket
    /// file (nobody listening) is replaced. Throws std::system_error whose
    /// what() reads like "bind 127.0.0.1:5555: Address already in use".
    TcpServer(EventLoop& loop, const Address& address, Callbacks callbacks,
              ServerOptions options = {});
    ~TcpServer();
    TcpServer(const TcpServer&) = delete;
    TcpServer& operator=(const TcpServer&) = delete;

    /// The address actually bound (with the chosen port when 0 was asked).
    const Address& local_address() const { return local_; }
    /// Counters; see ServerStats.
    ServerStats stats() const;
    /// Open connections right now.
    std::size_t connection_count() const { return conns_.size(); }
    /// Close every open connection (mode as Connection::close); keep listening.
    void close_all(CloseMode mode = CloseMode::immediate);
    /// The loop the server accepts on and its connections run on.
    EventLoop& loop() const { return loop_; }

  private:
    void accept_one(int fd, const Address& peer);
    void sweep_idle();
    detail::IdleLimits idle_limits() const;
    void forget(Connection& conn);

    EventLoop& loop_;
    Callbacks cb_;
    ServerOptions opt_;
    std::unique_ptr<detail::Acceptor> acceptor_;  // the listener and its accept loop
    Address local_;
    EventLoop::TimerId sweep_timer_ = 0;
    std::unordered_map<Connection*, ConnectionPtr> conns_;
    ServerStats closed_;  // bytes of connections already closed, and the counters
};

/// Options of connect().
struct ConnectOptions {
    /// Give up after this long (on_error with ETIMEDOUT); zero = never.
    std::chrono::milliseconds timeout{0};
    /// Limits for the connection once established.
    ConnectionOptions connection;
};

/// A connect() in progress. Thread rule: loop thread only.
class Connector : public std::enable_shared_from_this<Connector> {
    struct Private {};

  public:
    /// Use connect(). (Public only for std::make_shared.)
    Connector(Private, EventLoop& loop, Address address, Callbacks callbacks,
              ConnectOptions options);
    ~Connector();
    Connector(const Connector&) = delete;
    Connector& operator=(const Connector&) = delete;

    /// Abandon the attempt: on_error runs (from the loop) with ECANCELED,
    /// unless the attempt already finished; then a no-op. Closes the socket
    /// and cancels the timer.
    void cancel();
    /// True until the attempt has succeeded or failed.
    bool connecting() const { return fd_ >= 0; }
    /// Where to.
    const Address& address() const { return address_; }

  private:
    friend std::shared_ptr<Connector> connect(EventLoop&, const Address&, Callbacks,
                                              ConnectOptions);
    void start();
    void on_writable();
    void fail(int err, bool defer);
    void finish();

    EventLoop& loop_;
    Address address_;
    Callbacks cb_;
    ConnectOptions opt_;
    int fd_ = -1;
    bool watching_ = false;
    EventLoop::TimerId timer_ = 0;
    std::shared_ptr<Connector> self_;  // alive while connecting
};

/// Connect to `address` without blocking. On success a Connection is made
/// with `callbacks` (on_connect runs); on failure on_error runs once with the
/// error and a message like "connect 127.0.0.1:1: Connection refused"
/// (ETIMEDOUT after options.timeout, ECANCELED after cancel()). Callbacks
/// never run inside connect() itself. Returns a handle to cancel with; it
/// need not be kept. Throws std::invalid_argument for an address without a
/// family. Loop thread only.
std::shared_ptr<Connector> connect(EventLoop& loop, const Address& address, Callbacks callbacks,
                                   ConnectOptions options = {});

}  // namespace evmux
