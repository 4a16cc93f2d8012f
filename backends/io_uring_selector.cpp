// The io_uring backend: readiness through IORING_OP_POLL_ADD requests.
//
// Level-triggered, like poll and epoll's default, by one-shot poll requests
// re-armed after each completion. Multishot polls (IORING_POLL_ADD_MULTI) are
// not used on purpose: a multishot poll posts a completion per *wake-up* of the
// file, i.e. it is edge-triggered (measured here on 6.18: one byte left unread
// gives one completion, then none until more data arrives), and the
// level-triggered variant IORING_POLL_ADD_LEVEL is refused with EINVAL by
// current kernels. A one-shot poll re-armed at the next wait asks the file
// again (vfs_poll) when it is armed, so an fd that is still ready completes at
// once: exactly poll(2)'s answer, at no extra system call, because the re-arms
// ride on the io_uring_enter() that waits.
//
// Each request's user_data carries the fd and a per-fd token that changes with
// every new request; a completion whose token is not the fd's current one
// belongs to an earlier registration (or an interest since changed) and is
// dropped. Adds and re-arms are batched into the next wait's submission.
//
// A pending poll request holds a reference to its file: while it is in the
// kernel, close() does not close the socket (a listener keeps its port). So
// a remove cancels every request on the fd and reaps their completions before
// it returns, and the destructor does the same for all fds before it tears the
// ring down (the kernel's own teardown of a ring is asynchronous: its requests,
// and the files they hold, go some milliseconds later, from a worker).
#include <liburing.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "backend.hpp"
#include "completion_io.hpp"

namespace evmux::detail {
namespace {

constexpr unsigned sq_entries = 256;
constexpr unsigned cq_entries = 4096;  // more completions than that wait in the kernel (NODROP)
constexpr std::uint32_t control_bit = 0x8000'0000u;  // in the token half: not a poll request
// In the token half: a completion request, whose low bits are its CompletionOp's
// address (a user-space pointer, below 2^47).
constexpr std::uint32_t op_bit = 0x4000'0000u;
constexpr std::uint32_t token_mask = 0x3fff'ffffu;
constexpr std::uint64_t op_tag = std::uint64_t{op_bit} << 32;
// A completion request's user_data: the tag, its op's address and, in the
// address's lowest bit (an op is aligned), whether the op is early, so that
// sorting a completion does not load the op (one cache miss per completion
// at a thousand connections: the op is loaded again in dispatch()).
constexpr std::uint64_t early_bit = 1;
static_assert(alignof(CompletionOp) > early_bit);
std::uint64_t op_data(const CompletionOp* op) {
    return op_tag | reinterpret_cast<std::uintptr_t>(op) | (op->early ? early_bit : 0);
}

// The provided receive buffers of completion I/O, shared by a loop's
// connections, 2 MiB in all: a receive's bytes (a part of a buffer) are held
// from its completion to the end of that on_message, or until a send lent
// them has gone out. Where the kernel consumes buffers incrementally
// (IOU_PBUF_RING_INC, Linux 6.12) a buffer is 64 KiB and each receive takes
// only what it brought: a 16 KiB message is one receive, a 64 B one takes
// 64 B; the buffer goes back to the ring once the kernel has filled it and
// every part of it has been let go. Elsewhere each receive takes a whole
// buffer, so they are small (4 KiB) and many.
constexpr unsigned incremental_buffer_count = 32;  // powers of two
constexpr unsigned incremental_buffer_size = 64 * 1024;
constexpr unsigned whole_buffer_count = 512;
constexpr unsigned whole_buffer_size = 4096;
constexpr int buffer_group = 0;

// Newer than Debian's 6.1-era headers: io_uring_buf_reg's flags (called `pad`
// there) and the completion flag saying the kernel goes on filling the buffer.
constexpr std::uint16_t pbuf_ring_inc = 2;          // IOU_PBUF_RING_INC
constexpr std::uint16_t accept_dontwait = 1u << 1;  // IORING_ACCEPT_DONTWAIT, in sqe->ioprio
constexpr std::uint32_t cqe_f_buf_more = 1u << 4;   // IORING_CQE_F_BUF_MORE

// Test and diagnostic knobs, read once per process:
//  EVMUX_URING_BUFFERS=N       N provided receive buffers per loop (a power of
//                              two, 1-32768) instead of 32 (or 512 without
//                              incremental consumption): a small ring makes
//                              receives run out of buffers (ENOBUFS).
//  EVMUX_URING_INCREMENTAL=off act as a kernel without incremental buffer
//                              consumption: 4 KiB buffers, one per receive.
//  EVMUX_URING_RECV_LIMIT=off  act as a kernel without the multishot receive's
//                              byte limit: one-shot receives.
//  EVMUX_URING_CLOSE=off       act as a kernel without IORING_OP_CLOSE: a
//                              connection's socket is closed by close().
//  EVMUX_URING_COMPLETION=off  act as a kernel without what completion I/O
//                              needs: io_uring is readiness only.
struct Knobs {
    unsigned buffers = 0;  // 0: the default for the kind of buffers
    bool incremental_off = false;
    bool recv_limit_off = false;
    bool close_off = false;
    bool completion_off = false;
    std::string error;  // a bad value: what is wrong
};

// An on/off knob: true if `name` is "off"; unset or empty, false; anything
// else sets `error` (the first bad knob's) and gives false.
bool off_knob(const char* name, std::string& error) {
    const char* v = std::getenv(name);
    if (!v || *v == '\0') return false;
    if (std::strcmp(v, "off") == 0) return true;
    if (error.empty()) {
        error = "evmux: ";
        error += name;
        error += " must be 'off' (or unset), not '";
        error += v;
        error += "'";
    }
    return false;
}

Knobs read_knobs() {
    Knobs k;
    if (const char* v = std::getenv("EVMUX_URING_BUFFERS")) {
        char* end = nullptr;
        errno = 0;
        const unsigned long n = std::strtoul(v, &end, 10);
        if (*v < '0' || *v > '9' || *end != '\0' || errno != 0 || n == 0 || n > 32768 ||
            (n & (n - 1)) != 0) {
            k.error = "evmux: EVMUX_URING_BUFFERS must be a power of two from 1 to 32768, not '";
            k.error += v;
            k.error += "'";
        } else {
            k.buffers = static_cast<unsigned>(n);
        }
    }
    k.incremental_off = off_knob("EVMUX_URING_INCREMENTAL", k.error);
    k.recv_limit_off = off_knob("EVMUX_URING_RECV_LIMIT", k.error);
    k.close_off = off_knob("EVMUX_URING_CLOSE", k.error);
    k.completion_off = off_knob("EVMUX_URING_COMPLETION", k.error);
    return k;
}

const Knobs& knobs() {
    static const Knobs k = read_knobs();
    return k;
}

std::uint64_t encode(std::uint32_t token, int fd) {
    return (std::uint64_t{token} << 32) | static_cast<std::uint32_t>(fd);
}

[[noreturn]] void fail(int negative_errno, const char* what) {
    throw std::system_error(-negative_errno, std::generic_category(), what);
}

// Sets up `ring`: the flags that make a poll loop cheaper where the kernel has
// them, fewer where it does not. Returns 0 or -errno from io_uring_setup.
int init_ring(io_uring* ring) {
    const unsigned wanted[] = {
        // SUBMIT_ALL: a bad fd in one request does not stop the rest of the batch.
        // COOP_TASKRUN: no IPI per completion; TASKRUN_FLAG tells liburing to
        // enter the kernel when completions are waiting to be posted.
        IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN |
            IORING_SETUP_TASKRUN_FLAG,
        IORING_SETUP_CQSIZE,
    };
    int ret = -EINVAL;
    for (unsigned flags : wanted) {
        io_uring_params params{};
        params.flags = flags;
        params.cq_entries = cq_entries;
        ret = io_uring_queue_init_params(sq_entries, ring, &params);
        if (ret != -EINVAL) break;
    }
    return ret;
}

// ---- the completion I/O probe ladder ------------------------------------------------
// Each piece Connection and the acceptor use is tried once per process on a
// ring of its own: the opcodes through the probe API, a provided buffer ring
// by registering one, multishot receive and accept by running them on a
// socketpair and an abstract Unix listener. Any piece missing: the loop stays
// with readiness, and says why.

struct CompletionProbe {
    std::string missing;        // empty: completion I/O works here
    std::string features;       // what was found
    bool limited_recv = false;  // a multishot receive takes a byte limit (sqe->optlen)
    bool close = false;         // IORING_OP_CLOSE (Linux 5.6)
    bool incremental = false;   // IOU_PBUF_RING_INC (Linux 6.12)
};

// Bytes one multishot receive takes before it ends and is armed again: the
// connection's chance to stop reading (water marks, pause) between requests,
// as the readiness path's read budget; it also bounds what arrives after a
// pause, before the cancel reaches the kernel.
constexpr std::uint32_t recv_limit = 64 * 1024;

// Runs one request on `ring` and waits (at most 1 s) for its first completion.
bool first_completion(io_uring* ring, io_uring_cqe& out) {
    io_uring_submit(ring);
    __kernel_timespec ts{1, 0};
    io_uring_cqe* cqe = nullptr;
    if (io_uring_wait_cqe_timeout(ring, &cqe, &ts) < 0 || !cqe) return false;
    out = *cqe;
    io_uring_cqe_seen(ring, cqe);
    return true;
}

// For a receive probe: a ring of its own (a request may still post its end
// after the probe), one 64-byte provided buffer in group 7, registered with
// `flags` (io_uring_buf_reg's, `pad` in 6.1's headers), and a socketpair.
// `error` says what could not be set up.
struct RecvProbe {
    io_uring ring{};
    void* mem = nullptr;
    char buf[64] = {};
    int sv[2] = {-1, -1};
    std::string error;

    explicit RecvProbe(std::uint16_t flags) {
        if (int ret = io_uring_queue_init(4, &ring, 0); ret < 0) {
            error = std::string("io_uring_setup: ") + std::strerror(-ret);
            ring.ring_fd = -1;
            return;
        }
        if (posix_memalign(&mem, 4096, 4096) != 0) {
            error = "no memory for the probe";
            return;
        }
        auto* br = static_cast<io_uring_buf_ring*>(mem);
        io_uring_buf_ring_init(br);
        io_uring_buf_reg reg{};
        reg.ring_addr = reinterpret_cast<std::uint64_t>(br);
        reg.ring_entries = 1;
        reg.bgid = 7;
        reg.pad = flags;
        if (int ret = io_uring_register_buf_ring(&ring, &reg, 0); ret < 0) {
            error = std::string("provided buffer rings (io_uring_register_buf_ring: ") +
                    std::strerror(-ret) + ")";
        } else if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
            error = std::string("socketpair: ") + std::strerror(errno);
        } else {
            io_uring_buf_ring_add(br, buf, sizeof buf, 0, io_uring_buf_ring_mask(1), 0);
            io_uring_buf_ring_advance(br, 1);
        }
    }
    ~RecvProbe() {
        for (int fd : sv)
            if (fd >= 0) ::close(fd);
        if (ring.ring_fd >= 0) io_uring_queue_exit(&ring);
        std::free(mem);
    }
    RecvProbe(const RecvProbe&) = delete;
    RecvProbe& operator=(const RecvProbe&) = delete;

    // A receive into the buffer (`multishot`: with the byte limit `limit`).
    void recv(bool multishot, std::uint32_t limit = 0) {
        io_uring_sqe* sqe = io_uring_get_sqe(&ring);
        if (multishot) {
            io_uring_prep_recv_multishot(sqe, sv[0], nullptr, 0, 0);
            sqe->file_index = limit;  // sqe->optlen in newer headers
        } else {
            io_uring_prep_recv(sqe, sv[0], nullptr, sizeof buf, 0);
        }
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = 7;
    }
};

// A multishot receive on a socketpair. `limit` 0: expects one byte with a
// buffer and "more". Otherwise sets the request's byte limit (sqe->optlen,
// which 6.1's headers call file_index), sends 3 bytes and expects the request
// to end with them (a kernel without limits goes on, or refuses the field).
// Returns what is missing, or "".
std::string probe_recv(std::uint32_t limit, const char* what) {
    RecvProbe p(0);
    if (!p.error.empty()) return p.error;
    p.recv(true, limit);
    [[maybe_unused]] ssize_t n = ::write(p.sv[1], "xyz", limit == 0 ? 1 : 3);
    io_uring_cqe cqe{};
    const bool got = first_completion(&p.ring, cqe) && cqe.flags & IORING_CQE_F_BUFFER;
    const bool more = cqe.flags & IORING_CQE_F_MORE;
    // With a limit, the receive that reaches it ends the request (it may
    // take a little more: the limit is checked after each receive).
    if (!got || (limit == 0 ? cqe.res != 1 || !more : cqe.res <= 0 || more)) return what;
    return "";
}

// Incremental buffer consumption: the buffer registered with
// IOU_PBUF_RING_INC, two receives of 1 and 2 bytes: each must say the kernel
// goes on with the buffer (IORING_CQE_F_BUF_MORE) and name the same buffer,
// and the second's bytes must follow the first's. A kernel without it
// refuses the flag (EINVAL), or ignores it and gives no BUF_MORE.
bool probe_incremental() {
    RecvProbe p(pbuf_ring_inc);
    if (!p.error.empty()) return false;
    for (const std::string bytes : {"x", "yz"}) {
        p.recv(false);
        const auto len = static_cast<std::int32_t>(bytes.size());
        io_uring_cqe cqe{};
        if (::write(p.sv[1], bytes.data(), bytes.size()) != len ||
            !first_completion(&p.ring, cqe) || cqe.res != len ||
            !(cqe.flags & IORING_CQE_F_BUFFER) || !(cqe.flags & cqe_f_buf_more) ||
            cqe.flags >> IORING_CQE_BUFFER_SHIFT != 0)
            return false;
    }
    return std::memcmp(p.buf, "xyz", 3) == 0;
}

// Accept, on a ring of its own (the receive's request may still post its end):
// an abstract Unix listener, one connect, expecting a fd and "more".
std::string probe_multishot_accept() {
    io_uring ring_storage{};
    if (int ret = io_uring_queue_init(4, &ring_storage, 0); ret < 0)
        return std::string("io_uring_setup: ") + std::strerror(-ret);
    io_uring* ring = &ring_storage;
    std::string missing;
    int lfd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0) return std::string("socket: ") + std::strerror(errno);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;  // autobind: an abstract name of the kernel's choosing
    socklen_t len = sizeof(sa_family_t);
    int cfd = -1;
    if (::bind(lfd, reinterpret_cast<sockaddr*>(&addr), len) == 0 && ::listen(lfd, 4) == 0 &&
        ::getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &(len = sizeof addr)) == 0) {
        io_uring_prep_multishot_accept(io_uring_get_sqe(ring), lfd, nullptr, nullptr, SOCK_CLOEXEC);
        io_uring_submit(ring);
        cfd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        io_uring_cqe cqe{};
        if (cfd < 0 || ::connect(cfd, reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
            !first_completion(ring, cqe) || cqe.res < 0 || !(cqe.flags & IORING_CQE_F_MORE))
            missing = "multishot accept (Linux 5.19)";
        if (cqe.res > 0) ::close(cqe.res);
    } else {
        missing = std::string("a Unix listener for the probe: ") + std::strerror(errno);
    }
    if (cfd >= 0) ::close(cfd);
    ::close(lfd);
    io_uring_queue_exit(ring);
    return missing;
}

// The receive buffers: their size and (unless EVMUX_URING_BUFFERS says) count.
unsigned recv_buffer_size(const CompletionProbe& p) {
    return p.incremental ? incremental_buffer_size : whole_buffer_size;
}
unsigned recv_buffer_count(const CompletionProbe& p) {
    if (knobs().buffers != 0) return knobs().buffers;
    return p.incremental ? incremental_buffer_count : whole_buffer_count;
}

CompletionProbe run_completion_probe() {
    CompletionProbe p;
    if (knobs().completion_off) {
        p.missing = "EVMUX_URING_COMPLETION=off";
        return p;
    }
    io_uring ring{};
    if (int ret = io_uring_queue_init(8, &ring, 0); ret < 0) {
        p.missing = std::string("io_uring_setup: ") + std::strerror(-ret);
        return p;
    }
    io_uring_probe* ops = io_uring_get_probe_ring(&ring);
    const struct {
        int op;
        const char* name;
    } needed[] = {{IORING_OP_RECV, "IORING_OP_RECV"},
                  {IORING_OP_SEND, "IORING_OP_SEND"},
                  {IORING_OP_SENDMSG, "IORING_OP_SENDMSG"},
                  {IORING_OP_ACCEPT, "IORING_OP_ACCEPT"},
                  {IORING_OP_ASYNC_CANCEL, "IORING_OP_ASYNC_CANCEL"}};
    if (!ops) {
        p.missing = "the operation probe (IORING_REGISTER_PROBE)";
    } else {
        for (const auto& n : needed)
            if (!io_uring_opcode_supported(ops, n.op)) {
                p.missing = n.name;
                break;
            }
        // Optional: without it a connection's socket is closed by close().
        p.close = !knobs().close_off && io_uring_opcode_supported(ops, IORING_OP_CLOSE);
        io_uring_free_probe(ops);
    }
    io_uring_queue_exit(&ring);
    if (p.missing.empty())
        p.missing = probe_recv(0, "multishot receive into provided buffers (Linux 6.0)");
    if (p.missing.empty()) p.missing = probe_multishot_accept();
    if (!p.missing.empty()) return p;
    // Optional: without a byte limit per multishot receive, each receive is
    // one request (a buffer at most), re-armed with the next wait.
    p.limited_recv = !knobs().recv_limit_off && probe_recv(1, "x").empty();
    // Optional: without it each receive takes a whole (smaller) buffer.
    p.incremental = !knobs().incremental_off && probe_incremental();
    p.features =
        std::string(p.limited_recv           ? "multishot recv (64 KiB per request)"
                    : knobs().recv_limit_off ? "one-shot recv (EVMUX_URING_RECV_LIMIT=off)"
                                             : "one-shot recv (no multishot byte limit here)") +
        " into a provided buffer ring (" + std::to_string(recv_buffer_count(p)) + " x " +
        std::to_string(recv_buffer_size(p)) + " B, " +
        (p.incremental             ? "consumed incrementally"
         : knobs().incremental_off ? "a buffer per receive: EVMUX_URING_INCREMENTAL=off"
                                   : "a buffer per receive: no incremental consumption here") +
        "), multishot accept, send/sendmsg requests, " +
        (p.close             ? "close requests"
         : knobs().close_off ? "close() calls (EVMUX_URING_CLOSE=off)"
                             : "close() calls (no IORING_OP_CLOSE here)") +
        "; off: FIN requests (IORING_OP_SHUTDOWN runs on an io-wq thread), "
        "SINGLE_ISSUER|DEFER_TASKRUN (a loop may be run and destroyed by different threads), "
        "zero-copy send (slower on loopback)";
    return p;
}

const CompletionProbe& completion_probe() {
    static const CompletionProbe p = run_completion_probe();
    return p;
}

std::string completion_unusable() {
    const std::string& missing = completion_probe().missing;
    if (missing.empty()) return std::string();
    return knobs().completion_off ? "turned off (" + missing + ")" : "the kernel lacks " + missing;
}

std::string features_text() {
    return completion_probe().features;
}

class IoUringSelector final : public Selector, public CompletionIo {
  public:
    IoUringSelector() {
        if (int ret = init_ring(&ring_); ret < 0) fail(ret, "io_uring_setup");
    }
    ~IoUringSelector() override {
        // io_uring_queue_exit() only starts the ring's teardown; pending polls
        // would hold their files for a few more milliseconds. Let go of them now.
        try {
            for (std::size_t fd = 0; fd < slots_.size(); ++fd)
                if (slots_[fd].armed) cancel(static_cast<int>(fd), slots_[fd].token);
            queue_cancels();
            settle([this] { return in_flight_ == 0; });
        } catch (const std::system_error&) {
            // The ring still drops them, a little later.
        }
        // A close request made after the loop's last wait still runs.
        if (io_uring_sq_ready(&ring_) > 0) io_uring_submit(&ring_);
        if (buffers_) io_uring_unregister_buf_ring(&ring_, buffer_group);
        io_uring_queue_exit(&ring_);
        if (buffers_) std::free(buffers_);
        if (buf_ring_) std::free(buf_ring_);
    }
    std::string name() const override { return "io_uring"; }

  protected:
    void backend_add(const SelectorKey& key) override {
        if (static_cast<std::size_t>(key.fd) >= slots_.size()) slots_.resize(key.fd * 2 + 64);
        Slot& s = slots_[key.fd];
        s.registered = true;
        s.closed = false;
        s.armed = false;
        s.multishot = false;
        s.generation = key.generation;
        s.interest = key.interest;
        s.token = (s.token + 1) & token_mask;
        queue_arm(key.fd);  // submitted by the next wait: no system call per add
    }

    void backend_modify(const SelectorKey&, const SelectorKey& key) override {
        Slot& s = slots_[key.fd];
        if (s.armed) {
            // Cancel and ask again with the new mask (both ride on the next
            // submission). A completion of the old request carries the old
            // token and is dropped; the new request re-reads the state, so
            // nothing is lost.
            cancel(key.fd, s.token);
            s.armed = false;
            s.token = (s.token + 1) & token_mask;
        }
        s.interest = key.interest;
        s.multishot = false;
        s.closed = false;  // a modify re-enables an fd set aside as closed
        queue_arm(key.fd);
    }

    void backend_remove(const SelectorKey& key) override {
        const int fd = key.fd;
        Slot& s = slots_[fd];
        const bool armed = s.armed;
        const std::uint32_t token = s.token;
        s.registered = false;
        s.armed = false;
        s.token = (s.token + 1) & token_mask;  // whatever is still in the CQ is stale
        if (s.in_flight == 0) return;          // no request holds the file: no system call
        // A pending poll holds a reference to the file: cancel it now and wait
        // for its completion, so that a close() right after this really closes.
        // Older requests on the fd (replaced by a modify, or a multishot poll
        // given up) have their cancel queued already: it goes out with this one.
        try {
            if (armed) cancel(fd, token);
            queue_cancels();
            settle([this, fd] { return slots_[fd].in_flight == 0; });
        } catch (const std::system_error&) {
            // Must not throw; the ring drops the request when it is destroyed.
        }
    }

    // One wait. Completions that report nothing (stale tokens, cancels, a
    // closed fd) leave ready_ empty; Selector::select() then waits again for
    // what is left of the timeout, as after EINTR.
    bool backend_wait(Timeout timeout) override {
        prepare_gathered();
        arm_queued();
        int ret;
        if (timeout && timeout->count() <= 0) {
            ret = io_uring_submit_and_get_events(&ring_);
        } else {
            __kernel_timespec ts{};
            if (timeout) {
                ts.tv_sec = timeout->count() / 1'000'000'000;
                ts.tv_nsec = timeout->count() % 1'000'000'000;  // ns: no rounding needed
            }
            io_uring_cqe* cqe = nullptr;
            // Without a timeout, one io_uring_enter() with no more of
            // liburing around it (its timed wait peeks at the ring before
            // and after: ~150 instructions a wait).
            ret = timeout ? io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &ts, nullptr)
                          : io_uring_submit_and_wait(&ring_, 1);
        }
        if (ret == -EINTR) return false;
        // ETIME: the wait timed out. EBUSY/EAGAIN: completions back up in
        // the kernel (CQ overflow); reaping them below makes room.
        if (ret < 0 && ret != -ETIME && ret != -EBUSY && ret != -EAGAIN)
            fail(ret, "io_uring_enter");
        reap();
        set_other_work(!done_.empty() || !done_early_.empty());  // the wait has news
        return true;
    }

    // ---- completion I/O -----------------------------------------------------------

    bool enable_completion(std::string& why) override {
        if (buffers_) return true;
        if (!knobs().error.empty()) throw std::invalid_argument(knobs().error);
        why = completion_unusable();
        if (!why.empty()) return false;
        // The ring of buffer descriptors must be page-aligned; the buffers need not.
        void* ring_mem = nullptr;
        const unsigned buffer_count = recv_buffer_count(completion_probe());
        buffer_size_ = recv_buffer_size(completion_probe());
        const std::size_t ring_bytes =
            std::max<std::size_t>(buffer_count * sizeof(io_uring_buf), 4096);
        if (posix_memalign(&ring_mem, 4096, ring_bytes) != 0) {
            why = "no memory for the receive buffer ring";
            return false;
        }
        auto* br = static_cast<io_uring_buf_ring*>(ring_mem);
        io_uring_buf_ring_init(br);
        io_uring_buf_reg reg{};
        reg.ring_addr = reinterpret_cast<std::uint64_t>(br);
        reg.ring_entries = buffer_count;
        reg.bgid = buffer_group;
        if (completion_probe().incremental) reg.pad = pbuf_ring_inc;  // `flags` in newer headers
        if (int ret = io_uring_register_buf_ring(&ring_, &reg, 0); ret < 0) {
            std::free(ring_mem);
            why = std::string("io_uring_register_buf_ring: ") + std::strerror(-ret);
            return false;
        }
        buffers_ = static_cast<char*>(std::malloc(std::size_t{buffer_count} * buffer_size_));
        if (!buffers_) {
            io_uring_unregister_buf_ring(&ring_, buffer_group);
            std::free(ring_mem);
            why = "no memory for the receive buffers";
            return false;
        }
        buf_ring_ = br;
        buffer_mask_ = io_uring_buf_ring_mask(buffer_count);
        recv_buffers_.assign(buffer_count, RecvBuffer{});
        set_lend_limit(buffer_count, buffer_count / 4);
        const int mask = buffer_mask_;
        for (unsigned i = 0; i < buffer_count; ++i)
            io_uring_buf_ring_add(br, buffers_ + std::size_t{i} * buffer_size_, buffer_size_,
                                  static_cast<unsigned short>(i), mask, static_cast<int>(i));
        io_uring_buf_ring_advance(br, static_cast<int>(buffer_count));
        // One slot for shed_accept() (Linux 5.19); without it the acceptor
        // sheds with its spare fd.
        file_table_ = io_uring_register_files_sparse(&ring_, 1) == 0;
        return true;
    }

    std::string completion_features() const override { return features_text(); }
    bool incremental() const override { return completion_probe().incremental; }

    void recv_multishot(int fd, CompletionOp* op) override {
        io_uring_sqe* sqe = op_sqe(op);
        if (completion_probe().limited_recv) {
            io_uring_prep_recv_multishot(sqe, fd, nullptr, 0, 0);
            sqe->file_index = recv_limit;  // sqe->optlen in newer headers: the byte limit
        } else {
            io_uring_prep_recv(sqe, fd, nullptr, buffer_size_, 0);
        }
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = buffer_group;
    }

    void send(int fd, const void* data, std::size_t len, CompletionOp* op) override {
        io_uring_prep_send(op_sqe(op), fd, data, len, MSG_NOSIGNAL);
    }

    void sendmsg(int fd, const msghdr* msg, CompletionOp* op) override {
        io_uring_prep_sendmsg(op_sqe(op), fd, msg, MSG_NOSIGNAL);
    }

    void accept_multishot(int fd, CompletionOp* op) override {
        io_uring_prep_multishot_accept(op_sqe(op), fd, nullptr, nullptr,
                                       SOCK_NONBLOCK | SOCK_CLOEXEC);
    }

    bool sheds_accepts() const override { return file_table_; }

    // A direct descriptor (the kernel refuses SOCK_CLOEXEC for one) in slot 0
    // of the ring's file table, closed there by a linked request; with
    // IORING_ACCEPT_DONTWAIT (Linux 6.10) an empty backlog is -EAGAIN, not a
    // wait (an older kernel refuses the flag: -EINVAL). The close's
    // completion is ignored (-ECANCELED when nothing was accepted).
    void shed_accept(int fd, CompletionOp* op) override {
        io_uring_sqe* sqe = op_sqe(op);
        io_uring_prep_accept_direct(sqe, fd, nullptr, nullptr, 0, 0);
        sqe->ioprio |= accept_dontwait;
        sqe->flags |= IOSQE_IO_LINK;
        io_uring_sqe* close = get_sqe();
        io_uring_prep_close_direct(close, 0);
        io_uring_sqe_set_data64(close, std::uint64_t{control_bit} << 32);
        if (ring_.features & IORING_FEAT_CQE_SKIP) close->flags |= IOSQE_CQE_SKIP_SUCCESS;
    }

    bool close_requests() const override { return completion_probe().close; }

    void submit() override {
        prepare_gathered();
        if (io_uring_sq_ready(&ring_) == 0) return;
        if (int ret = io_uring_submit(&ring_); ret == -EBUSY || ret == -EAGAIN)
            stash_completions();  // the next wait submits them
    }

    // No completion on success (where the kernel skips it): a close must not
    // wake the loop for another iteration. A failed one's is ignored, as
    // close()'s result is. It runs inline as it is submitted (a socket has no
    // flush), so submitting it is enough: nothing waits for it.
    void close(int fd) override {
        io_uring_sqe* sqe = get_sqe();
        io_uring_prep_close(sqe, fd);
        io_uring_sqe_set_data64(sqe, std::uint64_t{control_bit} << 32);
        if (ring_.features & IORING_FEAT_CQE_SKIP) sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    }

    void prepare_before_wait(CompletionOp* op) override { to_prepare_.push_back(op); }

    void cancel(CompletionOp* target) override {
        io_uring_sqe* sqe = get_sqe();
        io_uring_prep_cancel64(sqe, op_data(target), 0);
        io_uring_sqe_set_data64(sqe, std::uint64_t{control_bit} << 32);
    }

    void cancel_and_wait(CompletionOp* target) override {
        const std::uint64_t user_data = op_data(target);
        auto ended = [&] {
            for (const Completion& c : stashed_)
                if (c.user_data == user_data && !(c.flags & IORING_CQE_F_MORE)) return true;
            for (const Done& d : done_)
                if (d.op == target && !(d.flags & IORING_CQE_F_MORE)) return true;
            for (const Done& d : done_early_)
                if (d.op == target && !(d.flags & IORING_CQE_F_MORE)) return true;
            return false;
        };
        try {
            cancel(target);
            settle(ended);
        } catch (const std::system_error&) {
            // The request ends with the ring, a little later.
        }
    }

    char* buffer() override { return part_; }

    // A part let go: its buffer goes back to the kernel when the kernel has
    // filled it and no other part of it is held.
    void recycle(std::uint32_t flags) override {
        const unsigned bid = buffer_id(flags);
        RecvBuffer& b = recv_buffers_[bid];
        if (--b.parts != 0 || !b.filled) return;
        b = RecvBuffer{};
        io_uring_buf_ring_add(buf_ring_, buffers_ + std::size_t{bid} * buffer_size_, buffer_size_,
                              static_cast<unsigned short>(bid), buffer_mask_, 0);
        io_uring_buf_ring_advance(buf_ring_, 1);
    }

    std::size_t dispatch() override {
        // A completion's handler may submit (never reap: reaping happens in
        // waits, and in settle() into stashed_), so the lists do not grow
        // under us. The early ones first (handle() sorted them).
        for (const Done& d : done_early_) {
            part_ = d.part;
            d.op->complete(d.op, d.res, d.flags);
        }
        for (const Done& d : done_) {
            part_ = d.part;
            d.op->complete(d.op, d.res, d.flags);
        }
        const std::size_t ran = done_early_.size() + done_.size();
        done_early_.clear();
        done_.clear();
        set_other_work(false);
        return ran;
    }

    void drain() override {
        for (int round = 0; round < 100; ++round) {
            prepare_gathered();
            reap();  // what settle() or a full submission queue stashed, too
            dispatch();
            if (ops_in_flight_ == 0 && stashed_.empty() && to_prepare_.empty()) break;
            settle([this] { return ops_in_flight_ == 0; });
        }
    }

  private:
    // The sends prepare_before_wait() gathered, made into requests. Index-based:
    // a prepare() may ask again (it does not; cheap to allow).
    void prepare_gathered() {
        for (std::size_t i = 0; i < to_prepare_.size(); ++i)
            to_prepare_[i]->prepare(to_prepare_[i]);
        to_prepare_.clear();
    }

    struct Slot {
        std::uint32_t token = 0;  // of the current request; 31 bits
        std::uint32_t generation = 0;
        Events interest = Events::none;
        bool registered = false;
        bool armed = false;      // a poll request with `token` is in the kernel
        bool queued = false;     // in to_arm_
        bool closed = false;     // the kernel said EBADF: set aside until modify
        bool multishot = false;  // the request is (or will be) a multishot poll
        // Poll requests on this fd, of any token, prepared and not yet
        // finished (their last completion not yet taken from the ring): each
        // holds a reference to the file.
        std::uint32_t in_flight = 0;
    };
    struct Completion {
        std::uint64_t user_data;
        std::int32_t res;
        std::uint32_t flags;
    };
    struct Done {  // a completion request's completion, for dispatch()
        CompletionOp* op = nullptr;
        std::int32_t res = 0;
        std::uint32_t flags = 0;
        char* part = nullptr;  // a receive's bytes in its provided buffer
    };
    // A provided receive buffer's parts. The kernel fills a buffer from its
    // start, receive after receive in the order their completions are posted
    // (incremental consumption; otherwise one receive fills it), so a
    // completion's bytes start where the previous one's in that buffer ended.
    struct RecvBuffer {
        std::uint32_t used = 0;   // bytes the kernel has put in it so far
        std::uint32_t parts = 0;  // receives of it not yet recycled
        bool filled = false;      // the kernel has let go of it (no BUF_MORE)
    };

    // An SQE for a completion request of `op`, counted in flight until its last completion.
    io_uring_sqe* op_sqe(CompletionOp* op) {
        io_uring_sqe* sqe = get_sqe();
        ++ops_in_flight_;
        io_uring_sqe_set_data64(sqe, op_data(op));
        return sqe;
    }

    void queue_arm(int fd) {
        Slot& s = slots_[fd];
        if (s.queued) return;
        s.queued = true;
        to_arm_.push_back(fd);
    }

    // The cancels handle() queued (it cannot take SQEs while walking the CQ).
    void queue_cancels() {
        for (std::uint64_t user_data : to_cancel_) {
            io_uring_sqe* sqe = get_sqe();
            io_uring_prep_poll_remove(sqe, user_data);
            io_uring_sqe_set_data64(sqe,
                                    (std::uint64_t{control_bit} << 32) | (user_data & 0xffffffffu));
        }
        to_cancel_.clear();
    }

    void arm_queued() {
        queue_cancels();
        for (int fd : to_arm_) {
            Slot& s = slots_[fd];
            s.queued = false;
            if (!s.registered || s.armed || s.closed) continue;
            io_uring_sqe* sqe = get_sqe();
            const auto mask = static_cast<unsigned>(poll_mask(s.interest));
            if (s.multishot)
                io_uring_prep_poll_multishot(sqe, fd, mask);
            else
                io_uring_prep_poll_add(sqe, fd, mask);
            io_uring_sqe_set_data64(sqe, encode(s.token, fd));
            s.armed = true;
            ++s.in_flight;
            ++in_flight_;
        }
        to_arm_.clear();
    }

    void cancel(int fd, std::uint32_t token) {
        io_uring_sqe* sqe = get_sqe();
        io_uring_prep_poll_remove(sqe, encode(token, fd));
        io_uring_sqe_set_data64(sqe, encode(control_bit, fd));
    }

    // A free SQE; when the submission queue is full, submit what is there.
    io_uring_sqe* get_sqe() {
        for (int tries = 0;; ++tries) {
            if (io_uring_sqe* sqe = io_uring_get_sqe(&ring_)) return sqe;
            int ret = io_uring_submit(&ring_);
            if (ret == -EBUSY || ret == -EAGAIN) {
                // The kernel will not take more until completions are reaped:
                // keep them for the next wait.
                stash_completions();
                if (tries > 1000) fail(ret, "io_uring_submit");
            } else if (ret < 0 && ret != -EINTR) {
                fail(ret, "io_uring_submit");
            }
        }
    }

    // Submits what is queued and takes completions from the ring (kept for
    // the next wait) until done(). Usually one system call: a cancelled poll
    // completes in the task work that runs before io_uring_enter() returns.
    // Bounded (100 waits of 10 ms): a remove() or a destructor must not hang.
    template <class Done>
    void settle(Done done) {
        for (int round = 0; !done() && round < 100; ++round) {
            if (round == 0) {
                io_uring_submit_and_get_events(&ring_);
            } else {
                __kernel_timespec ts{0, 10'000'000};
                io_uring_cqe* cqe = nullptr;
                io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &ts, nullptr);
            }
            stash_completions();
        }
    }

    // Counts a completion taken from the ring: the last one of a poll request
    // means the kernel let go of it, and of its file.
    void finished(const io_uring_cqe* cqe) {
        const auto token = static_cast<std::uint32_t>(cqe->user_data >> 32);
        const auto fd32 = static_cast<std::uint32_t>(cqe->user_data);
        if (token & control_bit || cqe->flags & IORING_CQE_F_MORE) return;
        if (token & op_bit) {
            --ops_in_flight_;
            return;
        }
        if (fd32 >= slots_.size()) return;
        --slots_[fd32].in_flight;
        --in_flight_;
    }

    void stash_completions() {
        unsigned head;
        unsigned n = 0;
        io_uring_cqe* cqe;
        io_uring_for_each_cqe(&ring_, head, cqe) {
            finished(cqe);
            stashed_.push_back(Completion{cqe->user_data, cqe->res, cqe->flags});
            ++n;
        }
        io_uring_cq_advance(&ring_, n);
        if (io_uring_cq_has_overflow(&ring_)) io_uring_get_events(&ring_);
    }

    // Handles every completion there is.
    void reap() {
        for (const Completion& c : stashed_) handle(c.user_data, c.res, c.flags, false);
        stashed_.clear();
        for (;;) {
            unsigned head;
            unsigned n = 0;
            io_uring_cqe* cqe;
            io_uring_for_each_cqe(&ring_, head, cqe) {
                handle(cqe->user_data, cqe->res, cqe->flags, true);
                ++n;
            }
            io_uring_cq_advance(&ring_, n);
            // More completions than the CQ holds were kept by the kernel (it
            // has IORING_FEAT_NODROP); flush them into the ring and go on.
            if (!io_uring_cq_has_overflow(&ring_)) break;
            io_uring_get_events(&ring_);
        }
    }

    // `count`: taken from the ring now, not stashed (stash_completions()
    // counted those with finished() as it took them). Inline, the part for
    // completion requests (most completions, under completion I/O); a poll
    // request's out of line.
    [[gnu::always_inline]] void handle(std::uint64_t user_data, std::int32_t res,
                                       std::uint32_t flags, bool count) {
        const auto token = static_cast<std::uint32_t>(user_data >> 32);
        const bool last = !(flags & IORING_CQE_F_MORE);
        // Cancels (and liburing's own timeout, user_data ~0) report nothing.
        if (token & control_bit) return;
        if (!(token & op_bit)) return handle_poll(user_data, res, flags, count);
        if (count && last) --ops_in_flight_;
        auto* op = reinterpret_cast<CompletionOp*>(user_data & ~(op_tag | early_bit));
        char* part = nullptr;
        if (flags & IORING_CQE_F_BUFFER && res > 0) {
            // Where this receive's bytes are: handled in the order the
            // kernel posted them (stashed ones first), as it filled the buffer.
            const unsigned bid = buffer_id(flags);
            RecvBuffer& b = recv_buffers_[bid];
            part = buffers_ + std::size_t{bid} * buffer_size_ + b.used;
            b.used += static_cast<std::uint32_t>(res);
            ++b.parts;
            b.filled = !(flags & cqe_f_buf_more);
        }
        (user_data & early_bit ? done_early_ : done_).push_back(Done{op, res, flags, part});
    }

    // A poll request's completion (handle()).
    [[gnu::noinline]] void handle_poll(std::uint64_t user_data, std::int32_t res,
                                       std::uint32_t flags, bool count) {
        const auto token = static_cast<std::uint32_t>(user_data >> 32);
        const auto fd32 = static_cast<std::uint32_t>(user_data);
        const bool last = !(flags & IORING_CQE_F_MORE);
        if (fd32 >= slots_.size()) return;
        const int fd = static_cast<int>(fd32);
        Slot& s = slots_[fd];
        if (count && last) {  // as finished()
            --s.in_flight;
            --in_flight_;
        }
        if (!s.registered || token != s.token) return;  // an earlier request
        if (last) s.armed = false;
        if (res == -EBADF) {
            // Closed without remove(): report nothing and stop asking, as the
            // poll backend does on POLLNVAL, so the wait does not spin.
            s.closed = true;
            return;
        }
        if (res < 0) {  // e.g. ECANCELED, ENOMEM: ask again
            queue_arm(fd);
            return;
        }
        // io_uring always listens for POLLRDHUP, POLLERR and POLLHUP whatever
        // was asked; poll(2) reports POLLRDHUP only when asked (read interest).
        const unsigned wanted = static_cast<unsigned>(poll_mask(s.interest)) | POLLERR | POLLHUP;
        const unsigned mask = static_cast<unsigned>(res) & wanted;
        if (mask == 0) {
            // Only what was not asked for, e.g. a write-only watcher of a
            // socket whose peer half-closed: a one-shot poll would complete at
            // once on every wait (a spin). A multishot poll completes once now
            // (ignored, as this one) and then only when the file wakes its
            // waiters, e.g. when the socket becomes writable.
            if (!s.armed) {
                s.multishot = true;
                queue_arm(fd);
            }
            return;
        }
        if (s.multishot) {
            // Back to one-shot polls: level-triggered from here. The cancel
            // goes out with the next submission (the CQ is being walked now);
            // until then the old token drops whatever the multishot posts.
            if (s.armed) to_cancel_.push_back(encode(s.token, fd));
            s.armed = false;
            s.multishot = false;
            s.token = (s.token + 1) & token_mask;
        }
        queue_arm(fd);  // level-triggered: ask again at the next wait
        report(fd, from_poll(mask), s.generation);
    }

    io_uring ring_{};
    std::vector<Slot> slots_;  // indexed by fd
    std::vector<int> to_arm_;  // fds whose poll request goes out with the next submission
    std::vector<std::uint64_t> to_cancel_;  // requests to cancel with the next submission
    std::vector<Completion> stashed_;
    std::size_t in_flight_ = 0;  // the sum of the slots' in_flight
    // Completion I/O (enable_completion()).
    std::vector<Done> done_;                 // reaped, not yet dispatched
    std::vector<Done> done_early_;           // the same, of CompletionOp::early ops
    std::vector<CompletionOp*> to_prepare_;  // prepare_before_wait()
    std::size_t ops_in_flight_ = 0;          // completion requests not finished
    char* buffers_ = nullptr;                // recv_buffers_.size() x buffer_size_
    unsigned buffer_size_ = 0;
    std::vector<RecvBuffer> recv_buffers_;
    char* part_ = nullptr;  // the bytes of the receive completion being dispatched
    int buffer_mask_ = 0;
    bool file_table_ = false;  // registered: shed_accept() can be asked
    io_uring_buf_ring* buf_ring_ = nullptr;
};

std::string read_sysctl(const char* path) {
    std::ifstream in(path);
    std::string value;
    in >> value;
    return value;
}

std::string probe() {
    io_uring ring{};
    if (int ret = init_ring(&ring); ret < 0) {
        std::string reason = std::string("io_uring_setup: ") + std::strerror(-ret);
        std::string disabled = read_sysctl("/proc/sys/kernel/io_uring_disabled");
        if (!disabled.empty() && disabled != "0")
            reason += " (kernel.io_uring_disabled = " + disabled + ")";
        return reason;
    }
    std::string reason;
    io_uring_probe* ops = io_uring_get_probe_ring(&ring);
    if (!ops) {
        reason = "io_uring: the kernel cannot list its operations (IORING_REGISTER_PROBE)";
    } else {
        if (!io_uring_opcode_supported(ops, IORING_OP_POLL_ADD))
            reason = "io_uring: the kernel lacks IORING_OP_POLL_ADD";
        else if (!io_uring_opcode_supported(ops, IORING_OP_POLL_REMOVE))
            reason = "io_uring: the kernel lacks IORING_OP_POLL_REMOVE";
        io_uring_free_probe(ops);
    }
    io_uring_queue_exit(&ring);
    return reason;
}

std::unique_ptr<Selector> create() {
    return std::make_unique<IoUringSelector>();
}

std::string unusable() {
    // Asked by every backends() and make_selector(): probe once per process.
    static const std::string reason = probe();
    return reason;
}

// What backends() and --list-backends say of a usable io_uring: whether
// completion I/O (EVMUX_IO=completion) can run here, and what it uses.
std::string details() {
    const CompletionProbe& p = completion_probe();
    return p.missing.empty() ? "completion I/O: " + p.features
                             : "completion I/O off: " + completion_unusable();
}

bool completion() {
    return completion_probe().missing.empty();
}

}  // namespace

extern const Backend io_uring_backend{.name = "io_uring",
                                      .create = create,
                                      .unusable = unusable,
                                      .details = details,
                                      .completion = completion};

}  // namespace evmux::detail
