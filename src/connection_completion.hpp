// Internal to evmux: a Connection's part in completion I/O (the loop's
// IoMode::completion), allocated only in that mode. Not installed.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

#include "completion_io.hpp"
#include "evmux/connection.hpp"

namespace evmux::detail {

// One writer (the loop thread), readers anywhere: a relaxed load and store,
// no locked read-modify-write on the message path. (A connection's byte counters.)
inline void add_relaxed(std::atomic<std::uint64_t>& counter, std::uint64_t n) {
    counter.store(counter.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
}

// Closes a connection's socket after a graceful close the way nginx's
// lingering close does (see ConnectionOptions::linger): FIN now, then input
// read and dropped until the peer has acknowledged all we sent, or ends its
// stream, or `limit` passes, then close() (at once for a Unix socket, or
// when that holds already). Owns `fd` from here; a loop destroyed meanwhile
// closes it. (connection.cpp)
void linger_close(EventLoop& loop, int fd, std::chrono::milliseconds limit);

// How many of linger_close()'s sockets on `loop` are still lingering (a
// group's graceful stop waits for them as for its connections). Any thread.
std::size_t lingering_closes(const EventLoop& loop);

struct alignas(64) CompletionState {
    // One request of the connection: its receive (multishot) or its send.
    struct Op : CompletionOp {
        Connection* conn = nullptr;
    };
    static constexpr std::size_t max_iov = 8;  // chunks per sendmsg request

    using Complete = void (*)(CompletionOp*, std::int32_t, std::uint32_t);
    using Prepare = void (*)(CompletionOp*);
    CompletionState(Connection& c, CompletionIo& completion_io, Complete on_recv, Complete on_send,
                    Prepare prepare_send)
        : io(completion_io) {
        recv_op.conn = &c;
        recv_op.complete = on_recv;
        send_op.conn = &c;
        send_op.complete = on_send;
        send_op.prepare = prepare_send;
        send_op.early = true;
    }

    // A send of bytes inside the receive on_message is handling, while the
    // connection lends fewer than max_lent buffers and the loop can lend one:
    // the chunk sends from the receive buffer, which goes back to the kernel
    // when the chunk is sent (or dropped) rather than after on_message.
    bool lendable(const char* p, std::size_t len) const {
        const auto at = reinterpret_cast<std::uintptr_t>(p);
        const auto from = reinterpret_cast<std::uintptr_t>(recv_bytes);
        return at >= from && at + len <= from + recv_len && !recv_lent && lent < max_lent &&
               io.can_lend(recv_flags);
    }
    // The current receive's bytes lent to a chunk (queued with recv_flags,
    // for give_back()).
    void lend() {
        recv_lent = true;
        ++lent;
        io.lend(recv_flags);
    }
    // A lent chunk (its bytes at `p`) sent or dropped: its receive let go
    // (after on_message, if it is the receive on_message is still handling;
    // told apart by address: a buffer may hold several receives' bytes).
    void give_back(const char* p, std::uint32_t flags) {
        --lent;
        io.unlend(flags);
        if (recv_lent && p >= recv_bytes && p < recv_bytes + recv_len)
            recv_lent = false;
        else
            io.recycle(flags);
    }
    static constexpr unsigned max_lent = 4;

    // Two cache lines in the order of use (the send request's phases, its
    // preparation and its completion, touch only the first; a receive both),
    // then what only closing and the gather list use.
    CompletionIo& io;
    Op send_op;
    std::size_t send_chunks = 0;  // queue chunks the send request is reading (from the front)
    int ops = 0;                  // requests in the kernel (or about to be made)
    unsigned lent = 0;            // queued chunks sending from receive buffers
    bool send_in_flight = false;  // a send request is in the kernel (made before a wait)
    bool send_prepare = false;    // the send request is to be made right before the next wait
    // The receive on_message is handling (set by recv_done), and whether a
    // queued chunk sends from its buffer (here: give_back() tests it).
    bool recv_lent = false;
    Op recv_op;
    const char* recv_bytes = nullptr;
    std::size_t recv_len = 0;
    std::uint32_t recv_flags = 0;
    bool recv_armed = false;       // the multishot receive is in the kernel
    bool recv_cancelling = false;  // its cancel is on its way
    bool held = false;             // bytes received while not reading wait in the input buffer
    bool eof_held = false;         // the peer's FIN came while not reading
    bool deliver_posted = false;
    int close_fd = -1;   // closed with the last request (see notify_closed)
    ConnectionPtr keep;  // holds the connection while ops > 0
    // The send request's gather list (its bytes are the queue's front chunks).
    iovec iov[max_iov];
    msghdr msg{};
    // TLS (evmux's record layer): the send request's bytes are records sealed
    // from the queue's front, `tls_plain` bytes of it, plus TLS's own.
    std::string tls_out;
    std::size_t tls_out_off = 0;
    std::size_t tls_plain = 0;
};

}  // namespace evmux::detail

namespace evmux {

// The send request is made right before the wait: every send of this
// iteration in one request. (Here, inline: send() calls it per message.)
inline void Connection::request_send() {
    detail::CompletionState& c = *cio_;
    c.send_prepare = true;
    if (c.ops++ == 0) c.keep = shared_from_this();
    c.io.prepare_before_wait(&c.send_op);
}

}  // namespace evmux
