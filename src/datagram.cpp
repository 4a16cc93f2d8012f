// UdpEndpoint: datagrams on the loop. Receiving reads up to recv_batch
// datagrams per recvmmsg into a per-thread area (no receive buffer per
// endpoint); sending goes straight to the kernel while nothing is queued, and
// through a bounded queue drained with sendmmsg on writable otherwise.
#include "evmux/datagram.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

namespace evmux {

namespace {

// Queued datagrams per sendmmsg (the mmsghdrs live on the stack).
constexpr unsigned max_send_batch = 64;
// The kernel's limit for the vlen of recvmmsg/sendmmsg (UIO_MAXIOV).
constexpr std::size_t max_recv_batch = 1024;
// Room for one SO_RXQ_OVFL control message (a 32-bit drop count) per datagram.
constexpr std::size_t control_bytes = CMSG_SPACE(sizeof(std::uint32_t));

[[noreturn]] void throw_errno(int err, const std::string& what) {
    throw std::system_error(err, std::generic_category(), what);
}

void check_options(const UdpOptions& o) {
    if (o.max_datagram < 1 || o.max_datagram > 65535)
        throw std::invalid_argument("evmux::UdpOptions: max_datagram must be 1..65535, not " +
                                    std::to_string(o.max_datagram));
    if (o.recv_batch < 1 || o.recv_batch > max_recv_batch)
        throw std::invalid_argument("evmux::UdpOptions: recv_batch must be 1..1024, not " +
                                    std::to_string(o.recv_batch));
    if (o.read_budget < 1)
        throw std::invalid_argument("evmux::UdpOptions: read_budget must be at least 1");
    if (o.receive_buffer < 0 || o.send_buffer < 0)
        throw std::invalid_argument("evmux::UdpOptions: socket buffer sizes must be >= 0");
}

void check_ip_or_unix(const Address& a, const char* call) {
    if (a.family() == 0)
        throw std::invalid_argument(std::string("evmux::UdpEndpoint::") + call +
                                    ": no address (Address())");
}

int open_socket(const Address& a) {
    int fd = ::socket(a.family(), SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) throw_errno(errno, "socket for " + a.to_string());
    return fd;
}

// Where recvmmsg puts a batch: `batch` slots of `slot` bytes, their
// addresses and control messages. The bytes are an anonymous mapping, so only
// the pages datagrams have filled become resident. One per thread, shared by
// every endpoint read on it (see thread_area()).
class ReceiveArea {
  public:
    ReceiveArea() = default;
    ~ReceiveArea() {
        if (bytes_ != nullptr) ::munmap(bytes_, size_);
    }
    ReceiveArea(const ReceiveArea&) = delete;
    ReceiveArea& operator=(const ReceiveArea&) = delete;

    // Room for `batch` datagrams of `slot` bytes. Throws std::system_error.
    void fit(std::size_t batch, std::size_t slot) {
        if (batch * slot > size_) {
            void* p = ::mmap(nullptr, batch * slot, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED) throw_errno(errno, "mmap (UDP receive area)");
            if (bytes_ != nullptr) ::munmap(bytes_, size_);
            bytes_ = static_cast<char*>(p);
            size_ = batch * slot;
            laid_out_ = 0;
        }
        if (batch > msgs_.size()) {
            msgs_.resize(batch);
            iov_.resize(batch);
            names_.resize(batch);
            control_.resize(batch * control_bytes / sizeof(std::uint64_t) + 1);
            laid_out_ = 0;
        }
    }
    // The headers for one recvmmsg of `count` datagrams. Laid out once per
    // shape (slot size, with or without addresses); after that only the
    // lengths the kernel overwrote in the last call are set again (a batch
    // of 16 laid out on every call cost ~40 instructions per datagram).
    mmsghdr* prepare(std::size_t count, std::size_t slot, bool want_names) {
        if (count > laid_out_ || slot != laid_slot_ || want_names != laid_names_) {
            lay_out(count, slot, want_names);
            return msgs_.data();
        }
        for (std::size_t i = 0; i < used_; ++i) {
            msghdr& h = msgs_[i].msg_hdr;
            h.msg_namelen = want_names ? sizeof(sockaddr_storage) : 0;
            h.msg_controllen = control_bytes;
        }
        used_ = 0;
        return msgs_.data();
    }
    // After a recvmmsg that returned `n`: the headers the kernel wrote to (one
    // even on an error, to be safe).
    void used(int n) { used_ = n > 0 ? static_cast<std::size_t>(n) : 1; }
    std::string_view data(std::size_t i, std::size_t slot) const {
        return {bytes_ + i * slot, msgs_[i].msg_len};
    }
    const sockaddr_storage& name(std::size_t i) const { return names_[i]; }

    bool busy = false;  // a read is using it (see UdpEndpoint::handle_read)

  private:
    void lay_out(std::size_t count, std::size_t slot, bool want_names) {
        for (std::size_t i = 0; i < count; ++i) {
            iov_[i] = {bytes_ + i * slot, slot};
            msghdr& h = msgs_[i].msg_hdr;
            h.msg_name = want_names ? &names_[i] : nullptr;
            h.msg_namelen = want_names ? sizeof(sockaddr_storage) : 0;
            h.msg_iov = &iov_[i];
            h.msg_iovlen = 1;
            h.msg_control = reinterpret_cast<char*>(control_.data()) + i * control_bytes;
            h.msg_controllen = control_bytes;
            h.msg_flags = 0;
        }
        laid_out_ = count;
        laid_slot_ = slot;
        laid_names_ = want_names;
        used_ = 0;
    }

    char* bytes_ = nullptr;
    std::size_t size_ = 0;
    std::vector<mmsghdr> msgs_;
    std::vector<iovec> iov_;
    std::vector<sockaddr_storage> names_;
    std::vector<std::uint64_t> control_;  // 8-aligned, as cmsghdr needs
    std::size_t laid_out_ = 0;            // headers laid out for laid_slot_, laid_names_
    std::size_t laid_slot_ = 0;
    bool laid_names_ = false;
    std::size_t used_ = 0;  // headers the last recvmmsg wrote to
};

ReceiveArea& thread_area() {
    thread_local ReceiveArea area;
    return area;
}

// The kernel's running count of datagrams it dropped for want of receive
// buffer (SO_RXQ_OVFL), if this datagram carries one.
bool drop_count(const msghdr& h, std::uint32_t* total) {
    for (const cmsghdr* c = CMSG_FIRSTHDR(&h); c != nullptr;
         c = CMSG_NXTHDR(const_cast<msghdr*>(&h), const_cast<cmsghdr*>(c))) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL) {
            std::memcpy(total, CMSG_DATA(c), sizeof *total);
            return true;
        }
    }
    return false;
}

// send()/sendto() errors that are the caller's mistake, not the network's.
bool caller_mistake(int err) {
    return err == EMSGSIZE || err == EINVAL || err == EAFNOSUPPORT || err == EDESTADDRREQ ||
           err == EISCONN || err == ENOTCONN || err == EFAULT || err == EBADF || err == ENOTSOCK;
}

}  // namespace

// ---- creation -------------------------------------------------------------------------

UdpEndpoint::UdpEndpoint(Private, EventLoop& loop, int fd, bool connected, UdpCallbacks callbacks,
                         UdpOptions options)
    : loop_(loop),
      fd_(fd),
      connected_(connected),
      queue_when_full_(true),
      cb_(std::move(callbacks)),
      opt_(options) {}

UdpEndpoint::~UdpEndpoint() {
    // Only reached with the fd open if start() failed.
    if (fd_ >= 0) ::close(fd_);
}

UdpEndpointPtr UdpEndpoint::bind(EventLoop& loop, const Address& local, UdpCallbacks callbacks,
                                 UdpOptions options) {
    check_ip_or_unix(local, "bind");
    check_options(options);
    int fd = open_socket(local);
    if (::bind(fd, static_cast<const sockaddr*>(local.sockaddr_ptr()), local.sockaddr_len()) < 0) {
        int err = errno;
        ::close(fd);
        throw_errno(err, "bind " + local.to_string());
    }
    detail::UnixSocketFile file = detail::UnixSocketFile::of(local);  // empty for IP
    UdpEndpointPtr ep;
    try {
        ep = start(loop, fd, false, std::move(callbacks), options);
    } catch (...) {
        file.remove();  // the file bind() made would block the next bind of the path
        throw;
    }
    ep->unix_file_ = std::move(file);
    return ep;
}

UdpEndpointPtr UdpEndpoint::connect(EventLoop& loop, const Address& remote, UdpCallbacks callbacks,
                                    UdpOptions options) {
    check_ip_or_unix(remote, "connect");
    check_options(options);
    int fd = open_socket(remote);
    // A datagram connect only sets the default peer: it completes at once.
    if (::connect(fd, static_cast<const sockaddr*>(remote.sockaddr_ptr()), remote.sockaddr_len()) <
        0) {
        int err = errno;
        ::close(fd);
        throw_errno(err, "connect " + remote.to_string());
    }
    return start(loop, fd, true, std::move(callbacks), options);
}

UdpEndpointPtr UdpEndpoint::adopt(EventLoop& loop, int fd, UdpCallbacks callbacks,
                                  UdpOptions options) {
    int type = 0;
    socklen_t len = sizeof type;
    if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) < 0) {
        int err = errno;
        ::close(fd);
        throw_errno(err, "getsockopt(SO_TYPE)");
    }
    if (type != SOCK_DGRAM) {
        ::close(fd);
        throw std::invalid_argument("evmux::UdpEndpoint::adopt: not a datagram socket");
    }
    try {
        check_options(options);
    } catch (...) {
        ::close(fd);
        throw;
    }
    int flags = ::fcntl(fd, F_GETFL);
    if (flags < 0 || (!(flags & O_NONBLOCK) && ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)) {
        int err = errno;
        ::close(fd);
        throw_errno(err, "fcntl(O_NONBLOCK)");
    }
    sockaddr_storage peer{};
    socklen_t peer_len = sizeof peer;
    bool connected = ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) == 0;
    return start(loop, fd, connected, std::move(callbacks), options);
}

// Owns `fd` from here: on failure it is closed (by ~UdpEndpoint once made).
UdpEndpointPtr UdpEndpoint::start(EventLoop& loop, int fd, bool connected, UdpCallbacks callbacks,
                                  const UdpOptions& options) {
    UdpEndpointPtr self;
    try {
        self = std::make_shared<UdpEndpoint>(Private{}, loop, fd, connected, std::move(callbacks),
                                             options);
    } catch (...) {
        ::close(fd);
        throw;
    }
    // The kernel's drop count rides on each datagram once it is non-zero.
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof one);
    if (options.receive_buffer > 0 &&
        ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &options.receive_buffer, sizeof(int)) < 0)
        throw_errno(errno, "setsockopt(SO_RCVBUF)");
    if (options.send_buffer > 0 &&
        ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &options.send_buffer, sizeof(int)) < 0)
        throw_errno(errno, "setsockopt(SO_SNDBUF)");
    const Address local = Address::local_of(fd);
    if (connected) self->peer_ = Address::peer_of(fd);
    // An unconnected Unix socket whose receiver is full gets EAGAIN yet polls
    // writable: waiting for writability would spin, so it drops instead.
    self->queue_when_full_ = local.family() != AF_UNIX || connected;
    // The loop holds us (the tie) until close(); if the loop goes first, it
    // closes us. The watcher holds us too, as a Connection's does, so a
    // close() inside our own callback cannot free us under the batch.
    self->tie_ = loop.tie(self, [raw = self.get()] { raw->close(); });
    try {
        loop.watch(fd, Events::read, [self](Events events) { self->handle(events); });
    } catch (...) {
        loop.untie(std::exchange(self->tie_, 0));
        throw;  // ~UdpEndpoint closes the fd
    }
    return self;
}

Address UdpEndpoint::local_address() const {
    return fd_ >= 0 ? Address::local_of(fd_) : Address();
}

// ---- receiving -------------------------------------------------------------------------

// While one of our callbacks may be on the stack: close() then leaves the
// callbacks in place (one is running) and the last scope out drops them.
struct UdpEndpoint::HandlerScope {
    UdpEndpoint& ep;
    explicit HandlerScope(UdpEndpoint& e) : ep(e) { ++ep.in_handler_; }
    ~HandlerScope() {
        if (--ep.in_handler_ == 0 && ep.fd_ < 0) ep.cb_ = UdpCallbacks{};
    }
    HandlerScope(const HandlerScope&) = delete;
    HandlerScope& operator=(const HandlerScope&) = delete;
};

void UdpEndpoint::handle(Events events) {
    HandlerScope scope(*this);
    if (fd_ >= 0 && any(events, Events::write) && !queue_.empty()) handle_write();
    if (fd_ >= 0 && any(events, Events::read | Events::error | Events::hangup)) handle_read();
}

void UdpEndpoint::handle_read() {
    // The thread's area, unless a callback is running another loop on this
    // thread from inside a read (its data must stay valid): then one of its own.
    ReceiveArea& shared = thread_area();
    std::unique_ptr<ReceiveArea> nested;
    if (shared.busy) nested = std::make_unique<ReceiveArea>();
    ReceiveArea& area = nested ? *nested : shared;
    const std::size_t slot = opt_.max_datagram;
    const std::size_t batch = std::min(opt_.recv_batch, opt_.read_budget);
    area.fit(batch, slot);
    area.busy = true;
    struct Release {
        ReceiveArea& a;
        ~Release() { a.busy = false; }
    } release{area};

    const bool want_names = !connected_;  // a connected endpoint hears only its peer
    std::size_t budget = opt_.read_budget;
    while (fd_ >= 0 && budget > 0) {
        const std::size_t want = std::min(batch, budget);
        mmsghdr* msgs = area.prepare(want, slot, want_names);
        int n = ::recvmmsg(fd_, msgs, static_cast<unsigned>(want), MSG_DONTWAIT, nullptr);
        area.used(n);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            // An ICMP error on a connected socket (reading it clears it).
            int err = errno;
            ++stats_.errors;
            report(err);
            --budget;
            continue;
        }
        ++stats_.receive_calls;
        for (int i = 0; i < n && fd_ >= 0; ++i) {
            const msghdr& h = msgs[i].msg_hdr;
            std::uint32_t drops;
            if (h.msg_controllen > 0 && drop_count(h, &drops)) count_kernel_drops(drops);
            if (h.msg_flags & MSG_TRUNC) {
                ++stats_.truncated;
                continue;
            }
            std::string_view data = area.data(static_cast<std::size_t>(i), slot);
            ++stats_.received;
            stats_.bytes_received += data.size();
            if (!cb_.on_datagram) continue;
            try {
                if (want_names)
                    cb_.on_datagram(*this, data,
                                    Address::from_sockaddr(&area.name(static_cast<std::size_t>(i)),
                                                           h.msg_namelen));
                else
                    cb_.on_datagram(*this, data, peer_);
            } catch (...) {
                loop_.handle_exception(std::current_exception());
            }
        }
        budget -= static_cast<std::size_t>(n);
        if (static_cast<std::size_t>(n) < want) break;  // drained
    }
}

void UdpEndpoint::count_kernel_drops(std::uint32_t total) {
    // A running 32-bit count: the difference survives its wrap-around.
    stats_.kernel_dropped += static_cast<std::uint32_t>(total - kernel_drops_seen_);
    kernel_drops_seen_ = total;
}

void UdpEndpoint::report(int err) noexcept {
    if (fd_ < 0 || !cb_.on_error) return;
    HandlerScope scope(*this);
    try {
        cb_.on_error(*this, std::error_code(err, std::generic_category()));
    } catch (...) {
        loop_.handle_exception(std::current_exception());
    }
}

// ---- sending ---------------------------------------------------------------------------

bool UdpEndpoint::send_to(const Address& to, std::string_view data) {
    // Not left to sendto() (a system_error), nor queued, where Address()
    // means "the connected peer".
    check_ip_or_unix(to, "send_to");
    return submit(&to, data);
}

bool UdpEndpoint::send(std::string_view data) {
    if (!connected_ && fd_ >= 0)
        throw std::logic_error(
            "evmux::UdpEndpoint::send: the endpoint is not connected (use send_to)");
    return submit(nullptr, data);
}

bool UdpEndpoint::submit(const Address* to, std::string_view data) {
    if (fd_ < 0) return false;
    if (queue_.empty()) {
        ssize_t n;
        do {
            n = to != nullptr
                    ? ::sendto(fd_, data.data(), data.size(), MSG_NOSIGNAL,
                               static_cast<const sockaddr*>(to->sockaddr_ptr()), to->sockaddr_len())
                    : ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
        } while (n < 0 && errno == EINTR);
        if (n >= 0) {
            ++stats_.sent;
            ++stats_.send_calls;
            stats_.bytes_sent += data.size();
            return true;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK) return send_failed(errno, to);
        if (!queue_when_full_) {
            ++stats_.dropped;
            return false;
        }
    }
    if (queued_bytes_ + data.size() > opt_.max_queued_bytes ||
        queue_.size() >= opt_.max_queued_datagrams) {
        ++stats_.dropped;
        return false;
    }
    queue_.push_back(Queued{to != nullptr ? *to : Address(), std::string(data)});
    queued_bytes_ += data.size();
    set_write_interest(true);
    return true;
}

bool UdpEndpoint::send_failed(int err, const Address* to) {
    if (caller_mistake(err))
        throw_errno(err, to != nullptr ? "sendto " + to->to_string() : "send " + peer_.to_string());
    if (err == ENOBUFS || err == ENOMEM) {  // the kernel dropped it
        ++stats_.dropped;
        return false;
    }
    // The network's answer (ECONNREFUSED after an ICMP port unreachable,
    // EHOSTUNREACH...): reported from the loop, never inside send.
    ++stats_.errors;
    loop_.post([self = shared_from_this(), err] { self->report(err); });
    return false;
}

void UdpEndpoint::handle_write() {
    while (fd_ >= 0 && !queue_.empty()) {
        mmsghdr msgs[max_send_batch];
        iovec iov[max_send_batch];
        unsigned count = 0;
        for (auto it = queue_.begin(); it != queue_.end() && count < max_send_batch;
             ++it, ++count) {
            iov[count] = {it->bytes.data(), it->bytes.size()};
            msgs[count] = {};
            msghdr& h = msgs[count].msg_hdr;
            if (it->to.family() != 0) {
                h.msg_name = const_cast<void*>(it->to.sockaddr_ptr());
                h.msg_namelen = it->to.sockaddr_len();
            }
            h.msg_iov = &iov[count];
            h.msg_iovlen = 1;
        }
        int n = ::sendmmsg(fd_, msgs, count, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            // The front datagram was refused: it is dropped, and said why.
            int err = errno;
            queued_bytes_ -= queue_.front().bytes.size();
            queue_.pop_front();
            if (err == ENOBUFS || err == ENOMEM) {
                ++stats_.dropped;
            } else {
                ++stats_.errors;
                report(err);
            }
            continue;
        }
        ++stats_.send_calls;
        stats_.sent += static_cast<std::uint64_t>(n);
        for (int i = 0; i < n; ++i) {
            stats_.bytes_sent += queue_.front().bytes.size();
            queued_bytes_ -= queue_.front().bytes.size();
            queue_.pop_front();
        }
    }
    if (queue_.empty()) set_write_interest(false);
}

void UdpEndpoint::set_write_interest(bool on) {
    if (fd_ < 0 || on == write_interest_) return;
    loop_.change(fd_, on ? Events::read | Events::write : Events::read);
    write_interest_ = on;
}

// ---- closing ---------------------------------------------------------------------------

void UdpEndpoint::close() {
    if (fd_ < 0) return;
    loop_.unwatch(fd_);
    ::close(fd_);
    fd_ = -1;
    unix_file_.remove();  // if no one took the path over meanwhile
    stats_.dropped += queue_.size();
    queue_.clear();
    queued_bytes_ = 0;
    // Our callbacks may hold pointers to us: drop them, unless one is running
    // (then handle() or report() drops them when it returns).
    if (in_handler_ == 0) cb_ = UdpCallbacks{};
    loop_.untie(std::exchange(tie_, 0));  // may destroy us: the last thing
}

}  // namespace evmux
