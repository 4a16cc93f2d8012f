// evmux-baseline-udp: the smallest correct UDP echo server on level-triggered
// epoll, the floor evmux's UdpEndpoint is measured against: recvmmsg a batch
// of datagrams (as UdpEndpoint does, 16 at a time, at most 64 per wake-up),
// send each back to its sender with one sendmmsg. A reply the kernel refuses
// (EAGAIN, which loopback never gives) is dropped, as UDP allows.
#include <signal.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>

#include <vector>

#include "baseline_common.hpp"

namespace {

constexpr const char* name = "evmux-baseline-udp";
constexpr unsigned batch = 16;
constexpr unsigned budget = 64;
constexpr std::size_t max_datagram = 65535;

/// The receive batch: buffers, senders and headers, set up once.
struct Batch {
    std::vector<char> bytes = std::vector<char>(batch * max_datagram);
    sockaddr_storage names[batch]{};
    iovec iov[batch]{};
    mmsghdr msgs[batch]{};

    /// Receives up to `batch` datagrams; their count, 0 if none is waiting.
    int receive(int fd) {
        for (unsigned i = 0; i < batch; ++i) {
            iov[i] = {bytes.data() + i * max_datagram, max_datagram};
            msgs[i].msg_hdr = {};
            msgs[i].msg_hdr.msg_name = &names[i];
            msgs[i].msg_hdr.msg_namelen = sizeof names[i];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        const int n = ::recvmmsg(fd, msgs, batch, MSG_DONTWAIT, nullptr);
        return n < 0 ? 0 : n;
    }
    /// Sends the `n` datagrams just received back to their senders.
    void echo(int fd, int n) {
        for (int i = 0; i < n; ++i) iov[i].iov_len = msgs[i].msg_len;
        int sent = 0;
        while (sent < n) {
            const int k = ::sendmmsg(fd, msgs + sent, static_cast<unsigned>(n - sent), 0);
            if (k < 0 && errno == EINTR) continue;
            sent += k > 0 ? k : 1;  // a refused datagram is dropped
        }
    }
};

}  // namespace

int main(int argc, char** argv) {
    using namespace evmux::baseline;
    const ServerOptions opt =
        start(name, "Minimal recvmmsg/sendmmsg UDP echo server on epoll (the floor).", argc, argv);
    const int sigfd = stop_signal_fd(name, {SIGINT, SIGTERM}, SFD_NONBLOCK);
    const int fd = bind_on(name, opt, SOCK_DGRAM, SOCK_NONBLOCK);
    const int epfd = ::epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die_errno(name, "epoll_create1");
    for (int watched : {fd, sigfd}) {
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.fd = watched;
        if (::epoll_ctl(epfd, EPOLL_CTL_ADD, watched, &ev) < 0) die_errno(name, "epoll_ctl");
    }
    Batch b;
    epoll_event events[2];
    announce(name, opt, fd);
    for (bool running = true; running;) {
        const int n = ::epoll_wait(epfd, events, 2, -1);
        if (n < 0 && errno != EINTR) die_errno(name, "epoll_wait");
        for (int k = 0; k < n; ++k) {
            if (events[k].data.fd == sigfd) {
                running = false;
                continue;
            }
            for (unsigned read = 0; read < budget;) {
                const int got = b.receive(fd);
                b.echo(fd, got);
                read += static_cast<unsigned>(got);
                if (got < static_cast<int>(batch)) break;
            }
        }
    }
    ::close(epfd);
    ::close(fd);
    ::close(sigfd);
    return 0;
}
