// Coroutines over EventLoop and Connection: the detached-task machinery, the
// stream's input buffer and waiters, connect, accept and serve. Only the
// public Connection / TcpServer / EventLoop API is used.
//
// A stream's connection carries, in its state slot, a shared_ptr to the
// stream's core; the callbacks that every stream connection shares find it
// there. The core lives while its Stream does and, past that, until on_close
// has returned (the slot is cleared right after), so on_close can resume
// waiters even if one of them destroys the Stream.
#include "evmux/coro.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace evmux::coro {

// ---- detached tasks ------------------------------------------------------------

namespace detail {

namespace {
// Whether `error` ends a detached task quietly: AcceptorClosed always (a
// server's ordinary end), ConnectionClosed of reason `local` always (the
// program closed it: close(), its Acceptor or server closing, the loop's end,
// asyncio's cancel), any ConnectionClosed in a serve() handler (the peer went
// away).
bool ends_quietly(const std::exception_ptr& error, bool quiet_close) {
    try {
        std::rethrow_exception(error);
    } catch (const AcceptorClosed&) {
        return true;
    } catch (const QueueClosed&) {
        return true;
    } catch (const SemaphoreClosed&) {
        return true;
    } catch (const ConnectionClosed& e) {
        return quiet_close || e.reason() == CloseReason::local;
    } catch (...) {
        return false;
    }
}
}  // namespace

void finish_detached(PromiseBase& promise) noexcept {
    EventLoop& loop = *promise.loop;
    const EventLoop::TieId tie = promise.tie;
    if (promise.error && !ends_quietly(promise.error, promise.quiet_close))
        loop.handle_exception(promise.error);
    loop.untie(tie);  // drops the frame's owner: the frame is destroyed here
}

void start_detached(EventLoop& loop, Task<void>&& task, bool quiet_close) {
    if (!task.valid()) throw std::invalid_argument("evmux::coro::spawn: empty Task");
    Task<void>::Handle h = std::exchange(task.h_, {});
    // From here the loop owns the frame, through a tie: untie() when the task
    // ends frees it, and so does the loop's destruction if it comes first.
    // (Should this allocation fail, the deleter has destroyed the frame.)
    std::shared_ptr<void> owner(
        h.address(), [](void* frame) { std::coroutine_handle<>::from_address(frame).destroy(); });
    PromiseBase& p = h.promise();
    p.loop = &loop;
    p.quiet_close = quiet_close;
    p.tie = loop.tie(std::move(owner));
    h.resume();
}

}  // namespace detail

void spawn(EventLoop& loop, Task<void> task) {
    if (!task.valid()) throw std::invalid_argument("evmux::coro::spawn: empty Task");
    // Copyable for EventLoop::Task; destroyed unrun (with the frame) if the
    // loop goes first.
    auto holder = std::make_shared<Task<void>>(std::move(task));
    loop.post([&loop, holder] { detail::start_detached(loop, std::move(*holder), false); });
}

// ---- queues ----------------------------------------------------------------------

namespace detail {

void wake_from_loop(WaitNode* w, WaitList& woken) {
    w->timer = w->loop->call_after(EventLoop::Duration::zero(), [w] {
        w->timer = 0;
        if (w->list) w->list->remove(w);
        w->waiting.resume();
    });
    woken.push_back(w);
}

bool leave_wait(WaitNode* w) noexcept {
    if (w->list) w->list->remove(w);
    if (w->timer == 0) return false;
    w->loop->cancel(std::exchange(w->timer, 0));
    return true;
}

}  // namespace detail

// ---- errors ----------------------------------------------------------------------

namespace {
int errno_for(CloseReason reason, int err) {
    if (err != 0) return err;
    switch (reason) {
        case CloseReason::reset:
            return ECONNRESET;
        case CloseReason::error:
            return EIO;
        case CloseReason::overflow:
            return ENOBUFS;
        case CloseReason::timeout:
            return ETIMEDOUT;
        case CloseReason::peer_closed:
            return EPIPE;
        case CloseReason::tls:
            return EPROTO;  // the reason in words: Connection::close_message()
        case CloseReason::local:
        case CloseReason::exception:
            break;
    }
    return ECANCELED;
}
}  // namespace

ConnectionClosed::ConnectionClosed(const char* operation, CloseReason reason, int err,
                                   const std::string& detail)
    : std::system_error(errno_for(reason, err), std::generic_category(),
                        std::string(operation) + ": connection closed (" + to_string(reason) + ")" +
                            (detail.empty() ? "" : ": " + detail)),
      reason_(reason) {}

QueueClosed::QueueClosed() : std::runtime_error("evmux::coro::Queue: closed") {}

SemaphoreClosed::SemaphoreClosed() : std::runtime_error("evmux::coro::Semaphore: closed") {}

// ---- semaphores ------------------------------------------------------------------

Semaphore::Permit::Permit(Semaphore& sem) noexcept {
    sem.hold(this);
}

void Semaphore::Permit::take(Permit& other) noexcept {
    Semaphore* sem = other.sem_;
    if (!sem) return;
    sem->unhold(&other);
    sem->hold(this);
}

void Semaphore::Permit::release() noexcept {
    Semaphore* sem = sem_;
    if (!sem) return;
    sem->unhold(this);
    sem->give_back();
}

void Semaphore::hold(Permit* p) noexcept {
    p->sem_ = this;
    p->prev_ = nullptr;
    p->next_ = held_;
    if (held_) held_->prev_ = p;
    held_ = p;
}

void Semaphore::unhold(Permit* p) noexcept {
    (p->prev_ ? p->prev_->next_ : held_) = p->next_;
    if (p->next_) p->next_->prev_ = p->prev_;
    p->sem_ = nullptr;
    p->prev_ = p->next_ = nullptr;
}

void Semaphore::give_back() noexcept {
    if (auto* w = static_cast<Waiter*>(waiters_.head)) {
        waiters_.remove(w);
        w->granted = true;
        detail::wake_from_loop(w, woken_);
    } else {
        ++free_;
    }
}

Semaphore::~Semaphore() {
    close();
    while (detail::WaitNode* w = woken_.head) {
        woken_.remove(w);  // its timer stays: it resumes as woken
        static_cast<Waiter*>(w)->sem = nullptr;
    }
    while (held_) unhold(held_);
}

void Semaphore::close() {
    closed_ = true;
    while (detail::WaitNode* w = waiters_.head) {
        waiters_.remove(w);
        detail::wake_from_loop(w, woken_);  // not granted: throws
    }
}

std::optional<Semaphore::Permit> Semaphore::try_acquire() {
    if (closed_) throw SemaphoreClosed();
    if (free_ == 0) return std::nullopt;  // none free while tasks wait: handed to them
    --free_;
    return Permit(*this);
}

bool Semaphore::Waiter::await_ready() {
    if (sem->closed_) return true;  // to throw
    if (sem->free_ == 0) return false;
    --sem->free_;
    granted = true;
    return true;
}

Semaphore::Permit Semaphore::Waiter::await_resume() {
    detail::leave_wait(this);
    if (!granted) throw SemaphoreClosed();
    granted = false;  // the permit's from here
    // Handed over before the semaphore went: a permit that holds nothing.
    return sem ? Permit(*sem) : Permit();
}

AcceptorClosed::AcceptorClosed()
    : std::system_error(ECANCELED, std::generic_category(), "accept: the acceptor is closed") {}

TimedOut::TimedOut(EventLoop::Duration limit)
    : std::system_error(
          ETIMEDOUT, std::generic_category(),
          "timed out after " +
              std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(limit).count()) +
              " ms"),
      limit_(limit) {}

IncompleteRead::IncompleteRead(std::size_t got, std::size_t wanted, const char* operation)
    : std::runtime_error(std::string(operation) + ": end of stream after " + std::to_string(got) +
                         " of " + std::to_string(wanted) + " bytes"),
      got_(got),
      wanted_(wanted) {}

LineTooLong::LineTooLong(std::size_t limit)
    : std::length_error("read_line: no newline within " + std::to_string(limit) + " bytes"),
      limit_(limit) {}

// ---- the stream's core ---------------------------------------------------------------

namespace detail {

void StreamCore::append(const char* p, std::size_t n) {
    if (in_start == in.size()) {
        in.clear();
        in_start = 0;
    }
    in.append(p, n);
}

void StreamCore::release_read() noexcept {
    if (in_start == 0) return;
    if (in_start == in.size()) {
        std::string().swap(in);
        in_start = 0;
    } else if (in_start >= in.size() / 2) {  // compact once the read part dominates
        in.erase(0, in_start);
        in_start = 0;
    }
}

void StreamCore::resume_peer() {
    conn->resume_reading();
    flags &= static_cast<std::uint8_t>(~paused);
}

void StreamCore::throw_closed(const char* operation) const {
    // Not closed yet but closing: our own close(), reason local.
    if (!has(closed)) throw ConnectionClosed(operation, CloseReason::local, 0);
    // OpenSSL's reason, the handshake's time limit: what the errno cannot say.
    const bool in_words = reason == CloseReason::tls || reason == CloseReason::timeout;
    throw ConnectionClosed(operation, reason, err, in_words ? conn->close_message() : "");
}

namespace {

using Status = ReadWait::Status;
using Kind = ReadWait::Kind;

StreamCore* find(const ConnectionPtr& conn) {
    auto* slot = conn->state<std::shared_ptr<StreamCore>>();
    return slot ? slot->get() : nullptr;
}

void wake_reader(StreamCore& c, Status status) {
    ReadWait* r = std::exchange(c.reader, nullptr);
    r->registered = false;
    if (r->status == Status::pending) r->status = status;
    r->waiting.resume();
}

void wake_writer(StreamCore& c, bool closed) {
    WriteWait* w = std::exchange(c.writer, nullptr);
    w->registered = false;
    w->closed = closed;
    w->waiting.resume();
}

// Move bytes from [p, p + n) into the read `r`, advancing p and n past what
// it took; true once the read is complete (a too-long line included).
bool feed(ReadWait& r, const char*& p, std::size_t& n) {
    std::size_t k = 0;
    bool complete = false;
    switch (r.kind) {
        case Kind::view:
            r.data = p;
            k = n;
            complete = k > 0;
            break;
        case Kind::some:
            k = std::min(n, r.cap);
            std::memcpy(const_cast<char*>(r.data), p, k);  // the caller's buffer
            complete = k > 0;
            break;
        case Kind::exactly:
            k = std::min(n, r.cap - r.got);
            if (k != 0) std::memcpy(const_cast<char*>(r.data) + r.got, p, k);
            complete = r.got + k == r.cap;
            break;
        case Kind::line: {
            const std::size_t room = r.cap - std::min(r.cap, r.line->size());
            const std::size_t look = std::min(n, room);
            const void* nl = std::memchr(p, '\n', look);
            k = nl ? static_cast<std::size_t>(static_cast<const char*>(nl) - p) + 1 : look;
            r.line->append(p, k);
            complete = nl != nullptr;
            if (!complete && r.line->size() >= r.cap) {
                r.status = Status::too_long;
                complete = true;
            }
            break;
        }
        case Kind::frame: {
            if (r.got < r.head_len) {  // the prefix first, into `head`
                k = std::min<std::size_t>(n, r.head_len - r.got);
                std::memcpy(r.head + r.got, p, k);
                if (r.got + k < r.head_len) break;
                for (std::size_t i = 0; i < r.head_len; ++i)
                    r.want = r.want << 8 | static_cast<unsigned char>(r.head[i]);
                if (r.want > r.cap) {
                    r.status = Status::too_long;
                    complete = true;
                    break;
                }
                r.got += k;
                p += k;
                n -= k;
            }
            k = std::min(n, r.want - r.line->size());
            r.line->append(p, k);
            complete = r.line->size() == r.want;
            break;
        }
    }
    r.got += k;
    p += k;
    n -= k;
    return complete;
}

// ---- the callbacks every stream connection shares ----

void on_message(const ConnectionPtr& conn, Buffer& input) {
    StreamCore* c = find(conn);
    if (!c) {  // the stream is gone and the connection closing: nobody reads
        input.consume_all();
        return;
    }
    const std::string_view bytes = input.view();
    ReadWait* r = c->reader;
    if (r && r->kind == Kind::view) {
        // The usual case: a view read waits (so `in` is empty) and takes it
        // all, straight from the loop's scratch buffer: no copy. The scratch
        // is not reused until the coroutine has suspended again.
        input.consume_all();
        r->data = bytes.data();
        r->got = bytes.size();
        c->reader = nullptr;
        r->registered = false;
        r->status = Status::done;
        r->waiting.resume();  // last: the coroutine may end the stream
        return;
    }
    const char* p = bytes.data();
    std::size_t n = bytes.size();
    // A waiting read has found the buffer empty: feed it straight from the
    // loop's scratch buffer.
    const bool complete = r && feed(*r, p, n);
    if (n != 0) c->append(p, n);
    input.consume_all();  // all taken or kept here: the connection keeps nothing
    if (!c->has(StreamCore::paused) && c->buffered() >= c->input_limit) {
        c->flags |= StreamCore::paused;
        conn->pause_reading();
    }
    if (complete) wake_reader(*c, Status::done);  // last: the coroutine may end the stream
}

void on_peer_shutdown(const ConnectionPtr& conn) {
    StreamCore* c = find(conn);
    if (!c) return;
    c->flags |= StreamCore::eof;
    if (c->reader) wake_reader(*c, Status::eof);
}

void on_low_water(const ConnectionPtr& conn, std::size_t) {
    StreamCore* c = find(conn);
    if (c && c->writer) wake_writer(*c, false);
}

void on_close(const ConnectionPtr& conn, CloseReason reason, int err) {
    StreamCore* c = find(conn);  // alive until this returns (the state slot holds it)
    if (!c) return;
    c->flags |= StreamCore::closed;
    if (reason == CloseReason::peer_closed) c->flags |= StreamCore::eof;
    c->reason = reason;
    c->err = err;
    if (c->reader)
        wake_reader(*c, reason == CloseReason::peer_closed ? Status::eof : Status::closed);
    // Read again: the reader's coroutine may have destroyed the writer's.
    if (c->writer) wake_writer(*c, true);
}

}  // namespace

Callbacks stream_callbacks() {
    Callbacks cb;
    cb.on_message = on_message;
    cb.on_peer_shutdown = on_peer_shutdown;
    cb.on_low_water = on_low_water;
    cb.on_close = on_close;
    return cb;
}

Stream attach_stream(const ConnectionPtr& conn, std::size_t input_limit) {
    auto core = std::make_shared<StreamCore>(conn, std::max<std::size_t>(input_limit, 1));
    conn->emplace_state<std::shared_ptr<StreamCore>>(core);
    return Stream(std::move(core));
}

// ---- reads ----

bool ReadWait::ready_slow() {
    StreamCore& c = *core;
    if (c.reader) throw std::logic_error("evmux::coro: another read is waiting on this stream");
    if (status != Status::pending) return true;  // read_exactly of nothing
    c.release_read();
    if (c.buffered() != 0) {
        const char* p = c.in.data() + c.in_start;
        std::size_t n = c.buffered();
        const bool complete = feed(*this, p, n);
        c.in_start = c.in.size() - n;  // a view keeps pointing at them until the next read
        if (complete) {
            if (status == Status::pending) status = Status::done;
            return true;
        }
    }
    // The buffer is empty and the read wants more.
    if (c.has(StreamCore::eof))
        status = Status::eof;
    else if (c.has(StreamCore::closed | StreamCore::closing))
        status = Status::closed;
    else
        return false;
    return true;
}

void ReadWait::fail(const char* operation) const {
    if (status == Status::too_long) throw LineTooLong(cap);
    core->throw_closed(operation);
}

void ReadExactly::await_resume() const {
    check("read_exactly");
    if (status == Status::eof) throw IncompleteRead(got, cap);
}

ReadExactlyString::ReadExactlyString(StreamCore* core, std::size_t n)
    : ReadWait(core, Kind::exactly), bytes(n, '\0') {
    data = bytes.data();
    cap = n;
    if (n == 0) status = Status::done;
}

namespace {
// Bytes a read took go back to the front of the stream's input.
void give_back(StreamCore& c, const char* p, std::size_t n) noexcept {
    if (n == 0) return;
    try {
        c.in.insert(c.in_start, p, n);
    } catch (...) {  // out of memory: the bytes are lost, as they were before
    }
}
}  // namespace

void ReadWait::abandon() noexcept {
    registered = false;
    core->reader = nullptr;
    if (kind == Kind::frame) {  // the prefix, then what came of the payload
        give_back(*core, line->data(), line->size());
        give_back(*core, head, std::min<std::size_t>(got, head_len));
        line->clear();
        return;
    }
    // Waiting, it has taken every byte that arrived (the core keeps none then).
    const char* taken = kind == Kind::line ? line->data() : data;
    const std::size_t n = kind == Kind::line ? line->size() : kind == Kind::exactly ? got : 0;
    give_back(*core, taken, n);
    if (kind == Kind::line) line->clear();  // read_line(into): they are the stream's again
}

std::optional<std::string> ReadFrame::await_resume() {
    if (status == Status::too_long) {
        give_back(*core, head, head_len);  // unread: the stream as it was
        throw FrameError::too_large(want, cap, head_len == 2 ? Prefix::u16_be : Prefix::u32_be);
    }
    check("read_frame");
    if (status == Status::eof) {
        if (got == 0) return std::nullopt;
        throw IncompleteRead(got, head_len + want, "read_frame");
    }
    return std::move(payload);
}

std::string ReadExactlyString::await_resume() {
    check("read_exactly");
    if (status == Status::eof) throw IncompleteRead(got, cap);
    return std::move(bytes);
}

// ---- writes ----

void WriteWait::refuse() const {
    if (core->writer)
        throw std::logic_error("evmux::coro: another write is waiting on this stream");
    if (core->has(StreamCore::closed | StreamCore::closing)) core->throw_closed("write");
    throw std::logic_error("evmux::coro: write after shutdown_write()");
}

}  // namespace detail

// ---- Stream ----------------------------------------------------------------------------

Stream& Stream::operator=(Stream&& other) noexcept {
    if (this != &other) {
        Stream old(std::move(*this));  // closes ours as it goes
        core_ = std::move(other.core_);
    }
    return *this;
}

Stream::~Stream() {
    if (core_ && !core_->has(detail::StreamCore::closed | detail::StreamCore::closing)) {
        core_->flags |= detail::StreamCore::closing;
        core_->conn->close(CloseMode::graceful);
    }
}

void Stream::throw_empty(const char* operation) {
    throw std::logic_error(std::string("evmux::coro: ") + operation + " on an empty Stream");
}

detail::ReadSome Stream::read_some(std::span<char> into) {
    detail::StreamCore* core = core_for("read");
    if (into.empty()) throw std::invalid_argument("evmux::coro: read_some into an empty buffer");
    return detail::ReadSome(core, into);
}

void Stream::shutdown_write() {
    detail::StreamCore& c = *core_for("shutdown_write");
    c.flags |= detail::StreamCore::write_shut;
    c.conn->shutdown_write();  // a no-op once closed
}

void Stream::close(CloseMode mode) {
    if (!core_ || core_->has(detail::StreamCore::closed | detail::StreamCore::closing)) return;
    core_->flags |= detail::StreamCore::closing;
    core_->conn->close(mode);
}

const ConnectionPtr& Stream::connection() const noexcept {
    static const ConnectionPtr none;
    return core_ ? core_->conn : none;
}

std::size_t Stream::buffered() const noexcept {
    return core_ ? core_->buffered() : 0;
}

bool Stream::at_eof() const noexcept {
    return core_ && core_->has(detail::StreamCore::eof);
}

bool Stream::is_open() const noexcept {
    return core_ && !core_->has(detail::StreamCore::closed | detail::StreamCore::closing);
}

// ---- connect -----------------------------------------------------------------------------

namespace detail {

struct ConnectState {
    std::coroutine_handle<> waiting;  // the awaiting coroutine, until the outcome
    Stream stream;
    std::exception_ptr error;
};

ConnectAwaiter::ConnectAwaiter(EventLoop& loop, const Address& address, ConnectOptions options)
    : loop_(loop), address_(address), options_(options) {}

ConnectAwaiter::ConnectAwaiter(EventLoop& loop, std::string_view target, ConnectOptions options)
    : loop_(loop), target_(target), by_text_(true), options_(options) {}

ConnectAwaiter::~ConnectAwaiter() {
    // Destroyed while waiting: the attempt is abandoned (its on_error, if it
    // comes, finds no state; a connection whose TLS handshake runs is closed
    // now; one made meanwhile is closed by its on_connect).
    if (state_ && state_->waiting && connector_) connector_->cancel();
}

void ConnectAwaiter::await_suspend(std::coroutine_handle<> waiting) {
    state_ = std::make_shared<ConnectState>();
    state_->waiting = waiting;
    // Weak references: the callbacks live in the connector and the
    // connection, which must not keep the state (and its stream) alive.
    std::weak_ptr<ConnectState> weak = state_;
    Callbacks cb = stream_callbacks();
    cb.on_connect = [weak, limit = options_.connection.high_water](const ConnectionPtr& conn) {
        Stream stream = attach_stream(conn, limit);
        auto st = weak.lock();
        if (!st || !st->waiting) return;  // abandoned: `stream` closes it
        st->stream = std::move(stream);
        std::exchange(st->waiting, {}).resume();
    };
    cb.on_error = [weak](std::error_code ec, const std::string& message) {
        auto st = weak.lock();
        if (!st || !st->waiting) return;
        // The connector's text ends with ec.message(), which system_error
        // appends itself: "connect HOST:PORT: ...: Connection refused". Over
        // TLS a failed handshake comes here too: "connect 127.0.0.1:443: TLS
        // handshake: certificate verify failed (hostname mismatch)", EPROTO.
        const std::string said = ": " + ec.message();
        const bool ends_so = message.size() > said.size() &&
                             message.compare(message.size() - said.size(), said.size(), said) == 0;
        st->error = std::make_exception_ptr(std::system_error(
            ec, ends_so ? message.substr(0, message.size() - said.size()) : message));
        std::exchange(st->waiting, {}).resume();
    };
    connector_ = by_text_ ? evmux::connect(loop_, target_, std::move(cb), options_)
                          : evmux::connect(loop_, address_, std::move(cb), options_);
}

Stream ConnectAwaiter::await_resume() {
    if (state_->error) std::rethrow_exception(state_->error);
    return std::move(state_->stream);
}

}  // namespace detail

// ---- names --------------------------------------------------------------------------------

namespace detail {

struct ResolveState {
    std::coroutine_handle<> waiting;  // the awaiting coroutine, until the outcome
    std::error_code error;
    std::vector<Address> addresses;
    std::shared_ptr<ResolveQuery> query;
    std::unique_ptr<Resolver> own;  // resolve(loop, ...)'s
};

ResolveAwaiter::ResolveAwaiter(Resolver& resolver, std::string_view host, std::string_view service)
    : resolver_(&resolver), loop_(&resolver.loop()), host_(host), service_(service) {}

ResolveAwaiter::ResolveAwaiter(EventLoop& loop, std::string_view host, std::string_view service,
                               ResolverOptions options)
    : loop_(&loop), host_(host), service_(service), options_(std::move(options)) {}

ResolveAwaiter::~ResolveAwaiter() {
    // Destroyed while waiting: the lookup is cancelled; its callback, which
    // comes later from the loop (or, for a resolver of its own, from that
    // resolver's destruction below), finds no one waiting.
    if (!state_ || !state_->waiting) return;
    state_->waiting = {};
    if (state_->query) state_->query->cancel();
    state_->own.reset();
}

void ResolveAwaiter::await_suspend(std::coroutine_handle<> waiting) {
    auto state = std::make_shared<ResolveState>();
    if (!resolver_) state->own = std::make_unique<Resolver>(*loop_, options_);
    Resolver& resolver = resolver_ ? *resolver_ : *state->own;
    // A weak reference: the callback lives in the query, which the state holds.
    std::weak_ptr<ResolveState> weak = state;
    state->query = resolver.resolve(host_, service_,
                                    [weak](std::error_code ec, std::vector<Address> addresses) {
                                        auto st = weak.lock();
                                        if (!st || !st->waiting) return;
                                        st->error = ec;
                                        st->addresses = std::move(addresses);
                                        std::exchange(st->waiting, {}).resume();
                                    });
    state->waiting = waiting;
    state_ = std::move(state);
}

std::vector<Address> ResolveAwaiter::await_resume() {
    if (state_->error) throw std::system_error(state_->error, "cannot resolve '" + host_ + "'");
    return std::move(state_->addresses);
}

}  // namespace detail

// ---- accept ------------------------------------------------------------------------------

namespace detail {

struct AcceptorState {
    std::deque<Stream> pending;  // accepted, not taken yet
    AcceptWait* waiter = nullptr;
    std::size_t max_pending = 0;
    bool closed = false;
    Address local;
    std::unique_ptr<TcpServer> server;  // last: destroyed first
};

AcceptWait::~AcceptWait() {
    if (registered) state->waiter = nullptr;
}

bool AcceptWait::await_ready() {
    if (state->closed) {
        closed = true;
        return true;
    }
    if (state->waiter)
        throw std::logic_error("evmux::coro: another accept is waiting on this acceptor");
    return !state->pending.empty();
}

void AcceptWait::await_suspend(std::coroutine_handle<> h) {
    waiting = h;
    registered = true;
    state->waiter = this;
}

Stream AcceptWait::await_resume() {
    if (closed) throw AcceptorClosed();
    Stream s = std::move(state->pending.front());
    state->pending.pop_front();
    return s;
}

}  // namespace detail

Acceptor::Acceptor(EventLoop& loop, const Address& address, ServerOptions options,
                   std::size_t max_pending)
    : state_(std::make_unique<detail::AcceptorState>()) {
    detail::AcceptorState* st = state_.get();
    st->max_pending = max_pending;
    Callbacks cb = detail::stream_callbacks();
    cb.on_connect = [st, limit = options.connection.high_water](const ConnectionPtr& conn) {
        Stream stream = detail::attach_stream(conn, limit);
        if (st->closed || (!st->waiter && st->pending.size() >= st->max_pending)) {
            stream.close(CloseMode::immediate);
            return;
        }
        st->pending.push_back(std::move(stream));
        if (detail::AcceptWait* w = std::exchange(st->waiter, nullptr)) {
            w->registered = false;
            w->waiting.resume();  // takes the stream just queued
        }
    };
    st->server = std::make_unique<TcpServer>(loop, address, std::move(cb), options);
    st->local = st->server->local_address();
}

Acceptor::~Acceptor() {
    close();
}

void Acceptor::close() {
    detail::AcceptorState& st = *state_;
    if (st.closed) return;
    st.closed = true;
    // Its connections close here, on_close and all, resuming their waiters.
    std::unique_ptr<TcpServer> server = std::move(st.server);
    server.reset();
    st.pending.clear();
    if (detail::AcceptWait* w = std::exchange(st.waiter, nullptr)) {
        w->registered = false;
        w->closed = true;
        w->waiting.resume();
    }
}

const Address& Acceptor::local_address() const {
    return state_->local;
}

TcpServer* Acceptor::server() const {
    return state_->server.get();
}

std::size_t Acceptor::pending() const {
    return state_->pending.size();
}

// ---- serve ---------------------------------------------------------------------------------

Callbacks handler_callbacks(Handler handler, const ConnectionOptions& connection) {
    if (!handler) throw std::invalid_argument("evmux::coro: empty handler");
    Callbacks cb = detail::stream_callbacks();
    cb.on_connect = [handler = std::move(handler),
                     limit = connection.high_water](const ConnectionPtr& conn) {
        detail::start_detached(conn->loop(), handler(detail::attach_stream(conn, limit)), true);
    };
    return cb;
}

std::unique_ptr<TcpServer> serve(EventLoop& loop, const Address& address, Handler handler,
                                 ServerOptions options) {
    Callbacks cb = handler_callbacks(std::move(handler), options.connection);
    return std::make_unique<TcpServer>(loop, address, std::move(cb), options);
}

TcpServer& serve(LoopGroup& group, const Address& address, Handler handler, ServerOptions options) {
    Callbacks cb = handler_callbacks(std::move(handler), options.connection);
    return group.listen(address, std::move(cb), options);
}

}  // namespace evmux::coro
