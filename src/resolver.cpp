// Resolver: c-ares on an EventLoop (libuv/node's cares_wrap model). c-ares
// tells us through its socket-state callback which of its sockets to watch
// for what; the loop calls ares_process_fd() when one is ready; one loop timer,
// re-armed from ares_timeout() after every call into c-ares, drives its
// retries and timeouts. Answers are delivered after c-ares has returned, never
// from inside it, so a callback may start lookups, cancel them or destroy the
// resolver. With c-ares before 1.20 the resolver also reads the head of each
// answer c-ares receives, through socket functions of its own, to report a
// server's SERVFAIL, NOTIMP or REFUSED as such (see ResolverState::heard()).
#include "evmux/resolver.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <deque>
#include <limits>
#include <optional>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

#include "dns_answer.hpp"
#include "evmux_config.h"
#if EVMUX_HAVE_CARES
#include <ares.h>
#include <fcntl.h>
#include <sys/time.h>
#endif

namespace evmux {

// ---- errors ---------------------------------------------------------------------------

namespace {

#if EVMUX_HAVE_CARES
static_assert(static_cast<int>(ResolveErrc::no_data) == ARES_ENODATA);
static_assert(static_cast<int>(ResolveErrc::server_failure) == ARES_ESERVFAIL);
static_assert(static_cast<int>(ResolveErrc::not_found) == ARES_ENOTFOUND);
static_assert(static_cast<int>(ResolveErrc::refused) == ARES_EREFUSED);
static_assert(static_cast<int>(ResolveErrc::bad_name) == ARES_EBADNAME);
static_assert(static_cast<int>(ResolveErrc::connection_refused) == ARES_ECONNREFUSED);
static_assert(static_cast<int>(ResolveErrc::timeout) == ARES_ETIMEOUT);
static_assert(static_cast<int>(ResolveErrc::unknown_service) == ARES_ESERVICE);
#endif

constexpr const char* not_compiled_in_reason =
    "not compiled in (needs libc-ares-dev; meson -Dcares=enabled)";

class ResolveCategory final : public std::error_category {
  public:
    const char* name() const noexcept override { return "evmux.resolve"; }
    std::string message(int ev) const override {
        if (ev == static_cast<int>(ResolveErrc::not_compiled_in))
            return std::string("name resolution ") + not_compiled_in_reason;
#if EVMUX_HAVE_CARES
        if (ev == static_cast<int>(ResolveErrc::unknown_service))  // c-ares 1.18 has no text
            return "Unknown service name";
        return ::ares_strerror(ev);
#else
        return "c-ares status " + std::to_string(ev);
#endif
    }
    std::error_condition default_error_condition(int ev) const noexcept override {
        if (ev == static_cast<int>(ResolveErrc::timeout)) return std::errc::timed_out;
        return {ev, *this};
    }
};

// c-ares and getservbyname_r read C strings: a NUL byte would cut the text
// short, "localhost\0.example.com" looked up as "localhost". Refused instead.
void refuse_nul(std::string_view host, std::string_view service) {
    if (host.find('\0') != std::string_view::npos)
        throw std::invalid_argument("evmux: resolve: the host name contains a NUL byte");
    if (service.find('\0') != std::string_view::npos)
        throw std::invalid_argument("evmux: resolve: the service contains a NUL byte");
}

// The port of `service`: a number ("" is 0), or a service name looked up in
// /etc/services (TCP's), as c-ares would; nullopt for text that is neither.
// Not left to c-ares: for text it does not find there it falls back on
// strtoul(service, NULL, 0) cast to 16 bits with no end check, so "80x" was
// port 80, "-5" port 65531 and "70000x" port 4464.
std::optional<std::uint16_t> service_port(std::string_view service) {
    if (service.empty()) return 0;
    if (std::all_of(service.begin(), service.end(), [](char c) { return c >= '0' && c <= '9'; })) {
        unsigned port = 0;
        auto [p, ec] = std::from_chars(service.data(), service.data() + service.size(), port);
        if (ec != std::errc() || port > 65535)
            throw std::invalid_argument("evmux: resolve: port \"" + std::string(service) +
                                        "\" is not 0..65535");
        return static_cast<std::uint16_t>(port);
    }
    const std::string name(service);
    servent entry{};
    servent* found = nullptr;
    std::vector<char> buffer(1024);
    while (::getservbyname_r(name.c_str(), "tcp", &entry, buffer.data(), buffer.size(), &found) ==
               ERANGE &&
           buffer.size() < (1u << 20))
        buffer.resize(buffer.size() * 2);
    if (found == nullptr) return std::nullopt;
    return ntohs(static_cast<std::uint16_t>(found->s_port));
}

// A numeric host needs no lookup: its one address, or nullopt for a name.
std::optional<Address> numeric_address(std::string_view host, std::optional<std::uint16_t> port) {
    if (!port) return std::nullopt;  // an unknown service: resolve() reports it
    try {
        return Address::ip(host, *port);
    } catch (const std::invalid_argument&) {
        return std::nullopt;
    }
}

std::error_code cancelled() {
    return std::make_error_code(std::errc::operation_canceled);
}

}  // namespace

const std::error_category& resolve_category() noexcept {
    static const ResolveCategory category;
    return category;
}

std::error_code make_error_code(ResolveErrc e) noexcept {
    return {static_cast<int>(e), resolve_category()};
}

std::string resolver_unavailable_reason() {
#if EVMUX_HAVE_CARES
    return {};
#else
    return not_compiled_in_reason;
#endif
}

std::string resolve_message(std::string_view host, std::error_code error) {
    return "cannot resolve '" + std::string(host) + "': " + error.message();
}

// ---- the resolver's state -------------------------------------------------------------

namespace detail {

// Everything a Resolver owns. Shared: the loop holds it (a tie, so that the
// loop's destruction closes it) and so does a delivery in progress (a
// callback may destroy the Resolver). Loop thread only.
struct ResolverState : std::enable_shared_from_this<ResolverState> {
    EventLoop& loop;
    ResolverOptions options;
#if EVMUX_HAVE_CARES
    ares_channel channel = nullptr;
#endif
    EventLoop::TimerId timer = 0;  // c-ares's next timeout
    EventLoop::TieId tie = 0;      // the loop's reference
    std::vector<int> watched;      // c-ares's sockets the loop watches
    std::unordered_map<ResolveQuery*, std::shared_ptr<ResolveQuery>> queries;  // owed or in c-ares
    std::deque<std::shared_ptr<ResolveQuery>> ready;  // outcome known, callback to run
    std::uint64_t next_sequence = 0;
    std::size_t owed = 0;  // callbacks not run yet
    bool closed = false;
    bool delivering = false;
    bool delivery_posted = false;
    // c-ares before 1.20 hides failure answers (see heard()): its sockets are
    // then made and read by the socket functions below, which look at each
    // answer received. Empty otherwise.
    std::vector<std::string> search_domains;  // dns_name_key()s, for asks()
    struct CaresSocket {
        bool stream = false;  // TCP: its bytes are cut into messages
        DnsStreamCutter cutter;
    };
    std::unordered_map<int, CaresSocket> cares_sockets;  // c-ares's, open

    ResolverState(EventLoop& l, ResolverOptions o) : loop(l), options(std::move(o)) {}
    ~ResolverState() {
        destroy_channel();
    }

    void open();
    std::shared_ptr<ResolveQuery> resolve(std::string_view host, std::string_view service,
                                          ResolveCallback callback);
    void cancel(ResolveQuery& query);
    void close();

  private:
    void finish(ResolveQuery& query, std::error_code error, std::vector<Address> addresses);
    void post_delivery();
    void deliver();
    void run_callback(const std::shared_ptr<ResolveQuery>& query);
    void destroy_channel();
#if EVMUX_HAVE_CARES
    static void on_sock_state(void* data, ares_socket_t fd, int readable, int writable);
    static void on_addrinfo(void* arg, int status, int timeouts, ares_addrinfo* result);
    void sock_state(int fd, bool readable, bool writable);
    void process(ares_socket_t read_fd, ares_socket_t write_fd);
    void arm_timer();
    void watch_failure_answers();
    static const ares_socket_functions socket_functions;
    static ares_socket_t open_socket(int family, int type, int protocol, void* data);
    static int close_socket(ares_socket_t fd, void* data);
    static int connect_socket(ares_socket_t fd, const sockaddr* to, ares_socklen_t length,
                              void* data);
    static ares_ssize_t receive(ares_socket_t fd, void* buffer, std::size_t size, int flags,
                                sockaddr* from, ares_socklen_t* from_length, void* data);
    static ares_ssize_t send_vector(ares_socket_t fd, const iovec* parts, int count, void* data);
    void received(int fd, std::string_view bytes);
    void heard(std::string_view message, bool over_tcp);
    bool asks(const ResolveQuery& query, std::string_view name) const;
#endif
};

void ResolverState::open() {
    if (options.family != 0 && options.family != AF_INET && options.family != AF_INET6)
        throw std::invalid_argument("evmux: Resolver: family must be 0, AF_INET or AF_INET6");
    if (options.timeout.count() < 1 || options.tries < 1)
        throw std::invalid_argument("evmux: Resolver: timeout and tries must be at least 1");
#if EVMUX_HAVE_CARES
    // Once per process (thread-safe static initialisation); a no-op on Linux.
    static const int library = ::ares_library_init(ARES_LIB_INIT_ALL);
    if (library != ARES_SUCCESS)
        throw std::system_error(library, resolve_category(), "ares_library_init");
    ares_options o{};
    o.sock_state_cb = &ResolverState::on_sock_state;
    o.sock_state_cb_data = this;
    o.timeout = static_cast<int>(std::min<std::chrono::milliseconds::rep>(
        options.timeout.count(), std::numeric_limits<int>::max()));
    o.tries = options.tries;
    int rc = ::ares_init_options(&channel, &o,
                                 ARES_OPT_SOCK_STATE_CB | ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES);
    if (rc != ARES_SUCCESS) {
        channel = nullptr;
        throw std::system_error(rc, resolve_category(), "ares_init_options");
    }
    // c-ares opens its sockets without close-on-exec; a child must not inherit them.
    ::ares_set_socket_configure_callback(
        channel,
        [](ares_socket_t fd, int, void*) { return ::fcntl(fd, F_SETFD, FD_CLOEXEC) == 0 ? 0 : -1; },
        nullptr);
    if (!options.servers.empty()) {
        rc = ::ares_set_servers_ports_csv(channel, options.servers.c_str());
        if (rc != ARES_SUCCESS) {
            destroy_channel();
            throw std::invalid_argument("evmux: Resolver: bad servers \"" + options.servers +
                                        "\": " + ::ares_strerror(rc));
        }
    }
    // The c-ares that runs, not the one compiled against: a newer shared
    // library reports failure answers itself.
    int version = 0;
    ::ares_version(&version);
    if (version < 0x011400) watch_failure_answers();
#endif
}

void ResolverState::destroy_channel() {
#if EVMUX_HAVE_CARES
    if (channel != nullptr) ::ares_destroy(std::exchange(channel, nullptr));
#endif
}

std::shared_ptr<ResolveQuery> ResolverState::resolve(std::string_view host,
                                                     std::string_view service,
                                                     ResolveCallback callback) {
    if (closed)
        throw std::logic_error(
            "evmux: Resolver::resolve: the resolver is being destroyed or its loop has gone");
    if (host.empty()) throw std::invalid_argument("evmux: resolve: empty host name");
    refuse_nul(host, service);
    // "[::1]" -> "::1" (c-ares takes hosts without brackets); "[localhost]" refused.
    [[maybe_unused]] const std::string_view unbracketed = detail::unbracketed_host(host, host);
    const std::optional<std::uint16_t> port = service_port(service);
    auto query = std::make_shared<ResolveQuery>(ResolveQuery::Private{}, std::string(host),
                                                std::move(callback));
    query->owner_ = this;
    query->sequence_ = next_sequence++;
    queries.emplace(query.get(), query);
    ++owed;

    if (!port) {  // neither a port number nor a service name
        finish(*query, make_error_code(ResolveErrc::unknown_service), {});
        post_delivery();
        return query;
    }
    if (std::optional<Address> numeric = numeric_address(host, port)) {
        if (options.family != 0 && numeric->family() != options.family)
            finish(*query, make_error_code(ResolveErrc::no_data), {});
        else
            finish(*query, {}, {*numeric});
        post_delivery();
        return query;
    }
#if EVMUX_HAVE_CARES
    ares_addrinfo_hints hints{};
    hints.ai_family = options.family;
    hints.ai_socktype = SOCK_STREAM;  // one entry per address
    const std::string name(unbracketed);
    // The port is set on the answers here (c-ares 1.18 refuses "0"; see
    // service_port() for its reading of other text).
    query->port_ = *port;
    query->in_cares_ = true;
    ::ares_getaddrinfo(channel, name.c_str(), nullptr, &hints, &ResolverState::on_addrinfo,
                       query.get());
    // Answered at once from /etc/hosts, or a question sent: either way the
    // callback waits for the loop (and c-ares may have a timeout to arm).
    arm_timer();
#else
    finish(*query, make_error_code(ResolveErrc::not_compiled_in), {});
#endif
    if (!ready.empty()) post_delivery();
    return query;
}

void ResolverState::cancel(ResolveQuery& query) {
    if (query.delivered_) return;
    if (!query.finished_) {
        finish(query, cancelled(), {});
    } else {  // an answer was waiting for the loop: it is dropped
        query.error_ = cancelled();
        query.addresses_.clear();
    }
    post_delivery();
}

// The outcome is known: queue the callback (once).
void ResolverState::finish(ResolveQuery& query, std::error_code error,
                           std::vector<Address> addresses) {
    if (query.finished_) return;
    query.finished_ = true;
    query.error_ = error;
    query.addresses_ = std::move(addresses);
    ready.push_back(queries.at(&query));
}

void ResolverState::post_delivery() {
    if (delivering || delivery_posted || ready.empty()) return;
    delivery_posted = true;
    loop.post([weak = weak_from_this()] {
        if (auto self = weak.lock()) {
            self->delivery_posted = false;
            self->deliver();
        }
    });
}

// Runs the queued callbacks, in order. One that destroys the Resolver ends
// this (close() has run the rest, with operation_canceled).
void ResolverState::deliver() {
    if (delivering) return;  // the delivery further up the stack goes on
    auto self = shared_from_this();
    delivering = true;
    while (!closed && !ready.empty()) {
        std::shared_ptr<ResolveQuery> query = std::move(ready.front());
        ready.pop_front();
        run_callback(query);
    }
    delivering = false;
}

void ResolverState::run_callback(const std::shared_ptr<ResolveQuery>& query) {
    if (query->delivered_) return;
    query->delivered_ = true;
    --owed;
    if (!query->in_cares_) queries.erase(query.get());
    ResolveCallback callback = std::move(query->callback_);
    std::vector<Address> addresses = std::move(query->addresses_);
    if (!callback) return;
    try {
        callback(query->error_, std::move(addresses));
    } catch (...) {
        loop.handle_exception(std::current_exception());
    }
}

// Closes the channel (c-ares closes its sockets, they are unwatched) and runs
// every callback still owed, in the order of the resolve() calls, with
// operation_canceled. Idempotent.
void ResolverState::close() {
    if (closed) return;
    closed = true;
    auto self = shared_from_this();
    if (timer != 0) loop.cancel(std::exchange(timer, 0));
    loop.untie(std::exchange(tie, 0));  // a no-op inside the loop's destructor
    destroy_channel();                  // c-ares reports its lookups as destroyed: cancelled
    for (int fd : watched) loop.unwatch(fd);
    watched.clear();
    std::vector<std::shared_ptr<ResolveQuery>> owed_now;
    for (auto& [raw, query] : queries)
        if (!query->delivered_) owed_now.push_back(query);
    std::sort(owed_now.begin(), owed_now.end(),
              [](const auto& a, const auto& b) { return a->sequence_ < b->sequence_; });
    ready.clear();
    for (auto& query : owed_now) {
        query->error_ = cancelled();
        query->addresses_.clear();
        query->in_cares_ = false;
        run_callback(query);
    }
    queries.clear();
}

#if EVMUX_HAVE_CARES

void ResolverState::on_sock_state(void* data, ares_socket_t fd, int readable, int writable) {
    auto* self = static_cast<ResolverState*>(data);
    try {
        self->sock_state(fd, readable != 0, writable != 0);
    } catch (...) {
        // The loop refused the socket (e.g. out of memory): c-ares cannot be
        // told, so its lookups on it end by their timeout.
        self->loop.handle_exception(std::current_exception());
    }
}

void ResolverState::sock_state(int fd, bool readable, bool writable) {
    const auto at = std::find(watched.begin(), watched.end(), fd);
    if (!readable && !writable) {  // c-ares is about to close it
        if (at != watched.end()) {
            loop.unwatch(fd);
            watched.erase(at);
        }
        return;
    }
    const Events interest =
        (readable ? Events::read : Events::none) | (writable ? Events::write : Events::none);
    if (at != watched.end()) {
        loop.change(fd, interest);
        return;
    }
    loop.watch(fd, interest, [this, fd](Events events) {
        const bool in = any(events, Events::read | Events::error | Events::hangup);
        const bool out = any(events, Events::write | Events::error);
        process(in ? fd : ARES_SOCKET_BAD, out ? fd : ARES_SOCKET_BAD);
    });
    watched.push_back(fd);
}

// One call into c-ares (a ready socket, or its timer with neither), then the
// timer re-armed and the answers delivered, outside c-ares.
void ResolverState::process(ares_socket_t read_fd, ares_socket_t write_fd) {
    auto self = shared_from_this();  // a callback may destroy the Resolver
    ::ares_process_fd(channel, read_fd, write_fd);
    arm_timer();
    deliver();
}

void ResolverState::arm_timer() {
    if (timer != 0) loop.cancel(std::exchange(timer, 0));
    timeval tv{};
    if (closed || ::ares_timeout(channel, nullptr, &tv) == nullptr) return;  // nothing pending
    // ares_timeout() rounds down to the millisecond: one more, so c-ares is
    // never woken before its deadline (and asked again at once, a spin).
    const auto delay = std::chrono::seconds(tv.tv_sec) + std::chrono::microseconds(tv.tv_usec) +
                       std::chrono::milliseconds(1);
    timer = loop.call_after(delay, [this] {
        timer = 0;
        process(ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    });
}

void ResolverState::on_addrinfo(void* arg, int status, int, ares_addrinfo* result) {
    auto* query = static_cast<ResolveQuery*>(arg);
    ResolverState& self = *query->owner_;
    std::vector<Address> addresses;
    if (status == ARES_SUCCESS && result != nullptr)
        for (ares_addrinfo_node* n = result->nodes; n != nullptr; n = n->ai_next) {
            if (query->port_ >= 0 && n->ai_family == AF_INET)
                reinterpret_cast<sockaddr_in*>(n->ai_addr)->sin_port =
                    htons(static_cast<std::uint16_t>(query->port_));
            else if (query->port_ >= 0 && n->ai_family == AF_INET6)
                reinterpret_cast<sockaddr_in6*>(n->ai_addr)->sin6_port =
                    htons(static_cast<std::uint16_t>(query->port_));
            Address a = Address::from_sockaddr(n->ai_addr, n->ai_addrlen);
            if (a.family() != 0) addresses.push_back(a);
        }
    if (result != nullptr) ::ares_freeaddrinfo(result);
    query->in_cares_ = false;
    // c-ares before 1.20 ends a lookup whose every try was answered SERVFAIL,
    // NOTIMP or REFUSED, or failed on its socket, with the status it starts
    // each query with, ARES_ECONNREFUSED ("Could not contact DNS servers"):
    // if a server did answer, its answer is the reason (the last one heard,
    // as c-ares 1.20 reports it). A try that timed out makes it
    // ARES_ETIMEOUT instead, which stays.
    if (status == ARES_ECONNREFUSED && query->heard_rcode_ == dns_rcode_servfail)
        status = ARES_ESERVFAIL;
    else if (status == ARES_ECONNREFUSED && query->heard_rcode_ == dns_rcode_notimp)
        status = ARES_ENOTIMP;
    else if (status == ARES_ECONNREFUSED && query->heard_rcode_ == dns_rcode_refused)
        status = ARES_EREFUSED;
    std::error_code error;
    if (status == ARES_EDESTRUCTION || status == ARES_ECANCELLED)
        error = cancelled();
    else if (status != ARES_SUCCESS)
        error = std::error_code(status, resolve_category());
    else if (addresses.empty())
        error = make_error_code(ResolveErrc::no_data);
    if (query->delivered_)  // cancelled and told: c-ares was its last holder
        self.queries.erase(query);
    else
        self.finish(*query, error, std::move(addresses));
}

// ---- failure answers (c-ares before 1.20) ----------------------------------------------
//
// c-ares 1.18 and 1.19 (ares_process.c, process_answer()) drop an answer
// whose RCODE is SERVFAIL, NOTIMP or REFUSED and try the next server (or the
// same one again, if it is the only one), without noting why; once every try
// is spent the query ends with query->error_status, which ares_send() sets to
// ARES_ECONNREFUSED and only a timeout changes (to ARES_ETIMEOUT). So a
// server that answered "refused" read as "Could not contact DNS servers".
// (c-ares 1.20 sets error_status from the RCODE.) ARES_FLAG_NOCHECKRESP
// would hand such an answer over, but also stop c-ares from asking the next
// server. Instead the resolver opens and reads c-ares's sockets for it
// (ares_set_socket_functions(): the system calls c-ares makes itself) and
// looks at the head of each answer that arrives, before c-ares does: a
// failure RCODE is noted on every pending lookup that asks the answer's
// question, and on_addrinfo() reports it if c-ares ends the lookup with
// ARES_ECONNREFUSED.

const ares_socket_functions ResolverState::socket_functions = {
    &ResolverState::open_socket, &ResolverState::close_socket, &ResolverState::connect_socket,
    &ResolverState::receive,     &ResolverState::send_vector,
};

void ResolverState::watch_failure_answers() {
    ::ares_set_socket_functions(channel, &socket_functions, this);
    // The names a lookup asks: the host, and the host in each search domain
    // (resolv.conf's "search", LOCALDOMAIN).
    ares_options saved{};
    int mask = 0;
    if (::ares_save_options(channel, &saved, &mask) != ARES_SUCCESS) return;
    try {
        for (int i = 0; i < saved.ndomains; ++i)
            search_domains.push_back(dns_name_key(saved.domains[i]));
    } catch (...) {
        ::ares_destroy_options(&saved);
        throw;
    }
    ::ares_destroy_options(&saved);
}

// c-ares sets no option on a socket of its socket functions: what it would
// have set (non-blocking, close-on-exec, TCP_NODELAY) is set here. (It binds
// only for ARES_OPT_LOCAL*, which a Resolver does not set.)
ares_socket_t ResolverState::open_socket(int family, int type, int protocol, void* data) {
    auto* self = static_cast<ResolverState*>(data);
    const int fd = ::socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, protocol);
    if (fd < 0) return ARES_SOCKET_BAD;
    const int on = 1;
    if (type == SOCK_STREAM && ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on) != 0) {
        const int err = errno;
        ::close(fd);
        errno = err;
        return ARES_SOCKET_BAD;
    }
    try {
        self->cares_sockets.erase(fd);  // a fresh stream: no bytes of an earlier socket
        self->cares_sockets[fd].stream = type == SOCK_STREAM;
    } catch (const std::bad_alloc&) {
        ::close(fd);
        errno = ENOMEM;
        return ARES_SOCKET_BAD;
    }
    return fd;
}

int ResolverState::close_socket(ares_socket_t fd, void* data) {
    static_cast<ResolverState*>(data)->cares_sockets.erase(fd);
    return ::close(fd);
}

int ResolverState::connect_socket(ares_socket_t fd, const sockaddr* to, ares_socklen_t length,
                                  void*) {
    return ::connect(fd, to, length);
}

ares_ssize_t ResolverState::receive(ares_socket_t fd, void* buffer, std::size_t size, int flags,
                                    sockaddr* from, ares_socklen_t* from_length, void* data) {
    const ssize_t n = ::recvfrom(fd, buffer, size, flags, from, from_length);
    if (n > 0 && (flags & MSG_PEEK) == 0) {
        const int err = errno;  // c-ares reads errno only after a failure; kept anyway
        static_cast<ResolverState*>(data)->received(
            fd, std::string_view(static_cast<const char*>(buffer), static_cast<std::size_t>(n)));
        errno = err;
    }
    return n;
}

// MSG_NOSIGNAL: a TCP server that has gone is an EPIPE for c-ares to handle,
// not a SIGPIPE for the process (c-ares itself writes with writev()).
ares_ssize_t ResolverState::send_vector(ares_socket_t fd, const iovec* parts, int count, void*) {
    msghdr message{};
    message.msg_iov = const_cast<iovec*>(parts);
    message.msg_iovlen = static_cast<std::size_t>(count);
    return ::sendmsg(fd, &message, MSG_NOSIGNAL);
}

// Bytes c-ares has just received on `fd`: a datagram is one message; a TCP
// stream is cut into its messages.
void ResolverState::received(int fd, std::string_view bytes) {
    const auto at = cares_sockets.find(fd);
    if (at == cares_sockets.end()) return;
    try {
        if (!at->second.stream)
            heard(bytes, false);
        else
            at->second.cutter.feed(bytes, [this](std::string_view m) { heard(m, true); });
    } catch (const std::bad_alloc&) {
        // Only a better message is lost: c-ares has the answer either way.
    }
}

// An answer is about to reach c-ares. One whose RCODE is SERVFAIL, NOTIMP or
// REFUSED is noted on each pending lookup that asks its question (c-ares
// checks the id as well; the name is enough here: two lookups that ask the
// same question of the same servers get the same answers). A truncated UDP
// answer is not one: c-ares asks again over TCP without looking at its RCODE.
void ResolverState::heard(std::string_view message, bool over_tcp) {
    const std::optional<DnsAnswerHead> head = read_dns_answer_head(message);
    if (!head || (head->truncated && !over_tcp)) return;
    if (head->rcode != dns_rcode_servfail && head->rcode != dns_rcode_notimp &&
        head->rcode != dns_rcode_refused)
        return;
    for (auto& [raw, query] : queries)
        if (query->in_cares_ && !query->finished_ && asks(*query, head->name))
            query->heard_rcode_ = head->rcode;
}

// Whether c-ares asks `name` (a dns_name_key()) for `query`: its host, or
// its host in one of the search domains (ares_getaddrinfo() tries those too,
// unless the host ends with a dot).
bool ResolverState::asks(const ResolveQuery& query, std::string_view name) const {
    const std::string host = dns_name_key(query.host_);
    if (name == host) return true;
    if (query.host_.ends_with('.') || name.size() <= host.size() + 1 || !name.starts_with(host) ||
        name[host.size()] != '.')
        return false;
    const std::string_view domain = name.substr(host.size() + 1);
    return std::find(search_domains.begin(), search_domains.end(), domain) != search_domains.end();
}

#endif  // EVMUX_HAVE_CARES

}  // namespace detail

// ---- the public face ------------------------------------------------------------------

ResolveQuery::ResolveQuery(Private, std::string host, ResolveCallback callback)
    : host_(std::move(host)), callback_(std::move(callback)) {}

void ResolveQuery::cancel() {
    if (!delivered_) owner_->cancel(*this);
}

Resolver::Resolver(EventLoop& loop, ResolverOptions options)
    : loop_(loop), state_(std::make_shared<detail::ResolverState>(loop, std::move(options))) {
    state_->open();
    detail::ResolverState* raw = state_.get();
    state_->tie = loop.tie(state_, [raw] { raw->close(); });
}

Resolver::~Resolver() {
    state_->close();
}

std::shared_ptr<ResolveQuery> Resolver::resolve(std::string_view host, std::string_view service,
                                                ResolveCallback callback) {
    return state_->resolve(host, service, std::move(callback));
}

std::size_t Resolver::pending() const {
    return state_->owed;
}

// ---- helpers ----------------------------------------------------------------------------

std::pair<std::string, std::string> split_host_port(std::string_view text) {
    auto bad = [&](const char* why) {
        return std::invalid_argument("bad address \"" + std::string(text) + "\": " + why);
    };
    const auto [host, port] =
        detail::split_host_port_text(text, "expected HOST:PORT or [HOST]:PORT");
    if (host.empty()) throw bad("no host");
    if (port.empty()) throw bad("no port");
    return {std::string(host), std::string(port)};
}

std::vector<Address> resolve_now(std::string_view host, std::string_view service,
                                 const ResolverOptions& options) {
    refuse_nul(host, service);
    // A numeric host answers without a loop.
    if (!host.empty() && (options.family == 0))
        if (std::optional<Address> a = numeric_address(host, service_port(service))) return {*a};
    EventLoop loop;
    Resolver resolver(loop, options);
    std::error_code error;
    std::vector<Address> addresses;
    bool done = false;
    resolver.resolve(host, service, [&](std::error_code e, std::vector<Address> a) {
        error = e;
        addresses = std::move(a);
        done = true;
    });
    // Bounded: c-ares gives up after its timeout and tries.
    while (!done) loop.run_once();
    if (error) throw std::system_error(error, "evmux: cannot resolve '" + std::string(host) + "'");
    return addresses;
}

std::vector<Address> resolve_address_now(std::string_view text, const ResolverOptions& options) {
    if (text.starts_with("unix:")) return {Address::parse(text)};
    // A server's ":8080" (Go's net.Listen): every IPv4 interface. A port
    // alone is refused, but told what to write.
    const bool digits_only = !text.empty() && std::all_of(text.begin(), text.end(), [](char c) {
        return c >= '0' && c <= '9';
    });
    if (digits_only)
        throw std::invalid_argument("bad address \"" + std::string(text) +
                                    "\": no host (every interface: 0.0.0.0:" + std::string(text) +
                                    " or :" + std::string(text) + ")");
    std::string every_interface;
    if (text.starts_with(':')) {
        every_interface = "0.0.0.0" + std::string(text);
        text = every_interface;
    }
    try {
        return {Address::parse(text)};
    } catch (const std::invalid_argument&) {
    }
    auto [host, port] = split_host_port(text);
    return resolve_now(host, port, options);
}

}  // namespace evmux
