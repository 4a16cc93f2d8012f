// Internal (not installed): the listener and accept loop of TcpServer, and its idle limits.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <string>

#include "evmux/server.hpp"

namespace evmux::detail {

/// Throws std::system_error ("bind 127.0.0.1:5555: Address already in use")
/// if a TCP `address` is bound already, by any socket: a probe bound there
/// without SO_REUSEPORT (with SO_REUSEADDR, as the listeners) fails, and
/// lets go at once. For SO_REUSEPORT listeners that must not join another
/// process's, which the kernel allows to any of the same user.
void refuse_port_in_use(const Address& address);

/// A listening socket and its accept loop on one loop: at most `budget` accept4()
/// calls per wake-up, handing each fd and its peer's address (from accept4
/// itself: no getpeername) to the callback, which owns the fd. On
/// EMFILE/ENFILE it gives up a reserved spare fd to take and close one
/// pending connection (the peer sees EOF, not a hang: muduo's trick); when
/// that cannot help, or on ENOBUFS/ENOMEM, it stops watching for `pause`
/// rather than spin. Owns the listening fd, the spare fd and a Unix socket
/// file (unlinked on destruction). Thread rule:
/// loop thread only; built and destroyed while not watching (before start(),
/// after stop()) on any thread. Non-copyable, non-movable.
struct AcceptOp;  // listener.cpp: the multishot accept request of completion I/O

class Acceptor {
  public:
    /// Opens a bound, listening, non-blocking socket for `address`. TCP:
    /// SO_REUSEADDR, and SO_REUSEPORT if `reuse_port`. Unix: a socket file
    /// left by a dead server (a connect is refused) is removed first, and the
    /// file bound here is unlinked if listen() fails. Counts accept_calls,
    /// accept_errors and rejected (shed) into `counters`, which must outlive
    /// it; each update is a relaxed std::atomic_ref increment, so another
    /// thread may read them through std::atomic_ref. Watches nothing yet.
    /// Throws std::system_error naming the call ("bind 127.0.0.1:5555:
    /// Address already in use").
    Acceptor(EventLoop& loop, const Address& address, bool reuse_port, int backlog,
             std::size_t budget, std::chrono::milliseconds pause, ServerStats& counters,
             std::function<void(int fd, const Address& peer)> on_accept);
    /// stop(), then closes the spare fd and unlinks the Unix socket file.
    ~Acceptor();
    Acceptor(const Acceptor&) = delete;
    Acceptor& operator=(const Acceptor&) = delete;

    /// Reserves the spare fd (unless held) and watches the listener; a no-op
    /// after stop().
    /// Throws what EventLoop::watch throws.
    void start();
    /// Cancels a pending resume, stops watching, closes the listening fd (the
    /// spare stays until destruction). Idempotent.
    void stop();
    /// The listening fd (-1 after stop()).
    int fd() const { return listen_fd_; }

    /// Completion I/O: one multishot accept request's completion (listener.cpp).
    void on_accepted(int res, bool ended);

  private:
    // Accepts up to the budget; false if a callback destroyed us (return at once).
    bool on_acceptable();
    void pause_accepting();
    // Runs on_accept_ (its exception to the loop's handler); false if it
    // destroyed us (a server destroyed in on_connect): touch nothing then.
    bool hand_over(int fd, const Address& peer);

    EventLoop& loop_;
    int listen_fd_;
    int spare_fd_ = -1;
    detail::UnixSocketFile unix_file_;  // removed at the end (the listener's own)
    std::size_t budget_;
    std::chrono::milliseconds pause_;
    ServerStats& counters_;
    std::function<void(int fd, const Address& peer)> on_accept_;
    bool accepting_ = false;
    EventLoop::TimerId resume_timer_ = 0;
    // Completion I/O (the loop's IoMode::completion): the multishot accept
    // request instead of a watch. Its op outlives us if stop() finds it in
    // the kernel: the op frees itself with its last completion.
    AcceptOp* accept_op_ = nullptr;
    bool accept_armed_ = false;
    bool in_completion_ = false;     // on_accepted() runs: stop() leaves the op to accept_done()
    bool shedding_ = false;          // the op's request in the kernel is a shed_accept()
    bool no_shed_requests_ = false;  // the kernel refused one: shed with the spare fd
    bool* gone_ = nullptr;           // hand_over()'s flag, set by the destructor
};

/// A server's idle timeouts (Netty's IdleStateHandler: reader, writer, all),
/// checked by one periodic sweep per loop.
struct IdleLimits {
    std::chrono::milliseconds all{0}, read{0}, write{0};  // zero: not checked

    /// True if any is set (then connections track their last read and write).
    bool any() const { return all.count() > 0 || read.count() > 0 || write.count() > 0; }
    /// How often to sweep: a quarter of the shortest limit (at least 1 ms), so
    /// a connection lives at most that much past its limit.
    std::chrono::milliseconds sweep_period() const;
    /// True if `conn` has passed a limit at `now`.
    bool expired(const Connection& conn, EventLoop::Clock::time_point now) const;
};

}  // namespace evmux::detail
