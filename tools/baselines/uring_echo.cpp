// evmux-baseline-uring: the smallest correct io_uring echo server, with no
// abstraction at all: the completion-I/O floor beside the epoll one. What the
// same machine does when nothing but one io_uring stands between the socket
// and the echo.
//
// The ring is set up as the kernel's networking advice has it:
// SINGLE_ISSUER|DEFER_TASKRUN (completions run only when we wait, in one
// batch), COOP_TASKRUN where the kernel takes it; fewer flags where it does
// not. One multishot accept; per connection one multishot recv that picks its
// buffers from a provided buffer ring; each received buffer is echoed with an
// IORING_OP_SEND and goes back to the ring when that send completes. One
// io_uring_submit_and_wait per iteration: everything queued in the last batch
// is submitted and the next batch waited for in the same system call.
//
// Still correct, or the floor would be a lie: one send in flight per
// connection and later data queued behind it (the stream keeps its order); a
// short send sends the rest; a multishot recv that ends (ENOBUFS when every
// buffer is lent out, or for any other reason) is armed again; a client that
// does not read cannot make us hold more than max_queued buffers (its recv is
// cancelled until its queue drains); EOF drains the queue, then closes;
// EMFILE on accept does not spin. Memory is fixed: buffer_count x buffer_size.
//
// Two variants, to measure what a piece is worth here (docs/completion-io.md,
// "Not used, and why"), chosen by the environment:
//  EVMUX_BASELINE_URING_SETUP=coop  COOP_TASKRUN|TASKRUN_FLAG only (the flags
//                                   evmux's rings use), not SINGLE_ISSUER|
//                                   DEFER_TASKRUN.
//  EVMUX_BASELINE_URING_SEND=zc     zero-copy sends (IORING_OP_SEND_ZC): a
//                                   buffer goes back to the ring at its last
//                                   send's notification, not at its completion.
#include <fcntl.h>
#include <liburing.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/signalfd.h>

#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "baseline_common.hpp"

// Debian's liburing 2.3 ships 6.1-era headers: the constants used here that
// a header might lack.
#ifndef IORING_SETUP_COOP_TASKRUN
#define IORING_SETUP_COOP_TASKRUN (1U << 8)
#endif
#ifndef IORING_SETUP_SUBMIT_ALL
#define IORING_SETUP_SUBMIT_ALL (1U << 7)
#endif
#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif
#ifndef IORING_SETUP_TASKRUN_FLAG
#define IORING_SETUP_TASKRUN_FLAG (1U << 9)
#endif

namespace {

constexpr const char* name = "evmux-baseline-uring";

/// The provided buffers: 1024 of buffer_size bytes, one group. 16 KiB takes
/// the largest message the bench sends in one buffer (one recv, one send);
/// 1024 of them serve 1000 sessions with a message each in flight. The
/// environment's EVMUX_BASELINE_URING_BUFFERS (a power of two, 1 to 32768)
/// sets another count: the tests run out of buffers with a few.
constexpr unsigned default_buffer_count = 1024;
constexpr unsigned buffer_size = 16 * 1024;
constexpr unsigned short buffer_group = 0;
/// A connection holding this many received buffers unsent stops receiving
/// until its queue is empty (a client that does not read its echoes).
constexpr std::size_t max_queued = 16;

/// What a completion is for: the low bits of its user_data, the fd above.
enum Op : std::uint64_t { op_accept, op_recv, op_send, op_cancel, op_signal };
constexpr unsigned op_bits = 3;

std::uint64_t user_data(Op op, int fd) {
    return (static_cast<std::uint64_t>(fd) << op_bits) | op;
}
/// A zero-copy send's user_data also names its buffer (its notification
/// gives that buffer back), above the fd's 32 bits.
constexpr unsigned buffer_shift = op_bits + 32;

/// The value of environment variable `var`: unset or empty gives "", `allowed`
/// gives it; anything else is one line and exit 2.
const char* variant(const char* var, const char* allowed) {
    const char* v = std::getenv(var);
    if (!v || *v == '\0') return "";
    if (std::strcmp(v, allowed) != 0) {
        std::fprintf(stderr, "%s: %s=%s: must be '%s' or unset\n", name, var, v, allowed);
        std::exit(2);
    }
    return v;
}

/// No buffer: the end of a connection's queue.
constexpr int no_buffer = -1;

/// One connection, indexed by its fd. The fd is closed only when no request
/// on it is outstanding, so a new connection reusing the number never sees an
/// old one's completions.
struct Conn {
    bool open = false;
    bool recv_armed = false;
    bool send_in_flight = false;
    bool cancel_sent = false;  // the recv's cancellation is on its way
    bool peer_done = false;    // EOF: drain the queue, then close
    bool failed = false;       // an error: close as soon as nothing is in flight
    // The received buffers not yet echoed, in order, linked through
    // Floor::next (each buffer is in one queue at most): no allocation.
    int head = no_buffer;  // being sent
    int tail = no_buffer;
    unsigned sent = 0;  // of the head's bytes
    unsigned queued = 0;
    bool empty() const { return head == no_buffer; }
};

/// The floor's state, and what it does with each completion. Each function is
/// called from one place and inlined there: named pieces, not a layer.
struct Floor {
    io_uring ring{};
    io_uring_buf_ring* buf_ring = nullptr;
    char* buffers = nullptr;
    int listen_fd = -1;
    int spare_fd = -1;  // given up on EMFILE to accept and drop one connection
    int sigfd = -1;
    std::vector<Conn> conns = std::vector<Conn>(1024);
    std::vector<int> next;           // per buffer: the next in its queue
    std::vector<unsigned> received;  // per buffer: the bytes in it
    // Zero-copy sends (EVMUX_BASELINE_URING_SEND=zc): per buffer, the
    // notifications still to come, and whether it has been sent in full (it
    // goes back to the ring when both are done).
    bool zero_copy = false;
    std::vector<unsigned> notifications;
    std::vector<char> sent_in_full;
    std::vector<int> starved;  // recv ended with ENOBUFS and nothing queued
    unsigned buffer_count = default_buffer_count;
    int returned = 0;  // buffers added to the ring since the last advance
    bool running = true;

    /// A free submission entry; submits what is queued when the ring is full.
    io_uring_sqe* sqe() {
        io_uring_sqe* e = io_uring_get_sqe(&ring);
        while (!e) {
            io_uring_submit(&ring);
            e = io_uring_get_sqe(&ring);
        }
        return e;
    }

    /// Sets the ring up with the most of SINGLE_ISSUER|DEFER_TASKRUN|
    /// COOP_TASKRUN the kernel takes; the CQ four times the SQ (a batch of
    /// multishot completions must not overflow it). Exits 1 if none works.
    void setup_ring() {
        const unsigned flag_sets[] = {
            IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_COOP_TASKRUN,
            IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
            IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN, IORING_SETUP_COOP_TASKRUN, 0};
        const unsigned coop_sets[] = {IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG, 0};
        const bool coop = *variant("EVMUX_BASELINE_URING_SETUP", "coop") != '\0';
        int rc = -EINVAL;
        const std::span<const unsigned> sets =
            coop ? std::span<const unsigned>(coop_sets) : std::span<const unsigned>(flag_sets);
        for (unsigned flags : sets) {
            io_uring_params p{};
            p.flags = flags | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_CQSIZE;
            p.cq_entries = 4 * 4096;
            rc = io_uring_queue_init_params(4096, &ring, &p);
            if (rc != -EINVAL) break;
        }
        if (rc < 0) {
            errno = -rc;
            evmux::baseline::die_errno(name, "io_uring_queue_init_params");
        }
    }

    /// The buffer ring and its buffers (touched now: the resident memory does
    /// not grow under load), every buffer handed to the kernel. A bad
    /// EVMUX_BASELINE_URING_BUFFERS is one line and exit 2.
    void setup_buffers() {
        if (const char* env = std::getenv("EVMUX_BASELINE_URING_BUFFERS")) {
            char* end = nullptr;
            const unsigned long n = std::strtoul(env, &end, 10);
            if (*env == '\0' || *end != '\0' || n < 1 || n > 32768 || (n & (n - 1)) != 0) {
                std::fprintf(stderr,
                             "%s: EVMUX_BASELINE_URING_BUFFERS=%s: not a power of two from 1 to "
                             "32768\n",
                             name, env);
                std::exit(2);
            }
            buffer_count = static_cast<unsigned>(n);
        }
        const std::size_t ring_bytes = buffer_count * sizeof(io_uring_buf);
        void* r = ::mmap(nullptr, ring_bytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        void* b = ::mmap(nullptr, std::size_t{buffer_count} * buffer_size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (r == MAP_FAILED || b == MAP_FAILED) evmux::baseline::die_errno(name, "mmap");
        next.assign(buffer_count, no_buffer);
        received.assign(buffer_count, 0);
        zero_copy = *variant("EVMUX_BASELINE_URING_SEND", "zc") != '\0';
        notifications.assign(buffer_count, 0);
        sent_in_full.assign(buffer_count, 0);
        buf_ring = static_cast<io_uring_buf_ring*>(r);
        buffers = static_cast<char*>(b);
        io_uring_buf_ring_init(buf_ring);
        io_uring_buf_reg reg{};
        reg.ring_addr = reinterpret_cast<std::uint64_t>(buf_ring);
        reg.ring_entries = buffer_count;
        reg.bgid = buffer_group;
        if (const int rc = io_uring_register_buf_ring(&ring, &reg, 0); rc < 0) {
            errno = -rc;
            evmux::baseline::die_errno(name, "io_uring_register_buf_ring");
        }
        for (unsigned bid = 0; bid < buffer_count; ++bid)
            give_back(static_cast<unsigned short>(bid));
        flush_buffers();
    }

    /// Queues buffer `bid` for the kernel again (visible at flush_buffers).
    void give_back(unsigned short bid) {
        io_uring_buf_ring_add(buf_ring, buffers + std::size_t{bid} * buffer_size, buffer_size, bid,
                              io_uring_buf_ring_mask(buffer_count), returned++);
    }

    /// Makes the buffers given back visible; a connection starved of them
    /// receives again.
    void flush_buffers() {
        if (returned == 0) return;
        io_uring_buf_ring_advance(buf_ring, returned);
        returned = 0;
        for (int fd : starved)
            if (conns[fd].open && !conns[fd].recv_armed) arm_recv(fd);
        starved.clear();
    }

    void arm_accept() {
        io_uring_sqe* e = sqe();
        io_uring_prep_multishot_accept(e, listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
        io_uring_sqe_set_data64(e, user_data(op_accept, listen_fd));
    }

    /// SIGINT or SIGTERM: polled, not read (a read would block a worker thread).
    void arm_signal() {
        io_uring_sqe* e = sqe();
        io_uring_prep_poll_add(e, sigfd, POLLIN);
        io_uring_sqe_set_data64(e, user_data(op_signal, sigfd));
    }

    void arm_recv(int fd) {
        io_uring_sqe* e = sqe();
        io_uring_prep_recv_multishot(e, fd, nullptr, 0, 0);
        e->flags |= IOSQE_BUFFER_SELECT;
        e->buf_group = buffer_group;
        io_uring_sqe_set_data64(e, user_data(op_recv, fd));
        conns[fd].recv_armed = true;
    }

    /// Cancels fd's multishot recv (once); its last completion says it ended.
    void cancel_recv(int fd) {
        Conn& c = conns[fd];
        if (!c.recv_armed || c.cancel_sent) return;
        io_uring_sqe* e = sqe();
        io_uring_prep_cancel64(e, user_data(op_recv, fd), 0);
        io_uring_sqe_set_data64(e, user_data(op_cancel, fd));
        c.cancel_sent = true;
    }

    /// Appends buffer `bid` holding `len` received bytes to c's queue.
    void enqueue(Conn& c, int bid, unsigned len) {
        received[bid] = len;
        next[bid] = no_buffer;
        (c.empty() ? c.head : next[c.tail]) = bid;
        c.tail = bid;
        ++c.queued;
    }

    /// Sends what is left of the buffer at the head of fd's queue.
    void send_front(int fd) {
        Conn& c = conns[fd];
        io_uring_sqe* e = sqe();
        char* at = buffers + std::size_t(c.head) * buffer_size + c.sent;
        if (zero_copy)
            io_uring_prep_send_zc(e, fd, at, received[c.head] - c.sent, MSG_NOSIGNAL, 0);
        else
            io_uring_prep_send(e, fd, at, received[c.head] - c.sent, MSG_NOSIGNAL);
        io_uring_sqe_set_data64(
            e, user_data(op_send, fd) | (static_cast<std::uint64_t>(c.head) << buffer_shift));
        c.send_in_flight = true;
    }

    /// Closes fd once nothing on it is outstanding; until then cancels its
    /// recv. Its queued buffers go back to the ring.
    void close_when_idle(int fd) {
        Conn& c = conns[fd];
        if (c.recv_armed) {
            cancel_recv(fd);
            return;
        }
        if (c.send_in_flight) return;
        for (int bid = c.head; bid != no_buffer; bid = next[bid]) release(bid);
        ::close(fd);
        c = Conn{};
    }

    void on_accept(const io_uring_cqe* cqe) {
        if (!(cqe->flags & IORING_CQE_F_MORE)) arm_accept();  // the multishot ended
        const int fd = cqe->res;
        if (fd < 0) {
            if ((fd == -EMFILE || fd == -ENFILE) && spare_fd >= 0) {
                // Out of descriptors: accept the waiting one and drop it, or
                // the re-armed accept would fail at once, forever.
                ::close(spare_fd);
                const int drop = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
                if (drop >= 0) ::close(drop);
                spare_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
            }
            return;
        }
        evmux::baseline::set_nodelay(fd);
        if (static_cast<std::size_t>(fd) >= conns.size())
            conns.resize(static_cast<std::size_t>(fd) * 2);
        conns[fd] = Conn{};
        conns[fd].open = true;
        arm_recv(fd);
    }

    void on_recv(int fd, const io_uring_cqe* cqe) {
        Conn& c = conns[fd];
        const bool more = cqe->flags & IORING_CQE_F_MORE;
        if (!more) c.recv_armed = false;
        if (cqe->flags & IORING_CQE_F_BUFFER) {
            const auto bid = static_cast<unsigned short>(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
            if (cqe->res <= 0 || c.failed) {
                give_back(bid);
            } else {
                enqueue(c, bid, static_cast<unsigned>(cqe->res));
                if (!c.send_in_flight) send_front(fd);
                if (c.queued >= max_queued) cancel_recv(fd);  // it does not read
            }
        }
        if (more) return;
        // The multishot ended: EOF, an error, no buffer, or our cancellation.
        c.cancel_sent = false;
        if (cqe->res == 0)
            c.peer_done = true;
        else if (cqe->res < 0 && cqe->res != -ENOBUFS && cqe->res != -ECANCELED)
            c.failed = true;
        if (c.failed || (c.peer_done && c.empty())) {
            close_when_idle(fd);
        } else if (!c.peer_done && c.empty()) {
            if (cqe->res == -ENOBUFS)
                starved.push_back(fd);  // armed again when a buffer comes back
            else
                arm_recv(fd);
        }
        // Otherwise armed again when the queue has drained (on_send).
    }

    /// A buffer done with (sent, or dropped): back to the ring, or once its
    /// zero-copy sends' notifications have come.
    void release(int bid) {
        if (notifications[bid] > 0)
            sent_in_full[bid] = 1;
        else
            give_back(static_cast<unsigned short>(bid));
    }

    void on_send(int fd, const io_uring_cqe* cqe) {
        const auto bid = static_cast<int>(io_uring_cqe_get_data64(cqe) >> buffer_shift);
        if (cqe->flags & IORING_CQE_F_NOTIF) {  // the kernel let go of a zero-copy send's bytes
            if (--notifications[bid] == 0 && sent_in_full[bid]) {
                sent_in_full[bid] = 0;
                give_back(static_cast<unsigned short>(bid));
            }
            return;
        }
        if (cqe->flags & IORING_CQE_F_MORE) ++notifications[bid];  // a notification follows
        Conn& c = conns[fd];
        c.send_in_flight = false;
        if (cqe->res < 0 || c.failed) {
            c.failed = true;
            close_when_idle(fd);
            return;
        }
        c.sent += static_cast<unsigned>(cqe->res);
        if (c.sent < received[c.head]) {  // short: the rest
            send_front(fd);
            return;
        }
        const int done = c.head;
        c.head = next[done];
        if (c.empty()) c.tail = no_buffer;
        c.sent = 0;
        --c.queued;
        release(done);
        if (!c.empty()) {
            send_front(fd);
        } else if (c.peer_done) {
            close_when_idle(fd);
        } else if (!c.recv_armed) {
            arm_recv(fd);  // drained after ENOBUFS, a cancellation or a full queue
        }
    }

    void on_completion(const io_uring_cqe* cqe) {
        const std::uint64_t ud = io_uring_cqe_get_data64(cqe);
        const auto fd = static_cast<int>(static_cast<std::uint32_t>(ud >> op_bits));
        switch (static_cast<Op>(ud & ((1U << op_bits) - 1))) {
            case op_accept:
                on_accept(cqe);
                break;
            case op_recv:
                on_recv(fd, cqe);
                break;
            case op_send:
                on_send(fd, cqe);
                break;
            case op_cancel:
                break;  // the recv's own completion says it ended
            case op_signal:
                running = false;
                break;
        }
    }
};

}  // namespace

int main(int argc, char** argv) {
    using namespace evmux::baseline;
    const ServerOptions opt =
        start(name, "Minimal io_uring echo server (the completion-I/O floor).", argc, argv);
    Floor floor;
    floor.sigfd = stop_signal_fd(name, {SIGINT, SIGTERM}, SFD_NONBLOCK);
    floor.listen_fd = listen_on(name, opt, 0);
    floor.spare_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    floor.setup_ring();
    floor.setup_buffers();
    floor.arm_accept();
    floor.arm_signal();
    announce(name, opt, floor.listen_fd);

    while (floor.running) {
        const int rc = io_uring_submit_and_wait(&floor.ring, 1);
        if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
            errno = -rc;
            die_errno(name, "io_uring_submit_and_wait");
        }
        unsigned head, seen = 0;
        io_uring_cqe* cqe;
        io_uring_for_each_cqe(&floor.ring, head, cqe) {
            floor.on_completion(cqe);
            ++seen;
        }
        io_uring_cq_advance(&floor.ring, seen);
        floor.flush_buffers();
    }

    io_uring_queue_exit(&floor.ring);  // the connections close with the process
    ::close(floor.listen_fd);
    ::close(floor.sigfd);
    if (floor.spare_fd >= 0) ::close(floor.spare_fd);
    return 0;
}
