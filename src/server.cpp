// TcpServer (listen/accept on one loop or over a LoopGroup's loops, with
// fd-exhaustion handling, limits, an idle sweep and counters) and connect()
// (non-blocking connect with timeout and cancel, over TLS until the
// handshake is done).
#include "evmux/server.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <optional>
#include <stdexcept>
#include <system_error>
#include <unordered_map>
#include <utility>
#include <vector>

#include "evmux/loop_group.hpp"
#include "evmux/resolver.hpp"
#include "listener.hpp"

namespace evmux {

namespace {

// An accepted fd travelling to another loop inside a posted task: closed if
// the task is destroyed unrun (the target loop stopped first).
struct TravellingFd {
    int fd;
    explicit TravellingFd(int f) : fd(f) {}
    ~TravellingFd() {
        if (fd >= 0) ::close(fd);
    }
    TravellingFd(const TravellingFd&) = delete;
    TravellingFd& operator=(const TravellingFd&) = delete;
    int release() { return std::exchange(fd, -1); }
};

// One writer, readers anywhere (see ByteCounters).
void bump(std::atomic<std::uint64_t>& counter) {
    counter.store(counter.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}

// The on_error of a connect() whose user left it empty: a failure nobody
// handles goes to the loop's exception handler, as an exception escaping a
// callback does (by default run() rethrows it); a cancel is no failure.
// A std::system_error whose what() is `message` ("connect 127.0.0.1:1:
// Connection refused": message ends with ec.message(), which system_error
// appends itself).
std::function<void(std::error_code, const std::string&)> unhandled_connect_error(EventLoop& loop) {
    return [&loop](std::error_code ec, const std::string& message) {
        if (ec == std::errc::operation_canceled) return;
        const std::string said = ": " + ec.message();
        const bool ends_so = message.size() > said.size() &&
                             message.compare(message.size() - said.size(), said.size(), said) == 0;
        loop.handle_exception(std::make_exception_ptr(std::system_error(
            ec, ends_so ? message.substr(0, message.size() - said.size()) : message)));
    };
}

}  // namespace

const char* to_string(Distribution distribution) {
    switch (distribution) {
        case Distribution::reuse_port:
            return "reuse_port";
        case Distribution::round_robin:
            return "round_robin";
    }
    return "unknown";
}

// ---- TcpServer::Shard: the server's part on one loop --------------------------------

// The one implementation of accepting, adopting, forgetting and sweeping, for
// one loop of the server (a one-loop server has one shard). Thread rule: its
// loop's thread only, except the atomic counters and accept_counters (read
// anywhere, the latter through std::atomic_ref) and construction/destruction
// (while the loop does not run it).
struct TcpServer::Shard {
    TcpServer& server;
    EventLoop& loop;
    std::size_t index;
    ServerStats accept_counters;  // the acceptor's: accept_calls, accept_errors, rejected (shed)
    std::optional<detail::Acceptor> acceptor;  // reuse_port: every shard; else shard 0
    bool stopping = false;
    std::size_t turn = 0;  // round_robin acceptor: the next loop to receive an fd
    EventLoop::TimerId sweep_timer = 0;
    std::unordered_map<Connection*, ConnectionPtr> conns;
    ByteCounters bytes;                      // every connection's, open or closed
    std::atomic<std::uint64_t> total{0};     // connections served by this loop
    std::atomic<std::uint64_t> rejected{0};  // over max_connections, or refused by the selector
    std::atomic<std::uint64_t> errors{0};    // Connection::create()/start() failed

    Shard(TcpServer& s, EventLoop& l, std::size_t i) : server(s), loop(l), index(i) {}

    // Opens the listener; accepting starts with start().
    void listen_on(const Address& address, bool reuse_port) {
        const ServerOptions& o = server.opt_;
        acceptor.emplace(loop, address, reuse_port, o.backlog, o.accept_budget, o.accept_pause,
                         accept_counters,
                         [this](int fd, const Address& peer) { dispatch(fd, peer); });
    }

    void start() {
        if (stopping) return;
        if (acceptor) acceptor->start();
        const detail::IdleLimits limits = server.idle_limits();
        if (limits.any())
            sweep_timer = loop.call_every(limits.sweep_period(), [this] { sweep_idle(); });
    }

    // Where an accepted fd goes: here, or (round_robin) the next loop in turn.
    void dispatch(int fd, const Address& peer) {
        const std::size_t n = server.shards_.size();
        const std::size_t target = server.distribution_ == Distribution::round_robin ? turn : index;
        turn = (turn + 1) % n;
        if (target == index) {
            adopt(fd, peer);
            return;
        }
        Shard* to = server.shards_[target].get();
        // std::function needs a copyable task; the shared holder closes the
        // fd if the target loop is destroyed before running it.
        auto holder = std::make_shared<TravellingFd>(fd);
        to->loop.post([to, holder, peer] { to->adopt(holder->release(), peer); });
    }

    void adopt(int fd, const Address& peer) {
        if (stopping) {  // accepted just before the stop: not served
            ::close(fd);
            return;
        }
        if (!server.reserve_slot()) {
            ::close(fd);
            bump(rejected);
            return;
        }
        ConnectionPtr conn;
        try {
            conn = Connection::create(loop, fd, server.cb_, server.opt_.connection, peer);
        } catch (const std::system_error&) {
            server.release_slot();  // create() closed the fd
            bump(errors);
            return;
        }
        conn->track_activity(sweep_timer != 0);
        conn->count_bytes_into(&bytes);
        conn->set_close_hook([this](Connection& c) { forget(c); });
        Connection* raw = conn.get();
        conns.emplace(raw, conn);
        bump(total);
        try {
            conn->start();
        } catch (const std::system_error&) {
            // The selector refused the fd (e.g. beyond select's limit): drop it.
            conns.erase(raw);
            server.release_slot();
            bump(errors);
            bump(rejected);
        }
    }

    // After on_close: free its slot.
    void forget(Connection& conn) {
        if (conns.erase(&conn) != 0) server.release_slot();
    }

    void sweep_idle() {
        const auto now = loop.iteration_time();
        const detail::IdleLimits limits = server.idle_limits();
        std::vector<ConnectionPtr> idle;
        for (auto& [raw, conn] : conns)
            if (conn->is_open() && limits.expired(*conn, now)) idle.push_back(conn);
        for (auto& conn : idle) conn->close_with(CloseReason::timeout);
    }

    std::vector<ConnectionPtr> snapshot() const {
        std::vector<ConnectionPtr> all;
        all.reserve(conns.size());
        for (const auto& [raw, c] : conns) all.push_back(c);
        return all;
    }

    // close() never runs on_close inside itself, so `conns` is not changed
    // under us; a connection with an empty queue closes now.
    void close_all(CloseMode mode) {
        for (auto& c : snapshot()) c->close(mode);
    }

    // Close the listener (stop_accepting()); the connections go on.
    void stop_accepting() {
        if (acceptor) acceptor->stop();
    }

    // Stop accepting and close every connection gracefully.
    void begin_stop() {
        stopping = true;
        if (acceptor) acceptor->stop();
        if (sweep_timer != 0) loop.cancel(std::exchange(sweep_timer, 0));
        close_all(CloseMode::graceful);
    }

    // Close what is left now, each on_close running here (reason `local`);
    // forget() frees the slots.
    void close_rest() {
        stopping = true;
        if (acceptor) acceptor->stop();
        if (sweep_timer != 0) loop.cancel(std::exchange(sweep_timer, 0));
        for (auto& c : snapshot()) c->close_now(CloseReason::local);
    }
};

// ---- TcpServer ------------------------------------------------------------------------

TcpServer::TcpServer(EventLoop& loop, const Address& address, Callbacks callbacks,
                     ServerOptions options)
    : TcpServer(&loop, nullptr, {address}, {}, std::move(callbacks), std::move(options)) {}

TcpServer::TcpServer(EventLoop& loop, std::string_view address, Callbacks callbacks,
                     ServerOptions options)
    // `options` copied, not moved: the lookup reads it, and arguments are
    // evaluated in no particular order.
    : TcpServer(&loop, nullptr, resolve_address_now(address, options.resolver), address,
                std::move(callbacks), options) {}

TcpServer::TcpServer(EventLoop* loop, LoopGroup* group, const std::vector<Address>& candidates,
                     std::string_view text, Callbacks callbacks, ServerOptions options)
    : cb_(std::move(callbacks)),
      opt_(std::move(options)),
      distribution_(Distribution::reuse_port),
      on_group_(group != nullptr) {
    for (const Address& a : candidates)
        if (a.family() == 0)
            throw std::invalid_argument(group ? "listen: address has no family"
                                              : "TcpServer: address has no family");
    if (group)
        for (std::size_t i = 0; i < group->size(); ++i)
            shards_.push_back(std::make_unique<Shard>(*this, group->loop(i), i));
    else
        shards_.push_back(std::make_unique<Shard>(*this, *loop, 0));
    bind_first(candidates, text);
    if (!group) shards_[0]->start();
}

// The first candidate that binds. One candidate's error is thrown as it is;
// for several, each one's: "bind localhost:80: tried [::1]:80 (Address
// already in use), 127.0.0.1:80: Address already in use".
void TcpServer::bind_first(const std::vector<Address>& candidates, std::string_view text) {
    std::string tried;
    for (std::size_t i = 0; i < candidates.size(); ++i) {
        const Address& address = candidates[i];
        // Over a LoopGroup a Unix socket is always round_robin (one
        // acceptor); on one loop the distribution is moot.
        if (on_group_)
            distribution_ = address.is_unix() ? Distribution::round_robin : opt_.distribution;
        try {
            bind_listeners(address,
                           on_group_ ? distribution_ == Distribution::reuse_port : opt_.reuse_port);
            return;
        } catch (const std::system_error& e) {
            for (auto& shard : shards_) shard->acceptor.reset();
            if (candidates.size() == 1) throw;
            if (!tried.empty()) tried += ", ";
            tried += address.to_string();
            if (i + 1 == candidates.size())  // system_error appends the last one's error
                throw std::system_error(e.code(), "bind " + std::string(text) + ": tried " + tried);
            tried += " (" + e.code().message() + ")";
        }
    }
}

// The first listener alone: with port 0 it picks the port, which the other
// SO_REUSEPORT listeners (reuse_port over a LoopGroup) then join. On a throw
// the acceptors made so far close (and unlink) as the shards are destroyed.
void TcpServer::bind_listeners(const Address& address, bool reuse_port) {
    // The group's SO_REUSEPORT is for its own listeners: unless the user asked
    // to share the port with other processes (`reuse_port`), a port in use is
    // refused as it is without SO_REUSEPORT, not joined.
    if (on_group_ && reuse_port && !opt_.reuse_port && address.port() != 0)
        detail::refuse_port_in_use(address);
    shards_[0]->listen_on(address, reuse_port);
    local_ = Address::local_of(shards_[0]->acceptor->fd());
    if (distribution_ == Distribution::reuse_port)
        for (std::size_t i = 1; i < shards_.size(); ++i) shards_[i]->listen_on(local_, true);
}

TcpServer::~TcpServer() {
    // One loop: on its thread, each on_close here (or, for a connection whose
    // own callback is destroying us, when that callback returns). Over a
    // LoopGroup the loops have closed theirs before joining; anything left is
    // closed here, safely, since those threads are gone.
    for (auto& shard : shards_) {
        shard->stopping = true;
        shard->acceptor.reset();  // stops accepting, closes the listener, unlinks a Unix path
        if (shard->sweep_timer != 0) shard->loop.cancel(std::exchange(shard->sweep_timer, 0));
        for (auto& [raw, conn] : shard->conns) conn->set_close_hook(nullptr);
        auto conns = std::move(shard->conns);
        shard->conns.clear();
        for (auto& [raw, conn] : conns) {
            conn->count_bytes_into(nullptr);  // the shard goes first
            conn->close_now(CloseReason::local);
        }
    }
}

EventLoop& TcpServer::loop() const {
    return shards_.front()->loop;
}

detail::IdleLimits TcpServer::idle_limits() const {
    return {opt_.idle_timeout, opt_.read_idle_timeout, opt_.write_idle_timeout};
}

ServerStats TcpServer::stats() const {
    ServerStats out;
    out.connections_now = connections_now();
    constexpr auto relaxed = std::memory_order_relaxed;
    for (const auto& s : shards_) {
        out.connections_total += s->total.load(relaxed);
        out.rejected += s->rejected.load(relaxed);
        out.accept_errors += s->errors.load(relaxed);
        out.bytes_in += s->bytes.in.load(relaxed);
        out.bytes_out += s->bytes.out.load(relaxed);
        // The acceptor's, bumped through std::atomic_ref on the loop thread.
        auto& acc = const_cast<ServerStats&>(s->accept_counters);
        out.accept_calls += std::atomic_ref(acc.accept_calls).load(relaxed);
        out.accept_errors += std::atomic_ref(acc.accept_errors).load(relaxed);
        out.rejected += std::atomic_ref(acc.rejected).load(relaxed);
    }
    return out;
}

std::vector<std::uint64_t> TcpServer::connections_per_loop() const {
    std::vector<std::uint64_t> out;
    out.reserve(shards_.size());
    for (const auto& s : shards_) out.push_back(s->total.load(std::memory_order_relaxed));
    return out;
}

std::uint64_t TcpServer::connections_total() const {
    std::uint64_t sum = 0;
    for (const auto& s : shards_) sum += s->total.load(std::memory_order_relaxed);
    return sum;
}

void TcpServer::close_all(CloseMode mode) {
    if (!on_group_) {
        shards_[0]->close_all(mode);
        return;
    }
    for (auto& shard : shards_) {
        Shard* s = shard.get();
        s->loop.post([s, mode] { s->close_all(mode); });
    }
}

void TcpServer::stop_accepting() {
    accepting_.store(false, std::memory_order_release);
    if (!on_group_) {
        shards_[0]->stop_accepting();
        return;
    }
    for (auto& shard : shards_) {
        Shard* s = shard.get();
        s->loop.post([s] { s->stop_accepting(); });
    }
}

// A slot under max_connections for a new connection (always, with no limit).
bool TcpServer::reserve_slot() {
    std::size_t n = open_.load(std::memory_order_relaxed);
    do {
        if (opt_.max_connections != 0 && n >= opt_.max_connections) return false;
    } while (!open_.compare_exchange_weak(n, n + 1, std::memory_order_relaxed));
    return true;
}

void TcpServer::release_slot() {
    open_.fetch_sub(1, std::memory_order_release);
}

void TcpServer::start_shard(std::size_t index) {
    shards_[index]->start();
}

void TcpServer::begin_stop(std::size_t index) {
    accepting_.store(false, std::memory_order_release);
    shards_[index]->begin_stop();
}

bool TcpServer::drained(std::size_t index) const {
    return shards_[index]->conns.empty();
}

void TcpServer::close_rest(std::size_t index) {
    shards_[index]->close_rest();
}

// ---- connect ----------------------------------------------------------------------

Connector::Connector(Private, EventLoop& loop, std::string target, Callbacks callbacks,
                     ConnectOptions options)
    : loop_(loop), target_(std::move(target)), cb_(std::move(callbacks)), opt_(options) {}

Connector::~Connector() {
    // Never reached while connecting (the loop's tie holds us, and its
    // destruction ends the attempt first); closed here all the same.
    close_socket();
}

std::shared_ptr<Connector> connect(EventLoop& loop, const Address& address, Callbacks callbacks,
                                   ConnectOptions options) {
    if (address.family() == 0) throw std::invalid_argument("connect: address has no family");
    auto c = std::make_shared<Connector>(Connector::Private{}, loop, address.to_string(),
                                         std::move(callbacks), options);
    c->start({address});
    return c;
}

std::shared_ptr<Connector> connect(EventLoop& loop, std::string_view address, Callbacks callbacks,
                                   ConnectOptions options) {
    std::optional<Address> numeric;
    if (address.starts_with("unix:")) numeric = Address::parse(address);  // throws if bad
    try {
        if (!numeric) numeric = Address::parse(address);
    } catch (const std::invalid_argument&) {
    }
    if (numeric) return connect(loop, *numeric, std::move(callbacks), options);
    auto [host, service] = split_host_port(address);
    if (options.resolver != nullptr && &options.resolver->loop() != &loop)
        throw std::invalid_argument("connect: options.resolver runs on another loop");
    auto c = std::make_shared<Connector>(Connector::Private{}, loop, std::string(address),
                                         std::move(callbacks), options);
    c->start_lookup(host, service);
    return c;
}

void Connector::start(std::vector<Address> candidates) {
    // The loop holds us until the outcome is told; destroyed first, it ends
    // the attempt there (end_with_loop()), so nothing is left of it.
    tie_ = loop_.tie(shared_from_this(), [this] { end_with_loop(); });
    active_ = true;
    candidates_ = std::move(candidates);
    if (opt_.timeout.count() > 0) {
        timer_ = loop_.call_after(opt_.timeout, [this] {
            timer_ = 0;
            if (conn_) {  // connected, the TLS handshake still running
                const std::error_code timed_out(ETIMEDOUT, std::generic_category());
                fail(timed_out, "connect " + target_ + ": timed out during the TLS handshake",
                     false);
                return;
            }
            if (by_name_ && !query_) {  // connecting to one of the name's addresses
                attempt_failed(ETIMEDOUT);
                fail(last_error_, "connect " + target_ + ": " + tried_, false);
                return;
            }
            const std::error_code timed_out(ETIMEDOUT, std::generic_category());
            fail(timed_out, "connect " + target_ + ": " + timed_out.message(), false);
        });
    }
    if (!candidates_.empty()) try_next(true);
}

// Asks the resolver (which never calls back inside resolve()), then arms the
// timer; candidates come with the answer.
void Connector::start_lookup(const std::string& host, const std::string& service) {
    by_name_ = true;
    host_ = host;
    Resolver* resolver = opt_.resolver;
    if (resolver == nullptr) {
        own_resolver_ = std::make_unique<Resolver>(loop_);
        resolver = own_resolver_.get();
    }
    // Weak: a cancelled attempt may be gone when the (cancelled) lookup reports.
    query_ = resolver->resolve(
        host, service,
        [weak = weak_from_this(), host](std::error_code error, std::vector<Address> addresses) {
            if (auto self = weak.lock()) self->on_resolved(host, error, std::move(addresses));
        });
    start({});
}

void Connector::on_resolved(const std::string& host, std::error_code error,
                            std::vector<Address> addresses) {
    if (!active_ || !query_) return;  // cancelled or timed out meanwhile
    query_.reset();
    if (error == std::errc::operation_canceled) {
        // Not by us: the resolver was destroyed, or the loop is being
        // destroyed (its resolvers may close before us). Said as cancel() says it.
        fail(error, "connect " + target_ + ": " + error.message(), false);
        return;
    }
    if (error) {
        fail(error, "connect " + target_ + ": " + resolve_message(host, error), false);
        return;
    }
    candidates_ = std::move(addresses);
    try_next(false);
}

// Starts connecting to the next candidate that gets as far as EINPROGRESS;
// when none is left, fails with the last one's error (and, for a name, every
// one tried). `defer`: inside connect() itself, so on_error is posted.
void Connector::try_next(bool defer) {
    while (next_ < candidates_.size()) {
        address_ = candidates_[next_++];
        fd_ = ::socket(address_.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd_ >= 0 && (::connect(fd_, static_cast<const sockaddr*>(address_.sockaddr_ptr()),
                                   address_.sockaddr_len()) == 0 ||
                         errno == EINPROGRESS)) {
            // Connected or in progress: either way completion is reported as
            // writability (at once if already connected), so callbacks never
            // run inside connect(). A selector that refuses the socket (out
            // of watches or memory) fails this attempt as a refusal would.
            int refused = 0;
            try {
                loop_.watch(fd_, Events::write, [this](Events) { on_writable(); });
            } catch (const std::system_error& e) {
                refused = e.code().value() != 0 ? e.code().value() : EIO;
            } catch (const std::bad_alloc&) {
                refused = ENOMEM;
            }
            if (refused == 0) {
                watching_ = true;
                return;
            }
            errno = refused;
        }
        attempt_failed(errno);  // includes EAGAIN: a Unix listener's backlog is full
    }
    fail(last_error_, "connect " + target_ + ": " + (by_name_ ? tried_ : last_error_.message()),
         defer);
}

// The address being tried failed with `err`: noted among those tried.
void Connector::attempt_failed(int err) {
    close_socket();
    last_error_ = std::error_code(err, std::generic_category());
    if (!tried_.empty()) tried_ += "; ";
    tried_ += address_.to_string() + ": " + last_error_.message();
}

void Connector::on_writable() {
    int err = 0;
    socklen_t len = sizeof err;
    if (::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err == 0) {
        finish();
        return;
    }
    attempt_failed(err);
    try_next(false);
}

void Connector::cancel() {
    if (!active_) return;
    const std::error_code ec(ECANCELED, std::generic_category());
    fail(ec, "connect " + target_ + ": " + ec.message(), true);
}

void Connector::close_socket() {
    if (watching_) loop_.unwatch(fd_);
    watching_ = false;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
}

void Connector::fail(std::error_code error, const std::string& message, bool defer) {
    active_ = false;
    if (timer_ != 0) loop_.cancel(timer_);
    timer_ = 0;
    close_socket();
    // Over TLS, during the handshake: the connection closes now, and its
    // on_close does not run (its handshake hook ignores it: we are not active).
    if (auto conn = std::exchange(conn_, nullptr)) conn->close_now(CloseReason::local);
    if (auto query = std::exchange(query_, nullptr)) query->cancel();
    auto on_error = std::move(cb_.on_error);
    if (!on_error && error != std::errc::operation_canceled)
        on_error = unhandled_connect_error(loop_);
    cb_ = Callbacks{};
    if (on_error && defer) {  // the tie stays until it has run (from the task, or the loop's end)
        deferred_ = [on_error = std::move(on_error), error, message] { on_error(error, message); };
        loop_.post([self = shared_from_this()] { self->deliver_deferred(); });
        return;
    }
    auto self = shared_from_this();       // the tie may hold the last other reference
    loop_.untie(std::exchange(tie_, 0));  // a no-op inside the loop's destructor
    if (on_error) on_error(error, message);
}

// Runs an on_error fail() posted (once), and lets the loop go of us.
void Connector::deliver_deferred() {
    auto deliver = std::exchange(deferred_, nullptr);
    auto self = shared_from_this();
    loop_.untie(std::exchange(tie_, 0));
    if (deliver) deliver();
}

// The loop is being destroyed: an attempt still in progress ends as cancel()
// ends it, but on_error runs now (a task posted now would never run), as
// does one posted earlier and not run yet.
void Connector::end_with_loop() {
    if (active_) {
        const std::error_code ec(ECANCELED, std::generic_category());
        fail(ec, "connect " + target_ + ": " + ec.message(), false);
        return;
    }
    deliver_deferred();
}

// Connected: the connection takes the socket. Plain, the attempt ends here
// (on_connect runs in start()). Over TLS it goes on until the handshake has
// ended (handshake_ended()): options.timeout and cancel() cover it too, and
// a failed handshake is this attempt's on_error, not the connection's
// on_close (asyncio's open_connection raises, and connection_lost is never
// called for a connection_made that never was).
void Connector::finish() {
    loop_.unwatch(fd_);
    watching_ = false;
    const int fd = std::exchange(fd_, -1);
    auto self = shared_from_this();
    const bool tls = opt_.connection.tls != nullptr;
    if (!tls) end_attempt();
    Callbacks callbacks = std::move(cb_);
    cb_ = Callbacks{};
    cb_.on_error = callbacks.on_error;  // for fail()
    ConnectionPtr conn;
    try {
        // By name: a TLS client context without a name of its own checks the
        // name connected to, not the address it gave.
        conn =
            Connection::create(loop_, fd, std::move(callbacks), opt_.connection, address_, host_);
        if (tls) {
            conn->set_handshake_hook(
                [weak = weak_from_this()](const ConnectionPtr& c, std::error_code error) {
                    if (auto connector = weak.lock()) connector->handshake_ended(c, error);
                });
            conn_ = conn;
        }
        conn->start();
    } catch (const std::system_error& e) {
        conn_.reset();
        const std::string message = "connect " + address_.to_string() + ": " + e.what();
        if (tls) {
            fail(e.code(), message, false);
        } else {
            auto on_error = std::move(cb_.on_error);
            if (!on_error) on_error = unhandled_connect_error(loop_);
            on_error(e.code(), message);
        }
    }
}

// The attempt is over (it succeeded): the timer goes, and the loop lets go of us.
void Connector::end_attempt() {
    active_ = false;
    if (timer_ != 0) loop_.cancel(std::exchange(timer_, 0));
    loop_.untie(std::exchange(tie_, 0));
}

// The TLS connection's handshake ended: completed (on_connect follows), or
// the connection closed first (its on_close does not run): on_error, with
// its reason, "connect 127.0.0.1:443: TLS handshake: certificate verify
// failed (hostname mismatch)". Nothing if we ended the attempt ourselves
// (timeout, cancel(): fail() closed the connection).
void Connector::handshake_ended(const ConnectionPtr& conn, std::error_code error) {
    if (!active_ || conn != conn_) return;
    auto self = shared_from_this();  // the tie may hold the last other reference
    conn_.reset();
    if (!error) {
        cb_ = Callbacks{};
        end_attempt();
        return;
    }
    std::string why = conn->close_message();
    if (error == std::errc::operation_canceled) {
        why = error.message();  // closed by the loop's end: as cancel() says it
    } else if (why.rfind("TLS", 0) != 0) {
        why = "TLS handshake: " + (why.empty() ? error.message() : why);
    }
    fail(error, "connect " + target_ + ": " + why, false);
}

}  // namespace evmux
