// Connection: the per-connection message queue. Reads go through the loop's
// scratch buffer; writes go straight to the kernel while nothing is queued and
// through a chunk queue drained with sendmsg (MSG_NOSIGNAL: never SIGPIPE)
// otherwise.
//
// The byte transport is the socket itself or, with a TLS context, a
// TlsSession over it, whose read() and write() answer as recv() and send() do.
// The queue, water marks, half-close and close reasons are the same code for
// both and count plaintext; the TLS-only parts are the handshake (on_connect
// after it), OpenSSL's buffered bytes that no readiness event announces, and
// close_notify.
#include "evmux/connection.hpp"

#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "completion_io.hpp"
#include "connection_completion.hpp"
#include "tls_session.hpp"

namespace evmux {

namespace {
// iovecs per sendmsg: enough to fill a socket buffer with small chunks, small
// enough to live on the stack (IOV_MAX is 1024).
constexpr int max_iov = 64;
// Small sends queued behind others are appended to the last chunk up to this
// size, so a stream of tiny messages does not become a deque of tiny strings.
constexpr std::size_t coalesce_limit = 16 * 1024;

// A handshake that ended in a close, as connect() reports it (on_error).
std::error_code handshake_error(CloseReason reason, int err) {
    int code = ECANCELED;  // local, exception: closed by us, or the loop went away
    switch (reason) {
        case CloseReason::tls:
            code = EPROTO;  // the reason in words: close_message()
            break;
        case CloseReason::timeout:
            code = ETIMEDOUT;
            break;
        case CloseReason::reset:
        case CloseReason::peer_closed:
            code = err != 0 ? err : ECONNRESET;
            break;
        case CloseReason::error:
            code = err != 0 ? err : EIO;
            break;
        case CloseReason::overflow:
            code = ENOBUFS;
            break;
        case CloseReason::local:
        case CloseReason::exception:
            break;
    }
    return {code, std::generic_category()};
}

}  // namespace

const char* to_string(CloseReason reason) {
    switch (reason) {
        case CloseReason::peer_closed:
            return "peer_closed";
        case CloseReason::reset:
            return "reset";
        case CloseReason::error:
            return "error";
        case CloseReason::overflow:
            return "overflow";
        case CloseReason::timeout:
            return "timeout";
        case CloseReason::local:
            return "local";
        case CloseReason::exception:
            return "exception";
        case CloseReason::tls:
            return "tls";
    }
    return "unknown";
}

// ---- Connection: creation -------------------------------------------------------

Connection::Connection(Private, EventLoop& loop, int fd, Callbacks callbacks,
                       ConnectionOptions options)
    : fd_(fd),
      wants_drain_(static_cast<bool>(callbacks.on_drain)),
      on_message_(std::move(callbacks.on_message)),
      loop_(loop),
      opt_(options),
      cb_(std::move(callbacks)) {
    opt_.low_water = std::min(opt_.low_water, opt_.high_water);
}

Connection::~Connection() {
    reset_state();
    if (handshake_timer_ != 0) loop_.cancel(handshake_timer_);
    // Only reached with the fd open if start() failed.
    if (fd_ >= 0) {
        if (watching_) loop_.unwatch(fd_);
        ::close(fd_);
    }
}

namespace {

// SO_KEEPALIVE and its timing, clamped to Linux's ranges; fails harmlessly
// on a Unix socket, as TCP_NODELAY does.
void set_keepalive(int fd, const TcpKeepalive& k) {
    auto clamp_s = [](std::chrono::seconds v) {
        return static_cast<int>(std::clamp<std::chrono::seconds::rep>(v.count(), 1, 32767));
    };
    const int one = 1;
    const int idle = clamp_s(k.idle);
    const int interval = clamp_s(k.interval);
    const int probes = std::clamp(k.probes, 1, 127);
    if (::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one) != 0) return;
    ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
    ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &probes, sizeof probes);
}

}  // namespace

ConnectionPtr Connection::create(EventLoop& loop, int fd, Callbacks callbacks,
                                 const ConnectionOptions& options, const Address& peer,
                                 const std::string& host_name) {
    int flags = ::fcntl(fd, F_GETFL);
    if (flags < 0 || (!(flags & O_NONBLOCK) && ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)) {
        int err = errno;
        ::close(fd);
        throw std::system_error(err, std::generic_category(), "fcntl(O_NONBLOCK)");
    }
    if (options.tcp_nodelay) {
        // Fails harmlessly (EOPNOTSUPP) on a Unix socket.
        int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    if (options.keepalive.idle.count() > 0) set_keepalive(fd, options.keepalive);
    auto conn = std::make_shared<Connection>(Private{}, loop, fd, std::move(callbacks), options);
    // Kept, not asked at close: after a reset getpeername() fails (ENOTCONN).
    conn->peer_ = peer.family() != 0 ? peer : Address::peer_of(fd);
    if (options.tls) {
        // A client with no name, given none to connect to, checks the peer's
        // IP address ("::1").
        try {
            conn->tls_ = std::make_unique<detail::TlsSession>(*options.tls, fd, host_name,
                                                              conn->peer_.host());
        } catch (const std::runtime_error& e) {  // ~Connection closes the fd
            throw std::system_error(ENOMEM, std::generic_category(), e.what());
        }
        conn->handshaking_ = true;
    }
    return conn;
}

ConnectionPtr Connection::adopt(EventLoop& loop, int fd, Callbacks callbacks,
                                ConnectionOptions options) {
    ConnectionPtr conn = create(loop, fd, std::move(callbacks), options);
    conn->start();
    return conn;
}

void Connection::start() {
    if (tracking_) last_read_ = last_write_ = loop_.iteration_time();
    ConnectionPtr guard = shared_from_this();
    // The loop holds us from here until on_close has run; if the loop goes
    // first, it closes us (on_close, reason `local`).
    tie_ = loop_.tie(guard, [this] { close_now(CloseReason::local); });
    // Completion I/O where the loop has it; TLS does its handshake with
    // OpenSSL on the socket itself (readiness) and may switch after it.
    if (!tls_) start_completion();
    self_ = guard;
    try {
        update_interest();  // throws like EventLoop::watch(); ~Connection closes the fd
    } catch (...) {
        self_.reset();
        loop_.untie(std::exchange(tie_, 0));
        throw;
    }
    if (handshaking_) {
        start_tls();  // on_connect once the handshake is done
        return;
    }
    ++in_handler_;
    if (cb_.on_connect) {
        try {
            cb_.on_connect(guard);
        } catch (...) {
            callback_threw(std::current_exception());
        }
    }
    if (--in_handler_ == 0 && notify_pending_) notify_closed();
}

Address Connection::local_address() const {
    return fd_ >= 0 ? Address::local_of(fd_) : Address();  // closed after on_close
}

// ---- lingering close ------------------------------------------------------------------

namespace detail {
namespace {

// Reads and drops what has arrived (at most 256 KiB a call: a peer that
// floods does not hold the loop); true at the end of the stream (or an
// error: nothing more will come either way), false otherwise.
bool drop_input(int fd) {
    char sink[16 * 1024];
    for (int reads = 0; reads < 16;) {
        const ssize_t n = ::recv(fd, sink, sizeof sink, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);
        ++reads;
    }
    return false;
}

// Bytes of ours the peer has not acknowledged yet (sent or not); 0 on error.
int unacknowledged(int fd) {
    int n = 0;
    return ::ioctl(fd, SIOCOUTQ, &n) == 0 ? n : 0;
}

// Lingering closes in progress per loop (lingering_closes()); a mutex, not
// the loop's thread rule: a group's stop reads it, and a loop may be
// destroyed on another thread than it ran on. Rare: most closes do not linger.
std::mutex lingering_mutex;
std::unordered_map<const EventLoop*, std::size_t>& lingering_counts() {
    static std::unordered_map<const EventLoop*, std::size_t> counts;
    return counts;
}

void count_lingering(const EventLoop& loop, bool more) {
    std::lock_guard lock(lingering_mutex);
    auto& counts = lingering_counts();
    if (more) {
        ++counts[&loop];
        return;
    }
    auto it = counts.find(&loop);
    if (it != counts.end() && --it->second == 0) counts.erase(it);
}

struct Linger {
    EventLoop& loop;
    int fd;
    EventLoop::Clock::time_point deadline;
    EventLoop::TimerId timer = 0;
    EventLoop::TieId tie = 0;
    bool counted = false;

    // Done once the peer has ended its stream or has everything of ours:
    // closing then resets nothing we still had to deliver.
    void check() {
        timer = 0;
        if (drop_input(fd) || unacknowledged(fd) == 0 || EventLoop::now() >= deadline)
            return finish();
        timer = loop.call_after(std::min<EventLoop::Duration>(std::chrono::milliseconds(50),
                                                              deadline - EventLoop::now()),
                                [this] { check(); });
    }
    void finish() {
        if (fd < 0) return;
        loop.unwatch(fd);
        if (timer != 0) loop.cancel(std::exchange(timer, 0));
        ::close(std::exchange(fd, -1));
        if (std::exchange(counted, false)) count_lingering(loop, false);
        loop.untie(std::exchange(tie, 0));  // may destroy us: last
    }
};

}  // namespace

void linger_close(EventLoop& loop, int fd, std::chrono::milliseconds limit) {
    int domain = 0;
    socklen_t len = sizeof domain;
    ::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len);
    // A Unix socket resets nothing: its peer reads all that was sent.
    if (domain != AF_INET && domain != AF_INET6) {
        ::close(fd);
        return;
    }
    ::shutdown(fd, SHUT_WR);  // FIN after what is queued in the kernel
    // The common case: the peer has all of ours (or has gone): close now.
    if (drop_input(fd) || unacknowledged(fd) == 0) {
        ::close(fd);
        return;
    }
    auto linger = std::make_shared<Linger>(Linger{loop, fd, EventLoop::now() + limit});
    Linger* raw = linger.get();
    try {
        loop.watch(fd, Events::read, [raw](Events) {
            if (drop_input(raw->fd)) raw->finish();
        });
        raw->tie = loop.tie(std::move(linger), [raw] { raw->finish(); });
    } catch (const std::exception&) {
        loop.unwatch(fd);
        ::close(fd);  // cannot wait (no memory, a selector full): close as before
        return;
    }
    raw->timer = loop.call_after(std::chrono::milliseconds(50), [raw] { raw->check(); });
    count_lingering(loop, true);
    raw->counted = true;
}

std::size_t lingering_closes(const EventLoop& loop) {
    std::lock_guard lock(lingering_mutex);
    auto it = lingering_counts().find(&loop);
    return it == lingering_counts().end() ? 0 : it->second;
}

}  // namespace detail

// ---- events -------------------------------------------------------------------------

void Connection::on_ready(void* ctx, Events events) {
    auto* self = static_cast<Connection*>(ctx);
    self->handle(self->self_, events);
}

void Connection::handle(const ConnectionPtr& guard, Events events) {
    // `guard` is self_ (or a posted task's copy): it stays until on_close has
    // run, and on_close waits for this call to unwind (in_handler_), so it
    // holds us for the whole call even if a callback here closes us.
    ++in_handler_;
    try {
        if (handshaking_) {
            continue_handshake(guard);
            // Done: read at once, as the peer's first data may have come with
            // its last handshake flight (and sit in OpenSSL's buffer).
            // (Completion I/O's receive request reads from here.)
            events = handshaking_ || state_ != State::open || cio_ ? Events::none : Events::read;
        }
        if (state_ == State::open && any(events, Events::write) && tls_ && !handshaking_)
            tls_write_ready(guard);
        if (state_ == State::open && any(events, Events::write) && queued_ != 0)
            handle_write(guard);
        if (state_ == State::open && any(events, Events::read | Events::hangup | Events::error)) {
            if (any(interest_, Events::read)) {
                handle_read(guard, events);
            } else if (any(events, Events::error)) {
                // Not reading (paused), so no read() will report it: ask the socket.
                int err = 0;
                socklen_t len = sizeof err;
                ::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len);
                fail(err != 0 ? err : ECONNRESET);
            } else if (any(events, Events::hangup) && queue_.empty()) {
                // Hang-up while only FIN bookkeeping is pending: nothing more can
                // happen on this socket; do not let a level-triggered backend spin.
                close_with(CloseReason::peer_closed);
            }
        }
    } catch (...) {
        // A callback threw (on_message, on_drain, on_peer_shutdown; or the
        // kernel refused a watch change): whatever it left half done, such as
        // input still pointing into the loop's scratch buffer, dies with this
        // connection.
        callback_threw(std::current_exception());
    }
    if (--in_handler_ == 0 && notify_pending_) notify_closed();
}

void Connection::handle_read(const ConnectionPtr& self, Events events) {
    std::span<char> scratch = loop_.scratch();
    std::size_t budget = std::max<std::size_t>(opt_.read_budget, 1);
    const bool more_signalled = any(events, Events::hangup | Events::error);
    while (state_ == State::open && any(interest_, Events::read)) {
        if (unconsumed_posted_) {
            // Reading resumed with input left unconsumed and its on_message
            // is posted (deliver_unconsumed_soon()) but has not run yet: it
            // comes now, before anything read from the socket; above all
            // before an end of file, whose half-close would otherwise
            // overtake that input (and, by default, close the connection
            // with it never delivered).
            // (Again while it consumes some, as the posted one would; a
            // handler that consumes nothing has seen it: on to the socket.)
            unconsumed_posted_ = false;
            if (on_message_ && !input_.empty()) {
                const std::size_t before = input_.size();
                on_message_(self, input_);
                if (input_.size() < before) continue;
                if (state_ != State::open || !any(interest_, Events::read)) break;
            }
        }
        std::size_t want = std::min(scratch.size(), budget);
        ssize_t n = tls_ ? tls_->read(scratch.data(), want) : ::recv(fd_, scratch.data(), want, 0);
        if (n > 0) {
            bytes_in_ += static_cast<std::uint64_t>(n);
            if (counters_) detail::add_relaxed(counters_->in, static_cast<std::uint64_t>(n));
            budget -= static_cast<std::size_t>(n);
            touch_read();
            if (on_message_) {
                if (input_.empty())
                    input_.attach(scratch.data(), static_cast<std::size_t>(n));
                else
                    input_.append(scratch.data(), static_cast<std::size_t>(n));
                on_message_(self, input_);
                if (state_ != State::open) break;
                if (input_.keep_rest() > opt_.max_buffered) {
                    close_with(CloseReason::overflow);
                    break;
                }
            }
            if (budget == 0) break;
            // A short read means the socket is drained; level-triggered
            // readiness brings us back if more arrives, so skip the read that
            // would return EAGAIN. With a hang-up pending, read on to the EOF
            // so the half-close is delivered right after the data before it.
            // (TLS: a record is shorter than `want`; drained() asks whether
            // the socket's last recv was short and OpenSSL holds nothing.)
            if ((tls_ ? tls_->drained() : static_cast<std::size_t>(n) < want) && !more_signalled)
                break;
            continue;
        }
        if (n == 0) {
            handle_peer_eof(self);
            break;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        fail(errno);
        break;
    }
    if (tls_ && state_ == State::open) {
        // Stopped with bytes in TLS's buffers (budget, pause): no readiness
        // event will announce them.
        if (any(interest_, Events::read) && tls_->has_pending()) read_pending_soon();
        // Reading made TLS write (a KeyUpdate answered) into a full socket.
        if (tls_->read_wants_write() || tls_->has_unsent()) update_interest();
    }
}

void Connection::handle_peer_eof(const ConnectionPtr& self) {
    peer_eof_ = true;
    update_interest();
    if (cb_.on_peer_shutdown)
        cb_.on_peer_shutdown(self);
    else
        shutdown_write();
    maybe_finish_shutdown();
}

void Connection::handle_write(const ConnectionPtr& self) {
    if (!flush() || queued_ != 0) return;
    written_all(self);
}

void Connection::tls_write_ready(const ConnectionPtr& self) {
    if (tls_->read_wants_write() && any(interest_, Events::read)) handle_read(self, Events::read);
    if (state_ != State::open || queued_ != 0 || !tls_->has_unsent()) return;
    int r = tls_->flush();
    if (r < 0) {
        fail(errno);
        return;
    }
    if (r == 1) tls_flushed();
    update_interest();
}

void Connection::tls_flushed() {
    if (fin_after_notify_) {
        fin_after_notify_ = false;
        ::shutdown(fd_, SHUT_WR);
        shut_done_ = true;
        maybe_finish_shutdown();
    }
    if (state_ == State::open && close_after_drain_ && queue_.empty())
        close_with(CloseReason::local);
}

void Connection::written_all(const ConnectionPtr& self) {
    // Drained. on_drain first, whatever follows (the contract is "the queue
    // has been fully written"); then a graceful close or a pending FIN. It
    // also answers for a send taken whole before the queue grew, whose
    // on_drain is posted and not run yet: that one is no longer owed.
    drain_posted_ = false;
    if (wants_drain_ && cb_.on_drain) {  // (the flag: no cache line of cb_ per message)
        cb_.on_drain(self);
        if (state_ != State::open || queued_ != 0) return;  // it closed, or sent more
    }
    if (close_after_drain_) {
        // TLS: close_notify on the socket first, so the peer knows the stream
        // is whole (a full socket: once it is writable again).
        if (tls_ && tls_->close_notify() == 0) {
            update_interest();
            return;
        }
        close_with(CloseReason::local);
        return;
    }
    if (shut_requested_ && !shut_done_) {
        send_fin();
        maybe_finish_shutdown();
    }
}

bool Connection::flush() {
    if (handshaking_) return true;  // sent once the handshake is done
    return write_queue() && after_sent();
}

bool Connection::write_queue() {
    while (!queue_.empty()) {
        std::size_t total = 0;
        ssize_t n;
        if (tls_) {
            // One chunk per call: a record cannot gather (and the retry after
            // EAGAIN must start with the same bytes, which the front chunk is).
            const Chunk& front = queue_.front();
            total = front.bytes.size() - front.offset;
            n = tls_->write(front.bytes.data() + front.offset, total);
        } else {
            iovec iov[max_iov];
            int count = 0;
            for (; static_cast<std::size_t>(count) < queue_.size() && count < max_iov; ++count) {
                const Chunk& chunk = queue_[static_cast<std::size_t>(count)];
                iov[count].iov_base = const_cast<char*>(chunk.rest());
                iov[count].iov_len = chunk.rest_size();
                total += iov[count].iov_len;
            }
            msghdr msg{};
            msg.msg_iov = iov;
            msg.msg_iovlen = static_cast<std::size_t>(count);
            // sendmsg rather than writev: only the socket calls take MSG_NOSIGNAL.
            n = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            fail(errno);
            return false;
        }
        consume_sent(static_cast<std::size_t>(n));
        if (static_cast<std::size_t>(n) < total) break;  // socket buffer full
    }
    return true;
}

void Connection::consume_sent(std::size_t n) {
    bytes_out_ += n;
    if (counters_) detail::add_relaxed(counters_->out, n);
    queued_ -= n;
    touch_write();
    while (n > 0) {
        Chunk& front = queue_.front();
        std::size_t rest = front.rest_size();
        if (n < rest) {
            front.offset += n;
            break;
        }
        n -= rest;
        if (front.lent) {
            cio_->give_back(front.lent, front.lent_buffer);  // the receive buffer it was sent from
            queue_.drop_front();
            continue;
        }
        std::string done = queue_.pop_front();
        if (cio_) cio_->io.give_string(std::move(done));  // the next send's, without an allocation
    }
}

bool Connection::after_sent() {
    if (above_high_ && queued_ <= opt_.low_water) {
        above_high_ = false;
        update_interest();
        if (cb_.on_low_water) {
            cb_.on_low_water(shared_from_this(),
                             queued_);  // inside handle(): a throw is caught there
            return state_ == State::open;
        }
        return true;
    }
    // (Completion I/O: the request for what is left is made by the caller.)
    if (!cio_) update_interest();
    return true;
}

// ---- sending --------------------------------------------------------------------------

void Connection::send(const void* data, std::size_t len) {
    if (detail::running_loop != &loop_ && send_elsewhere(static_cast<const char*>(data), len))
        return;
    if (state_ != State::open || shut_requested_ || close_after_drain_ || len == 0) return;
    const char* p = static_cast<const char*>(data);
    if (queued_ == 0 && !handshaking_ && !cio_) {
        std::ptrdiff_t n = write_some(p, len);
        if (n > 0) {
            bytes_out_ += static_cast<std::uint64_t>(n);
            if (counters_) detail::add_relaxed(counters_->out, static_cast<std::uint64_t>(n));
            touch_write();
            if (static_cast<std::size_t>(n) == len) {  // the usual case
                if (wants_drain_) drain_soon();
                return;
            }
            p += n;
            len -= static_cast<std::size_t>(n);
        } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            fail(errno);
            return;
        }
    }
    send_rest(p, len);
}

// Completion I/O: bytes of the receive on_message is handling, sent from its
// buffer, which is kept from the kernel until they are sent.
void Connection::send_lent(const char* p, std::size_t len) {
    if (queued_ + len > opt_.max_buffered) return close_with(CloseReason::overflow);
    queue_.push_lent(p, len, cio_->recv_flags);  // may throw: nothing lent yet
    cio_->lend();
    queued_ += len;
    after_queue_grew();
}

// Queue what the kernel did not take (completion I/O: all of it). Kept out of
// send() so its fast path stays small.
void Connection::send_rest(const char* p, std::size_t len) {
    // (Asked here, not in send(): readiness's send() stays as small; and
    // before queue_copy()'s larger frame is set up.)
    if (cio_ && cio_->lendable(p, len)) return send_lent(p, len);
    queue_copy(p, len);
}

void Connection::queue_copy(const char* p, std::size_t len) {
    if (queued_ + len > opt_.max_buffered) {
        close_with(CloseReason::overflow);
        return;
    }
    // (Never into a chunk a completion-mode send request is reading.)
    if (len <= coalesce_limit && !queue_.empty() &&
        queue_.back().bytes.size() + len <= coalesce_limit &&
        !(cio_ && (cio_->send_chunks >= queue_.size() || queue_.back().lent))) {
        queue_.back().bytes.append(p, len);
    } else if (cio_) {
        std::string bytes = cio_->io.take_string();  // a sent chunk's storage, if one is spare
        bytes.assign(p, len);
        queue_.push_back(Chunk{std::move(bytes), 0});
    } else {
        queue_.push_back(Chunk{std::string(p, len), 0});
    }
    queued_ += len;
    after_queue_grew();
}

void Connection::send(std::string&& bytes) {
    if (detail::running_loop != &loop_ && send_elsewhere(bytes)) return;
    if (state_ != State::open || shut_requested_ || close_after_drain_ || bytes.empty()) return;
    std::size_t written = 0;
    if (queue_.empty() && !handshaking_ && !cio_) {
        std::ptrdiff_t n = write_some(bytes.data(), bytes.size());
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                fail(errno);
                return;
            }
            n = 0;
        }
        written = static_cast<std::size_t>(n);
        if (written > 0) {
            bytes_out_ += written;
            if (counters_) detail::add_relaxed(counters_->out, written);
            touch_write();
        }
        if (written == bytes.size()) {
            if (wants_drain_) drain_soon();
            return;
        }
    }
    std::size_t len = bytes.size() - written;
    if (queued_ + len > opt_.max_buffered) {
        close_with(CloseReason::overflow);
        return;
    }
    queue_.push_back(Chunk{std::move(bytes), written});  // keeps the caller's storage
    queued_ += len;
    after_queue_grew();
}

void Connection::after_queue_grew() {
    if (cio_ && !above_high_ && queued_ < opt_.high_water) {
        // The usual case on completion I/O: the request goes out with the next wait.
        if (!cio_->send_in_flight && !cio_->send_prepare) request_send();
        return;
    }
    // Completion I/O queues every send for the request made before the next
    // wait. Crossing high water, ask the kernel now, as readiness would have
    // (unless a request is still in the kernel: then its buffer is full), so
    // that high water means the same on both: the kernel takes no more.
    // (TLS: records sealed now, in order before what the next request sends.)
    if (!above_high_ && queued_ >= opt_.high_water && cio_ && !cio_->send_in_flight) {
        if (!(tls_ ? write_tls_now() : write_queue())) return;  // failed: closed
        if (queued_ == 0) {  // all taken, as by readiness's send()
            if (wants_drain_) drain_soon();
            return update_interest();
        }
    }
    if (!above_high_ && queued_ >= opt_.high_water) {
        above_high_ = true;
        update_interest();
        if (cb_.on_high_water) {
            // Maybe inside send() from elsewhere (a timer, another
            // connection): the exception is ours, not that caller's.
            try {
                cb_.on_high_water(shared_from_this(), queued_);
            } catch (...) {
                callback_threw(std::current_exception());
            }
        }
        if (state_ != State::open) return;
    }
    update_interest();
}

// A send() gave all its bytes to the kernel: on_drain from the loop, once
// however many sends follow before it runs.
void Connection::drain_soon() {
    if (drain_posted_) return;
    drain_posted_ = true;
    loop_.post([self = shared_from_this()] { self->deliver_drain(); });
}

void Connection::deliver_drain() {
    // Not owed any more: a drained queue reported it meanwhile (written_all()).
    if (!std::exchange(drain_posted_, false)) return;
    // Queued since (then handle_write reports the drain) or closed: nothing to say.
    if (state_ != State::open || queued_ != 0 || !cb_.on_drain) return;
    ++in_handler_;
    try {
        cb_.on_drain(shared_from_this());
    } catch (...) {
        callback_threw(std::current_exception());
    }
    if (--in_handler_ == 0 && notify_pending_) notify_closed();
}

void Connection::shutdown_write() {
    if (detail::running_loop != &loop_ &&
        call_elsewhere([](Connection& c, int) { c.shutdown_write(); }, 0))
        return;
    if (state_ != State::open || shut_requested_) return;
    shut_requested_ = true;
    if (queue_.empty() && !handshaking_) {
        send_fin();
        maybe_finish_shutdown();
    }
}

std::ptrdiff_t Connection::write_some(const char* p, std::size_t len) {
    if (tls_) return tls_->write(p, len);
    return ::send(fd_, p, len, MSG_NOSIGNAL);
}

void Connection::send_fin() {
    if (tls_ && tls_->close_notify() == 0) {
        fin_after_notify_ = true;  // the FIN follows close_notify when the socket takes it
        update_interest();
        return;
    }
    ::shutdown(fd_, SHUT_WR);
    shut_done_ = true;
}

void Connection::maybe_finish_shutdown() {
    if (state_ == State::open && peer_eof_ && shut_done_) close_with(CloseReason::peer_closed);
}

void Connection::pause_reading() {
    if (detail::running_loop != &loop_ &&
        call_elsewhere([](Connection& c, int) { c.pause_reading(); }, 0))
        return;
    user_paused_ = true;
    update_interest();
}

void Connection::resume_reading() {
    if (detail::running_loop != &loop_ &&
        call_elsewhere([](Connection& c, int) { c.resume_reading(); }, 0))
        return;
    user_paused_ = false;
    update_interest();
}

// ---- calls from other threads ------------------------------------------------------------
// send(), shutdown_write(), close(), pause_reading() and resume_reading() made
// off the thread running our loop (detail::running_loop is another loop, or
// none). Under remote_lock_: closed, a no-op (the loop may be gone: it is
// not touched); open, the loop is alive until the lock is released (it
// closes us before it goes, and closing takes the lock), and the call is
// posted, holding us and a copy of the bytes, or runs here on the loop's own
// thread outside run() (the constructing thread between run_once() calls).

bool Connection::send_elsewhere(const char* p, std::size_t len) {
    const std::lock_guard lock(remote_lock_);
    if (remote_closed_) return true;
    if (loop_.in_loop_thread()) return false;
    if (len != 0)
        loop_.post([self = shared_from_this(), bytes = std::string(p, len)]() mutable {
            self->send(std::move(bytes));
        });
    return true;
}

bool Connection::send_elsewhere(std::string& bytes) {
    const std::lock_guard lock(remote_lock_);
    if (remote_closed_) return true;
    if (loop_.in_loop_thread()) return false;
    if (!bytes.empty())
        loop_.post([self = shared_from_this(), bytes = std::move(bytes)]() mutable {
            self->send(std::move(bytes));
        });
    return true;
}

bool Connection::call_elsewhere(void (*call)(Connection&, int), int arg) {
    const std::lock_guard lock(remote_lock_);
    if (remote_closed_) return true;
    if (loop_.in_loop_thread()) return false;
    loop_.post([self = shared_from_this(), call, arg] { call(*self, arg); });
    return true;
}

// ---- interest and closing ---------------------------------------------------------------

void Connection::update_interest() {
    if (state_ != State::open) return;
    Events want = Events::none;
    if (handshaking_) {
        want = tls_->wants_write() ? Events::write : Events::read;
    } else {
        if (!peer_eof_ && !above_high_ && !user_paused_ && !close_after_drain_)
            want |= Events::read;
        if (!queue_.empty() || (tls_ && (tls_->has_unsent() || tls_->read_wants_write())))
            want |= Events::write;
        // Reading resumes with bytes OpenSSL already holds: no event will come for them.
        if (tls_ && !cio_ && any(want, Events::read) && !any(interest_, Events::read) &&
            tls_->has_pending())
            read_pending_soon();
    }
    // Reading resumes (pause_reading() undone, low water reached) with input
    // a handler left unconsumed, such as pipelined requests taken one at a
    // time: on_message comes again for it, as no event will announce it.
    const bool resumes_with_input =
        any(want, Events::read) && !any(interest_, Events::read) && !input_.empty();
    if (cio_) {
        if (resumes_with_input) cio_->held = true;  // delivered before the receive is armed
        interest_ = want;
        completion_interest(want);
        return;
    }
    if (resumes_with_input) deliver_unconsumed_soon();
    if (watching_ && want == interest_) return;
    if (want == Events::none) {
        // No interest left (e.g. half-closed and drained): selectors take no
        // empty interest, so stop watching until there is something to wait for.
        if (watching_) loop_.unwatch(fd_);
        watching_ = false;
    } else if (!watching_) {
        loop_.watch(fd_, want, on_ready, this);  // self_ keeps us while watched
        watching_ = true;
    } else {
        loop_.change(fd_, want);
    }
    interest_ = want;
}

void Connection::close(CloseMode mode) {
    if (detail::running_loop != &loop_ &&
        call_elsewhere([](Connection& c, int m) { c.close(static_cast<CloseMode>(m)); },
                       static_cast<int>(mode)))
        return;
    if (state_ != State::open) return;
    graceful_ = mode == CloseMode::graceful;
    if (mode == CloseMode::reset) {
        resetting_ = true;
        const ::linger abort{1, 0};  // close() then sends RST, dropping what is unsent
        ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &abort, sizeof abort);
    }
    if (mode == CloseMode::graceful &&
        (!queue_.empty() || (tls_ && !handshaking_ && tls_->close_notify() == 0))) {
        close_after_drain_ = true;  // TLS: or close_notify still to go out
        update_interest();
        return;
    }
    close_with(CloseReason::local);
}

void Connection::fail(int err) {
    if (tls_ && err == EPROTO && !tls_->error_text().empty()) {
        close_message_ = tls_->error_text();
        close_with(CloseReason::tls);
        return;
    }
    close_with(err == ECONNRESET || err == EPIPE ? CloseReason::reset : CloseReason::error, err);
}

void Connection::close_with(CloseReason reason, int err) {
    if (!close_quietly(reason, err)) return;
    if (in_handler_ > 0) {
        // One of our callbacks is on the stack: report when it unwinds.
        notify_pending_ = true;
    } else {
        // Called from outside our callbacks (another connection's, a timer, the
        // user's send()): report from the loop, never re-entrantly. If the loop
        // is destroyed first, its tie runs close_now(), which reports instead.
        loop_.post([self = shared_from_this()] { self->notify_closed(); });
    }
}

void Connection::close_now(CloseReason reason) {
    close_quietly(reason, 0);
    if (state_ != State::closing) return;  // on_close has run already
    if (in_handler_ > 0)
        notify_pending_ = true;
    else
        notify_closed();
}

// Stops all I/O; the fd itself stays open until on_close has run, so that
// local_address() still answers there.
bool Connection::close_quietly(CloseReason reason, int err) {
    if (state_ != State::open) return false;
    // A TLS peer told of a complete stream (nothing of ours was dropped) can
    // tell it from a cut one.
    if (tls_ && !handshaking_ && !shut_done_ && !resetting_ && queue_.empty() &&
        (reason == CloseReason::local || reason == CloseReason::timeout))
        tls_->close_notify();
    // Completion I/O: that close_notify, or the fatal alert a bad record
    // sealed, waits for a send request, and a closing connection makes none:
    // it goes on the socket now, best effort, as under readiness. Not behind
    // a send request still in the kernel, which would then follow it.
    if (tls_ && cio_ && !cio_->send_in_flight && !resetting_ && tls_->own_records() &&
        tls_->records().has_unsent())
        tls_->records().send_unsent();
    if (handshake_timer_ != 0) loop_.cancel(std::exchange(handshake_timer_, 0));
    {
        // Waits for a call being posted from another thread; later ones are no-ops.
        const std::lock_guard lock(remote_lock_);
        remote_closed_ = true;
    }
    state_ = State::closing;
    reason_ = reason;
    err_ = err;
    // The watcher's reference may be the last but the tie's; the tie stays
    // until on_close has run.
    if (watching_) loop_.unwatch(fd_);
    watching_ = false;
    interest_ = Events::none;
    // A send request in the kernel still reads the queue's front: completion
    // mode empties the queue when that request completes.
    if (cio_) completion_closed();
    if (!cio_ || !cio_->send_in_flight) clear_queue();
    queued_ = 0;
    return true;
}

void Connection::callback_threw(std::exception_ptr error) noexcept {
    close_with(CloseReason::exception);  // a no-op if already closing (e.g. on_close threw)
    loop_.handle_exception(std::move(error));
}

void Connection::reset_state() noexcept {
    // Emptied first: the state's destructor may look at it, or put another
    // in its place, which goes too (emplace_state() would overwrite it).
    while (user_state_.object) {
        UserState old = std::exchange(user_state_, UserState{});
        old.destroy(old.object);
    }
}

void Connection::notify_closed() noexcept {
    if (state_ != State::closing) return;  // already reported (close_now ran first)
    state_ = State::closed;
    notify_pending_ = false;
    ConnectionPtr self = shared_from_this();
    self_.reset();   // `self` keeps us to the end of this call
    input_.clear();  // drops a view into the loop's scratch buffer, if a throw left one
    if (auto hook = std::exchange(handshake_hook_, nullptr)) {
        // connect() over TLS, closed before on_connect: its owner says so
        // (on_error), not on_close: the connection was never open to the user.
        try {
            hook(self, handshake_error(reason_, err_));
        } catch (...) {
            loop_.handle_exception(std::current_exception());
        }
    } else if (auto on_close = std::move(cb_.on_close)) {
        try {
            on_close(self, reason_, err_);
        } catch (...) {
            loop_.handle_exception(std::current_exception());
        }
    }
    if (auto hook = std::move(close_hook_)) hook(*this);
    reset_state();
    cb_ = Callbacks{};  // drop user captures (they may hold ConnectionPtrs)
    on_message_ = nullptr;
    // Completion I/O: a request not yet submitted names the fd by number; a
    // socket accepted meanwhile would get it. Closed after the last request.
    if (cio_ && cio_->ops > 0)
        cio_->close_fd = fd_;
    else
        close_socket(fd_);
    fd_ = -1;
    loop_.untie(std::exchange(tie_, 0));  // `self` keeps us to the end of this call
}

// ---- TLS: the handshake and OpenSSL's buffered bytes -----------------------------------

void Connection::start_tls() {
    const auto limit = opt_.tls->handshake_timeout();
    if (limit.count() > 0) {
        handshake_timer_ = loop_.call_after(limit, [this, limit] {
            handshake_timer_ = 0;
            close_message_ =
                "TLS handshake timed out after " + std::to_string(limit.count()) + " ms";
            close_with(CloseReason::timeout);
        });
    }
}

void Connection::continue_handshake(const ConnectionPtr& self) {
    int r = tls_->handshake();
    if (r < 0) {
        fail(errno);
        return;
    }
    if (r == 0) {
        update_interest();  // read or write, as OpenSSL asks
        return;
    }
    handshaking_ = false;
    if (tls_->own_records() && loop_.completion_io()) {
        // evmux's record layer over completion I/O from here: the watch goes,
        // requests move the ciphertext (OpenSSL read nothing past the handshake).
        if (watching_) loop_.unwatch(fd_);
        watching_ = false;
        interest_ = Events::none;
        tls_->records().use_buffers();
        start_completion();
    }
    if (handshake_timer_ != 0) loop_.cancel(std::exchange(handshake_timer_, 0));
    if (auto hook = std::exchange(handshake_hook_, nullptr)) hook(self, {});  // connect(): done
    if (cb_.on_connect) cb_.on_connect(self);  // a throw: handle() closes us
    if (state_ != State::open) return;
    if (!queue_.empty()) {
        // Sent during on_connect (or before, by an owner). Completion I/O:
        // with the send request update_interest() makes.
        if (!cio_) handle_write(self);
    } else if (shut_requested_ && !shut_done_) {
        send_fin();
        maybe_finish_shutdown();
    }
    update_interest();
}

void Connection::read_pending_soon() {
    if (pump_posted_) return;
    pump_posted_ = true;
    loop_.post([self = shared_from_this()] {
        self->pump_posted_ = false;
        if (self->state_ == State::open && any(self->interest_, Events::read))
            self->handle(self, Events::read);
    });
}

void Connection::deliver_unconsumed_soon() {
    if (unconsumed_posted_) return;
    unconsumed_posted_ = true;
    loop_.post([self = shared_from_this()] {
        Connection& c = *self;
        if (!c.unconsumed_posted_) return;  // handle_read() delivered it first
        c.unconsumed_posted_ = false;
        if (c.state_ != State::open || !any(c.interest_, Events::read) || c.input_.empty() ||
            !c.on_message_)
            return;
        ++c.in_handler_;
        try {
            c.on_message_(self, c.input_);
        } catch (...) {
            c.callback_threw(std::current_exception());
        }
        if (--c.in_handler_ == 0 && c.notify_pending_) c.notify_closed();
    });
}

std::string Connection::tls_alpn() const {
    return tls_ ? tls_->alpn() : std::string();
}

std::string Connection::tls_peer_subject() const {
    return tls_ ? tls_->peer_subject() : std::string();
}

TlsRecords Connection::tls_records() const {
    return tls_ && tls_->own_records() ? TlsRecords::evmux : TlsRecords::openssl;
}

std::string Connection::tls_version() const {
    return tls_ ? tls_->version() : std::string();
}

std::string Connection::close_message() const {
    if (!close_message_.empty()) return close_message_;
    if (err_ != 0 && (reason_ == CloseReason::reset || reason_ == CloseReason::error))
        return std::strerror(err_);
    return {};
}

}  // namespace evmux
