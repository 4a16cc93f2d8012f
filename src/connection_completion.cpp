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
//    request has written the queue, as after a readiness flush.
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

namespace evmux {

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

// The send request is made right before the wait: every send of this
// iteration in one request.
void Connection::request_send() {
    detail::CompletionState& c = *cio_;
    c.send_prepare = true;
    if (c.ops++ == 0) c.keep = shared_from_this();
    c.io.prepare_before_wait(&c.send_op);
}

// Right before the loop's wait (inside it: no user code here).
void Connection::prepare_send(detail::CompletionOp* op) {
    Connection& conn = *static_cast<detail::CompletionState::Op*>(op)->conn;
    detail::CompletionState& c = *conn.cio_;
    c.send_prepare = false;
    if (conn.state_ == State::open && !conn.queue_.empty() && !c.send_in_flight) {
        conn.submit_send();  // the op goes on as the request (counted already)
        return;
    }
    // Written meanwhile, or closed. Not the last reference while it is open
    // (the loop's tie holds it); after on_close, nothing of the user's is left
    // to run in its destructor.
    conn.op_finished();
}

void Connection::submit_send() {
    detail::CompletionState& c = *cio_;
    c.send_chunks = std::min(queue_.size(), detail::CompletionState::max_iov);
    if (c.send_chunks == 1) {
        const Chunk& front = queue_.front();
        c.io.send(fd_, front.bytes.data() + front.offset, front.bytes.size() - front.offset,
                  &c.send_op);
    } else {
        for (std::size_t i = 0; i < c.send_chunks; ++i) {
            Chunk& chunk = queue_[i];
            c.iov[i].iov_base = chunk.bytes.data() + chunk.offset;
            c.iov[i].iov_len = chunk.bytes.size() - chunk.offset;
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
        if (c.close_fd >= 0) ::close(std::exchange(c.close_fd, -1));
        ConnectionPtr last = std::move(c.keep);  // may be the last reference: dies at return
    }
}

void Connection::recv_done(detail::CompletionOp* op, std::int32_t res, std::uint32_t flags) {
    Connection& self_ref = *static_cast<detail::CompletionState::Op*>(op)->conn;
    detail::CompletionState& c = *self_ref.cio_;
    ConnectionPtr self = c.keep;  // alive to the end of this call
    const bool ended = !(flags & detail::completion_more);
    if (ended) c.recv_armed = c.recv_cancelling = false;
    ++self->in_handler_;
    try {
        if (res > 0) {
            // Hand the buffer back whatever on_message does (a throw included).
            struct Recycle {
                detail::CompletionIo& io;
                std::uint32_t flags;
                ~Recycle() { io.recycle(flags); }
            } recycle{c.io, flags};
            if (self->state_ == State::open)
                self->deliver(self, c.io.buffer(flags), static_cast<std::size_t>(res));
        } else if (self->state_ != State::open || res == -ECANCELED || res == -ENOBUFS) {
            // Closed or paused meanwhile, or the buffers ran out: re-armed below if wanted.
        } else if (res == 0) {
            if (any(self->interest_, Events::read))
                self->handle_peer_eof(self);
            else
                c.eof_held = true;  // after the bytes held, when reading resumes
        } else {
            self->fail(-res);
        }
        if (ended && self->state_ == State::open) self->update_interest();  // re-arm
    } catch (...) {
        self->callback_threw(std::current_exception());
    }
    if (--self->in_handler_ == 0 && self->notify_pending_) self->notify_closed();
    if (ended) self->op_finished();
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
        if (state_ == State::open && c.eof_held && any(interest_, Events::read)) {
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
    Connection& self_ref = *static_cast<detail::CompletionState::Op*>(op)->conn;
    detail::CompletionState& c = *self_ref.cio_;
    ConnectionPtr self = c.keep;
    c.send_in_flight = false;
    c.send_chunks = 0;
    if (self->state_ != State::open) {
        self->queue_.clear();  // what the request was reading, kept until now
    } else {
        ++self->in_handler_;
        try {
            if (res < 0) {
                self->fail(-res);
            } else {
                self->consume_sent(static_cast<std::size_t>(res));
                if (self->after_sent()) {
                    if (self->queued_ == 0)
                        self->written_all(self);
                    else if (self->state_ == State::open)
                        self->after_queue_grew();  // high water if backed up; the next request
                }
            }
        } catch (...) {
            self->callback_threw(std::current_exception());
        }
        if (--self->in_handler_ == 0 && self->notify_pending_) self->notify_closed();
    }
    self->op_finished();
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
