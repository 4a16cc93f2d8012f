// evmux coroutines: straight-line handlers over EventLoop and Connection
// (C++20 co_await), the fourth concurrency model beside callbacks, threads
// and processes. Task<T>, spawn(), sleep(), Stream (reading, writing,
// half-close and close on one connection), connect(), Acceptor and serve().
//
// Everything here runs on one loop's thread: a coroutine is resumed only by
// the loop it waits on, never from another thread (spawn() is the one call
// allowed from any thread: it posts).
//
// GCC 12 caveat: it miscompiles a co_await inside an `if` condition, and a
// Task temporary awaited inside any condition (the temporary dies early).
// Write `bool ok = co_await ...; if (ok)`. `while (co_await s.read_line(l))`
// with a stream's awaiter is fine (tested under ASan).
//
// This header includes only evmux's public headers and the standard library.
#pragma once

#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "evmux/address.hpp"
#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/loop_group.hpp"
#include "evmux/resolver.hpp"
#include "evmux/selector.hpp"
#include "evmux/server.hpp"

/// Coroutines on evmux: `co_await` reading, writing, sleeping, connecting and
/// accepting. A layer above the server/client layer; nothing below names it.
namespace evmux::coro {

template <class T = void>
class Task;

namespace detail {

struct PromiseBase;
struct WhenAllStart;
// A detached task finished: its exception (if any) to the loop's handler,
// then its frame is freed (the loop's tie owns it). Out of line, cold.
void finish_detached(PromiseBase& promise) noexcept;

// What every Task's promise holds besides its result.
struct PromiseBase {
    std::coroutine_handle<> continuation;  // the coroutine awaiting this one; null if detached
    std::exception_ptr error;              // what escaped the body
    EventLoop* loop = nullptr;             // detached: the loop whose tie owns the frame
    EventLoop::TieId tie = 0;              // detached: that tie
    bool quiet_close = false;              // serve(): ConnectionClosed ends a handler quietly

    // At the end: symmetric transfer to the awaiting coroutine (no stack
    // growth however deep tasks nest), or, detached, free the frame.
    struct FinalAwaiter {
        bool await_ready() const noexcept { return false; }
        template <class P>
        std::coroutine_handle<> await_suspend(std::coroutine_handle<P> done) noexcept {
            PromiseBase& p = done.promise();
            if (p.continuation) return p.continuation;
            if (p.loop) finish_detached(p);  // frees the frame: touch nothing after
            return std::noop_coroutine();
        }
        void await_resume() const noexcept {}
    };
    // Lazily started: the body runs when the task is awaited or spawned.
    std::suspend_always initial_suspend() const noexcept { return {}; }
    FinalAwaiter final_suspend() const noexcept { return {}; }
    void unhandled_exception() noexcept { error = std::current_exception(); }
};

template <class T>
struct Promise : PromiseBase {
    std::optional<T> value;
    Task<T> get_return_object() noexcept;
    template <class U = T>
    void return_value(U&& v) {
        value.emplace(std::forward<U>(v));
    }
    T take() {
        if (error) std::rethrow_exception(error);
        return std::move(*value);
    }
};

template <>
struct Promise<void> : PromiseBase {
    Task<void> get_return_object() noexcept;
    void return_void() const noexcept {}
    void take() const {
        if (error) std::rethrow_exception(error);
    }
};

void start_detached(EventLoop& loop, Task<void>&& task, bool quiet_close);

}  // namespace detail

/// A coroutine that produces a T (cppcoro's task<T>, Asio's awaitable<T>).
/// Lazily started: the body runs when the task is `co_await`ed (then the
/// awaiting coroutine resumes, by symmetric transfer, when it ends) or given
/// to spawn(). An exception that escapes the body is rethrown from the
/// `co_await`. Destroying a Task destroys its coroutine frame wherever it is
/// suspended: the operation it waits on is cancelled (a read, write, sleep,
/// connect or accept unregisters itself) and it is never resumed. Move-only;
/// loop thread only.
template <class T>
class [[nodiscard]] Task {
    static_assert(!std::is_reference_v<T>, "evmux::coro::Task<T&> is not supported");

  public:
    /// The coroutine's promise (C++ machinery).
    using promise_type = detail::Promise<T>;
    /// The coroutine's handle.
    using Handle = std::coroutine_handle<promise_type>;

    /// An empty task (no coroutine).
    Task() noexcept = default;
    /// Takes over `other`'s coroutine.
    Task(Task&& other) noexcept : h_(std::exchange(other.h_, {})) {}
    /// Destroys the coroutine held, then takes over `other`'s.
    Task& operator=(Task&& other) noexcept {
        if (this != &other) {
            reset();
            h_ = std::exchange(other.h_, {});
        }
        return *this;
    }
    /// Destroys the coroutine frame (see the class comment).
    ~Task() { reset(); }

    /// True if it holds a coroutine.
    bool valid() const noexcept { return static_cast<bool>(h_); }
    /// True once the body has finished (returned or thrown).
    bool done() const noexcept { return h_ && h_.done(); }

    /// `co_await std::move(task)`: run it, resume when it finishes, return its
    /// value or rethrow its exception. std::logic_error for an empty task.
    auto operator co_await() && noexcept {
        struct Awaiter {
            Handle h;
            bool await_ready() const noexcept { return !h || h.done(); }
            std::coroutine_handle<> await_suspend(std::coroutine_handle<> awaiting) noexcept {
                h.promise().continuation = awaiting;
                return h;  // start it: symmetric transfer
            }
            T await_resume() {
                if (!h) throw std::logic_error("evmux::coro: co_await on an empty Task");
                return h.promise().take();
            }
        };
        return Awaiter{h_};
    }

  private:
    friend struct detail::Promise<T>;
    friend void detail::start_detached(EventLoop&, Task<void>&&, bool);
    friend struct detail::WhenAllStart;
    explicit Task(Handle h) noexcept : h_(h) {}
    void reset() noexcept {
        if (h_) std::exchange(h_, {}).destroy();
    }

    Handle h_;
};

namespace detail {
template <class T>
Task<T> Promise<T>::get_return_object() noexcept {
    return Task<T>(Task<T>::Handle::from_promise(*this));
}
inline Task<void> Promise<void>::get_return_object() noexcept {
    return Task<void>(Task<void>::Handle::from_promise(*this));
}
}  // namespace detail

/// Run `task` detached on `loop` (Asio's co_spawn with `detached`): it is
/// started from the loop (posted, so this never runs it inline), and its frame
/// is freed when it ends. An exception that escapes it goes to the loop's
/// exception handler (EventLoop::set_exception_handler(); by default run()
/// rethrows it), except AcceptorClosed (a server task that waited in
/// accept() ends quietly when its Acceptor closes), QueueClosed (a consumer
/// whose Queue was closed), SemaphoreClosed and ConnectionClosed of reason `local` (the
/// program closed the connection: close(), its Acceptor or server closing,
/// the loop's end), which end it quietly. If the loop is
/// destroyed first, a task not yet started is destroyed unstarted and a
/// suspended one is destroyed where it waits (after the loop's connections
/// have closed, so a read sees ConnectionClosed first). Any thread (the task
/// then runs on the loop's thread only).
void spawn(EventLoop& loop, Task<void> task);

// ---- sleeping ------------------------------------------------------------------

/// `co_await sleep(loop, 50ms)`: resumes from `loop` (a timer) once the time
/// has passed, never early; zero yields to the loop for one turn. Destroying
/// the waiting task cancels the timer. Use the loop the task runs on.
class [[nodiscard]] Sleep {
  public:
    /// Sleep `delay` on `loop` (negative counts as zero).
    Sleep(EventLoop& loop, EventLoop::Duration delay) noexcept : loop_(loop), delay_(delay) {}
    Sleep(const Sleep&) = delete;
    Sleep& operator=(const Sleep&) = delete;
    /// Cancels the timer if still pending.
    ~Sleep() {
        if (timer_ != 0) loop_.cancel(timer_);
    }
    /// Always suspends (a zero sleep yields).
    bool await_ready() const noexcept { return false; }
    /// Arms the timer (no allocation beyond the loop's timer table).
    void await_suspend(std::coroutine_handle<> waiting) {
        waiting_ = waiting;
        timer_ = loop_.call_after(delay_, [this] {
            timer_ = 0;
            waiting_.resume();
        });
    }
    /// Nothing to return.
    void await_resume() const noexcept {}

  private:
    EventLoop& loop_;
    EventLoop::Duration delay_;
    EventLoop::TimerId timer_ = 0;
    std::coroutine_handle<> waiting_;
};

/// `co_await sleep(loop, d)` with any std::chrono duration (clamped, not overflowed).
template <class Rep, class Period>
Sleep sleep(EventLoop& loop, std::chrono::duration<Rep, Period> delay) {
    return Sleep(loop, saturating_nanoseconds(delay));
}

// ---- timeouts --------------------------------------------------------------------

/// with_timeout() ran out of time (asyncio's TimeoutError). code(): ETIMEDOUT;
/// what() reads like "timed out after 250 ms: Connection timed out".
class TimedOut : public std::system_error {
  public:
    /// `limit`: the time that was given.
    explicit TimedOut(EventLoop::Duration limit);
    /// The time that was given.
    EventLoop::Duration limit() const noexcept { return limit_; }

  private:
    EventLoop::Duration limit_;
};

namespace detail {

// co_await with_timeout(...): runs the task; a timer on the loop destroys
// it where it waits and resumes the awaiting coroutine with TimedOut.
template <class T>
class [[nodiscard]] TimeoutAwaiter {
  public:
    TimeoutAwaiter(EventLoop& loop, EventLoop::Duration limit, Task<T> task) noexcept
        : loop_(loop), limit_(limit), task_(std::move(task)) {}
    TimeoutAwaiter(const TimeoutAwaiter&) = delete;
    TimeoutAwaiter& operator=(const TimeoutAwaiter&) = delete;
    ~TimeoutAwaiter() {
        if (timer_ != 0) loop_.cancel(timer_);
    }  // then task_ goes, and with it the task wherever it waits

    bool await_ready() const noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<> waiting) {
        if (inner_.await_ready()) return waiting;  // empty or finished: no timer
        waiting_ = waiting;
        timer_ = loop_.call_after(limit_, [this] { expire(); });
        return inner_.await_suspend(waiting);  // start it: symmetric transfer
    }
    T await_resume() {
        if (timer_ != 0) loop_.cancel(std::exchange(timer_, 0));
        if (expired_) throw TimedOut(limit_);
        return inner_.await_resume();
    }

  private:
    void expire() {
        timer_ = 0;
        expired_ = true;
        task_ = Task<T>();  // destroyed where it waits: its read, sleep... unregisters
        waiting_.resume();
    }

    EventLoop& loop_;
    EventLoop::Duration limit_;
    Task<T> task_;
    decltype(std::declval<Task<T>>().operator co_await()) inner_ =
        std::move(task_).operator co_await();
    std::coroutine_handle<> waiting_;
    EventLoop::TimerId timer_ = 0;
    bool expired_ = false;
};

// An awaitable run as a task (with_timeout() of a stream's read or write).
template <class Awaitable>
auto await_as_task(Awaitable& operation)
    -> Task<decltype(std::declval<Awaitable&>().await_resume())> {
    if constexpr (std::is_void_v<decltype(operation.await_resume())>)
        co_await operation;
    else
        co_return co_await operation;
}

template <class X>
inline constexpr bool is_task = false;
template <class T>
inline constexpr bool is_task<Task<T>> = true;

}  // namespace detail

/// `T value = co_await with_timeout(loop, 5s, task)`: runs the task and
/// returns its value or rethrows its exception, unless `limit` passes first:
/// then the task is destroyed where it waits (its read, write, sleep,
/// connect or accept is cancelled, as when any Task is destroyed) and
/// TimedOut is thrown (asyncio's wait_for, Asio's cancel_after). A task that
/// finishes without waiting never times out. Use the loop the task runs on.
template <class T, class Rep, class Period>
detail::TimeoutAwaiter<T> with_timeout(EventLoop& loop, std::chrono::duration<Rep, Period> limit,
                                       Task<T> task) {
    return detail::TimeoutAwaiter<T>(loop, saturating_nanoseconds(limit), std::move(task));
}

/// `std::string line = co_await with_timeout(loop, 5s, stream.read_line())`:
/// as above, for one of a Stream's reads or writes (an awaitable, awaited
/// at once as those must be). The stream stays usable after TimedOut: what
/// a timed-out read_exactly() or read_line() had received is read next, and
/// a timed-out write's bytes are queued still (only the wait for the queue
/// to drain ended).
template <class Awaitable, class Rep, class Period>
requires(!detail::is_task<std::remove_cvref_t<Awaitable>>) auto with_timeout(
    EventLoop& loop, std::chrono::duration<Rep, Period> limit, Awaitable&& operation) {
    return with_timeout(loop, limit, detail::await_as_task(operation));
}

// ---- running tasks side by side ----------------------------------------------------

namespace detail {

// What when_all() and when_any() give for a Task<T>: T, or std::monostate
// for void.
template <class T>
using WhenAllResult = std::conditional_t<std::is_void_v<T>, std::monostate, T>;

// Shared by a when_all() or when_any() and the small tasks (runners) that
// run its tasks.
struct WhenAllState {
    std::size_t pending = 0;          // runners not finished, +1 while they are being started
    bool starting = false;            // the runners are being started (see WhenAllStart)
    bool any = false;                 // when_any(): the first to finish decides
    bool decided = false;             // a runner failed (or, when_any(), finished) first
    bool deferred = false;            // and settle() runs from the loop
    std::size_t first = 0;            // that runner
    std::coroutine_handle<> waiting;  // when_all()'s own coroutine
    std::exception_ptr error;         // the first failure
    std::vector<Task<void>>* runners = nullptr;
    EventLoop* loop = nullptr;  // settle()'s
    EventLoop::TimerId settle_timer = 0;

    WhenAllState() = default;
    WhenAllState(const WhenAllState&) = delete;
    WhenAllState& operator=(const WhenAllState&) = delete;
    ~WhenAllState() {
        if (settle_timer != 0) loop->cancel(settle_timer);
    }

    // Runner `self` failed (`e`) or, in when_any(), finished, first. The
    // others are destroyed where they wait, but not here: this may run inside
    // another runner's code (closing an Acceptor resumes its accept() there
    // and then), which must get back from that call. So settle() runs from
    // the loop (a zero timer), as asyncio cancels from call_soon(). Off any
    // running loop (a task driven by hand), at once.
    void decide(std::size_t self, std::exception_ptr e) noexcept {
        if (decided) return;  // a later one's value or exception is dropped
        decided = true;
        first = self;
        error = std::move(e);
        loop = ::evmux::detail::running_loop;
        if (loop) {
            try {
                settle_timer = loop->call_after(EventLoop::Duration::zero(), [this] {
                    settle_timer = 0;
                    settle();
                });
                deferred = true;
                return;
            } catch (...) {  // no memory for the timer: at once, as off a loop
            }
        }
        for (std::size_t i = 0; i < runners->size(); ++i)
            if (i != self) (*runners)[i] = Task<void>();
        pending = starting ? 2 : 1;  // `self`'s finish (or the start's end) resumes
    }

    // From the loop: no runner is running. Destroy them all (the first is
    // suspended in its finish) and resume when_all().
    void settle() noexcept {
        for (Task<void>& runner : *runners) runner = Task<void>();
        waiting.resume();
    }
};

// A runner's last step: the last to finish resumes when_all() (symmetric
// transfer); the others stay suspended here until when_all() destroys them.
// After a deferred decision, settle() resumes it instead.
struct WhenAllFinish {
    WhenAllState* state;
    bool await_ready() const noexcept { return false; }
    std::coroutine_handle<> await_suspend(std::coroutine_handle<>) const noexcept {
        if (--state->pending == 0 && !state->deferred) return state->waiting;
        return std::noop_coroutine();
    }
    void await_resume() const noexcept {}
};

// Runs `task`, its value into `slot`, its exception to the state.
template <class T>
Task<void> when_all_run(WhenAllState* state, std::size_t self, Task<T> task,
                        std::optional<WhenAllResult<T>>* slot) {
    try {
        if constexpr (std::is_void_v<T>) {
            co_await std::move(task);
            slot->emplace();
        } else {
            slot->emplace(co_await std::move(task));
        }
        if (state->any) state->decide(self, nullptr);
    } catch (...) {
        state->decide(self, std::current_exception());
    }
    co_await WhenAllFinish{state};
}

// Starts every runner in turn (each runs until it first waits; none after
// one decided), then suspends when_all() until the last finishes or settle()
// runs; not at all if all finished while starting. The +1 keeps a runner
// that finishes while starting from resuming when_all() inside this call.
struct WhenAllStart {
    WhenAllState* state;
    std::vector<Task<void>>* runners;
    bool await_ready() const noexcept { return runners->empty(); }
    bool await_suspend(std::coroutine_handle<> waiting) noexcept {
        WhenAllState& s = *state;
        s.runners = runners;
        s.waiting = waiting;
        s.pending = s.runners->size() + 1;
        s.starting = true;
        for (std::size_t i = 0; i < s.runners->size() && !s.decided; ++i)
            (*s.runners)[i].h_.resume();
        s.starting = false;
        return --s.pending != 0 || s.deferred;
    }
    void await_resume() const {
        if (state->error) std::rethrow_exception(state->error);
    }
};

template <class... T, std::size_t... I>
std::vector<Task<void>> when_all_runners(WhenAllState& state,
                                         std::tuple<std::optional<WhenAllResult<T>>...>& slots,
                                         std::index_sequence<I...>, Task<T>&&... tasks) {
    std::vector<Task<void>> runners;
    runners.reserve(sizeof...(T));
    (runners.push_back(when_all_run(&state, I, std::move(tasks), &std::get<I>(slots))), ...);
    return runners;
}

template <class T>
std::vector<Task<void>> when_all_runners(WhenAllState& state, std::vector<Task<T>>& tasks,
                                         std::vector<std::optional<WhenAllResult<T>>>& slots) {
    std::vector<Task<void>> runners;
    runners.reserve(tasks.size());
    for (std::size_t i = 0; i < tasks.size(); ++i)
        runners.push_back(when_all_run(&state, i, std::move(tasks[i]), &slots[i]));
    return runners;
}

// when_any()'s variant, alternative `first` from its slot.
template <class... T, std::size_t... I>
std::variant<WhenAllResult<T>...> when_any_value(
    std::size_t first, std::tuple<std::optional<WhenAllResult<T>>...>& slots,
    std::index_sequence<I...>) {
    std::optional<std::variant<WhenAllResult<T>...>> value;
    ((first == I ? (value.emplace(std::in_place_index<I>, std::move(*std::get<I>(slots))), 0) : 0),
     ...);
    return std::move(*value);
}

}  // namespace detail

/// `auto [a, b] = co_await when_all(fetch(x), fetch(y))`: runs the tasks side
/// by side on the loop (each started in turn, running until it first waits)
/// and returns when all have finished, their values as a tuple in the order
/// given (std::monostate for a Task<void>). The first exception destroys the
/// others where they wait (their reads, writes, sleeps... cancelled, as when
/// any Task is destroyed; from the loop, once the code that raised it has
/// returned, so a task whose own call ended the other's wait gets back from
/// it) and is rethrown: asyncio's TaskGroup, Asio's `&&` (asyncio.gather()
/// would let the others run on, unwatched). Destroying the
/// when_all() task (with_timeout() expiring) destroys them all. Lazily
/// started, like every Task. Loop thread only; the tasks may use different
/// streams or the same one (one read and one write at a time, as ever).
template <class... T>
Task<std::tuple<detail::WhenAllResult<T>...>> when_all(Task<T>... tasks) {
    std::tuple<std::optional<detail::WhenAllResult<T>>...> slots;
    detail::WhenAllState state;
    std::vector<Task<void>> runners = detail::when_all_runners<T...>(
        state, slots, std::index_sequence_for<T...>{}, std::move(tasks)...);
    co_await detail::WhenAllStart{&state, &runners};
    co_return std::apply(
        [](auto&... slot) { return std::tuple<detail::WhenAllResult<T>...>(std::move(*slot)...); },
        slots);
}

/// `std::vector<T> values = co_await when_all(std::move(tasks))`: as above,
/// for any number of tasks of one type, the values in the tasks' order (for
/// Task<void>, when_all() returns nothing). No tasks: done at once.
template <class T>
Task<std::conditional_t<std::is_void_v<T>, void, std::vector<T>>> when_all(
    std::vector<Task<T>> tasks) {
    std::vector<std::optional<detail::WhenAllResult<T>>> slots(tasks.size());
    detail::WhenAllState state;
    std::vector<Task<void>> runners = detail::when_all_runners(state, tasks, slots);
    co_await detail::WhenAllStart{&state, &runners};
    if constexpr (std::is_void_v<T>) {
        co_return;
    } else {
        std::vector<T> values;
        values.reserve(slots.size());
        for (auto& slot : slots) values.push_back(std::move(*slot));
        co_return values;
    }
}

/// `auto v = co_await when_any(fetch(primary), fetch(backup))`: runs the
/// tasks side by side as when_all() does and returns as soon as one has
/// finished: its value as the std::variant's alternative of the same index
/// (v.index() says which; std::monostate for a Task<void>), or its exception
/// rethrown. The others are destroyed where they wait (cancelled, as when any
/// Task is destroyed; from the loop, as in when_all()), never resumed again:
/// asyncio.wait(FIRST_COMPLETED) with the rest cancelled, Asio's `||` (which waits for a success
/// instead). A task that finishes while being started wins before the later ones start.
template <class... T>
Task<std::variant<detail::WhenAllResult<T>...>> when_any(Task<T>... tasks) {
    static_assert(sizeof...(T) > 0, "evmux::coro::when_any() of no tasks would never finish");
    std::tuple<std::optional<detail::WhenAllResult<T>>...> slots;
    detail::WhenAllState state;
    state.any = true;
    std::vector<Task<void>> runners = detail::when_all_runners<T...>(
        state, slots, std::index_sequence_for<T...>{}, std::move(tasks)...);
    co_await detail::WhenAllStart{&state, &runners};
    co_return detail::when_any_value<T...>(state.first, slots, std::index_sequence_for<T...>{});
}

/// `auto [index, value] = co_await when_any(std::move(tasks))`: as above, for
/// any number of tasks of one type: which finished first and its value
/// (std::monostate for Task<void>). std::invalid_argument for no tasks.
template <class T>
Task<std::pair<std::size_t, detail::WhenAllResult<T>>> when_any(std::vector<Task<T>> tasks) {
    if (tasks.empty()) throw std::invalid_argument("evmux::coro::when_any: no tasks");
    std::vector<std::optional<detail::WhenAllResult<T>>> slots(tasks.size());
    detail::WhenAllState state;
    state.any = true;
    std::vector<Task<void>> runners = detail::when_all_runners(state, tasks, slots);
    co_await detail::WhenAllStart{&state, &runners};
    co_return std::pair<std::size_t, detail::WhenAllResult<T>>(state.first,
                                                               std::move(*slots[state.first]));
}

// ---- queues ------------------------------------------------------------------------

/// A Queue was closed: put() on it, or get() once it is closed and empty
/// (asyncio's QueueShutDown). Ends a detached task quietly (spawn()): closing
/// a queue is how a program tells its consumers to finish.
class QueueClosed : public std::runtime_error {
  public:
    /// what(): "evmux::coro::Queue: closed".
    QueueClosed();
};

namespace detail {

// A task waiting in a Queue's put() or get() (in the queue's putters or
// getters) or an Event's wait(), until woken; then, in the owner's `woken`
// list, until a zero timer on the loop resumes it. The awaiter in the
// waiting coroutine's frame is the node.
struct WaitNode {
    WaitNode* prev = nullptr;
    WaitNode* next = nullptr;
    struct WaitList* list = nullptr;  // the list it is in, if any
    EventLoop* loop = nullptr;
    std::coroutine_handle<> waiting;
    EventLoop::TimerId timer = 0;  // woken, not yet resumed
};

// A FIFO of waiters, linked through them (the list allocates nothing).
struct WaitList {
    WaitNode* head = nullptr;
    WaitNode* tail = nullptr;

    bool empty() const noexcept { return head == nullptr; }
    void push_back(WaitNode* w) noexcept {
        w->list = this;
        w->prev = tail;
        w->next = nullptr;
        (tail ? tail->next : head) = w;
        tail = w;
    }
    void remove(WaitNode* w) noexcept {
        (w->prev ? w->prev->next : head) = w->next;
        (w->next ? w->next->prev : tail) = w->prev;
        w->prev = w->next = nullptr;
        w->list = nullptr;
    }
};

// Moves `w` to `woken` and resumes it from the loop (a zero timer), never
// inside the call that woke it: that call may be another task's, which must
// get back from it first (as when_all() settles from the loop).
void wake_from_loop(WaitNode* w, WaitList& woken);
// A waiter going away (its frame destroyed, or resumed): out of its list, its
// timer cancelled. True if it had been woken and not resumed.
bool leave_wait(WaitNode* w) noexcept;

}  // namespace detail

/// A flag tasks can wait for (asyncio's Event): `co_await ev.wait()` returns
/// at once if the event is set, else when set() is called; clear() unsets it
/// for later waits. Every waiter set() wakes is resumed from the loop (a zero
/// timer), never inside set(), and returns even if clear() came in between
/// (as asyncio's). A waiting task destroyed (a timeout, when_any()) simply
/// stops waiting. Destroying the event wakes its waiters as set() would. Loop
/// thread only; from another thread, EventLoop::post() a set(). Not copyable
/// or movable.
class Event {
  public:
    /// An unset event on `loop`.
    explicit Event(EventLoop& loop) noexcept : loop_(loop) {}
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
    /// Wakes the waiters (see the class comment), which touch it no more.
    ~Event() {
        set();
        while (detail::WaitNode* w = woken_.head) woken_.remove(w);  // their timers stay
    }

    /// Sets it and wakes every waiting task, in the order they came.
    void set() {
        set_ = true;
        while (detail::WaitNode* w = waiters_.head) {
            waiters_.remove(w);
            detail::wake_from_loop(w, woken_);
        }
    }
    /// Unsets it: wait() waits again.
    void clear() noexcept { set_ = false; }
    /// True if set.
    bool is_set() const noexcept { return set_; }
    /// `co_await ev.wait()`: once it is set.
    [[nodiscard]] auto wait() { return Waiter(*this); }

  private:
    struct Waiter : detail::WaitNode {
        Event& event;
        explicit Waiter(Event& e) noexcept : event(e) { loop = &e.loop_; }
        Waiter(const Waiter&) = delete;
        Waiter& operator=(const Waiter&) = delete;
        ~Waiter() { detail::leave_wait(this); }
        bool await_ready() const noexcept { return event.set_; }
        void await_suspend(std::coroutine_handle<> h) {
            waiting = h;
            event.waiters_.push_back(this);
        }
        void await_resume() noexcept { detail::leave_wait(this); }
    };

    EventLoop& loop_;
    detail::WaitList waiters_;
    detail::WaitList woken_;
    bool set_ = false;
};

/// A FIFO queue between coroutines on one loop (asyncio.Queue): `co_await
/// q.put(v)` waits while the queue holds max_size() items; `T v = co_await
/// q.get()` waits while it is empty. Waiters are served in the order they
/// came, a value put while a get() waits goes straight to it, and a waiting
/// task is resumed from the loop (a zero timer), never inside the put() or
/// get() that woke it. close() ends it: waiting and later put()s throw
/// QueueClosed, get()s return what is left and then throw QueueClosed;
/// destroying the queue closes it. A task destroyed while it waits in get()
/// (a with_timeout(), when_all() or when_any() that gave up on it) takes
/// nothing: a value handed to it and not yet received goes to the next
/// waiting get(), or back to the front; a put() whose value went in stays
/// put. (Under when_any(), a get() that received its value in the turn
/// another task won in ran on and its task is destroyed with the value:
/// with_timeout() has no such race, it ends the wait at once.) task_done()
/// and join() count the items through to their end, as asyncio's do. Loop
/// thread only; from another thread, EventLoop::post() a try_put(). Not
/// copyable or movable.
template <class T>
class Queue {
    static_assert(std::is_move_constructible_v<T>, "evmux::coro::Queue<T>: T must be movable");

  public:
    /// A queue on `loop` of at most `max_size` items; 0: unbounded (put()
    /// never waits).
    explicit Queue(EventLoop& loop, std::size_t max_size = 0) noexcept
        : loop_(loop), max_size_(max_size), finished_(loop) {
        finished_.set();  // nothing put: join() returns at once (no waiter to wake)
    }
    Queue(const Queue&) = delete;
    Queue& operator=(const Queue&) = delete;
    /// Closes the queue (see close()) and lets its waiters go: each is
    /// resumed from the loop, as by close(), and touches the queue no more.
    ~Queue() {
        close();
        while (detail::WaitNode* w = woken_.head) {
            woken_.remove(w);  // its timer stays: it resumes as woken
            static_cast<Waiter*>(w)->queue = nullptr;
        }
    }  // finished_'s destruction lets the tasks in join() go

    /// `co_await q.put(std::move(v))`: v goes to the first waiting get(), or
    /// to the back of the queue, waiting while it is full. QueueClosed if the
    /// queue is closed (then, or while waiting: v is not put).
    [[nodiscard]] auto put(T value) { return PutAwaiter(*this, std::move(value)); }
    /// `T v = co_await q.get()`: the front item, waiting while there is none.
    /// QueueClosed once the queue is closed and empty.
    [[nodiscard]] auto get() { return GetAwaiter(*this); }

    /// put() without waiting (asyncio's put_nowait()): false if the queue is
    /// full (`value` is left as it was); QueueClosed if it is closed.
    bool try_put(T&& value) {
        if (closed_) throw QueueClosed();
        if (!getters_.empty()) {
            hand(std::move(value));
        } else {
            if (full()) return false;
            items_.push_back(std::move(value));
        }
        count_put();
        return true;
    }
    /// try_put() of a copy.
    bool try_put(const T& value) {
        if (full() && getters_.empty() && !closed_) return false;
        return try_put(T(value));
    }
    /// get() without waiting (asyncio's get_nowait()): the front item, or
    /// nothing if the queue is empty; QueueClosed if it is closed and empty.
    std::optional<T> try_get() {
        if (items_.empty()) {
            if (closed_) throw QueueClosed();
            return std::nullopt;
        }
        return take();
    }

    /// No more put()s: every waiting put() and, the queue being empty then,
    /// every waiting get() throws QueueClosed (resumed from the loop); the
    /// items in it can still be got. Idempotent.
    void close() {
        closed_ = true;
        while (getters_.head) wake(getters_.head);
        while (putters_.head) wake(putters_.head);
    }

    /// An item got from the queue has been dealt with (asyncio's
    /// task_done()): when every item put has been, join() returns.
    /// std::logic_error if called more often than items were put.
    void task_done() {
        if (unfinished_ == 0)
            throw std::logic_error(
                "evmux::coro::Queue::task_done(): called more times than items were put");
        if (--unfinished_ == 0) finished_.set();
    }
    /// `co_await q.join()`: until task_done() has been called for every item
    /// put (at once if there is none); asyncio's join(). Waiters resumed from
    /// the loop; the queue's destruction lets them go too.
    [[nodiscard]] auto join() { return finished_.wait(); }
    /// Items put and not yet marked task_done().
    std::size_t unfinished() const noexcept { return unfinished_; }

    /// True once close() has been called.
    bool closed() const noexcept { return closed_; }
    /// Items in the queue (not counting values on their way to a woken get()).
    std::size_t size() const noexcept { return items_.size(); }
    /// True if it holds no items.
    bool empty() const noexcept { return items_.empty(); }
    /// True if it holds max_size() items (never, unbounded).
    bool full() const noexcept { return max_size_ != 0 && items_.size() >= max_size_; }
    /// The bound given; 0: unbounded.
    std::size_t max_size() const noexcept { return max_size_; }

  private:
    struct Waiter : detail::WaitNode {
        Queue* queue;           // null once the queue is gone
        std::optional<T> item;  // get(): handed to it; put(): what it puts
        bool getter;            // a get()'s, not a put()'s
        bool done = false;      // put(): its item went into the queue
        Waiter(Queue& q, bool get) : queue(&q), getter(get) { loop = &q.loop_; }
        Waiter(const Waiter&) = delete;
        Waiter& operator=(const Waiter&) = delete;
        // Destroyed while waiting: out of the queue. A get() woken with a
        // value it never received gives it back.
        ~Waiter() {
            if (detail::leave_wait(this) && getter && queue && item)
                queue->give_back(std::move(*item));
        }
        void await_suspend(std::coroutine_handle<> h, detail::WaitList& into) {
            waiting = h;
            into.push_back(this);
        }
    };

    struct PutAwaiter : Waiter {
        PutAwaiter(Queue& q, T&& value) : Waiter(q, false) { this->item.emplace(std::move(value)); }
        // Closed: at once, to throw. Else try_put(), which takes the value
        // only when it succeeds; a full queue waits.
        bool await_ready() {
            Queue& q = *this->queue;
            if (q.closed_) return true;
            this->done = q.try_put(std::move(*this->item));
            return this->done;
        }
        void await_suspend(std::coroutine_handle<> h) {
            Waiter::await_suspend(h, this->queue->putters_);
        }
        void await_resume() {
            detail::leave_wait(this);
            if (!this->done) throw QueueClosed();
        }
    };

    struct GetAwaiter : Waiter {
        explicit GetAwaiter(Queue& q) : Waiter(q, true) {}
        bool await_ready() {
            Queue& q = *this->queue;
            if (!q.items_.empty()) this->item.emplace(q.take());
            return this->item || q.closed_;
        }
        void await_suspend(std::coroutine_handle<> h) {
            Waiter::await_suspend(h, this->queue->getters_);
        }
        T await_resume() {
            detail::leave_wait(this);
            if (!this->item) throw QueueClosed();
            T value = std::move(*this->item);
            this->item.reset();
            return value;
        }
    };

    // The front item; a waiting put() moves up into the room made.
    T take() {
        T value = std::move(items_.front());
        items_.pop_front();
        if (putters_.head) {
            auto* p = static_cast<Waiter*>(putters_.head);
            items_.push_back(std::move(*p->item));
            p->done = true;
            count_put();
            wake(p);
        }
        return value;
    }
    // `value` to the first waiting get().
    void hand(T&& value) {
        auto* g = static_cast<Waiter*>(getters_.head);
        g->item.emplace(std::move(value));
        wake(g);
    }
    // A woken get() went without its value: to the next one, or to the front.
    void give_back(T&& value) {
        if (!getters_.empty())
            hand(std::move(value));
        else
            items_.push_front(std::move(value));
    }
    void wake(detail::WaitNode* w) {
        w->list->remove(w);
        detail::wake_from_loop(w, woken_);
    }
    // An item went in: join() waits for it (asyncio's _finished event).
    void count_put() noexcept {
        if (unfinished_++ == 0) finished_.clear();
    }

    EventLoop& loop_;
    std::size_t max_size_;
    std::deque<T> items_;
    detail::WaitList getters_;
    detail::WaitList putters_;
    detail::WaitList woken_;
    Event finished_;              // set while unfinished_ is 0: join()'s
    std::size_t unfinished_ = 0;  // put, not yet task_done()
    bool closed_ = false;
};

// ---- semaphores --------------------------------------------------------------------

/// A Semaphore was closed (or destroyed) while a task waited in acquire(), or
/// acquire() was called after. Ends a detached task quietly (spawn()), as
/// QueueClosed does.
class SemaphoreClosed : public std::runtime_error {
  public:
    /// what(): "evmux::coro::Semaphore: closed".
    SemaphoreClosed();
};

/// A bound on how many tasks do something at once (asyncio's
/// BoundedSemaphore; with one permit, its Lock): `auto permit = co_await
/// sem.acquire();` returns at once while a permit is free, else waits, and the
/// permit goes back when `permit` is destroyed (or by permit.release()). A
/// permit given back while tasks wait goes to the first of them, in the order
/// they came (a task that calls acquire() later cannot take it first), and
/// that task is resumed from the loop (a zero timer), never inside the
/// release. A task destroyed while it waits (with_timeout(), when_any()) stops
/// waiting; one destroyed after a permit was handed to it, before it ran,
/// passes the permit on. close(), or the semaphore's destruction, ends the
/// waiting acquire()s and later ones with SemaphoreClosed; permits still held
/// stay harmless (after the destruction their release does nothing). Permits
/// are the only way to give back, so more can never be free than the semaphore
/// was made with. Loop thread only. Not copyable or movable.
class Semaphore {
  public:
    /// A permit from acquire() or try_acquire(), given back once, when it is
    /// destroyed or by release(). Movable; a moved-from or released permit
    /// holds nothing.
    class Permit {
      public:
        /// Holds nothing.
        Permit() noexcept = default;
        /// Takes `other`'s permit; `other` holds nothing.
        Permit(Permit&& other) noexcept { take(other); }
        /// Gives back the permit this holds, then takes `other`'s.
        Permit& operator=(Permit&& other) noexcept {
            if (this != &other) {
                release();
                take(other);
            }
            return *this;
        }
        Permit(const Permit&) = delete;
        Permit& operator=(const Permit&) = delete;
        ~Permit() { release(); }
        /// Gives the permit back now (to the first waiting task, if any);
        /// then it holds nothing. Idempotent.
        void release() noexcept;
        /// True until released or moved from (and while its semaphore lives).
        bool held() const noexcept { return sem_ != nullptr; }

      private:
        friend class Semaphore;
        explicit Permit(Semaphore& sem) noexcept;
        void take(Permit& other) noexcept;  // other's place in the held list
        Semaphore* sem_ = nullptr;
        Permit* prev_ = nullptr;
        Permit* next_ = nullptr;
    };

    /// At most `permits` permits held at once (0 is allowed: every acquire()
    /// then waits until close()).
    Semaphore(EventLoop& loop, std::size_t permits) noexcept : loop_(loop), free_(permits) {}
    Semaphore(const Semaphore&) = delete;
    Semaphore& operator=(const Semaphore&) = delete;
    /// Closes it (see close()); its woken waiters and held permits touch it
    /// no more.
    ~Semaphore();

    /// `Permit p = co_await sem.acquire()`: a permit, waiting while none is
    /// free. SemaphoreClosed once closed.
    [[nodiscard]] auto acquire() { return Waiter(*this); }
    /// acquire() without waiting: a permit if one is free and no task waits
    /// for one, else nothing. SemaphoreClosed once closed.
    std::optional<Permit> try_acquire();
    /// Every waiting and later acquire() throws SemaphoreClosed (the waiting
    /// ones resumed from the loop); permits held are unaffected. Idempotent.
    void close();

    /// Permits free now (asyncio's `_value`).
    std::size_t available() const noexcept { return free_; }
    /// True if an acquire() would wait (asyncio's locked()).
    bool locked() const noexcept { return free_ == 0; }
    /// True once close() has been called.
    bool closed() const noexcept { return closed_; }

  private:
    struct Waiter : detail::WaitNode {
        Semaphore* sem;        // null once the semaphore is gone
        bool granted = false;  // a permit is its: taken at once, or handed over
        explicit Waiter(Semaphore& s) noexcept : sem(&s) { loop = &s.loop_; }
        Waiter(const Waiter&) = delete;
        Waiter& operator=(const Waiter&) = delete;
        // Destroyed before it ran with a permit handed to it: passed on.
        ~Waiter() {
            if (detail::leave_wait(this) && granted && sem) sem->give_back();
        }
        bool await_ready();
        void await_suspend(std::coroutine_handle<> h) {
            waiting = h;
            sem->waiters_.push_back(this);
        }
        Permit await_resume();
    };

    void give_back() noexcept;  // a permit to the first waiter, else free
    void hold(Permit* p) noexcept;
    void unhold(Permit* p) noexcept;

    EventLoop& loop_;
    std::size_t free_;  // never above 0 while tasks wait (give_back())
    detail::WaitList waiters_;
    detail::WaitList woken_;
    Permit* held_ = nullptr;  // the permits out, linked through them
    bool closed_ = false;
};

// ---- errors ----------------------------------------------------------------------

/// A read or write on a connection that has closed, or that closes while the
/// coroutine waits. code(): the errno for `reset`/`error` (ECONNRESET, EPIPE,
/// ...), ECANCELED for `local` and `exception`, ENOBUFS for `overflow`,
/// ETIMEDOUT for `timeout`, EPIPE for `peer_closed` (a write after the peer
/// closed). what() reads like "read: connection closed (reset): Connection
/// reset by peer"; for `tls` and `timeout` it has the connection's
/// close_message() too: "read: connection closed (tls): TLS: unexpected eof
/// while reading: Protocol error". One of reason `local` (the program's own
/// close, as asyncio's cancel) ends a detached task quietly (spawn()).
class ConnectionClosed : public std::system_error {
  public:
    /// `operation`: "read", "write", ...; `reason`, `err` as on_close had them;
    /// `detail`: Connection::close_message(), or "".
    ConnectionClosed(const char* operation, CloseReason reason, int err,
                     const std::string& detail = {});
    /// Why the connection closed.
    CloseReason reason() const noexcept { return reason_; }

  private:
    CloseReason reason_;
};

/// Acceptor::accept() on a closed Acceptor, or waiting when it closed (its
/// close() or destructor): the server's ordinary end, so one that escapes
/// a detached task (spawn(), serve()) ends it quietly, never reaching the
/// loop's exception handler (as asyncio's server task cancelled at shutdown
/// is no error). code(): ECANCELED; what(): "accept: the acceptor is
/// closed: Operation canceled".
class AcceptorClosed : public std::system_error {
  public:
    AcceptorClosed();
};

/// read_exactly() met the end of the stream first. what() reads like
/// "read_exactly: end of stream after 3 of 10 bytes".
class IncompleteRead : public std::runtime_error {
  public:
    /// `got` of `wanted` bytes had arrived, in `operation` ("read_exactly",
    /// "read_frame").
    IncompleteRead(std::size_t got, std::size_t wanted, const char* operation = "read_exactly");
    /// Bytes read before the end (they are lost to the caller of the
    /// string-returning read_exactly; in the span form they are its first bytes).
    std::size_t got() const noexcept { return got_; }
    /// Bytes asked for.
    std::size_t wanted() const noexcept { return wanted_; }

  private:
    std::size_t got_, wanted_;
};

/// read_line() found no newline within its limit. what() reads like
/// "read_line: no newline within 65536 bytes".
class LineTooLong : public std::length_error {
  public:
    /// `limit`: the read's max.
    explicit LineTooLong(std::size_t limit);
    /// The limit that was passed.
    std::size_t limit() const noexcept { return limit_; }

  private:
    std::size_t limit_;
};

// ---- streams ---------------------------------------------------------------------

class Stream;

namespace detail {

struct ReadWait;
struct WriteWait;

// One stream's state, shared by its Stream and (through the connection's
// state slot) the callbacks that every stream connection has. In the header
// only for the awaiters' inline fast paths: a read or write that needs no
// waiting and no error costs a few loads and branches, no call.
struct StreamCore {
    // Why reads or writes leave the fast path.
    enum Flag : std::uint8_t {
        eof = 1,         // the peer shut down its side
        closed = 2,      // on_close has run (reason, err say why)
        closing = 4,     // Stream::close() or ~Stream
        write_shut = 8,  // shutdown_write()
        paused = 16,     // reading from the peer paused: input over the limit
        read_stops = eof | closed | closing,
        write_stops = closed | closing | write_shut,
    };

    StreamCore(ConnectionPtr connection, std::size_t limit) noexcept
        : conn(std::move(connection)), input_limit(limit) {}
    bool has(std::uint8_t f) const noexcept { return (flags & f) != 0; }
    std::size_t buffered() const noexcept { return in.size() - in_start; }
    // Keep bytes no read has taken (only while no coroutine of this stream
    // runs: a view lent from `in` has expired).
    void append(const char* p, std::size_t n);
    // A read begins: the previous read's bytes are done with; an emptied
    // buffer gives its storage back (an idle stream holds none).
    void release_read() noexcept;
    void resume_peer();  // a read wants more: undo `paused`
    [[noreturn]] void throw_closed(const char* operation) const;

    ConnectionPtr conn;
    ReadWait* reader = nullptr;  // the read waiting, if any (`in` is empty then)
    WriteWait* writer = nullptr;
    std::uint8_t flags = 0;
    CloseReason reason = CloseReason::local;  // once `closed`
    int err = 0;
    std::size_t in_start = 0;  // read prefix of `in` (a view may still show it)
    std::string in;            // received, not read yet: [in_start, size)
    std::size_t input_limit;   // pause reading from the peer at this many buffered
};

// A read. Lives in the awaiting coroutine's frame (no allocation per read);
// registered in the core while it waits; the core fills it and resumes the
// coroutine; destroyed while waiting, it unregisters.
struct ReadWait {
    enum class Kind : std::uint8_t { view, some, exactly, line, frame };
    enum class Status : std::uint8_t { pending, done, eof, closed, too_long };

    ReadWait(StreamCore* stream, Kind wanted) noexcept : core(stream), kind(wanted) {}
    ReadWait(const ReadWait&) = delete;
    ReadWait& operator=(const ReadWait&) = delete;
    ~ReadWait() {
        if (registered) abandon();
    }
    // Destroyed while waiting (its task destroyed, with_timeout() expired):
    // unregister, and give back the bytes a read_exactly() or read_line()
    // had taken so far, so that the next read finds them. (A subclass whose
    // buffer is its own member calls it first, while that buffer lives.)
    void abandon() noexcept;

    // Nothing buffered and the stream open: wait (the usual case, inline).
    bool await_ready() {
        const StreamCore& c = *core;
        if (c.in.empty() && !c.has(StreamCore::read_stops) && !c.reader &&
            status == Status::pending)
            return false;
        return ready_slow();
    }
    void await_suspend(std::coroutine_handle<> h) {
        StreamCore& c = *core;
        if (c.has(StreamCore::paused)) c.resume_peer();
        waiting = h;
        registered = true;
        c.reader = this;
    }
    // Throws what the outcome calls for (ConnectionClosed, LineTooLong);
    // each awaiter adds its own return value.
    void check(const char* operation) const {
        if (status >= Status::closed) fail(operation);
    }

    bool ready_slow();  // served from buffered input, or the stream has ended
    [[noreturn]] void fail(const char* operation) const;

    StreamCore* core;
    std::coroutine_handle<> waiting;
    const char* data = nullptr;   // view: the bytes; some, exactly: where to (as char*)
    std::size_t cap = 0;          // some, exactly: room; line: the max
    std::size_t got = 0;          // bytes delivered so far (a frame's: its prefix's too)
    std::string* line = nullptr;  // line: the line; frame: the payload
    std::size_t want = 0;         // frame: the payload's size, once its prefix is in
    std::uint8_t head_len = 0;    // frame: the prefix's size
    char head[4] = {};            // frame: the prefix's bytes
    Kind kind;
    Status status = Status::pending;
    bool registered = false;
};

// A write: sends at once; waits while the queue is over the high-water mark.
struct WriteWait {
    WriteWait(StreamCore* stream, const char* bytes, std::size_t size, std::string* kept) noexcept
        : core(stream), p(bytes), n(size), owned(kept) {}
    WriteWait(const WriteWait&) = delete;
    WriteWait& operator=(const WriteWait&) = delete;
    ~WriteWait() {
        if (registered) core->writer = nullptr;
    }

    // Send; ready unless over the high-water mark (or the send closed it:
    // then on_close resumes us with the reason).
    bool await_ready() {
        StreamCore& c = *core;
        if (c.writer || c.has(StreamCore::write_stops)) refuse();
        Connection& conn = *c.conn;
        if (owned)
            conn.send(std::move(*owned));
        else
            conn.send(p, n);
        return conn.is_open() && !conn.above_high_water();
    }
    void await_suspend(std::coroutine_handle<> h) noexcept {
        waiting = h;
        registered = true;
        core->writer = this;
    }
    void await_resume() const {
        if (closed) core->throw_closed("write");
    }

    [[noreturn]] void refuse() const;  // a second writer, closed, shut down

    StreamCore* core;
    const char* p;
    std::size_t n;
    std::string* owned;  // write(std::string&&): sent without a copy
    std::coroutine_handle<> waiting;
    bool registered = false;
    bool closed = false;
};

// read_some(): a view of what arrived.
struct ReadView : ReadWait {
    explicit ReadView(StreamCore* stream) noexcept : ReadWait(stream, Kind::view) {}
    std::string_view await_resume() const {
        check("read");
        return std::string_view(data, got);
    }
};
// read_some(span): copied into the caller's buffer.
struct ReadSome : ReadWait {
    ReadSome(StreamCore* stream, std::span<char> into) noexcept : ReadWait(stream, Kind::some) {
        data = into.data();
        cap = into.size();
    }
    std::size_t await_resume() const {
        check("read");
        return got;
    }
};
// read_exactly(span).
struct ReadExactly : ReadWait {
    ReadExactly(StreamCore* stream, std::span<char> into) noexcept
        : ReadWait(stream, Kind::exactly) {
        data = into.data();
        cap = into.size();
        if (cap == 0) status = Status::done;
    }
    void await_resume() const;
};
// read_exactly(n): into a string of its own.
struct ReadExactlyString : ReadWait {
    ReadExactlyString(StreamCore* core, std::size_t n);
    ReadExactlyString(const ReadExactlyString&) = delete;
    ReadExactlyString& operator=(const ReadExactlyString&) = delete;
    ~ReadExactlyString() {
        if (registered) abandon();
    }
    std::string await_resume();
    std::string bytes;
};
// read_line(std::string&, max).
struct ReadLineInto : ReadWait {
    ReadLineInto(StreamCore* stream, std::string& into, std::size_t max) noexcept
        : ReadWait(stream, Kind::line) {
        into.clear();
        line = &into;
        cap = max;
    }
    bool await_resume() const {
        check("read_line");
        return !line->empty();
    }
};
// read_line(max): into a string of its own.
struct ReadLine : ReadWait {
    ReadLine(StreamCore* stream, std::size_t max) noexcept : ReadWait(stream, Kind::line) {
        line = &text;
        cap = max;
    }
    ReadLine(const ReadLine&) = delete;
    ReadLine& operator=(const ReadLine&) = delete;
    ~ReadLine() {
        if (registered) abandon();
    }
    std::string await_resume() {
        check("read_line");
        return std::move(text);
    }
    std::string text;
};

// read_frame(prefix, max).
struct ReadFrame : ReadWait {
    ReadFrame(StreamCore* stream, Prefix prefix, std::size_t max) noexcept
        : ReadWait(stream, Kind::frame) {
        line = &payload;
        cap = max;
        head_len = prefix == Prefix::u16_be ? 2 : 4;
    }
    ReadFrame(const ReadFrame&) = delete;
    ReadFrame& operator=(const ReadFrame&) = delete;
    ~ReadFrame() {
        if (registered) abandon();
    }
    std::optional<std::string> await_resume();
    std::string payload;
};

// The wiring of stream connections: the callbacks that every stream's
// connection gets (they find the stream in the connection's state slot).
Callbacks stream_callbacks();
// Make the stream of a connection just established (inside on_connect).
Stream attach_stream(const ConnectionPtr& conn, std::size_t input_limit);

}  // namespace detail

/// One connection as a coroutine sees it (asyncio's StreamReader and
/// StreamWriter in one; a gevent socket): `co_await` a read, a line, exactly
/// n bytes, a write. Made by serve(), Acceptor::accept() and connect().
///
/// At most one read and one write may wait at a time (a reader task and a
/// writer task may share a stream by reference); a second throws
/// std::logic_error. Input arriving while nobody reads is kept (up to the
/// connection's high-water mark, then reading from the peer pauses until a
/// read wants more: backpressure both ways). A write returns once the bytes
/// are sent or queued and the queue is under the high-water mark.
///
/// Errors: a read or write on a closed connection, or one waiting when it
/// closes, throws ConnectionClosed (the close reason and errno); the end of
/// the stream is not an error for read_some() (empty) or read_line() (empty,
/// or the last unterminated line), but read_exactly() throws IncompleteRead.
/// Bytes that arrived before a close or the end are always read first.
///
/// Destroying the Stream closes the connection gracefully (queued bytes are
/// sent first). Move-only; loop thread only, write() included (its wait is
/// resumed by the loop only): another thread sends through a ConnectionPtr
/// copied on the loop thread (connection()), whose send() posts (see
/// Connection), bypassing the stream's backpressure. Awaiters are the `co_await`
/// operands returned below; await each at once (they refer to the stream).
class Stream {
  public:
    /// The longest line read_line() accepts by default (the newline included).
    static constexpr std::size_t default_max_line = 64 * 1024;

    /// An empty stream (no connection); only assignment and destruction.
    Stream() noexcept = default;
    /// Takes over `other`'s connection.
    Stream(Stream&& other) noexcept = default;
    /// Closes this stream's connection (as the destructor), then takes `other`'s.
    Stream& operator=(Stream&& other) noexcept;
    /// Closes the connection gracefully (see close()) unless closed already.
    ~Stream();

    // ---- reading ----------------------------------------------------------------
    /// `std::string_view bytes = co_await s.read_some();`: what has arrived
    /// (waits for at least one byte), without a copy; empty at the end of the
    /// stream. The bytes stay valid until this stream's next read or the
    /// coroutine's next suspension, whichever comes first
    /// (`co_await s.write(bytes)` hands them over before it can suspend).
    detail::ReadView read_some() { return detail::ReadView(core_for("read")); }
    /// `std::size_t n = co_await s.read_some(buffer);`: copies what has
    /// arrived, at most buffer.size() bytes (waits for at least one); 0 at the
    /// end of the stream. std::invalid_argument for an empty buffer.
    detail::ReadSome read_some(std::span<char> into);
    /// `co_await s.read_exactly(buffer);`: fills the whole buffer; at the end
    /// of the stream first, IncompleteRead (the bytes that came are in the
    /// buffer's start).
    detail::ReadExactly read_exactly(std::span<char> into) {
        return detail::ReadExactly(core_for("read_exactly"), into);
    }
    /// `std::string s = co_await s.read_exactly(n);`: as above, into a new string.
    detail::ReadExactlyString read_exactly(std::size_t n) {
        return detail::ReadExactlyString(core_for("read_exactly"), n);
    }
    /// `std::string line = co_await s.read_line();`: up to and including the
    /// next '\n'; at the end of the stream the last bytes without one, then
    /// "" for every further call. LineTooLong if no '\n' comes within `max`
    /// bytes (the newline counted; the bytes read are consumed and dropped).
    detail::ReadLine read_line(std::size_t max = default_max_line) {
        return detail::ReadLine(core_for("read_line"), max);
    }
    /// `while (co_await s.read_line(line)) ...`: as read_line(max), into
    /// `into` (cleared first; reuse it and no read allocates in steady
    /// state); false at the end of the stream with nothing read. On
    /// LineTooLong `into` holds the bytes read; cancelled (timed out), it is
    /// empty, and what it had taken is the stream's next input.
    detail::ReadLineInto read_line(std::string& into, std::size_t max = default_max_line) {
        return detail::ReadLineInto(core_for("read_line"), into, max);
    }
    /// `std::optional<std::string> f = co_await s.read_frame(Prefix::u32_be,
    /// 1 << 20);`: the payload of the next length-prefixed frame (the prefix
    /// as Buffer::take_frame() reads it; write one with `s.write(frame(prefix,
    /// payload))`); nothing at the end of the stream between frames,
    /// IncompleteRead ("read_frame: end of stream after 7 of 14 bytes", the
    /// prefix counted) inside one. A prefix announcing more than `max_size`
    /// throws FrameError (frame_too_large, take_frame()'s text) as soon as it
    /// is in, and leaves the prefix unread, so the stream is as it was: close
    /// it. Cancelled (timed out), the bytes it had taken are the stream's
    /// next input. The payload grows as it arrives (a prefix alone allocates
    /// nothing).
    detail::ReadFrame read_frame(Prefix prefix, std::size_t max_size) {
        return detail::ReadFrame(core_for("read_frame"), prefix, max_size);
    }

    // ---- writing ----------------------------------------------------------------
    /// `co_await s.write(bytes);`: Connection::send() them (written at once
    /// or queued: the caller may reuse its buffer as soon as this returns),
    /// then, if the queue is over the high-water mark, wait until it has
    /// drained to the low-water mark. std::logic_error after shutdown_write().
    detail::WriteWait write(std::string_view bytes) {
        return detail::WriteWait(core_for("write"), bytes.data(), bytes.size(), nullptr);
    }
    /// As write(std::string_view); a NUL-terminated text.
    detail::WriteWait write(const char* text) { return write(std::string_view(text)); }
    /// As write(std::string_view), but a queued remainder keeps the string's
    /// storage (no copy).
    detail::WriteWait write(std::string&& bytes) {
        return detail::WriteWait(core_for("write"), bytes.data(), bytes.size(), &bytes);
    }

    // ---- ending -------------------------------------------------------------------
    /// Send FIN once the queue has drained (reading goes on); later writes
    /// throw std::logic_error.
    void shutdown_write();
    /// Close the connection: graceful (the default here, unlike
    /// Connection::close()) sends the queue first, immediate drops it, reset
    /// drops it and resets the connection (the peer reads ECONNRESET). Later
    /// reads and writes throw ConnectionClosed (reason `local`); a read or
    /// write waiting in another task is resumed with it when on_close runs.
    void close(CloseMode mode = CloseMode::graceful);

    // ---- state ------------------------------------------------------------------
    /// True if it holds a connection.
    bool valid() const noexcept { return static_cast<bool>(core_); }
    /// The connection (for its addresses, counters, send()...); null if empty.
    const ConnectionPtr& connection() const noexcept;
    /// Bytes received and not read yet.
    std::size_t buffered() const noexcept;
    /// True once the peer has ended its side (all its bytes may not be read yet).
    bool at_eof() const noexcept;
    /// True until the connection has closed or close() was called.
    bool is_open() const noexcept;

  private:
    friend Stream detail::attach_stream(const ConnectionPtr&, std::size_t);
    explicit Stream(std::shared_ptr<detail::StreamCore> core) noexcept : core_(std::move(core)) {}
    detail::StreamCore* core_for(const char* operation) const {
        if (!core_) throw_empty(operation);
        return core_.get();
    }
    [[noreturn]] static void throw_empty(const char* operation);

    std::shared_ptr<detail::StreamCore> core_;
};

// ---- connecting ----------------------------------------------------------------

namespace detail {
struct ConnectState;
// co_await connect(...).
class ConnectAwaiter {
  public:
    ConnectAwaiter(EventLoop& loop, const Address& address, ConnectOptions options);
    ConnectAwaiter(EventLoop& loop, std::string_view target, ConnectOptions options);
    ConnectAwaiter(const ConnectAwaiter&) = delete;
    ConnectAwaiter& operator=(const ConnectAwaiter&) = delete;
    ~ConnectAwaiter();
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> waiting);
    Stream await_resume();

  private:
    EventLoop& loop_;
    Address address_;
    std::string target_;  // "host:port" text, when by_text_
    bool by_text_ = false;
    ConnectOptions options_;
    std::shared_ptr<ConnectState> state_;
    std::shared_ptr<Connector> connector_;
};
}  // namespace detail

/// `Stream s = co_await connect(loop, address);`: a non-blocking connect
/// (evmux::connect()). Throws std::system_error on failure, what() like
/// "connect 127.0.0.1:1: Connection refused" (ETIMEDOUT after
/// options.timeout). Over TLS (options.connection.tls) it returns once the
/// handshake is done; a failed handshake throws std::system_error too, with
/// evmux::connect()'s on_error text: "connect 127.0.0.1:443: TLS handshake:
/// certificate verify failed (hostname mismatch): Protocol error" (code()
/// EPROTO; ETIMEDOUT for options.timeout or the context's
/// handshake_timeout). Destroying the waiting task (with_timeout() expiring)
/// cancels the attempt, and closes a connection whose handshake runs at once.
inline detail::ConnectAwaiter connect(EventLoop& loop, const Address& address,
                                      ConnectOptions options = {}) {
    return detail::ConnectAwaiter(loop, address, options);
}

/// `Stream s = co_await connect(loop, "localhost:8080");`: "host:port" text,
/// as evmux::connect() takes it (asyncio's open_connection(host, port)): a
/// numeric address ("127.0.0.1:80", "[::1]:80", "unix:/path") or a name,
/// looked up without blocking by options.resolver (or a Resolver made for
/// it), its addresses tried in turn until one connects. Throws
/// std::system_error with evmux::connect()'s on_error text, e.g. "connect
/// localhost:1: 127.0.0.1:1: Connection refused" or "connect
/// nosuch.invalid:80: cannot resolve 'nosuch.invalid': Domain name not
/// found" (code(): the errno, or the ResolveErrc); options.timeout covers the
/// lookup too. Text that is not HOST:PORT throws std::invalid_argument from
/// the co_await. Destroying the waiting task cancels the lookup or attempt.
inline detail::ConnectAwaiter connect(EventLoop& loop, std::string_view target,
                                      ConnectOptions options = {}) {
    return detail::ConnectAwaiter(loop, target, options);
}

// ---- names ---------------------------------------------------------------------

namespace detail {
struct ResolveState;
// co_await resolve(...).
class ResolveAwaiter {
  public:
    ResolveAwaiter(Resolver& resolver, std::string_view host, std::string_view service);
    ResolveAwaiter(EventLoop& loop, std::string_view host, std::string_view service,
                   ResolverOptions options);
    ResolveAwaiter(const ResolveAwaiter&) = delete;
    ResolveAwaiter& operator=(const ResolveAwaiter&) = delete;
    ~ResolveAwaiter();
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> waiting);
    std::vector<Address> await_resume();

  private:
    Resolver* resolver_ = nullptr;  // null: one of its own, made on loop_
    EventLoop* loop_ = nullptr;
    std::string host_;
    std::string service_;
    ResolverOptions options_;
    std::shared_ptr<ResolveState> state_;
};
}  // namespace detail

/// `std::vector<Address> all = co_await resolve(resolver, "example.com",
/// "443");` (asyncio's loop.getaddrinfo()): Resolver::resolve() awaited. The
/// addresses, each with the port set, in the order to try them; on failure a
/// std::system_error whose code() is the ResolveErrc and whose what() reads
/// "cannot resolve 'nosuch.invalid': Domain name not found" (as
/// resolve_message()); std::invalid_argument from the co_await for what
/// resolve() refuses (an empty host, a numeric service over 65535...).
/// Destroying the waiting task (with_timeout() expiring, when_any()) cancels
/// the lookup. The resolver's loop is the task's.
inline detail::ResolveAwaiter resolve(Resolver& resolver, std::string_view host,
                                      std::string_view service) {
    return detail::ResolveAwaiter(resolver, host, service);
}

/// resolve() with a Resolver of its own on `loop`, made for this lookup (it
/// reads /etc/resolv.conf, unless options.servers says whom to ask): for a
/// single lookup; keep a Resolver for many.
inline detail::ResolveAwaiter resolve(EventLoop& loop, std::string_view host,
                                      std::string_view service, ResolverOptions options = {}) {
    return detail::ResolveAwaiter(loop, host, service, std::move(options));
}

// ---- accepting -----------------------------------------------------------------

namespace detail {
struct AcceptorState;
// co_await acceptor.accept().
struct AcceptWait {
    explicit AcceptWait(AcceptorState* acceptor) noexcept : state(acceptor) {}
    AcceptWait(const AcceptWait&) = delete;
    AcceptWait& operator=(const AcceptWait&) = delete;
    ~AcceptWait();
    bool await_ready();
    void await_suspend(std::coroutine_handle<> waiting);
    Stream await_resume();

    AcceptorState* state;
    bool registered = false;
    bool closed = false;
    std::coroutine_handle<> waiting;
};
}  // namespace detail

/// A listening server whose connections are taken one by one with
/// `Stream s = co_await acceptor.accept();` (asyncio's start_server with
/// the loop turned inside out; a gevent listener). A TcpServer on one loop
/// underneath (same options, limits and counters). Connections accepted while
/// no accept() waits are kept (their input too), up to `max_pending`; more
/// are closed at once. One accept() may wait at a time (std::logic_error
/// otherwise). Loop thread only; non-copyable.
class Acceptor {
  public:
    /// Bind and listen (throws as TcpServer's constructor).
    Acceptor(EventLoop& loop, const Address& address, ServerOptions options = {},
             std::size_t max_pending = 128);
    /// As close().
    ~Acceptor();
    Acceptor(const Acceptor&) = delete;
    Acceptor& operator=(const Acceptor&) = delete;

    /// The next connection (waits for one). After close(), and for an accept()
    /// waiting when close() is called: AcceptorClosed (a std::system_error,
    /// ECANCELED, "accept: the acceptor is closed"), which ends a detached
    /// task quietly.
    detail::AcceptWait accept() { return detail::AcceptWait(state_.get()); }
    /// Stop: the listener closes and so does every connection it accepted,
    /// pending or handed out (TcpServer's rule: connections belong to their
    /// server; their streams see ConnectionClosed, reason `local`). A waiting
    /// accept() is resumed (with the error above) before this returns.
    /// Idempotent.
    void close();
    /// The address bound (with the port chosen for port 0).
    const Address& local_address() const;
    /// The server underneath (stats()), null after close().
    TcpServer* server() const;
    /// Connections accepted and not yet taken by accept().
    std::size_t pending() const;

  private:
    std::unique_ptr<detail::AcceptorState> state_;
};

// ---- serving -------------------------------------------------------------------

/// A coroutine per connection: called with the connection's stream when it
/// is accepted; the task runs detached on the connection's loop.
using Handler = std::function<Task<void>(Stream)>;

/// The callbacks of a server whose every connection runs `handler(stream)`
/// as a detached task (what serve() uses): for a TcpServer or
/// LoopGroup::listen() built by hand. `connection`: the limits the server
/// gives its connections (the stream's input limit is their high-water mark).
/// std::invalid_argument for an empty handler.
///
/// A coroutine lambda's captures are not copied into its frame: a handler
/// that needs state takes it as parameters, e.g.
/// `std::bind_front(handle, &state)` with `Task<void> handle(State*, Stream)`.
Callbacks handler_callbacks(Handler handler, const ConnectionOptions& connection = {});

/// A TcpServer on `loop` that runs `handler(stream)` as a detached task for
/// each connection (gevent's StreamServer). The handler's end closes the
/// connection gracefully (its Stream is destroyed). A ConnectionClosed that
/// escapes a handler ends it quietly (the peer went away); any other
/// exception goes to the loop's exception handler. Throws as TcpServer's
/// constructor. Destroying the server closes the connections (their handlers
/// see ConnectionClosed, reason `local`). Loop thread only.
std::unique_ptr<TcpServer> serve(EventLoop& loop, const Address& address, Handler handler,
                                 ServerOptions options = {});
/// As serve(EventLoop&...), over the loops of `group` (LoopGroup::listen()):
/// each handler runs on its connection's loop thread, so `handler` itself is
/// called from several threads at once. The server is the group's.
TcpServer& serve(LoopGroup& group, const Address& address, Handler handler,
                 ServerOptions options = {});

}  // namespace evmux::coro
