// evmux-baseline-epoll: the smallest correct level-triggered epoll echo server,
// with no abstraction at all. It is the floor evmux is measured against: what
// the same machine does when nothing but the system calls stands between the
// socket and the echo.
//
// Still correct, or the floor would be a lie: non-blocking sockets, a partial
// write keeps the rest for that connection and switches it to write interest
// (not reading it meanwhile, so a client that does not read cannot make us
// buffer without bound), accept4 until EAGAIN, EMFILE does not spin.
#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>

#include <vector>

#include "baseline_common.hpp"

namespace {

constexpr const char* name = "evmux-baseline-epoll";

/// The bytes of an echo the kernel did not take yet (empty when drained).
struct Pending {
    std::vector<char> bytes;
    std::size_t offset = 0;
};

/// Registers or changes fd's interest; the data word is the fd itself.
void set_interest(int epfd, int op, int fd, std::uint32_t events) {
    epoll_event ev{};
    ev.events = events;
    ev.data.fd = fd;
    if (::epoll_ctl(epfd, op, fd, &ev) < 0) evmux::baseline::die_errno(name, "epoll_ctl");
}

/// The floor's state, and what it does with one event. Each function is
/// called from one place in the loop and inlined there: named pieces, not a
/// layer.
struct Floor {
    int epfd = -1;
    int listen_fd = -1;
    // A spare descriptor to give up when accept fails with EMFILE: closing
    // it lets us accept and drop the waiting connection instead of being woken
    // for it forever (level-triggered).
    int spare_fd = -1;
    std::vector<Pending> pending = std::vector<Pending>(1024);  // indexed by fd
    std::vector<char> buf = std::vector<char>(64 * 1024);

    void close_conn(int fd) {
        ::close(fd);
        pending[fd] = Pending{};
    }

    /// The listening socket is readable: accept4 until EAGAIN.
    void accept_all() {
        while (true) {
            const int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (c >= 0) {
                evmux::baseline::set_nodelay(c);
                if (static_cast<std::size_t>(c) >= pending.size())
                    pending.resize(static_cast<std::size_t>(c) * 2);
                set_interest(epfd, EPOLL_CTL_ADD, c, EPOLLIN);
                continue;
            }
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if ((errno == EMFILE || errno == ENFILE) && spare_fd >= 0) {
                ::close(spare_fd);
                const int drop = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
                if (drop >= 0) ::close(drop);
                spare_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
                continue;
            }
            break;  // EAGAIN, or a failure that a later wake-up retries
        }
    }

    /// EPOLLOUT: writes what is left of fd's echo; reads again once drained.
    void write_pending(int fd) {
        Pending& p = pending[fd];
        const ssize_t w = ::write(fd, p.bytes.data() + p.offset, p.bytes.size() - p.offset);
        if (w < 0) {
            if (errno != EAGAIN && errno != EINTR) close_conn(fd);
            return;
        }
        p.offset += static_cast<std::size_t>(w);
        if (p.offset == p.bytes.size()) {
            p.bytes.clear();
            p.offset = 0;
            set_interest(epfd, EPOLL_CTL_MOD, fd, EPOLLIN);  // drained: read again
        }
    }

    /// EPOLLIN, EPOLLERR or EPOLLHUP: read says which. With an echo still
    /// pending only an error or hang-up gets here (no read interest), and
    /// reading now would reorder the stream.
    void echo(int fd) {
        if (!pending[fd].bytes.empty()) {
            close_conn(fd);
            return;
        }
        const ssize_t r = ::read(fd, buf.data(), buf.size());
        if (r <= 0) {
            if (r == 0 || (errno != EAGAIN && errno != EINTR)) close_conn(fd);
            return;
        }
        const ssize_t w = ::write(fd, buf.data(), static_cast<std::size_t>(r));
        if (w == r) return;
        if (w < 0 && errno != EAGAIN && errno != EINTR) {
            close_conn(fd);
            return;
        }
        // The kernel took only part: keep the rest, stop reading until it is
        // out.
        const std::size_t done = w > 0 ? static_cast<std::size_t>(w) : 0;
        Pending& p = pending[fd];
        p.bytes.assign(buf.begin() + static_cast<std::ptrdiff_t>(done), buf.begin() + r);
        p.offset = 0;
        set_interest(epfd, EPOLL_CTL_MOD, fd, EPOLLOUT);
    }
};

}  // namespace

int main(int argc, char** argv) {
    using namespace evmux::baseline;
    const ServerOptions opt =
        start(name, "Minimal level-triggered epoll echo server (the floor).", argc, argv);
    const int sigfd = stop_signal_fd(name, {SIGINT, SIGTERM}, SFD_NONBLOCK);

    Floor floor;
    floor.listen_fd = listen_on(name, opt, SOCK_NONBLOCK);
    floor.epfd = ::epoll_create1(EPOLL_CLOEXEC);
    if (floor.epfd < 0) die_errno(name, "epoll_create1");
    set_interest(floor.epfd, EPOLL_CTL_ADD, floor.listen_fd, EPOLLIN);
    set_interest(floor.epfd, EPOLL_CTL_ADD, sigfd, EPOLLIN);
    floor.spare_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    std::vector<epoll_event> events(256);
    announce(name, opt, floor.listen_fd);

    bool running = true;
    while (running) {
        const int n = ::epoll_wait(floor.epfd, events.data(), static_cast<int>(events.size()), -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die_errno(name, "epoll_wait");
        }
        for (int k = 0; k < n; ++k) {
            const int fd = events[k].data.fd;
            if (fd == sigfd)
                running = false;
            else if (fd == floor.listen_fd)
                floor.accept_all();
            else if (events[k].events & EPOLLOUT)
                floor.write_pending(fd);
            else
                floor.echo(fd);
        }
    }

    ::close(floor.epfd);  // the connections close with the process
    ::close(floor.listen_fd);
    ::close(sigfd);
    if (floor.spare_fd >= 0) ::close(floor.spare_fd);
    return 0;
}
