// evmux event loop: callbacks per fd, timers, cross-thread post, signals, on
// top of any selector.
//
// This header includes only evmux's public headers and the standard library.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "evmux/selector.hpp"

namespace evmux {

/// A reactor: one per thread. Thread rule: only post(), stop() and
/// in_loop_thread() may be called from another thread; everything else must
/// be called on the loop's thread (the thread that calls run()/run_once(), or
/// the constructing thread before that). Non-copyable, non-movable.
class EventLoop {
public:
    using Clock = std::chrono::steady_clock;
    using Duration = std::chrono::nanoseconds;
    /// Called with the ready events (read, write, error, hangup) of one fd.
    using IoCallback = std::function<void(Events)>;
    using Task = std::function<void()>;
    /// Identifies a timer for cancel(); never 0.
    using TimerId = std::uint64_t;

    /// A loop on `selector`, by default make_selector() (EVMUX_BACKEND or the
    /// best backend here). Throws std::system_error if the wake-up eventfd
    /// cannot be created.
    explicit EventLoop(std::unique_ptr<Selector> selector = make_selector());
    /// Destroys pending tasks, timers and watchers without calling them. The
    /// fds being watched are not closed (the loop does not own them).
    ~EventLoop();
    EventLoop(const EventLoop&) = delete;
    EventLoop& operator=(const EventLoop&) = delete;

    // ---- fds ------------------------------------------------------------------
    /// Call `callback` whenever `fd` is ready for `interest`. The loop does not
    /// own `fd`. A callback may watch, change or unwatch any fd, itself
    /// included: an fd unwatched during a ready batch gets no further call in
    /// that batch, even if a new fd has taken its number. Throws as
    /// Selector::add() does.
    void watch(int fd, Events interest, IoCallback callback);
    /// Change the interest of a watched fd (throws std::out_of_range if not watched).
    void change(int fd, Events interest);
    /// Stop watching `fd`; a no-op if it is not watched. Safe after close(fd).
    void unwatch(int fd);
    /// True while `fd` is watched.
    bool watching(int fd) const;
    /// The interest `fd` is watched for, or Events::none.
    Events interest(int fd) const;

    // ---- timers (monotonic clock; never early) --------------------------------
    /// Run `fn` once, `delay` from now.
    TimerId call_after(Duration delay, Task fn);
    /// Run `fn` every `interval` (first call one interval from now). An
    /// interval of zero or less is treated as 1 ns.
    TimerId call_every(Duration interval, Task fn);
    /// Cancel a timer; true if it was pending. Safe from inside any callback,
    /// the timer's own included (a repeating timer then stops).
    bool cancel(TimerId id);

    // ---- threads ----------------------------------------------------------------
    /// Run `fn` on the loop thread, soon, in post order. Any thread. Wakes the
    /// loop if it is waiting. Tasks posted before the loop is destroyed and
    /// not yet run are destroyed without being run.
    void post(Task fn);
    /// Make run() return after the current iteration. Any thread.
    void stop();
    /// True on the thread that runs (or ran, or constructed) this loop.
    bool in_loop_thread() const;

    // ---- signals ----------------------------------------------------------------
    /// Deliver `signo` as a callback on this loop (signalfd). The signal is
    /// blocked in the calling thread; block it in every thread (call before
    /// starting others) for reliable delivery. Replaces an earlier callback.
    void on_signal(int signo, std::function<void(int signo)> callback);
    /// Stop delivering `signo` and unblock it.
    void remove_signal(int signo);

    // ---- running ----------------------------------------------------------------
    /// Run until stop(). Returns at once if stop() was called before.
    void run();
    /// One iteration: wait at most `timeout` (nullopt: until something
    /// happens), then run ready callbacks, due timers and posted tasks.
    /// Returns the number of callbacks and tasks run.
    std::size_t run_once(Timeout timeout = std::nullopt);

    /// A buffer of the loop's own that read callbacks may read into; its
    /// contents are valid until the next callback. Idle connections thus hold
    /// no read buffer of their own.
    std::span<char> scratch() { return {scratch_.get(), scratch_size}; }
    static constexpr std::size_t scratch_size = 64 * 1024;

    /// The selector underneath (to read name() or size()).
    Selector& selector() { return *selector_; }
    /// The backend name, e.g. "epoll".
    std::string backend_name() const { return selector_->name(); }
    /// The loop's idea of now (cached per iteration is not guaranteed: reads the clock).
    static Clock::time_point now() { return Clock::now(); }

private:
    struct Impl;
    std::unique_ptr<Selector> selector_;
    std::unique_ptr<char[]> scratch_;
    std::unique_ptr<Impl> impl_;
};

}  // namespace evmux
