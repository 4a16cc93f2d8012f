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

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <system_error>
#include <vector>

#include "backend.hpp"

namespace evmux::detail {
namespace {

constexpr unsigned sq_entries = 256;
constexpr unsigned cq_entries = 4096;  // more completions than that wait in the kernel (NODROP)
constexpr std::uint32_t control_bit = 0x8000'0000u;  // in the token half: not a poll request
constexpr std::uint32_t token_mask = 0x7fff'ffffu;

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

class IoUringSelector final : public Selector {
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
        io_uring_queue_exit(&ring_);
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
            ret =
                io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, timeout ? &ts : nullptr, nullptr);
        }
        if (ret == -EINTR) return false;
        // ETIME: the wait timed out. EBUSY/EAGAIN: completions back up in
        // the kernel (CQ overflow); reaping them below makes room.
        if (ret < 0 && ret != -ETIME && ret != -EBUSY && ret != -EAGAIN)
            fail(ret, "io_uring_enter");
        reap();
        return true;
    }

  private:
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
        if (token & control_bit || cqe->flags & IORING_CQE_F_MORE || fd32 >= slots_.size()) return;
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
        for (const Completion& c : stashed_) handle(c.user_data, c.res, c.flags);
        stashed_.clear();
        for (;;) {
            unsigned head;
            unsigned n = 0;
            io_uring_cqe* cqe;
            io_uring_for_each_cqe(&ring_, head, cqe) {
                finished(cqe);
                handle(cqe->user_data, cqe->res, cqe->flags);
                ++n;
            }
            io_uring_cq_advance(&ring_, n);
            // More completions than the CQ holds were kept by the kernel (it
            // has IORING_FEAT_NODROP); flush them into the ring and go on.
            if (!io_uring_cq_has_overflow(&ring_)) break;
            io_uring_get_events(&ring_);
        }
    }

    void handle(std::uint64_t user_data, std::int32_t res, std::uint32_t flags) {
        const auto token = static_cast<std::uint32_t>(user_data >> 32);
        const auto fd32 = static_cast<std::uint32_t>(user_data);
        // Cancels (and liburing's own timeout, user_data ~0) report nothing.
        if (token & control_bit || fd32 >= slots_.size()) return;
        const int fd = static_cast<int>(fd32);
        Slot& s = slots_[fd];
        if (!s.registered || token != s.token) return;  // an earlier request
        if (!(flags & IORING_CQE_F_MORE)) s.armed = false;
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

}  // namespace

extern const Backend io_uring_backend{.name = "io_uring", .create = create, .unusable = unusable};

}  // namespace evmux::detail
