// evmux event loop: callbacks per fd, timers, cross-thread post, signals, on
// top of any selector.
//
// This header includes only evmux's public headers and the standard library.
#pragma once

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>

#include "evmux/selector.hpp"

namespace evmux {

class EventLoop;

namespace detail {
class CompletionIo;  // backends/completion_io.hpp (internal)
/// The loop whose run() or run_once() is on this thread's stack (the
/// innermost), null outside them: EventLoop::in_loop_thread()'s and
/// Connection's check that needs no call (initial-exec: one load).
extern constinit thread_local EventLoop* running_loop [[gnu::tls_model("initial-exec")]];
}  // namespace detail

/// How a loop's connections move their bytes.
///  - readiness: the loop waits until a socket is ready, then the connection
///    calls recv/sendmsg itself (every backend).
///  - completion: the connection hands its receives, sends and accepts to the
///    kernel as io_uring requests, submitted together with the loop's wait
///    (one io_uring_enter per iteration), and the kernel picks the receive
///    buffers from a ring the loop provides (io_uring backend only; a TLS
///    connection does its handshake on readiness, then goes on with
///    completion I/O under evmux's record layer, or stays with readiness
///    under OpenSSL's). See README, "Completion I/O".
enum class IoMode : std::uint8_t { readiness, completion };

/// "readiness" or "completion".
const char* to_string(IoMode mode);

/// What EVMUX_IO asks for: "completion" or "readiness"; unset or empty means
/// the default, completion (measured the better here: docs/measurements.md,
/// "Default: completion"), which a loop takes where its backend has it (io_uring with
/// every piece its probe looks for) and quietly does without elsewhere.
/// Throws std::invalid_argument naming the variable and the accepted values
/// for anything else.
IoMode requested_io_mode();

/// A reactor: one per thread. Thread rule: only post(), stop() and
/// in_loop_thread() may be called from another thread (and a Connection's
/// send(), close() and the like, which post); everything else must
/// be called on the loop's thread (the thread that calls run()/run_once(), or
/// the constructing thread before that). Non-copyable, non-movable.
///
/// An exception that escapes a callback (fd watcher, timer, posted task,
/// signal) ends only that call: the rest of the iteration runs (the other
/// ready fds, due timers and tasks; a repeating timer stays armed) and the
/// exception goes to the exception handler (see set_exception_handler(); by
/// default run()/run_once() rethrows it once the iteration has finished). A
/// Connection catches its own callbacks' exceptions, closes itself (reason
/// `exception`) and hands the exception to the same handler.
class EventLoop {
  public:
    /// The clock of every timer: monotonic, unaffected by changes of the wall clock.
    using Clock = std::chrono::steady_clock;
    /// Timer delays and intervals.
    using Duration = std::chrono::nanoseconds;
    /// Called with the ready events (read, write, error, hangup) of one fd.
    using IoCallback = std::function<void(Events)>;
    /// A timer callback or a posted task.
    using Task = std::function<void()>;
    /// Identifies a timer for cancel(); never 0.
    using TimerId = std::uint64_t;
    /// Identifies a tie() for untie(); never 0.
    using TieId = std::uint64_t;
    /// Receives an exception that escaped a callback; see set_exception_handler().
    using ExceptionHandler = std::function<void(std::exception_ptr)>;

    /// A loop on `selector`, by default make_selector() (EVMUX_BACKEND or the
    /// best backend here), in the I/O mode EVMUX_IO asks for; unset, in
    /// completion I/O if the selector has it, else readiness with no note.
    /// Throws std::system_error if the wake-up eventfd cannot be created,
    /// std::invalid_argument if `selector` is null. The loop registers its own
    /// fds (eventfd, signalfd) in the selector; do not add fds to selector()
    /// directly, use watch().
    explicit EventLoop(std::unique_ptr<Selector> selector = make_selector());
    /// A loop whose connections use `io` where they can: completion I/O needs
    /// the io_uring backend and the kernel pieces its probe finds (see
    /// BackendInfo::reason); without them the loop uses readiness and
    /// io_note() says why.
    EventLoop(std::unique_ptr<Selector> selector, IoMode io);
    /// First runs the `on_loop_end` of every tie() still in place (so
    /// connections still open close and run their on_close, reason `local`,
    /// before this returns), then destroys pending tasks, timers and
    /// watchers without calling them (a tie that destroying them makes is
    /// ended too, its on_loop_end run). The fds being watched are not closed
    /// (the loop does not own them). An exception from an `on_loop_end` goes
    /// to the exception handler; with the default one it is written to stderr
    /// (there is no run() left to rethrow it from). Every signal still
    /// delivered by the loop is then given back as remove_signal() does: an
    /// instance not read yet is discarded (the loop was its handler, as
    /// asyncio drops a signal whose callback has not run when its loop
    /// closes) and the signal unblocked if on_signal() found it unblocked, so
    /// Ctrl-C and SIGTERM take their default action during the program's
    /// cleanup; unblocked only when destroyed on the thread that called
    /// on_signal(): a LoopGroup's loop, destroyed by the group's owner, leaves
    /// its own thread's mask (which blocked the signal anyway) as it was.
    ~EventLoop();
    EventLoop(const EventLoop&) = delete;
    EventLoop& operator=(const EventLoop&) = delete;

    // ---- fds ------------------------------------------------------------------
    /// Call `callback` whenever `fd` is ready for `interest`. The loop does not
    /// own `fd`. A callback may watch, change or unwatch any fd, itself
    /// included: an fd unwatched during a ready batch gets no further call in
    /// that batch, even if a new fd has taken its number. Throws as
    /// Selector::add() does, and std::invalid_argument for an empty callback.
    /// Unwatch before closing `fd`.
    void watch(int fd, Events interest, IoCallback callback);
    /// A plain function called with its context and the ready events.
    using RawIoCallback = void (*)(void* ctx, Events events);
    /// watch() for an owner on every message's path (a Connection): calls
    /// `fn(ctx, events)` directly, with no std::function in between. The
    /// caller keeps `ctx` valid while `fd` is watched; once unwatch(fd) has
    /// returned, `fn` is not called with it again (not even later in the same
    /// ready batch), so `ctx` may go. Throws as watch() does, and
    /// std::invalid_argument for a null `fn`.
    void watch(int fd, Events interest, RawIoCallback fn, void* ctx);
    /// Change the interest of a watched fd (throws std::out_of_range if not watched).
    void change(int fd, Events interest);
    /// Stop watching `fd`; a no-op if it is not watched. Safe after close(fd).
    void unwatch(int fd);
    /// True while `fd` is watched.
    bool watching(int fd) const;
    /// The interest `fd` is watched for, or Events::none.
    Events interest(int fd) const;

    // ---- owners ---------------------------------------------------------------
    /// Keep `owner` alive until untie(id) or the loop's destruction (as
    /// muduo's Channel::tie): an object that serves an fd on this loop (a
    /// Connection) holds itself here while it is open, so the user need not.
    /// When the loop is destroyed with the tie in place, `on_loop_end` (if
    /// set) runs first, while the loop is still whole: the owner's chance to
    /// close and tell its user. The loop knows nothing else of its owners.
    /// O(1), no allocation once the table has grown.
    TieId tie(std::shared_ptr<void> owner, Task on_loop_end = {});
    /// Drop a tie (the owner may be destroyed inside this call). A no-op for
    /// an id that is not tied (already untied, or 0).
    void untie(TieId id);

    // ---- exceptions -----------------------------------------------------------
    /// Who receives an exception that escaped a callback of this loop, or that
    /// an owner handed over with handle_exception() (a Connection does so when
    /// its own callback throws, after closing itself). Empty (the default):
    /// the first such exception of an iteration is rethrown from run() or
    /// run_once() once that iteration has finished, and any further ones of
    /// the same iteration are written to stderr. asyncio's
    /// loop.set_exception_handler() is the model. A handler that throws is
    /// treated as the default would treat its exception. Loop thread only.
    void set_exception_handler(ExceptionHandler handler);
    /// Hand `error` to the exception handler (see set_exception_handler()).
    /// For owners that catch their user's exceptions. Loop thread only.
    void handle_exception(std::exception_ptr error) noexcept;

    // ---- timers (monotonic clock; never early) --------------------------------
    /// Run `fn` once, `delay` from now (a negative delay counts as zero).
    /// Timers due at the same time run in the order they were scheduled; a
    /// timer scheduled from a timer callback runs in a later iteration at the
    /// earliest. Throws std::invalid_argument for an empty `fn`. O(log n).
    TimerId call_after(Duration delay, Task fn);
    /// call_after() with any std::chrono duration, clamped rather than
    /// overflowed: call_after(hours(24 * 365 * 1000), f) never fires.
    template <class Rep, class Period>
    TimerId call_after(std::chrono::duration<Rep, Period> delay, Task fn) {
        return call_after(saturating_nanoseconds(delay), std::move(fn));
    }
    /// Run `fn` every `interval` (first call one interval from now). An
    /// interval of zero or less is treated as 1 ns. Each call is due one
    /// interval after the previous *due* time (no drift); if the loop fell
    /// more than an interval behind, the missed calls are skipped (it never
    /// fires twice in one iteration to catch up).
    TimerId call_every(Duration interval, Task fn);
    /// call_every() with any std::chrono duration, clamped rather than overflowed.
    template <class Rep, class Period>
    TimerId call_every(std::chrono::duration<Rep, Period> interval, Task fn) {
        return call_every(saturating_nanoseconds(interval), std::move(fn));
    }
    /// Cancel a timer; true if it was pending (a one-shot timer whose callback
    /// has started is no longer pending). Safe from inside any callback, the
    /// timer's own included (a repeating timer then stops). O(1) amortised.
    bool cancel(TimerId id);

    // ---- threads ----------------------------------------------------------------
    /// Run `fn` on the loop thread, soon, in post order. Any thread. Wakes the
    /// loop if it is waiting. Tasks posted before the loop is destroyed and
    /// not yet run are destroyed without being run. Tasks posted by a task run
    /// in the next iteration, after the next I/O wait. The eventfd is written
    /// only when the loop is (about to be) waiting, at most once per wait.
    /// Throws std::invalid_argument for an empty `fn`.
    void post(Task fn);
    /// Make run() return after the current iteration. Any thread. run()
    /// consumes the request; run_once() does not (but a stop() from another
    /// thread wakes its wait). The loop's thread may destroy the loop as soon
    /// as run() returns, while this call (or a post() whose task stopped it)
    /// is still returning: ~EventLoop waits for it first. Lock-free (callable
    /// from a signal handler); the loop must exist when the call starts.
    void stop();
    /// True on the thread that runs (or ran, or constructed) this loop. A
    /// few instructions inside run() and run_once() (a thread_local compared
    /// with `this`), a call outside them.
    bool in_loop_thread() const { return detail::running_loop == this || owned_by_this_thread(); }

    // ---- signals ----------------------------------------------------------------
    /// Deliver `signo` as a callback on this loop (signalfd). The signal is
    /// blocked in the calling thread; it must be blocked in every thread of
    /// the process, or the kernel may hand a process-directed instance (kill,
    /// Ctrl-C) to one that has it unblocked, where its default action (for
    /// most signals: terminate) runs instead. Threads inherit the mask: call
    /// this before starting your own threads. A LoopGroup's threads block the
    /// asynchronous signals themselves, so the main thread's loop may call
    /// this before or after the group is made; a loop of the group may call
    /// it too, once every thread not of the group blocks the signal.
    /// Replaces an earlier callback.
    /// Throws std::invalid_argument for SIGKILL, SIGSTOP, a number out of range
    /// or an empty callback; std::system_error if signalfd fails (nothing
    /// changed then). The loop's destruction undoes it as remove_signal() does.
    void on_signal(int signo, std::function<void(int signo)> callback);
    /// Stop delivering `signo` and leave it in the mask as on_signal() found
    /// it: unblocked again if it was unblocked then (a main thread's usual
    /// case), still blocked if it was blocked already (a LoopGroup's thread,
    /// or one whose mask blocked it); an instance that arrived but was not
    /// delivered yet is discarded (it would otherwise take its default
    /// action, usually termination, on unblock). A mask is a thread's own:
    /// called on another thread than on_signal() was (the loop ran on a
    /// thread other than the one that set it up), it unblocks nothing, in
    /// neither thread. A no-op if `signo` is not delivered by this loop.
    void remove_signal(int signo);

    // ---- running ----------------------------------------------------------------
    /// Run until stop(). Returns at once if stop() was called before. Reads the
    /// clock once per iteration, right after the wait, and only while timers
    /// exist. Throws std::logic_error if called from a callback of this loop,
    /// and what the default exception handler rethrows (the loop stays usable:
    /// call run() again to go on).
    void run();
    /// One iteration: wait at most `timeout` (nullopt: until something
    /// happens; shorter if a timer is due sooner, zero if tasks are pending),
    /// then run ready fd callbacks, due timers and posted tasks, in that
    /// order. Returns the number of callbacks and tasks run (may be 0, e.g.
    /// on timeout). Throws std::logic_error if called from a callback of this
    /// loop, and as run(). While timers exist it reads the clock twice: on
    /// entry (it cannot know how old the last reading is) and after the wait.
    std::size_t run_once(Timeout timeout = std::nullopt);
    /// run_once() with any std::chrono duration, clamped rather than
    /// overflowed: run_once(hours(24 * 365 * 1000)) waits (until woken).
    template <class Rep, class Period>
    std::size_t run_once(std::chrono::duration<Rep, Period> timeout) {
        return run_once(Timeout(saturating_nanoseconds(timeout)));
    }

    /// A buffer of the loop's own that read callbacks may read into; its
    /// contents are valid until the next callback. Idle connections thus hold
    /// no read buffer of their own.
    std::span<char> scratch() { return {scratch_.get(), scratch_size}; }
    /// Size of scratch() in bytes.
    static constexpr std::size_t scratch_size = 64 * 1024;

    /// The selector underneath (to read name() or size()).
    Selector& selector() { return *selector_; }
    /// The backend name, e.g. "epoll".
    std::string backend_name() const { return selector_->name(); }
    /// How this loop's connections do their I/O (see IoMode).
    IoMode io_mode() const { return completion_io_ ? IoMode::completion : IoMode::readiness; }
    /// Why the loop uses readiness although completion was asked for (e.g.
    /// "the epoll backend has no completion I/O"), or, in completion mode,
    /// what it uses. Empty when readiness was asked for.
    const std::string& io_note() const { return io_note_; }
    /// For evmux's own connection and server code: the selector's completion
    /// I/O, or null in readiness mode.
    detail::CompletionIo* completion_io() const { return completion_io_; }

    /// Reads the clock (no caching).
    static Clock::time_point now() { return Clock::now(); }
    /// The time of this iteration: the clock as the loop read it right after
    /// this iteration's wait, without reading it again. Where the loop did
    /// not read it (no timers existed), the first call of the iteration reads
    /// it. Late by at most the iteration's own work, never ahead: for cheap
    /// timestamps such as a connection's last activity. Loop thread only.
    Clock::time_point iteration_time();

  private:
    struct Impl;
    /// `io` asked for, or (`by_default`) the default mode: then a backend
    /// without completion I/O is no fallback to explain in io_note().
    EventLoop(std::unique_ptr<Selector> selector, IoMode io, bool by_default);
    std::size_t iterate(Timeout timeout, bool stoppable);
    bool owned_by_this_thread() const;  // in_loop_thread() outside run()/run_once()

    std::unique_ptr<Selector> selector_;
    std::unique_ptr<char[]> scratch_;
    std::unique_ptr<Impl> impl_;
    detail::CompletionIo* completion_io_ = nullptr;  // in selector_; null: readiness
    std::string io_note_;
};

}  // namespace evmux
