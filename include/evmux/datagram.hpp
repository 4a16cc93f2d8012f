// evmux datagrams: a UDP endpoint (IPv4 or IPv6; Unix datagram sockets too)
// on an EventLoop, beside connections. recvmmsg batches on receive, an
// outgoing queue bounded in bytes and datagrams drained with sendmmsg.
//
// This header includes only evmux's public headers and the standard library.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>

#include "evmux/address.hpp"
#include "evmux/event_loop.hpp"

namespace evmux {

class UdpEndpoint;
/// Endpoints are shared: the loop keeps an open endpoint alive, so a user
/// needs a pointer only to talk to it later.
using UdpEndpointPtr = std::shared_ptr<UdpEndpoint>;

/// Limits of one endpoint. The defaults deliver any UDP datagram whole.
struct UdpOptions {
    /// The largest datagram delivered whole (bytes, 1..65535). A longer one
    /// is not delivered: it counts in UdpStats::truncated.
    std::size_t max_datagram = 65535;
    /// Datagrams asked for per recvmmsg call (1..1024).
    std::size_t recv_batch = 16;
    /// At most this many datagrams are read per wake-up (at least 1), so a
    /// flooded endpoint cannot starve the loop's other fds.
    std::size_t read_budget = 64;
    /// Outgoing datagrams the kernel refused for now (EAGAIN) wait in a queue
    /// of at most this many payload bytes...
    std::size_t max_queued_bytes = 1 << 20;
    /// ...and at most this many datagrams (so 0-byte datagrams are bounded
    /// too). A datagram that does not fit is dropped and counted.
    std::size_t max_queued_datagrams = 4096;
    /// SO_RCVBUF / SO_SNDBUF in bytes; 0: the kernel's default. The kernel
    /// caps them at net.core.rmem_max / wmem_max.
    int receive_buffer = 0;
    /// See receive_buffer.
    int send_buffer = 0;
};

/// What an endpoint tells its user. Both may be left empty; both run on the
/// loop thread, from the loop (never inside send_to() or send()).
///
/// An exception from on_datagram ends only that call: the endpoint stays
/// open, the next datagram is delivered, and the exception goes to the
/// loop's exception handler (EventLoop::set_exception_handler(); by default
/// run() rethrows it after the iteration). An exception from on_error goes
/// there too.
struct UdpCallbacks {
    /// One datagram arrived from `from` (the peer on a connected endpoint;
    /// Address() for an unbound Unix sender). `data` is valid for this call
    /// only. Unset: datagrams are read and discarded.
    std::function<void(UdpEndpoint&, std::string_view data, const Address& from)> on_datagram;
    /// An asynchronous error: on a connected UDP endpoint the ICMP errors
    /// (ECONNREFUSED for port unreachable, EHOSTUNREACH, ...) that the kernel
    /// reports on the next receive or send; a queued datagram the kernel
    /// refused when it was finally sent. Counted in UdpStats::errors; the
    /// endpoint stays usable. Unconnected UDP endpoints see no ICMP errors
    /// (Linux reports them only to connected sockets).
    std::function<void(UdpEndpoint&, std::error_code ec)> on_error;
};

/// Counters of one endpoint (loop thread only).
struct UdpStats {
    /// Datagrams received whole (and given to on_datagram, if set).
    std::uint64_t received = 0;
    /// Datagrams handed to the kernel.
    std::uint64_t sent = 0;
    /// Datagrams not sent: the queue was full, the kernel had no buffer
    /// (ENOBUFS), or close() found them queued.
    std::uint64_t dropped = 0;
    /// Datagrams that arrived longer than max_datagram (not delivered).
    std::uint64_t truncated = 0;
    /// Errors reported to on_error (a caller's mistake throws instead).
    std::uint64_t errors = 0;
    /// Datagrams the kernel dropped because our receive buffer was full
    /// (SO_RXQ_OVFL; learnt from the next datagram that arrives).
    std::uint64_t kernel_dropped = 0;
    /// Payload bytes received whole.
    std::uint64_t bytes_received = 0;
    /// Payload bytes handed to the kernel.
    std::uint64_t bytes_sent = 0;
    /// recvmmsg calls that returned datagrams.
    std::uint64_t receive_calls = 0;
    /// sendto/send/sendmmsg calls that sent datagrams.
    std::uint64_t send_calls = 0;
};

/// One datagram socket (UDP over IPv4 or IPv6, or a Unix datagram socket) on
/// one EventLoop; owns the fd. Create with bind(), connect() or adopt(). The
/// loop keeps an endpoint alive (EventLoop::tie) until close() or the loop's
/// destruction (which closes it). Thread rule: loop thread only, every
/// member. Non-copyable.
///
/// Cost: the object (about 500 bytes) and its socket; no receive buffer of
/// its own. Receiving reads into one area per thread of recv_batch x
/// max_datagram bytes (1 MiB of address space with the defaults) shared by
/// every endpoint on that thread, of which only the pages datagrams have
/// filled are resident. The send queue exists only while the kernel refuses.
class UdpEndpoint : public std::enable_shared_from_this<UdpEndpoint> {
    struct Private {};

  public:
    /// A socket bound to `local` ("127.0.0.1:0", "[::1]:53", "unix:/path"),
    /// unconnected: send_to() anyone (a Unix socket file is removed again by
    /// close(), unless another socket was bound at the path since; and if
    /// bind() fails after making it). Throws std::system_error naming the call and address
    /// ("bind 127.0.0.1:53: Address already in use"), std::invalid_argument
    /// for an unspecified address or bad options.
    static UdpEndpointPtr bind(EventLoop& loop, const Address& local, UdpCallbacks callbacks,
                               UdpOptions options = {});
    /// A socket connected to `remote` (bound to any free local port): send()
    /// goes there, only its datagrams are received, and ICMP errors are
    /// reported to on_error. Throws as bind().
    static UdpEndpointPtr connect(EventLoop& loop, const Address& remote, UdpCallbacks callbacks,
                                  UdpOptions options = {});
    /// Take ownership of `fd`, a datagram socket (bound, connected or
    /// neither; e.g. one end of socketpair(AF_UNIX, SOCK_DGRAM)), and make it
    /// non-blocking. On failure the fd is closed and std::system_error or
    /// std::invalid_argument is thrown.
    static UdpEndpointPtr adopt(EventLoop& loop, int fd, UdpCallbacks callbacks,
                                UdpOptions options = {});

    /// Use bind(), connect() or adopt(). (Public only for std::make_shared.)
    UdpEndpoint(Private, EventLoop& loop, int fd, bool connected, UdpCallbacks callbacks,
                UdpOptions options);
    ~UdpEndpoint();
    UdpEndpoint(const UdpEndpoint&) = delete;
    UdpEndpoint& operator=(const UdpEndpoint&) = delete;

    /// Send one datagram to `to`: at once if nothing is queued, else (or if
    /// the kernel says EAGAIN) queued and sent with sendmmsg when the socket
    /// is writable. True if sent or queued; false if dropped (the queue is
    /// full: counted in `dropped`; an unconnected Unix socket whose receiver
    /// is full: also `dropped`, as its writability cannot be waited for), if
    /// the endpoint is closed, or on an asynchronous error (ECONNREFUSED...:
    /// counted, then on_error from the loop). Address() throws
    /// std::invalid_argument; a datagram the kernel refuses throws
    /// std::system_error naming the call and address ("sendto 127.0.0.1:9:
    /// Message too long" for more than 65507 bytes over IPv4; an IPv6
    /// address on an IPv4 socket).
    bool send_to(const Address& to, std::string_view data);
    /// Send one datagram to the connected peer; as send_to(). Throws
    /// std::logic_error on an unconnected endpoint.
    bool send(std::string_view data);
    /// Stop: unwatch and close the socket now; queued datagrams are dropped
    /// (counted). Idempotent; safe inside this endpoint's own callbacks (the
    /// rest of the batch is not delivered).
    void close();

    /// False once closed.
    bool is_open() const { return fd_ >= 0; }
    /// True for an endpoint made by connect() (or an adopted connected socket).
    bool is_connected() const { return connected_; }
    /// The socket, or -1 once closed.
    int fd() const { return fd_; }
    /// The loop this endpoint runs on.
    EventLoop& loop() const { return loop_; }
    /// The bound address (getsockname; port 0 resolved); Address() once closed.
    Address local_address() const;
    /// The connected peer, or Address().
    const Address& peer_address() const { return peer_; }
    /// The counters.
    const UdpStats& stats() const { return stats_; }
    /// Payload bytes waiting in the queue.
    std::size_t queued_bytes() const { return queued_bytes_; }
    /// Datagrams waiting in the queue.
    std::size_t queued_datagrams() const { return queue_.size(); }
    /// The options in force.
    const UdpOptions& options() const { return opt_; }

  private:
    struct HandlerScope;
    struct Queued {
        Address to;  // family 0: the connected peer
        std::string bytes;
    };

    static UdpEndpointPtr start(EventLoop& loop, int fd, bool connected, UdpCallbacks callbacks,
                                const UdpOptions& options);
    void handle(Events events);
    void handle_read();
    void handle_write();
    bool submit(const Address* to, std::string_view data);
    [[gnu::cold]] bool send_failed(int err, const Address* to);
    [[gnu::cold]] void report(int err) noexcept;
    void count_kernel_drops(std::uint32_t total);
    void set_write_interest(bool on);

    EventLoop& loop_;
    int fd_;
    bool connected_;
    bool queue_when_full_;  // EAGAIN is followed by a writable event we can wait for
    bool write_interest_ = false;
    int in_handler_ = 0;                   // depth of our callbacks on the stack
    std::uint32_t kernel_drops_seen_ = 0;  // last SO_RXQ_OVFL total
    UdpStats stats_;
    std::size_t queued_bytes_ = 0;
    std::deque<Queued> queue_;
    UdpCallbacks cb_;
    UdpOptions opt_;
    Address peer_;
    detail::UnixSocketFile unix_file_;  // the socket file bind() made; close() removes it
    EventLoop::TieId tie_ = 0;
};

}  // namespace evmux
