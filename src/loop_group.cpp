// LoopGroup: one EventLoop per thread; GroupServer: connections spread over
// those loops by SO_REUSEPORT listeners or by one acceptor handing fds out
// round-robin.
#include "evmux/loop_group.hpp"

#include <unistd.h>

#include <algorithm>
#include <future>
#include <optional>
#include <stdexcept>
#include <system_error>
#include <unordered_map>
#include <utility>

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

// ---- GroupServer::Shard: one server's part on one loop ------------------------------

// Thread rule: loop thread only, except the atomic counters and
// accept_counters (read anywhere, the latter through std::atomic_ref) and the
// constructor/destructor (run while the loop is not running it: before the
// start task is posted, after the thread is joined).
struct GroupServer::Shard {
    GroupServer& server;
    EventLoop& loop;
    std::size_t index;
    ServerStats accept_counters;  // the acceptor's: accept_calls, accept_errors, rejected (shed)
    std::optional<detail::Acceptor> acceptor;  // reuse_port: every shard; round_robin: shard 0
    bool stopping = false;
    std::size_t turn = 0;  // round_robin acceptor: the next loop to receive an fd
    Callbacks callbacks;   // the user's
    GroupServerOptions options;
    EventLoop::TimerId sweep_timer = 0;
    std::unordered_map<Connection*, ConnectionPtr> conns;
    std::atomic<std::uint64_t> total{0};     // connections served by this loop
    std::atomic<std::uint64_t> rejected{0};  // over max_connections, or refused by the selector
    std::atomic<std::uint64_t> errors{0};    // Connection::create()/start() failed
    std::atomic<std::uint64_t> bytes_in{0};  // of the connections closed so far
    std::atomic<std::uint64_t> bytes_out{0};

    Shard(GroupServer& s, EventLoop& l, std::size_t i, const Callbacks& user,
          const GroupServerOptions& opt)
        : server(s), loop(l), index(i), callbacks(user), options(opt) {}

    // Opens the listener; accepting starts with start() on the loop.
    void listen_on(const Address& address, bool reuse_port) {
        acceptor.emplace(loop, address, reuse_port, options.backlog, options.accept_budget,
                         options.accept_pause, accept_counters,
                         [this](int accepted, const Address& peer) { dispatch(accepted, peer); });
    }

    detail::IdleLimits idle_limits() const {
        return {options.idle_timeout, options.read_idle_timeout, options.write_idle_timeout};
    }

    void start() {
        if (stopping) return;
        if (acceptor) acceptor->start();
        if (idle_limits().any())
            sweep_timer = loop.call_every(idle_limits().sweep_period(), [this] { sweep_idle(); });
    }

    // Where an accepted fd goes: here, or (round_robin) the next loop in turn.
    void dispatch(int fd, const Address& peer) {
        const std::size_t n = server.shards_.size();
        if (server.distribution_ == Distribution::reuse_port || n == 1) {
            adopt(fd, peer);
            return;
        }
        const std::size_t target = turn;
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

    // As TcpServer::accept_one, with the open count shared by all shards.
    void adopt(int fd, const Address& peer) {
        if (stopping) {  // accepted just before the stop: not served
            ::close(fd);
            return;
        }
        if (!server.reserve_slot()) {
            ::close(fd);
            rejected.fetch_add(1, std::memory_order_relaxed);
            return;
        }
        ConnectionPtr conn;
        try {
            conn = Connection::create(loop, fd, callbacks, options.connection, peer);
        } catch (const std::system_error&) {
            server.release_slot();  // create() closed the fd
            errors.fetch_add(1, std::memory_order_relaxed);
            return;
        }
        conn->tracking_ = idle_limits().any();
        conn->close_hook_ = [this](Connection& c) { forget(c); };
        Connection* raw = conn.get();
        conns.emplace(raw, conn);
        total.fetch_add(1, std::memory_order_relaxed);
        try {
            conn->start();
        } catch (const std::system_error&) {
            // The selector refused the fd (e.g. beyond select's limit): drop it.
            conns.erase(raw);
            server.release_slot();
            errors.fetch_add(1, std::memory_order_relaxed);
            rejected.fetch_add(1, std::memory_order_relaxed);
        }
    }

    // After on_close: count the connection's bytes, then free its slot (in
    // that order, so a reader that sees the slot free sees the bytes).
    void forget(Connection& conn) {
        bytes_in.fetch_add(conn.bytes_in(), std::memory_order_relaxed);
        bytes_out.fetch_add(conn.bytes_out(), std::memory_order_relaxed);
        if (conns.erase(&conn) != 0) server.release_slot();
    }

    void sweep_idle() {
        const auto now = loop.iteration_time();
        const detail::IdleLimits limits = idle_limits();
        std::vector<ConnectionPtr> idle;
        for (auto& [raw, conn] : conns)
            if (conn->is_open() && limits.expired(*conn, now)) idle.push_back(conn);
        for (auto& conn : idle) conn->close_with(CloseReason::timeout);
    }

    // Stop accepting and close every connection gracefully.
    void begin_stop() {
        stopping = true;
        if (acceptor) acceptor->stop();
        if (sweep_timer != 0) loop.cancel(std::exchange(sweep_timer, 0));
        std::vector<ConnectionPtr> all;
        all.reserve(conns.size());
        for (auto& [raw, c] : conns) all.push_back(c);
        // close() never runs on_close inside itself, so `conns` is not
        // changed under us; a connection with an empty queue closes now.
        for (auto& c : all) c->close(CloseMode::graceful);
    }

    // The grace is over and the loop has stopped: close what is left now,
    // each on_close running here (reason `local`); forget() frees the slots.
    void close_rest() {
        std::vector<ConnectionPtr> all;
        all.reserve(conns.size());
        for (auto& [raw, c] : conns) all.push_back(c);
        for (auto& c : all) c->close_now(CloseReason::local);
    }
};

GroupServer::GroupServer(LoopGroup& group, const Address& address, Callbacks callbacks,
                         GroupServerOptions options)
    : distribution_(address.is_unix() ? Distribution::round_robin : options.distribution),
      max_connections_(options.max_connections) {
    if (address.family() == 0) throw std::invalid_argument("listen: address has no family");
    const std::size_t n = group.size();
    shards_.reserve(n);
    for (std::size_t i = 0; i < n; ++i)
        shards_.push_back(std::make_unique<Shard>(*this, group.loop(i), i, callbacks, options));
    const bool reuse = distribution_ == Distribution::reuse_port;
    // Bind the first listener alone: with port 0 it picks the port, which the
    // other SO_REUSEPORT listeners then join.
    shards_[0]->listen_on(address, reuse);
    local_ = Address::local_of(shards_[0]->acceptor->fd());
    if (reuse) {
        for (std::size_t i = 1; i < n; ++i) shards_[i]->listen_on(local_, true);
    }
}

GroupServer::~GroupServer() = default;  // the acceptors close and unlink

std::vector<std::uint64_t> GroupServer::connections_per_loop() const {
    std::vector<std::uint64_t> out;
    out.reserve(shards_.size());
    for (const auto& s : shards_) out.push_back(s->total.load(std::memory_order_relaxed));
    return out;
}

std::uint64_t GroupServer::connections_total() const {
    std::uint64_t sum = 0;
    for (const auto& s : shards_) sum += s->total.load(std::memory_order_relaxed);
    return sum;
}

std::size_t GroupServer::connections_now() const {
    return open_.load(std::memory_order_acquire);
}

ServerStats GroupServer::stats() const {
    ServerStats out;
    out.connections_now = connections_now();
    for (const auto& s : shards_) {
        out.connections_total += s->total.load(std::memory_order_relaxed);
        out.rejected += s->rejected.load(std::memory_order_relaxed);
        out.accept_errors += s->errors.load(std::memory_order_relaxed);
        out.bytes_in += s->bytes_in.load(std::memory_order_relaxed);
        out.bytes_out += s->bytes_out.load(std::memory_order_relaxed);
        // The acceptor's, bumped through std::atomic_ref on the loop thread.
        auto& acc = const_cast<ServerStats&>(s->accept_counters);
        out.accept_calls += std::atomic_ref(acc.accept_calls).load(std::memory_order_relaxed);
        out.accept_errors += std::atomic_ref(acc.accept_errors).load(std::memory_order_relaxed);
        out.rejected += std::atomic_ref(acc.rejected).load(std::memory_order_relaxed);
    }
    return out;
}

// A slot under max_connections for a new connection (always, with no limit).
bool GroupServer::reserve_slot() {
    std::size_t n = open_.load(std::memory_order_relaxed);
    do {
        if (max_connections_ != 0 && n >= max_connections_) return false;
    } while (!open_.compare_exchange_weak(n, n + 1, std::memory_order_relaxed));
    return true;
}

void GroupServer::release_slot() {
    open_.fetch_sub(1, std::memory_order_release);
}

// ---- LoopGroup ------------------------------------------------------------------------

LoopGroup::LoopGroup(std::size_t threads, const std::string& backend) {
    if (threads == 0) throw std::invalid_argument("LoopGroup: at least one thread");
    loops_.resize(threads);
    // Each loop (and its selector) is built on the thread that runs it: a
    // kernel object may belong to its creating thread (io_uring queues its
    // completion work to the submitter, which then sees EINTR in blocking
    // calls), and the user's thread must not be that one. Shared, so no
    // thread touches a promise the constructor has already destroyed.
    auto ready = std::make_shared<std::vector<std::promise<void>>>(threads);
    threads_.reserve(threads);
    std::exception_ptr error;
    try {
        for (std::size_t i = 0; i < threads; ++i) {
            threads_.emplace_back([this, i, ready, backend] {
                try {
                    loops_[i] = std::make_unique<EventLoop>(
                        backend.empty() ? make_selector() : make_selector(backend));
                } catch (...) {
                    (*ready)[i].set_exception(std::current_exception());
                    return;
                }
                (*ready)[i].set_value();
                run_loop(i);
            });
            thread_ids_.push_back(threads_.back().get_id());
        }
    } catch (...) {
        error = std::current_exception();
    }
    for (std::size_t i = 0; i < threads_.size(); ++i) {
        try {
            (*ready)[i].get_future().get();
        } catch (...) {
            if (!error) error = std::current_exception();
        }
    }
    if (error) {
        for (auto& loop : loops_)
            if (loop) loop->stop();
        for (auto& t : threads_) t.join();
        std::rethrow_exception(error);
    }
}

LoopGroup::~LoopGroup() {
    try {
        stop();
    } catch (...) {
        // A callback's exception (already reported to nobody): nothing to do
        // in a destructor.
    }
    // The servers hold connections and timers of the loops: destroy them first.
    servers_.clear();
    loops_.clear();
}

EventLoop& LoopGroup::loop(std::size_t index) const {
    if (index >= loops_.size())
        throw std::out_of_range("LoopGroup: no loop " + std::to_string(index) + " (size " +
                                std::to_string(loops_.size()) + ")");
    return *loops_[index];
}

void LoopGroup::post(std::size_t index, EventLoop::Task fn) {
    loop(index).post(std::move(fn));
}

std::size_t LoopGroup::post(EventLoop::Task fn) {
    const std::size_t index = next_.fetch_add(1, std::memory_order_relaxed) % loops_.size();
    loops_[index]->post(std::move(fn));
    return index;
}

GroupServer& LoopGroup::listen(const Address& address, Callbacks callbacks,
                               GroupServerOptions options) {
    std::lock_guard lock(mutex_);
    if (stopping_.load()) throw std::logic_error("LoopGroup::listen after stop()");
    std::unique_ptr<GroupServer> server(
        new GroupServer(*this, address, std::move(callbacks), options));
    GroupServer& ref = *server;
    servers_.push_back(std::move(server));
    // Posted under the lock, so every loop runs its start task before the
    // stop task that a concurrent stop() posts.
    for (std::size_t i = 0; i < loops_.size(); ++i) {
        GroupServer::Shard* shard = ref.shards_[i].get();
        loops_[i]->post([shard] { shard->start(); });
    }
    return ref;
}

std::vector<GroupServer::Shard*> LoopGroup::shards_of(std::size_t index) {
    std::lock_guard lock(mutex_);
    std::vector<GroupServer::Shard*> out;
    out.reserve(servers_.size());
    for (auto& s : servers_) out.push_back(s->shards_[index].get());
    return out;
}

void LoopGroup::run_loop(std::size_t index) {
    EventLoop& loop = *loops_[index];
    for (;;) {
        try {
            loop.run();
            break;
        } catch (...) {
            // The loop stays usable (EventLoop's rule); keep serving the
            // others and report the first failure from stop().
            std::lock_guard lock(mutex_);
            if (!first_error_) first_error_ = std::current_exception();
        }
    }
    finish_loop(index);
}

void LoopGroup::begin_stop(std::size_t index) {
    for (GroupServer::Shard* s : shards_of(index)) s->begin_stop();
    check_drained(index);
}

void LoopGroup::check_drained(std::size_t index) {
    EventLoop& loop = *loops_[index];
    bool drained = true;
    for (GroupServer::Shard* s : shards_of(index)) drained = drained && s->conns.empty();
    if (drained || EventLoop::now() >= deadline_) {
        loop.stop();
        return;
    }
    // Poll: a connection closes when its queue drains (or its peer goes), with
    // no single event to wait on for "all of them".
    loop.call_after(std::chrono::milliseconds(1), [this, index] { check_drained(index); });
}

// On the loop thread, after run() returned: close what is left (grace over),
// running each on_close here, so the user sees every connection end on its
// own loop's thread.
void LoopGroup::finish_loop(std::size_t index) {
    EventLoop& loop = *loops_[index];
    for (GroupServer::Shard* s : shards_of(index)) s->close_rest();
    try {
        loop.run_once(std::chrono::nanoseconds(0));  // and the tasks those on_close posted
    } catch (...) {
        std::lock_guard lock(mutex_);
        if (!first_error_) first_error_ = std::current_exception();
    }
}

void LoopGroup::stop(std::chrono::milliseconds grace) {
    const auto me = std::this_thread::get_id();
    if (std::find(thread_ids_.begin(), thread_ids_.end(), me) != thread_ids_.end())
        throw std::logic_error("LoopGroup::stop from one of its own loop threads");
    std::lock_guard stop_lock(stop_mutex_);
    {
        std::lock_guard lock(mutex_);
        if (!stopping_.load()) {
            deadline_ = EventLoop::now() + grace;
            stopping_.store(true);
            for (std::size_t i = 0; i < loops_.size(); ++i)
                loops_[i]->post([this, i] { begin_stop(i); });
        }
    }
    if (!joined_) {
        for (auto& t : threads_) t.join();
        joined_ = true;
    }
    std::exception_ptr error;
    {
        std::lock_guard lock(mutex_);
        error = std::exchange(first_error_, nullptr);
    }
    if (error) std::rethrow_exception(error);
}

}  // namespace evmux
