// TcpServer (listen/accept with fd-exhaustion handling and an idle sweep) and
// connect() (non-blocking connect with timeout and cancel).
#include "evmux/server.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <stdexcept>
#include <system_error>
#include <vector>

#include "listener.hpp"

namespace evmux {

// ---- TcpServer --------------------------------------------------------------------

TcpServer::TcpServer(EventLoop& loop, const Address& address, Callbacks callbacks,
                     ServerOptions options)
    : loop_(loop), cb_(std::move(callbacks)), opt_(options) {
    if (address.family() == 0) throw std::invalid_argument("TcpServer: address has no family");
    acceptor_ = std::make_unique<detail::Acceptor>(
        loop_, address, opt_.reuse_port, opt_.backlog, opt_.accept_budget, opt_.accept_pause,
        closed_, [this](int fd, const Address& peer) { accept_one(fd, peer); });
    // On a throw from here on, acceptor_'s destructor closes and unlinks.
    local_ = Address::local_of(acceptor_->fd());
    acceptor_->start();
    if (idle_limits().any())
        sweep_timer_ = loop_.call_every(idle_limits().sweep_period(), [this] { sweep_idle(); });
}

detail::IdleLimits TcpServer::idle_limits() const {
    return {opt_.idle_timeout, opt_.read_idle_timeout, opt_.write_idle_timeout};
}

TcpServer::~TcpServer() {
    if (sweep_timer_ != 0) loop_.cancel(sweep_timer_);
    acceptor_.reset();  // stops accepting, closes the listener, unlinks a Unix path
    // Each on_close runs here, before we return (or, for a connection whose
    // own callback is destroying us, when that callback returns).
    auto conns = std::move(conns_);
    for (auto& [raw, conn] : conns) {
        conn->close_hook_ = nullptr;  // nothing to forget: we are going
        conn->close_now(CloseReason::local);
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

void TcpServer::accept_one(int fd, const Address& peer) {
    if (opt_.max_connections != 0 && conns_.size() >= opt_.max_connections) {
        ::close(fd);
        ++closed_.rejected;
        return;
    }
    ConnectionPtr conn;
    try {
        conn = Connection::create(loop_, fd, cb_, opt_.connection, peer);
    } catch (const std::system_error&) {
        ++closed_.accept_errors;  // create() closed the fd
        return;
    }
    conn->tracking_ = sweep_timer_ != 0;
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

void TcpServer::sweep_idle() {
    const auto now = loop_.iteration_time();
    const detail::IdleLimits limits = idle_limits();
    std::vector<ConnectionPtr> idle;
    for (auto& [raw, conn] : conns_)
        if (conn->is_open() && limits.expired(*conn, now)) idle.push_back(conn);
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
        ConnectionPtr conn =
            Connection::create(loop_, fd, std::move(cb_), opt_.connection, address_);
        conn->start();
    } catch (const std::system_error& e) {
        if (on_error) on_error(e.code(), "connect " + address_.to_string() + ": " + e.what());
    }
}

}  // namespace evmux
