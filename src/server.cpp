// TcpServer (listen/accept with fd-exhaustion handling and an idle sweep) and
// connect() (non-blocking connect with timeout and cancel).
#include "evmux/server.hpp"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <stdexcept>
#include <system_error>
#include <vector>

namespace evmux {

namespace {

[[noreturn]] void throw_errno(int err, const std::string& what) {
    throw std::system_error(err, std::generic_category(), what);
}

int open_spare() {
    return ::open("/dev/null", O_RDONLY | O_CLOEXEC);
}

// A Unix socket file left by a server that died: bind() would fail with
// EADDRINUSE although nobody listens. Remove it only if a connect is refused,
// so a live server's socket is never stolen.
void remove_stale_unix_socket(const Address& address) {
    struct stat st {};
    std::string path = address.path();
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

// ---- TcpServer --------------------------------------------------------------------

TcpServer::TcpServer(EventLoop& loop, const Address& address, Callbacks callbacks,
                     ServerOptions options)
    : loop_(loop), cb_(std::move(callbacks)), opt_(options) {
    const int family = address.family();
    if (family == 0) throw std::invalid_argument("TcpServer: address has no family");
    listen_fd_ = ::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listen_fd_ < 0) throw_errno(errno, "socket " + address.to_string());
    try {
        if (address.is_unix()) {
            remove_stale_unix_socket(address);
        } else {
            int one = 1;
            if (::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
                throw_errno(errno, "setsockopt(SO_REUSEADDR)");
            if (opt_.reuse_port &&
                ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0)
                throw_errno(errno, "setsockopt(SO_REUSEPORT)");
        }
        if (::bind(listen_fd_, static_cast<const sockaddr*>(address.sockaddr_ptr()),
                   address.sockaddr_len()) < 0)
            throw_errno(errno, "bind " + address.to_string());
        if (address.is_unix()) unix_path_ = address.path();
        if (::listen(listen_fd_, opt_.backlog) < 0)
            throw_errno(errno, "listen " + address.to_string());
        local_ = Address::local_of(listen_fd_);
        spare_fd_ = open_spare();
        loop_.watch(listen_fd_, Events::read, [this](Events) { on_acceptable(); });
        accepting_ = true;
        if (opt_.idle_timeout.count() > 0) {
            auto period = std::max(opt_.idle_timeout / 4, std::chrono::milliseconds(1));
            sweep_timer_ = loop_.call_every(period, [this] { sweep_idle(); });
        }
    } catch (...) {
        if (spare_fd_ >= 0) ::close(spare_fd_);
        ::close(listen_fd_);
        if (!unix_path_.empty()) ::unlink(unix_path_.c_str());
        throw;
    }
}

TcpServer::~TcpServer() {
    if (sweep_timer_ != 0) loop_.cancel(sweep_timer_);
    if (resume_timer_ != 0) loop_.cancel(resume_timer_);
    if (accepting_) loop_.unwatch(listen_fd_);
    ::close(listen_fd_);
    if (spare_fd_ >= 0) ::close(spare_fd_);
    if (!unix_path_.empty()) ::unlink(unix_path_.c_str());
    auto conns = std::move(conns_);
    for (auto& [raw, conn] : conns) {
        conn->close_hook_ = nullptr;  // we are gone by the time on_close runs
        conn->close_with(CloseReason::local);
    }
}

ServerStats TcpServer::stats() const {
    ServerStats s = closed_;
    s.connections_now = conns_.size();
    for (const auto& [raw, conn] : conns_) {
        s.bytes_in += conn->bytes_in();
        s.bytes_out += conn->bytes_out();
    }
    return s;
}

void TcpServer::close_all(CloseMode mode) {
    std::vector<ConnectionPtr> all;
    all.reserve(conns_.size());
    for (auto& [raw, conn] : conns_) all.push_back(conn);
    for (auto& conn : all) conn->close(mode);
}

void TcpServer::on_acceptable() {
    for (std::size_t i = 0; i < std::max<std::size_t>(opt_.accept_budget, 1); ++i) {
        ++closed_.accept_calls;
        int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) {
            accept_one(fd);
            continue;
        }
        const int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK) return;
        if (err == EINTR) continue;
        ++closed_.accept_errors;
        if (err == EMFILE || err == ENFILE) {
            // Out of fds: the pending connection stays in the backlog and a
            // level-triggered listener would wake us forever. Give up the
            // spare fd, take the connection and close it (the peer sees EOF
            // rather than hanging), then reserve the spare again (muduo's trick).
            if (spare_fd_ >= 0) {
                ::close(spare_fd_);
                ++closed_.accept_calls;
                int shed = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
                const int shed_err = errno;
                if (shed >= 0) {
                    ::close(shed);
                    ++closed_.rejected;
                }
                spare_fd_ = open_spare();
                if (spare_fd_ >= 0) {
                    if (shed >= 0) continue;
                    if (shed_err == EAGAIN || shed_err == EWOULDBLOCK) return;  // backlog empty
                }
            }
            pause_accepting();  // still failing: wait for fds to free up
            return;
        }
        if (err == ENOBUFS || err == ENOMEM) {
            pause_accepting();
            return;
        }
        // ECONNABORTED, EPROTO, EPERM (firewall)...: that one connection failed.
    }
}

void TcpServer::accept_one(int fd) {
    if (opt_.max_connections != 0 && conns_.size() >= opt_.max_connections) {
        ::close(fd);
        ++closed_.rejected;
        return;
    }
    ConnectionPtr conn;
    try {
        conn = Connection::create(loop_, fd, cb_, opt_.connection);
    } catch (const std::system_error&) {
        ++closed_.accept_errors;  // create() closed the fd
        return;
    }
    conn->tracking_ = opt_.idle_timeout.count() > 0;
    conn->close_hook_ = [this](Connection& c) { forget(c); };
    Connection* raw = conn.get();
    conns_.emplace(raw, conn);
    ++closed_.connections_total;
    try {
        conn->start();
    } catch (const std::system_error&) {
        // The selector refused the fd (e.g. beyond select's limit): drop it.
        conns_.erase(raw);
        ++closed_.accept_errors;
        ++closed_.rejected;
    }
}

void TcpServer::forget(Connection& conn) {
    closed_.bytes_in += conn.bytes_in();
    closed_.bytes_out += conn.bytes_out();
    conns_.erase(&conn);
}

void TcpServer::pause_accepting() {
    if (!accepting_) return;
    loop_.unwatch(listen_fd_);
    accepting_ = false;
    resume_timer_ = loop_.call_after(opt_.accept_pause, [this] {
        resume_timer_ = 0;
        if (spare_fd_ < 0) spare_fd_ = open_spare();
        loop_.watch(listen_fd_, Events::read, [this](Events) { on_acceptable(); });
        accepting_ = true;
    });
}

void TcpServer::sweep_idle() {
    const auto deadline = EventLoop::now() - opt_.idle_timeout;
    std::vector<ConnectionPtr> idle;
    for (auto& [raw, conn] : conns_)
        if (conn->is_open() && conn->last_activity() <= deadline) idle.push_back(conn);
    for (auto& conn : idle) conn->close_with(CloseReason::timeout);
}

// ---- connect ----------------------------------------------------------------------

Connector::Connector(Private, EventLoop& loop, Address address, Callbacks callbacks,
                     ConnectOptions options)
    : loop_(loop), address_(std::move(address)), cb_(std::move(callbacks)), opt_(options) {}

Connector::~Connector() {
    // Only reached while connecting if the loop went away first.
    if (fd_ >= 0) {
        if (watching_) loop_.unwatch(fd_);
        ::close(fd_);
    }
}

std::shared_ptr<Connector> connect(EventLoop& loop, const Address& address, Callbacks callbacks,
                                   ConnectOptions options) {
    if (address.family() == 0) throw std::invalid_argument("connect: address has no family");
    auto c = std::make_shared<Connector>(Connector::Private{}, loop, address, std::move(callbacks),
                                         options);
    c->start();
    return c;
}

void Connector::start() {
    self_ = shared_from_this();
    fd_ = ::socket(address_.family(), SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd_ < 0) {
        fail(errno, true);
        return;
    }
    int r = ::connect(fd_, static_cast<const sockaddr*>(address_.sockaddr_ptr()),
                      address_.sockaddr_len());
    if (r < 0 && errno != EINPROGRESS) {
        // Includes EAGAIN: a Unix listener's backlog is full.
        fail(errno, true);
        return;
    }
    // Connected or in progress: either way completion is reported as
    // writability (at once if already connected), so callbacks never run
    // inside connect().
    loop_.watch(fd_, Events::write, [this](Events) { on_writable(); });
    watching_ = true;
    if (opt_.timeout.count() > 0) {
        timer_ = loop_.call_after(opt_.timeout, [this] {
            timer_ = 0;
            fail(ETIMEDOUT, false);
        });
    }
}

void Connector::on_writable() {
    int err = 0;
    socklen_t len = sizeof err;
    if (::getsockopt(fd_, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err != 0) {
        fail(err, false);
        return;
    }
    finish();
}

void Connector::cancel() {
    if (fd_ < 0) return;
    fail(ECANCELED, true);
}

void Connector::fail(int err, bool defer) {
    if (timer_ != 0) loop_.cancel(timer_);
    timer_ = 0;
    if (watching_) loop_.unwatch(fd_);
    watching_ = false;
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    std::error_code ec(err, std::generic_category());
    std::string message = "connect " + address_.to_string() + ": " + ec.message();
    auto on_error = std::move(cb_.on_error);
    cb_ = Callbacks{};
    auto self = std::move(self_);  // released when this call (or the task) ends
    if (!on_error) return;
    if (defer) {
        loop_.post([self, on_error = std::move(on_error), ec, message] { on_error(ec, message); });
    } else {
        on_error(ec, message);
    }
}

void Connector::finish() {
    if (timer_ != 0) loop_.cancel(timer_);
    timer_ = 0;
    loop_.unwatch(fd_);
    watching_ = false;
    int fd = fd_;
    fd_ = -1;
    auto self = std::move(self_);
    auto on_error = cb_.on_error;
    try {
        ConnectionPtr conn = Connection::create(loop_, fd, std::move(cb_), opt_.connection);
        conn->start();
    } catch (const std::system_error& e) {
        if (on_error) on_error(e.code(), "connect " + address_.to_string() + ": " + e.what());
    }
}

}  // namespace evmux
