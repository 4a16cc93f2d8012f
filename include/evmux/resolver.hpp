// evmux names: an asynchronous resolver (c-ares) driven by an EventLoop, and
// a blocking one-off lookup for start-up code.
//
// This header includes only evmux's public headers and the standard library
// (c-ares is a private dependency of the library: its header is not needed).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "evmux/address.hpp"
#include "evmux/event_loop.hpp"

namespace evmux {

/// Why a name could not be resolved: c-ares's status codes (the numbers are
/// c-ares's `ARES_E*`), in resolve_category(); any other c-ares status shows
/// up in the same category under its own number (5, ARES_ENOTIMP: a server
/// answered NOTIMP). A cancelled lookup is not one of these: it reports
/// std::errc::operation_canceled. A server that answers SERVFAIL, NOTIMP or
/// REFUSED is passed over for the next one; when no server gives an answer,
/// the error is the last such failure answered (server_failure, 5, refused).
/// c-ares 1.20 and later report it so (the last try's outcome: a timeout or
/// an unreachable server after the answer is reported instead); for c-ares
/// before 1.20, which said connection_refused, evmux reads the answers
/// itself, and any try that timed out makes it timeout.
enum class ResolveErrc {
    no_data = 1,              ///< the name exists but has no address of the family asked
    server_failure = 3,       ///< the (last) server that answered said SERVFAIL
    not_found = 4,            ///< no such name (NXDOMAIN): "Domain name not found"
    refused = 6,              ///< the (last) server that answered said REFUSED
    bad_name = 8,             ///< not a well-formed host name
    connection_refused = 11,  ///< no server answered or could be reached (ICMP port unreachable)
    timeout = 12,             ///< a server did not answer within ResolverOptions' timeout and tries
    unknown_service = 25,     ///< the service name is not in /etc/services
    not_compiled_in = 1000,   ///< evmux was built without c-ares: only numeric hosts
};

/// The error category of ResolveErrc ("evmux.resolve"); message() is
/// c-ares's ares_strerror() text. ResolveErrc::timeout compares equal to
/// std::errc::timed_out.
const std::error_category& resolve_category() noexcept;
/// A std::error_code in resolve_category().
std::error_code make_error_code(ResolveErrc e) noexcept;

/// "" when evmux was built with c-ares (names resolve); otherwise why not,
/// e.g. "not compiled in (needs libc-ares-dev; meson -Dcares=enabled)".
std::string resolver_unavailable_reason();

/// How a Resolver asks.
struct ResolverOptions {
    /// Servers to ask, "127.0.0.1:5353,[::1]:53" (port optional, 53 by
    /// default). Empty: the system's (/etc/resolv.conf). Names in /etc/hosts
    /// are answered from there first either way.
    std::string servers;
    /// How long to wait for an answer on the first try; c-ares doubles it on
    /// every further round over the servers.
    std::chrono::milliseconds timeout{2000};
    /// Tries per server before giving up with ResolveErrc::timeout. With one
    /// server, timeout 200 ms and 2 tries, a lookup gives up after 600 ms.
    int tries = 3;
    /// AF_INET or AF_INET6 for that family only; 0 (AF_UNSPEC): both, in
    /// the order RFC 6724 prefers (getaddrinfo's).
    int family = 0;
};

/// The callback of Resolver::resolve(): an error (ResolveErrc, or
/// std::errc::operation_canceled) and no addresses, or no error and at least
/// one address, in the order to try them.
using ResolveCallback = std::function<void(std::error_code error, std::vector<Address> addresses)>;

namespace detail {
struct ResolverState;  // src/resolver.cpp
}  // namespace detail

/// One lookup of Resolver::resolve(), to cancel it with. Thread rule: the
/// resolver's loop thread only. Need not be kept.
class ResolveQuery {
    struct Private {};

  public:
    /// Use Resolver::resolve(). (Public only for std::make_shared.)
    ResolveQuery(Private, std::string host, ResolveCallback callback);
    ResolveQuery(const ResolveQuery&) = delete;
    ResolveQuery& operator=(const ResolveQuery&) = delete;

    /// End the lookup: its callback runs once, from the loop (never inside
    /// cancel()), with std::errc::operation_canceled and no addresses, even
    /// if an answer had arrived and was waiting to be delivered. A no-op once
    /// the callback has run. (c-ares cannot stop one lookup of many: a
    /// question already sent is left to finish or time out quietly.)
    void cancel();
    /// True until the callback has run.
    bool pending() const { return !delivered_; }
    /// The host asked for.
    const std::string& host() const { return host_; }

  private:
    friend struct detail::ResolverState;

    std::string host_;
    ResolveCallback callback_;
    detail::ResolverState* owner_ = nullptr;  // set while the callback is owed
    std::uint64_t sequence_ = 0;              // the order of resolve() calls
    int port_ = -1;  // the service's port (resolve() sets it), set on each address
    std::error_code error_;
    std::vector<Address> addresses_;
    unsigned heard_rcode_ = 0;  // the last SERVFAIL, NOTIMP or REFUSED a server answered it
    bool in_cares_ = false;     // c-ares holds a pointer to this lookup
    bool finished_ = false;     // the outcome is known (answer, error or cancel)
    bool delivered_ = false;    // the callback has run
};

/// Resolves host names to addresses without blocking (c-ares, its sockets
/// watched by the loop and its timeouts driven by one loop timer, as libuv's
/// cares_wrap does it). /etc/hosts is read first ("localhost" included), then
/// the DNS servers. A numeric host ("127.0.0.1", "::1", "[::1]") is answered
/// without asking anyone. Several lookups may be pending at once.
///
/// Thread rule: built, used and destroyed on its loop's thread; the loop must
/// outlive it, or else the loop's destruction cancels every pending lookup
/// (callbacks with operation_canceled) and the resolver answers nothing more.
/// Callbacks run on the loop thread, never inside resolve() or cancel(), and
/// never after the resolver's destruction: destroying it (also from one of its
/// own callbacks) runs every pending callback with operation_canceled before
/// it returns. A callback may throw: the exception goes to the loop's
/// exception handler and the other lookups go on. Non-copyable, non-movable.
class Resolver {
  public:
    /// A resolver on `loop` (its channel reads /etc/resolv.conf unless
    /// options.servers is given). Throws std::invalid_argument for servers
    /// that do not parse, a family other than 0, AF_INET, AF_INET6, or a
    /// timeout or tries below 1; std::system_error (resolve_category())
    /// if c-ares cannot start.
    explicit Resolver(EventLoop& loop, ResolverOptions options = {});
    ~Resolver();
    Resolver(const Resolver&) = delete;
    Resolver& operator=(const Resolver&) = delete;

    /// Look up `host` (a name or a numeric address) for `service` (a port
    /// number "80", a service name "http", or "" for port 0; other text, e.g.
    /// "80x" or "-5", is ResolveErrc::unknown_service). `callback` runs
    /// once, from the loop: with the addresses, each with the port set, or an
    /// error (ResolveErrc; resolve_message() words it for a user). Returns a
    /// handle to cancel with. Throws std::invalid_argument for an empty host,
    /// a host or service with a NUL byte (never looked up as the text before
    /// it), a bracketed host that is not an IPv6 address ("[localhost]": the
    /// brackets are for IPv6 only) or a numeric service over 65535,
    /// std::logic_error while the resolver
    /// is being destroyed or its loop has gone.
    std::shared_ptr<ResolveQuery> resolve(std::string_view host, std::string_view service,
                                          ResolveCallback callback);
    /// Lookups whose callback has not run yet.
    std::size_t pending() const;
    /// The loop it runs on.
    EventLoop& loop() const { return loop_; }

  private:
    EventLoop& loop_;
    // Shared with the loop (a tie) and with a delivery in progress, so a
    // callback may destroy the Resolver.
    std::shared_ptr<detail::ResolverState> state_;
};

/// "cannot resolve 'HOST': WHY", e.g. "cannot resolve 'nosuch.invalid':
/// Domain name not found", for an error a Resolver reported.
std::string resolve_message(std::string_view host, std::error_code error);

/// Splits "host:port", "[v6 host]:port" into host and port text, as
/// Address::parse() reads them; a bare IPv6 host must be bracketed, and
/// brackets hold an IPv6 address only ("[localhost]:80" is refused). Throws
/// std::invalid_argument naming the text otherwise.
std::pair<std::string, std::string> split_host_port(std::string_view text);

/// Resolve once, blocking the calling thread until the answer (a private
/// EventLoop and Resolver, run to completion): for start-up code (a server's
/// address, a tool's --host), not for a loop that serves. Returns the
/// addresses in the order to try them. Throws std::system_error whose what()
/// reads "evmux: cannot resolve 'nosuch.invalid': Domain name not found"
/// (its code: ResolveErrc), std::invalid_argument as Resolver's constructor
/// and resolve() do.
std::vector<Address> resolve_now(std::string_view host, std::string_view service,
                                 const ResolverOptions& options = {});

/// The addresses of "host:port" text, for start-up code: the one address
/// Address::parse() reads ("127.0.0.1:80", "[::1]:80", "unix:/path"), or
/// else resolve_now() of its host and port (split_host_port()). For a
/// server's address (TcpServer, LoopGroup::listen(), a UdpEndpoint to
/// bind), ":8080" means every IPv4 interface, "0.0.0.0:8080" (Go's
/// net.Listen(":8080"); "[::]:8080" for IPv6); connect() does not take it.
/// Throws as those do; a port alone ("8080") is refused with what to write:
/// "bad address "8080": no host (every interface: 0.0.0.0:8080 or :8080)".
std::vector<Address> resolve_address_now(std::string_view text,
                                         const ResolverOptions& options = {});

}  // namespace evmux

/// ResolveErrc values are std::error_code enums.
template <>
struct std::is_error_code_enum<evmux::ResolveErrc> : std::true_type {};
