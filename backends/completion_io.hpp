// Internal to evmux: completion I/O, for a selector whose kernel interface has
// it (io_uring). The event loop finds it with a dynamic_cast of its selector;
// Connection and the server's acceptor submit their socket I/O through it when
// the loop runs in IoMode::completion. Not installed.
//
// A request names a CompletionOp, whose address travels through the kernel as
// the request's user data: the op must stay where it is until its request's
// last completion (one without completion_more) has been dispatched. The
// completions a wait reaps are dispatched by the loop after the ready fds'
// callbacks (dispatch()), never from inside the wait.
#pragma once

#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace evmux::detail {

/// The receiver of one request's completions.
struct CompletionOp {
    /// `res` is the system call's result (-errno on failure); `flags` carries
    /// completion_more while a multishot request goes on, and the provided
    /// buffer of a receive (see CompletionIo::buffer).
    void (*complete)(CompletionOp* op, std::int32_t res, std::uint32_t flags) = nullptr;
    /// For prepare_before_wait(): called right before the loop's next wait
    /// (inside it: must not throw or call user code); may submit requests.
    void (*prepare)(CompletionOp* op) = nullptr;
    /// Dispatched before the other completions of the same wait (a send's,
    /// so that a receive handled in the same batch sees the send finished).
    /// Set once, before the op's first request (its requests carry it).
    bool early = false;
};

/// In a completion's flags: the request goes on (multishot); more will come.
constexpr std::uint32_t completion_more = 1u << 1;  // IORING_CQE_F_MORE

class CompletionIo {
  public:
    virtual ~CompletionIo() = default;

    /// Turns completion I/O on for this selector (registers the receive
    /// buffers). False, with the reason in `why`, if a piece the connections
    /// need is missing here: the loop then stays with readiness. Throws
    /// std::invalid_argument for a bad test knob (EVMUX_URING_BUFFERS, ...).
    virtual bool enable_completion(std::string& why) = 0;
    /// What is on ("recv multishot, buffer ring 512 x 4096 B, ...").
    virtual std::string completion_features() const = 0;
    /// Whether the kernel consumes the receive buffers incrementally: each
    /// receive's bytes follow the previous one's in the buffer it fills.
    virtual bool incremental() const = 0;

    /// A multishot receive into the provided buffers: a completion per
    /// arrival, 0 at end of file, -ENOBUFS when the buffers ran out (the
    /// request ends: submit it again).
    virtual void recv_multishot(int fd, CompletionOp* op) = 0;
    /// One send (MSG_NOSIGNAL) of `len` bytes at `data`, which must stay
    /// unchanged until the completion; a short count is possible.
    virtual void send(int fd, const void* data, std::size_t len, CompletionOp* op) = 0;
    /// sendmsg (MSG_NOSIGNAL); `msg` and what it points to stay until the completion.
    virtual void sendmsg(int fd, const msghdr* msg, CompletionOp* op) = 0;
    /// A multishot accept: a completion per connection, the new fd (non-blocking, close-on-exec).
    virtual void accept_multishot(int fd, CompletionOp* op) = 0;
    /// Whether shed_accept() can be asked here.
    virtual bool sheds_accepts() const = 0;
    /// Out of fds: takes one connection pending on listening socket `fd`
    /// without an fd number (into the ring's own file table, which no other
    /// thread's call can take from) and closes it there, so that its peer sees
    /// the end. One completion: >= 0 a connection was shed, -EAGAIN none was
    /// pending (nothing is waited for), -EINVAL the kernel cannot, or -errno.
    virtual void shed_accept(int fd, CompletionOp* op) = 0;
    /// Whether close() is a request here (the kernel has IORING_OP_CLOSE); if
    /// not, the caller calls close() itself.
    virtual bool close_requests() const = 0;
    /// close(fd) as a request, submitted with the next wait (or submit(), or
    /// the selector's destructor): nothing to wait for, the fd is no longer
    /// the caller's. Until the request runs the number stays taken, so no new
    /// socket can get it.
    virtual void close(int fd) = 0;
    /// Submits the requests made since the last wait (closes, cancels,
    /// receives armed again, and the sends prepare_before_wait() gathered:
    /// their prepare runs first), without waiting; no system call if there
    /// are none. For the loop returning to its caller: what its last
    /// iteration sent goes out even if it never runs again.
    virtual void submit() = 0;
    /// cancel(), then waits (bounded) until the request has ended, so that
    /// the file it held is let go; its last completion is still dispatched
    /// later. For a listener that must free its port at once.
    virtual void cancel_and_wait(CompletionOp* target) = 0;
    /// Calls `op->prepare` once right before the next wait: a connection's
    /// sends of one iteration, gathered into one request.
    virtual void prepare_before_wait(CompletionOp* op) = 0;
    /// Cancels `target`'s request: its last completion follows (-ECANCELED,
    /// or whatever it finished with first). Nothing is posted for the cancel.
    virtual void cancel(CompletionOp* target) = 0;

    /// The bytes of the receive completion being dispatched (res > 0: its
    /// flags name a provided buffer), until recycle(). Only in that
    /// completion's handler: where the kernel consumes buffers incrementally,
    /// a buffer holds several receives' bytes, one after another, and this is
    /// where this one's start.
    virtual char* buffer() = 0;
    /// Lets go of a receive completion's bytes (once per completion): their
    /// buffer goes back to the kernel when no receive's bytes in it are held.
    virtual void recycle(std::uint32_t flags) = 0;

    /// Storage for a queued send: a string given back by an earlier one (its
    /// capacity kept, so a steady stream of sends allocates nothing), or a new one.
    std::string take_string() {
        if (spare_strings_.empty()) return {};
        std::string s = std::move(spare_strings_.back());
        spare_strings_.pop_back();
        spare_bytes_ -= s.capacity();
        return s;
    }
    /// A sent chunk's string (or a TLS send request's records), kept for
    /// take_string(): at most 80 KiB each (a request's 64 KiB of plaintext
    /// sealed) and 8 MiB in all per loop; idle connections hold none. (Freed
    /// and allocated again per message, such buffers made the heap give pages
    /// back and fault them in again: 2.5 page faults per 16 KiB TLS message
    /// with no pool, 0.2-2 with one of 1 MiB, too small for 100 connections'
    /// two strings each in flight.)
    void give_string(std::string&& s) {
        const std::size_t size = s.capacity();
        if (size > 80 * 1024 || size <= 15 || spare_bytes_ + size > 8 * 1024 * 1024) return;
        s.clear();
        spare_strings_.push_back(std::move(s));
        spare_bytes_ += size;
    }

    /// Received bytes lent to sends (sent from where they arrived, see
    /// CompletionState::lendable) keep their buffer from the kernel: at most
    /// a quarter of the ring's buffers are so kept, so that connections whose
    /// peers do not read cannot starve the others' receives; past it, sends
    /// copy. Bytes in a buffer kept already can always be lent.
    bool can_lend(std::uint32_t flags) const {
        return lent_in_[buffer_id(flags)] > 0 || kept_ < lend_limit_;
    }
    void lend(std::uint32_t flags) {
        if (lent_in_[buffer_id(flags)]++ == 0) ++kept_;
    }
    void unlend(std::uint32_t flags) {
        if (--lent_in_[buffer_id(flags)] == 0) --kept_;
    }
    /// How many buffers lends may keep (a quarter of the ring).
    std::size_t lend_limit() const { return lend_limit_; }
    /// The provided buffer a receive completion's flags name.
    static std::uint32_t buffer_id(std::uint32_t flags) { return flags >> 16; }

    /// Runs the completions the last wait reaped; returns how many ran.
    virtual std::size_t dispatch() = 0;
    /// Waits (bounded) until no request is in flight, dispatching as they
    /// complete: for the loop's destructor, after its owners have closed.
    virtual void drain() = 0;

  protected:
    /// For enable_completion(): `buffers` in the ring, at most `limit` kept by lends.
    void set_lend_limit(std::size_t buffers, std::size_t limit) {
        lent_in_.assign(buffers, 0);
        lend_limit_ = limit;
    }

  private:
    std::vector<std::string> spare_strings_;
    std::size_t spare_bytes_ = 0;         // their capacities
    std::vector<std::uint32_t> lent_in_;  // per buffer: lent sends of its bytes
    std::size_t kept_ = 0;                // buffers with lent_in_ > 0
    std::size_t lend_limit_ = 0;
};

}  // namespace evmux::detail
