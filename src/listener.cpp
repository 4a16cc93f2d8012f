// The listening socket and accept loop of TcpServer, and its idle limits.
#include "listener.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <exception>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <system_error>
#include <utility>

#include "completion_io.hpp"

namespace evmux::detail {

struct AcceptOp : CompletionOp {
    Acceptor* owner = nullptr;  // null once the acceptor let go: the op frees itself
};

namespace {

void accept_done(CompletionOp* op, std::int32_t res, std::uint32_t flags) {
    auto* a = static_cast<AcceptOp*>(op);
    const bool ended = !(flags & completion_more);
    if (a->owner) {
        a->owner->on_accepted(res, ended);  // may let go of the op (stop(), or destroyed)
        if (a->owner) return;
    } else if (res >= 0) {
        // Accepted by the kernel after the acceptor let go (reaped by
        // cancel_and_wait(), or later in the same batch): nobody will serve
        // it, and the peer sees the end rather than a hang.
        ::close(res);
    }
    if (ended) delete a;
}

// The counters are plain fields of a ServerStats, bumped atomically so that
// TcpServer::stats() may read them from another thread (std::atomic_ref).
void bump(std::uint64_t& counter) {
    std::atomic_ref<std::uint64_t>(counter).fetch_add(1, std::memory_order_relaxed);
}

[[noreturn]] void throw_errno(int err, const std::string& what) {
    throw std::system_error(err, std::generic_category(), what);
}

// The spare-fd trick gives an fd number up for a moment (close the spare,
// accept the pending connection into it, close that, reopen the spare). Out
// of fds, every accepting thread of the process (a LoopGroup's loops) is in
// the same state, and another loop's accept4() or reopened spare could take
// the number in that moment: this listener then has no spare for as long as
// fds stay short, and its pending clients hang in the backlog instead of
// seeing the end. So the acceptors' fd-taking calls hold this lock shared
// (they do not wait on each other) and the trick holds it exclusively.
std::shared_mutex& fd_reservation() {
    static std::shared_mutex mutex;
    return mutex;
}

// A multishot accept keeps the RLIMIT_NOFILE it was made with: the kernel
// reads the limit once, when the request is submitted, and the request lasts
// as long as the server accepts. After the limit was lowered it hands out
// numbers at or above the new one, where accept4() would fail with EMFILE.
// (A raised limit needs nothing: the request fails with EMFILE at the old
// one, ends, and is made again with the new one.)
bool above_fd_limit(int fd) {
    rlimit limit{};
    return ::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY &&
           static_cast<rlim_t>(fd) >= limit.rlim_cur;
}

int open_spare() {
    const std::shared_lock lock(fd_reservation());
    return ::open("/dev/null", O_RDONLY | O_CLOEXEC);
}

// A Unix socket file left by a server that died: bind() would fail with
// EADDRINUSE although nobody listens. Remove it only if a connect is refused,
// so a live server's socket is never stolen.
void remove_stale_unix_socket(const Address& address) {
    struct stat st {};
    const std::string path = address.path();
    if (path.empty() || ::lstat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) return;
    int probe = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (probe < 0) return;
    int r = ::connect(probe, static_cast<const sockaddr*>(address.sockaddr_ptr()),
                      address.sockaddr_len());
    int err = errno;
    ::close(probe);
    if (r < 0 && err == ECONNREFUSED) ::unlink(path.c_str());
}

}  // namespace

void refuse_port_in_use(const Address& address) {
    const int fd = ::socket(address.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw_errno(errno, "socket " + address.to_string());
    const int one = 1;
    int err = 0;
    if (::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        ::bind(fd, static_cast<const sockaddr*>(address.sockaddr_ptr()), address.sockaddr_len()) <
            0)
        err = errno;
    ::close(fd);
    if (err != 0) throw_errno(err, "bind " + address.to_string());
}

namespace {

// A bound, listening, non-blocking socket (see Acceptor's constructor).
int open_listener(const Address& address, bool reuse_port, int backlog) {
    int fd = ::socket(address.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) throw_errno(errno, "socket " + address.to_string());
    bool bound = false;
    try {
        if (address.is_unix()) {
            remove_stale_unix_socket(address);
        } else {
            int one = 1;
            if (::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
                throw_errno(errno, "setsockopt(SO_REUSEADDR)");
            if (reuse_port && ::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0)
                throw_errno(errno, "setsockopt(SO_REUSEPORT)");
        }
        if (::bind(fd, static_cast<const sockaddr*>(address.sockaddr_ptr()),
                   address.sockaddr_len()) < 0) {
            const int err = errno;
            struct stat st {};
            if (err == EADDRINUSE && address.is_unix() &&
                ::lstat(address.path().c_str(), &st) == 0 && !S_ISSOCK(st.st_mode))
                throw_errno(err, "bind " + address.to_string() +
                                     ": a file that is not a socket is there (left alone)");
            throw_errno(err, "bind " + address.to_string());
        }
        bound = true;
        if (::listen(fd, backlog) < 0) throw_errno(errno, "listen " + address.to_string());
    } catch (...) {
        ::close(fd);
        // The file bind() made would block the next bind of this path.
        if (bound && address.is_unix()) ::unlink(address.path().c_str());
        throw;
    }
    return fd;
}

}  // namespace

Acceptor::Acceptor(EventLoop& loop, const Address& address, bool reuse_port, int backlog,
                   std::size_t budget, std::chrono::milliseconds pause, ServerStats& counters,
                   std::function<void(int fd, const Address& peer)> on_accept)
    : loop_(loop),
      listen_fd_(open_listener(address, reuse_port, backlog)),
      // Reserved here, not first in start(): a LoopGroup's loops start
      // their acceptors later, from their own threads, and one that found
      // fds already short then would have no spare to shed with.
      spare_fd_(open_spare()),
      unix_file_(detail::UnixSocketFile::of(address)),
      budget_(std::max<std::size_t>(budget, 1)),
      pause_(pause),
      counters_(counters),
      on_accept_(std::move(on_accept)) {}

Acceptor::~Acceptor() {
    if (gone_) *gone_ = true;  // destroyed by the callback hand_over() runs
    stop();
    if (spare_fd_ >= 0) ::close(spare_fd_);
    unix_file_.remove();  // if no one took the path over meanwhile
}

void Acceptor::start() {
    if (listen_fd_ < 0) return;
    if (spare_fd_ < 0) spare_fd_ = open_spare();
    if (CompletionIo* io = loop_.completion_io()) {
        if (!accept_op_) {
            accept_op_ = new AcceptOp;
            accept_op_->complete = accept_done;
            accept_op_->owner = this;
        }
        if (!accept_armed_) io->accept_multishot(listen_fd_, accept_op_);
        accept_armed_ = true;
    } else {
        loop_.watch(listen_fd_, Events::read, [this](Events) { on_acceptable(); });
    }
    accepting_ = true;
}

void Acceptor::stop() {
    shedding_ = false;
    if (resume_timer_ != 0) loop_.cancel(std::exchange(resume_timer_, 0));
    if (std::exchange(accepting_, false) && !accept_op_) loop_.unwatch(listen_fd_);
    if (AcceptOp* op = std::exchange(accept_op_, nullptr)) {
        op->owner = nullptr;
        if (std::exchange(accept_armed_, false)) {
            // The request holds the listening socket: end it now, so that the
            // port is free when stop() returns, as with readiness. The op
            // frees itself with its last completion.
            loop_.completion_io()->cancel_and_wait(op);
        } else if (!in_completion_) {
            delete op;  // (inside its completion, accept_done() frees it)
        }
    }
    if (listen_fd_ >= 0) ::close(std::exchange(listen_fd_, -1));
}

bool Acceptor::hand_over(int fd, const Address& peer) {
    bool gone = false;
    gone_ = &gone;
    EventLoop& loop = loop_;
    std::exception_ptr error;
    try {
        on_accept_(fd, peer);
    } catch (...) {
        error = std::current_exception();
    }
    if (!gone) gone_ = nullptr;
    if (error) loop.handle_exception(error);  // the accept loop goes on
    return !gone;
}

void Acceptor::on_accepted(int res, bool ended) {
    const bool shed = std::exchange(shedding_, false);  // shed_accept()'s one completion
    in_completion_ = true;
    if (shed) {
        bump(counters_.accept_calls);
        if (res >= 0) bump(counters_.rejected);
    } else if (res >= 0) {
        bump(counters_.accept_calls);
        if (above_fd_limit(res)) {
            // Past the limit as it is now (see above_fd_limit()): shed, as
            // readiness sheds what accept4() refuses; the peer sees the end.
            ::close(res);
            bump(counters_.accept_errors);
            bump(counters_.rejected);
        } else if (!hand_over(res, Address())) {
            return;  // (the peer is asked of the socket)
        }
    }
    in_completion_ = false;
    if (!ended) return;
    accept_armed_ = false;
    if (!accepting_) return;
    if (shed && res == -EAGAIN) {
        pause_accepting();  // none pending, fds still short: as readiness after shedding
    } else if (shed && res < 0 && res != -EINVAL) {
        pause_accepting();  // shedding failed (ENFILE, ENOMEM): wait for fds, as readiness
    } else if (res < 0 || shed) {
        // The request ended with an error (it does at the first), or one
        // connection was shed: the readiness path goes on (accept4(), then
        // shedding out of fds, or pausing). Out of fds or memory, the request
        // fails at once however empty the backlog (the kernel takes the fd
        // first): pause, as readiness does when shedding fails, rather than
        // ask again and again.
        if (shed && res == -EINVAL) no_shed_requests_ = true;  // the kernel cannot
        in_completion_ = true;
        if (!on_acceptable()) return;
        in_completion_ = false;
        if (shedding_) return;  // on_acceptable() asked for a shed_accept()
        if (res == -EMFILE || res == -ENFILE || res == -ENOBUFS || res == -ENOMEM)
            pause_accepting();
    }
    if (accepting_ && accept_op_ && !accept_armed_) {
        loop_.completion_io()->accept_multishot(listen_fd_, accept_op_);
        accept_armed_ = true;
    }
}

bool Acceptor::on_acceptable() {
    for (std::size_t i = 0; i < budget_; ++i) {
        bump(counters_.accept_calls);
        sockaddr_storage peer;
        socklen_t peer_len = sizeof peer;
        int fd;
        int err;
        {
            const std::shared_lock lock(fd_reservation());  // see fd_reservation()
            fd = ::accept4(listen_fd_, reinterpret_cast<sockaddr*>(&peer), &peer_len,
                           SOCK_NONBLOCK | SOCK_CLOEXEC);
            err = errno;
        }
        if (fd >= 0) {
            if (!hand_over(fd, Address::from_sockaddr(&peer, peer_len))) return false;
            continue;
        }
        if (err == EAGAIN || err == EWOULDBLOCK) return true;
        if (err == EINTR) continue;
        bump(counters_.accept_errors);
        if (err == EMFILE || err == ENFILE) {
            if (accept_op_ && !no_shed_requests_ && loop_.completion_io()->sheds_accepts()) {
                // Completion I/O: shed without an fd number (shed_accept()).
                // The spare's number, given up for a moment, could be taken by
                // another loop's accept request, which the kernel makes
                // outside fd_reservation(): this loop would be left with no
                // spare and its clients hanging in the backlog for as long as
                // fds stay short. Its completion comes back here (in
                // on_accepted()), as the loop below goes on after a shed.
                loop_.completion_io()->shed_accept(listen_fd_, accept_op_);
                accept_armed_ = shedding_ = true;
                return true;
            }
            // Out of fds: the pending connection stays in the backlog and a
            // level-triggered listener would wake us forever. Give up the
            // spare fd, take the connection and close it (the peer sees EOF
            // rather than hanging), then reserve the spare again.
            if (spare_fd_ >= 0) {
                int shed;
                int shed_err;
                {
                    // No other acceptor takes the number meanwhile (fd_reservation()).
                    const std::unique_lock lock(fd_reservation());
                    ::close(spare_fd_);
                    shed = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
                    shed_err = errno;
                    if (shed >= 0) ::close(shed);
                    spare_fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
                }
                bump(counters_.accept_calls);
                if (shed >= 0) bump(counters_.rejected);
                if (spare_fd_ >= 0) {
                    if (shed >= 0) continue;
                    if (shed_err == EAGAIN || shed_err == EWOULDBLOCK) return true;  // empty
                }
            }
            pause_accepting();  // still failing: wait for fds to free up
            return true;
        }
        if (err == ENOBUFS || err == ENOMEM) {
            pause_accepting();
            return true;
        }
        // ECONNABORTED, EPROTO, EPERM (firewall)...: that one connection failed.
    }
    return true;
}

void Acceptor::pause_accepting() {
    if (!accepting_) return;
    if (!accept_op_) loop_.unwatch(listen_fd_);
    accepting_ = false;
    resume_timer_ = loop_.call_after(pause_, [this] {
        resume_timer_ = 0;
        start();  // and reserve the spare again if that failed
    });
}

// ---- IdleLimits ------------------------------------------------------------------

std::chrono::milliseconds IdleLimits::sweep_period() const {
    std::chrono::milliseconds shortest = std::chrono::milliseconds::max();
    for (auto limit : {all, read, write})
        if (limit.count() > 0) shortest = std::min(shortest, limit);
    return std::max(shortest / 4, std::chrono::milliseconds(1));
}

bool IdleLimits::expired(const Connection& conn, EventLoop::Clock::time_point now) const {
    auto passed = [&](std::chrono::milliseconds limit, EventLoop::Clock::time_point last) {
        return limit.count() > 0 && now - last >= limit;
    };
    return passed(read, conn.last_read()) || passed(write, conn.last_write()) ||
           passed(all, conn.last_activity());
}

}  // namespace evmux::detail
