// Connection over completion I/O (the loop's IoMode::completion): instead of
// a watch and its recv/sendmsg calls, a multishot receive request into the
// loop's provided buffers and one send request at a time for the queue's
// front chunks, both submitted with the loop's next wait. Everything above
// the bytes (on_message and the input buffer, the queue and its water marks,
// half-close, close reasons, on_close once) is connection.cpp's, shared with
// readiness.
//
// Differences the contract hides:
//  - send() always queues (a copy, or the caller's string moved) and the
//    send request goes out with the next wait; on_drain comes when the
//    request has written the queue, as after a readiness flush. Bytes of the
//    receive on_message is handling (an echo, a forwarded slice) are queued
//    without a copy: the chunk sends from the receive buffer, which goes back
//    to the kernel when the chunk has been sent (CompletionState::lendable:
//    at most 4 per connection and a quarter of the loop's buffers, else a copy).
//  - A receive in flight when reading pauses may still complete: its bytes
//    are kept in the input buffer (counted against max_buffered) and handed
//    to on_message when reading resumes; so is an end of file.
//  - The connection keeps itself alive (`keep`) while a request is in the
//    kernel; close cancels them, and the fd is closed after the last one
//    finished (a request not yet submitted names the fd by number).
#include <algorithm>
#include <cerrno>
#include <exception>
#include <utility>

#include <unistd.h>

#include "connection_completion.hpp"
#include "tls_session.hpp"

namespace evmux {

void Connection::start_completion() {
    if (detail::CompletionIo* io = loop_.completion_io())
        cio_ = std::make_unique<detail::CompletionState>(*this, *io, &recv_done, &send_done,
                                                         &prepare_send);
}

void Connection::completion_interest(Events want) {
    detail::CompletionState& c = *cio_;
    const bool read = any(want, Events::read);
    if (read && (c.held || c.eof_held) && !c.deliver_posted) {
        c.deliver_posted = true;
        loop_.post([self = shared_from_this()] { self->deliver_held(); });
    }
    if (read && !c.held && !c.eof_held && !c.recv_armed) {
        c.io.recv_multishot(fd_, &c.recv_op);
        c.recv_armed = true;
        c.recv_cancelling = false;
        if (c.ops++ == 0) c.keep = shared_from_this();
    } else if (!read && c.recv_armed && !c.recv_cancelling) {
        c.io.cancel(&c.recv_op);
        c.recv_cancelling = true;
    }
    if (any(want, Events::write) && !c.send_in_flight && !c.send_prepare) request_send();
}

// Right before the loop's wait (inside it: no user code here).
void Connection::prepare_send(detail::CompletionOp* op) {
    Connection& conn = *static_cast<detail::CompletionState::Op*>(op)->conn;
    detail::CompletionState& c = *conn.cio_;
    c.send_prepare = false;
    if (conn.state_ == State::open && !c.send_in_flight &&
        (!conn.queue_.empty() || (conn.tls_ && conn.tls_->has_unsent()))) {
        conn.submit_send();  // the op goes on as the request (counted already)
        return;
    }
    // Written meanwhile, or closed. Not the last reference while it is open
    // (the loop's tie holds it); after on_close, nothing of the user's is left
    // to run in its destructor.
    conn.op_finished();
}

// A request's bytes must stay where they are until it completes, and the
// queue's ring may grow meanwhile, moving every slot: a string of up to 15
// bytes keeps them inside its slot (short-string storage), so such a chunk
// gets heap storage first (a string's heap bytes stay put when it moves).
// Else the kernel would send, once the peer's window opens, whatever the
// freed ring holds by then. (A sent chunk's string goes to the loop's spares
// with its capacity: small messages allocate only until there are spares.)
static void keep_in_place(std::string& bytes) {
    const auto* at = reinterpret_cast<const char*>(&bytes);
    if (bytes.data() >= at && bytes.data() < at + sizeof bytes) bytes.reserve(bytes.capacity() + 1);
}

void Connection::submit_send() {
    detail::CompletionState& c = *cio_;
    if (tls_) return submit_tls_send();
    c.send_chunks = std::min(queue_.size(), detail::CompletionState::max_iov);
    if (c.send_chunks == 1) {
        Chunk& front = queue_.front();
        if (!front.lent) keep_in_place(front.bytes);
        c.io.send(fd_, front.rest(), front.rest_size(), &c.send_op);
    } else {
        for (std::size_t i = 0; i < c.send_chunks; ++i) {
            Chunk& chunk = queue_[i];
            if (!chunk.lent) keep_in_place(chunk.bytes);
            c.iov[i].iov_base = const_cast<char*>(chunk.rest());
            c.iov[i].iov_len = chunk.rest_size();
        }
        c.msg = msghdr{};
        c.msg.msg_iov = c.iov;
        c.msg.msg_iovlen = c.send_chunks;
        c.io.sendmsg(fd_, &c.msg, &c.send_op);
    }
    c.send_in_flight = true;
}

// One request finished (its last completion): the last lets the connection go.
void Connection::op_finished() {
    detail::CompletionState& c = *cio_;
    if (--c.ops == 0) {
        if (c.close_fd >= 0) close_socket(std::exchange(c.close_fd, -1));
        ConnectionPtr last = std::move(c.keep);  // may be the last reference: dies at return
    }
}

// `self` is kept by `keep` (this request is in flight) to op_finished(), the
// last thing here; while open, self_ is the reference the callbacks get.
void Connection::recv_done(detail::CompletionOp* op, std::int32_t res, std::uint32_t flags) {
    Connection& self = *static_cast<detail::CompletionState::Op*>(op)->conn;
    detail::CompletionState& c = *self.cio_;
    const bool ended = !(flags & detail::completion_more);
    if (ended) c.recv_armed = c.recv_cancelling = false;
    ++self.in_handler_;
    try {
        if (res > 0) {
            // Hand the buffer back whatever on_message does (a throw
            // included), unless a queued send still reads it.
            struct Recycle {
                detail::CompletionState& c;
                ~Recycle() {
                    c.recv_bytes = nullptr;
                    if (!std::exchange(c.recv_lent, false)) c.io.recycle(c.recv_flags);
                }
            } recycle{c};
            c.recv_flags = flags;
            if (self.state_ == State::open) {
                if (self.tls_) {  // decrypted into the loop's scratch: nothing to lend
                    self.deliver_tls(self.self_, c.io.buffer(), static_cast<std::size_t>(res));
                } else {
                    c.recv_bytes = c.io.buffer();
                    c.recv_len = static_cast<std::size_t>(res);
                    self.deliver(self.self_, c.recv_bytes, c.recv_len);
                }
            }
        } else if (self.state_ != State::open || res == -ECANCELED || res == -ENOBUFS ||
                   res == -EAGAIN || res == -EINTR) {
            // Closed or paused meanwhile, the buffers ran out, or nothing was
            // there: re-armed below if wanted. EAGAIN is what a send request
            // met (see send_done()): the kernel retries a request when its poll
            // wakes, and may give up when the retry finds nothing. No test
            // brings it about for a receive on this kernel: the multishot
            // request arms its poll again itself, and a one-shot one woken
            // by TCP urgent data (readable, then a receive that skips the
            // urgent byte and finds nothing) was retried inside the kernel
            // too. Taken for a socket error, it would close a sound connection.
        } else if (res == 0 && self.tls_) {
            // After close_notify (delivered as the end already) the FIN is
            // expected; without one the stream was cut.
            if (!self.tls_->records().end_of_file()) self.fail(EPROTO);
        } else if (res == 0) {
            if (any(self.interest_, Events::read) && !c.held)
                self.handle_peer_eof(self.self_);
            else
                c.eof_held = true;  // after the bytes held (reading resumed: their
                                    // on_message is posted, or still to come)
        } else {
            self.fail(-res);
        }
        if (ended && self.state_ == State::open) self.update_interest();  // re-arm
    } catch (...) {
        self.callback_threw(std::current_exception());
    }
    if (--self.in_handler_ == 0 && self.notify_pending_) self.notify_closed();
    if (ended) self.op_finished();
}

void Connection::deliver(const ConnectionPtr& self, const char* p, std::size_t n) {
    bytes_in_ += n;
    if (counters_) detail::add_relaxed(counters_->in, n);
    touch_read();
    if (!on_message_) return;
    if (!any(interest_, Events::read) || cio_->held) {
        // Not reading (paused, above high water): keep the bytes for later.
        input_.append(p, n);
        cio_->held = true;
    } else {
        if (input_.empty())
            input_.attach(p, n);
        else
            input_.append(p, n);
        on_message_(self, input_);
        if (state_ != State::open) return;
        input_.keep_rest();  // the buffer goes back to the kernel next
    }
    if (input_.size() > opt_.max_buffered) close_with(CloseReason::overflow);
}

// Reading resumed with bytes (or an end of file) received while it was paused.
void Connection::deliver_held() {
    detail::CompletionState& c = *cio_;
    c.deliver_posted = false;
    if (state_ != State::open || !any(interest_, Events::read)) return;
    ConnectionPtr self = shared_from_this();
    ++in_handler_;
    try {
        if (c.held) {
            c.held = false;
            if (on_message_ && !input_.empty()) {
                on_message_(self, input_);
                if (state_ == State::open) input_.keep_rest();
            }
        }
        if (state_ == State::open && c.eof_held && !c.held && any(interest_, Events::read)) {
            c.eof_held = false;
            handle_peer_eof(self);
        }
        if (state_ == State::open) update_interest();  // arm the receive again
    } catch (...) {
        callback_threw(std::current_exception());
    }
    if (--in_handler_ == 0 && notify_pending_) notify_closed();
}

void Connection::send_done(detail::CompletionOp* op, std::int32_t res, std::uint32_t) {
    Connection& self = *static_cast<detail::CompletionState::Op*>(op)->conn;  // as in recv_done
    detail::CompletionState& c = *self.cio_;
    c.send_in_flight = false;
    c.send_chunks = 0;
    if (self.state_ != State::open) {
        self.clear_queue();  // what the request was reading, kept until now
        c.io.give_string(std::exchange(c.tls_out, {}));
    } else {
        ++self.in_handler_;
        try {
            if (res == -EAGAIN || res == -EINTR) {
                // Nothing sent: the kernel gave up on a full socket (its poll
                // was woken by something other than room, e.g. the peer's
                // FIN, and the retry found the socket still full). Ask again:
                // a new request waits for room. (The TLS records stay as
                // sealed, from tls_out_off.)
                self.request_send();
            } else if (res < 0 && self.tls_ && self.peer_eof_ && self.fin_after_notify_ &&
                       c.tls_plain == 0 && (res == -EPIPE || res == -ECONNRESET)) {
                // Our close_notify answering the peer's, refused: the peer
                // closed its socket without waiting for it (RFC 8446 6.1
                // lets it; unread session tickets there make its kernel
                // reset). Its stream ended in order, and nothing of ours
                // was lost but the answer: peer_closed, as readiness's
                // send_fin() ignores the same refusal.
                c.io.give_string(std::exchange(c.tls_out, {}));
                c.tls_out_off = 0;
                self.tls_flushed();  // the FIN, then peer_closed
            } else if (res < 0) {
                self.fail(-res);
            } else if (self.tls_) {
                self.tls_sent(self.self_, static_cast<std::size_t>(res));
            } else {
                self.consume_sent(static_cast<std::size_t>(res));
                if (self.after_sent()) {
                    if (self.queued_ == 0)
                        self.written_all(self.self_);
                    else if (self.state_ == State::open)
                        self.after_queue_grew();  // high water if backed up; the next request
                }
            }
        } catch (...) {
            self.callback_threw(std::current_exception());
        }
        if (--self.in_handler_ == 0 && self.notify_pending_) self.notify_closed();
    }
    self.op_finished();
}

// ---- TLS over completion I/O: evmux's record layer between the requests and the user ----

// Ciphertext a receive brought: decrypted into the loop's scratch buffer and
// delivered as plaintext (the provided buffer goes back at once).
void Connection::deliver_tls(const ConnectionPtr& self, const char* p, std::size_t n) {
    detail::TlsRecordLayer& records = tls_->records();
    records.absorb(p, n);
    std::span<char> out = loop_.scratch();
    for (;;) {
        ssize_t got = records.read(out.data(), out.size());
        if (got > 0) {
            deliver(self, out.data(), static_cast<std::size_t>(got));
            if (state_ != State::open) return;
            continue;
        }
        if (got == 0) {  // close_notify
            if (any(interest_, Events::read) && !cio_->held)
                handle_peer_eof(self);
            else
                cio_->eof_held = true;
            return;
        }
        if (errno == EAGAIN) break;
        fail(errno);
        return;
    }
    if (records.has_unsent()) update_interest();  // a KeyUpdate to answer: a send request
}

// The send request's records: TLS's own first (a KeyUpdate answered,
// close_notify), then the queue's front sealed, up to 64 KiB of plaintext; a
// request the socket took part of goes on with the rest, never sealed twice.
void Connection::submit_tls_send() {
    detail::CompletionState& c = *cio_;
    if (c.tls_out_off == c.tls_out.size() && !seal_tls_out()) {
        // After close_notify nothing more is sealed: what is queued is dropped.
        // (Inside the loop's wait: the failure is reported from the loop.)
        loop_.post([self = shared_from_this()] { self->fail(EPROTO); });
        op_finished();  // no request made
        return;
    }
    c.io.send(fd_, c.tls_out.data() + c.tls_out_off, c.tls_out.size() - c.tls_out_off, &c.send_op);
    c.send_in_flight = true;
}

// The next records to send (tls_out, sent from tls_out_off): TLS's own, then
// the queue's front sealed, up to 64 KiB of plaintext (tls_plain of it). False
// if the record layer refuses (after close_notify, or failed).
bool Connection::seal_tls_out() {
    detail::CompletionState& c = *cio_;
    if (c.tls_out.capacity() <= 15) c.tls_out = c.io.take_string();
    c.tls_out.clear();
    c.tls_out_off = 0;
    c.tls_plain = 0;
    constexpr std::size_t max_plain = 64 * 1024;
    detail::TlsRecordLayer& records = tls_->records();
    bool ok = true;
    for (std::size_t i = 0; ok && i < queue_.size() && c.tls_plain < max_plain; ++i) {
        const Chunk& chunk = queue_[i];  // (never lent: TLS plaintext is not in a receive buffer)
        const std::size_t n = std::min(chunk.rest_size(), max_plain - c.tls_plain);
        ok = records.seal_append(c.tls_out, chunk.rest(), n);
        c.tls_plain += n;
        if (n < chunk.rest_size()) break;
    }
    if (ok && queue_.empty()) ok = records.seal_append(c.tls_out, nullptr, 0);
    if (!ok) c.tls_out.clear();
    return ok;
}

// Crossing high water with no send request in the kernel: records sealed from
// the queue go to the socket now, as readiness's send() writes them, until it
// takes no more; what it did not take (a record's rest included) is the next
// request's. False if the connection failed (closed).
bool Connection::write_tls_now() {
    detail::CompletionState& c = *cio_;
    for (;;) {
        if (c.tls_out_off == c.tls_out.size()) {
            if (queue_.empty()) {  // all sent (TLS's own records alone: the request's)
                c.io.give_string(std::exchange(c.tls_out, {}));  // as tls_sent()
                return true;
            }
            if (!seal_tls_out()) {
                fail(EPROTO);
                return false;
            }
        }
        const ssize_t n = ::send(fd_, c.tls_out.data() + c.tls_out_off,
                                 c.tls_out.size() - c.tls_out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
            fail(errno);
            return false;
        }
        c.tls_out_off += static_cast<std::size_t>(n);
        if (c.tls_out_off < c.tls_out.size()) return true;  // the socket is full
        consume_sent(std::exchange(c.tls_plain, 0));
        c.tls_out.clear();
        c.tls_out_off = 0;
    }
}

void Connection::tls_sent(const ConnectionPtr& self, std::size_t n) {
    detail::CompletionState& c = *cio_;
    c.tls_out_off += n;
    if (c.tls_out_off < c.tls_out.size()) {
        request_send();  // the rest of these records
        return;
    }
    const std::size_t plain = std::exchange(c.tls_plain, 0);
    c.io.give_string(std::exchange(c.tls_out, {}));  // to the loop's spares: idle holds none
    c.tls_out_off = 0;
    if (plain > 0) {
        consume_sent(plain);
        if (!after_sent()) return;
        if (queued_ == 0)
            written_all(self);
        else if (state_ == State::open)
            after_queue_grew();
    }
    if (state_ != State::open) return;
    if (tls_->has_unsent()) {
        if (!c.send_prepare && !c.send_in_flight) request_send();
    } else if (queued_ == 0) {
        tls_flushed();  // close_notify is out: the FIN, or the graceful close
    }
}

// Empties the queue; chunks sending from receive buffers give them back.
void Connection::clear_queue() {
    if (cio_)
        for (std::size_t i = 0; i < queue_.size(); ++i)
            if (queue_[i].lent) cio_->give_back(queue_[i].lent, queue_[i].lent_buffer);
    queue_.clear();
}

// The socket's close: a request with the next wait where the kernel has it
// (after the connection's last request: none names the fd any more). The
// FIN stays a shutdown() call: the kernel runs IORING_OP_SHUTDOWN on an
// io-wq worker thread, a thread hop for the system call it would save.
void Connection::close_socket(int fd) {
    // A graceful close that got as far as closing: linger (see ConnectionOptions::linger).
    if (graceful_ && reason_ == CloseReason::local && opt_.linger.count() > 0)
        return detail::linger_close(loop_, fd, opt_.linger);
    if (cio_ && cio_->io.close_requests())
        cio_->io.close(fd);
    else
        ::close(fd);
}

// Closing: cancel what is in the kernel (the completions still come, and
// op_finished() lets the connection go after the last).
void Connection::completion_closed() {
    detail::CompletionState& c = *cio_;
    if (c.recv_armed && !c.recv_cancelling) {
        c.io.cancel(&c.recv_op);
        c.recv_cancelling = true;
    }
    if (c.send_in_flight) c.io.cancel(&c.send_op);
}

}  // namespace evmux
