// The event loop: fd watchers, timers (a TimerQueue, timer_queue.cpp), a
// cross-thread task queue and signals, on top of any Selector.
//
// One iteration (run_once):
//   1. timeout = time to the nearest timer (0 if tasks are pending), capped by
//      the caller's timeout;
//   2. wait in the selector, then read the clock (only if timers exist);
//   3. call the fd callbacks of the ready batch;
//   4. run the due timers, against the clock read of step 2;
//   5. run the tasks posted before step 5 began.
// The clock read of step 2 is also what step 1 of the next iteration and the
// selector's own timeout measure from, as libevent's time cache does: one
// clock read per iteration. It is a little stale by then (by the time the
// callbacks took), which can only make a wait longer, never a timer early.
//
// Every callback runs inside its own try block: an exception ends that call
// only, goes to the exception handler, and the iteration goes on.
#include "evmux/event_loop.hpp"

#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "completion_io.hpp"
#include "timer_queue.hpp"

namespace evmux {
namespace {

[[noreturn]] void throw_errno(int err, const char* call) {
    throw std::system_error(err, std::generic_category(), std::string("evmux: ") + call);
}

constexpr Events always_reported = Events::error | Events::hangup;

}  // namespace

struct EventLoop::Impl {
    // ---- fds ------------------------------------------------------------------
    enum class Kind : std::uint8_t { user, wake, signal };

    // One per watched fd; its address is the selector key's data. An event in
    // the ready batch is delivered only if its watcher is still alive, and a
    // watcher unwatched during the batch is kept (in `dead`) until the batch
    // ends, so the address cannot be reused by a new watcher of the same fd
    // number meanwhile and the running callback is not destroyed under itself.
    // A user watcher is called as fn(ctx, events): a plain one directly, a
    // std::function one through call_function() with the function (held
    // apart, so that a connection's watcher is 40 bytes, not 64) as ctx.
    struct Watcher {
        int fd;
        Events interest;
        Kind kind;
        bool alive = true;
        RawIoCallback fn = nullptr;
        void* ctx = nullptr;
        std::unique_ptr<IoCallback> function;
    };
    static void call_function(void* ctx, Events events) {
        (*static_cast<IoCallback*>(ctx))(events);
    }
    void add_watcher(Selector& selector, std::unique_ptr<Watcher> w) {
        const int fd = w->fd;
        if (fd >= 0 && static_cast<std::size_t>(fd) >= watchers.size())
            watchers.resize(
                std::max<std::size_t>(static_cast<std::size_t>(fd) + 1, watchers.size() * 2));
        selector.add(fd, w->interest, w.get());  // checks fd and interest; throws: nothing watched
        watchers[fd] = std::move(w);
    }
    std::vector<std::unique_ptr<Watcher>> watchers;  // indexed by fd

    // ---- ties (see EventLoop::tie) -----------------------------------------------
    // A slot table: TieId = generation << 32 | slot, so a stale id finds a
    // slot of another generation and does nothing.
    struct Tie {
        std::shared_ptr<void> owner;
        Task on_loop_end;
        std::uint32_t generation = 1;
    };
    std::vector<Tie> ties;
    std::vector<std::uint32_t> free_ties;
    // Every tie in place, taken out of its slot as untie() takes one (its
    // generation bumped, the slot freed): for the loop's end. An id handed
    // out before then matches no tie made after (one an on_loop_end makes,
    // such as a lingering close), so an owner that unties itself late does
    // not drop another's.
    std::vector<Tie> take_ties() {
        std::vector<Tie> taken;
        for (std::uint32_t slot = 0; slot < ties.size(); ++slot) {
            Tie& t = ties[slot];
            if (!t.owner) continue;
            taken.push_back(Tie{std::move(t.owner), std::move(t.on_loop_end)});
            if (++t.generation == 0) t.generation = 1;
            free_ties.push_back(slot);
        }
        return taken;
    }
    // Takes every tie out and runs its on_loop_end (~EventLoop); false if
    // there was none.
    bool end_ties() {
        std::vector<Tie> taken = take_ties();
        for (Tie& t : taken) {
            if (!t.owner || !t.on_loop_end) continue;
            try {
                t.on_loop_end();
            } catch (...) {
                handle_exception(std::current_exception());
            }
        }
        return !taken.empty();
    }
    bool tied() const {
        return std::any_of(ties.begin(), ties.end(),
                           [](const Tie& t) { return t.owner != nullptr; });
    }

    // ---- exceptions ---------------------------------------------------------------
    ExceptionHandler exception_handler;  // empty: the default (rethrow from run)
    std::exception_ptr pending_error;    // the default's: rethrown after the iteration

    // The default handler: keep the first exception for run() to rethrow, and
    // say something of any further one rather than lose it silently.
    void keep_for_run(std::exception_ptr error) noexcept {
        if (!pending_error) {
            pending_error = std::move(error);
            return;
        }
        report_to_stderr("evmux: a further exception in the same loop iteration", error);
    }
    static void report_to_stderr(const char* what, const std::exception_ptr& error) noexcept {
        try {
            std::rethrow_exception(error);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "%s: %s\n", what, e.what());
        } catch (...) {
            std::fprintf(stderr, "%s (not a std::exception)\n", what);
        }
    }
    void handle_exception(std::exception_ptr error) noexcept {
        if (!exception_handler) return keep_for_run(std::move(error));
        try {
            exception_handler(std::move(error));
        } catch (...) {
            keep_for_run(std::current_exception());
        }
    }
    void rethrow_pending() {
        if (pending_error) std::rethrow_exception(std::exchange(pending_error, nullptr));
    }

    Watcher* find(int fd) const {
        if (fd < 0 || static_cast<std::size_t>(fd) >= watchers.size()) return nullptr;
        return watchers[fd].get();
    }
    Watcher* find_user(int fd) const {
        Watcher* w = find(fd);
        return w && w->kind == Kind::user ? w : nullptr;
    }

    // ---- what every iteration reads, side by side --------------------------------
    // (Declared together so that a wake-up after a long sleep, with cold
    // caches, touches one or two lines of the loop's state, not six.)
    bool running = false;                // inside run_once(): it must not be re-entered
    bool dispatching = false;            // in step 3 of iterate()
    bool now_valid = false;              // `now` was read in this run (see iteration_time())
    std::atomic<bool> has_tasks{false};  // == !pending.empty(); written under task_mutex
    std::atomic<bool> sleeping{false};   // see wake_if_sleeping()
    std::atomic<bool> stop_requested{false};
    detail::TimerQueue timers;                   // heap and slots: timer_queue.hpp
    std::vector<std::unique_ptr<Watcher>> dead;  // unwatched during the batch
    Clock::time_point now{};                     // the iteration's clock read

    // ---- tasks and wake-up --------------------------------------------------------
    // Another thread writes the eventfd only if the loop announced it is about
    // to wait (`sleeping`) and no one else has written since (the exchange):
    // a busy loop is never sent a syscall. Both sides store, then load, with
    // seq_cst (the Dekker pattern): either the poster sees `sleeping` and
    // writes, or the loop sees `has_tasks`/`stop_requested` and does not block.
    std::mutex task_mutex;
    std::vector<Task> pending;        // guarded by task_mutex
    std::vector<Task> running_tasks;  // loop thread only; swapped with `pending`
    std::atomic<std::thread::id> owner{std::this_thread::get_id()};
    // The thread that runs the loop owns it (in_loop_thread()); set on entry
    // to run()/run_once(), not per iteration.
    void claim() {
        const std::thread::id me = std::this_thread::get_id();
        if (owner.load(std::memory_order_relaxed) != me) owner.store(me, std::memory_order_relaxed);
    }
    int wake_fd = -1;

    // stop() and post() from other threads, still touching the loop: the
    // loop's thread may have returned from run() and be destroying it.
    std::atomic<int> calls_in_flight{0};
    class CallInFlight {
      public:
        explicit CallInFlight(Impl& m) noexcept : m_(m) {
            m_.calls_in_flight.fetch_add(1, std::memory_order_seq_cst);
        }
        ~CallInFlight() { m_.calls_in_flight.fetch_sub(1, std::memory_order_release); }
        CallInFlight(const CallInFlight&) = delete;
        CallInFlight& operator=(const CallInFlight&) = delete;

      private:
        Impl& m_;
    };
    void wait_for_calls_in_flight() const {
        while (calls_in_flight.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    }

    void wake_if_sleeping() {
        if (!sleeping.load(std::memory_order_seq_cst)) return;
        if (!sleeping.exchange(false, std::memory_order_seq_cst)) return;  // another thread woke it
        const std::uint64_t one = 1;
        // Fails only with EAGAIN when the counter is saturated: it is readable then anyway.
        [[maybe_unused]] ssize_t n = ::write(wake_fd, &one, sizeof one);
    }

    void drain_wake_fd() {
        std::uint64_t count;
        [[maybe_unused]] ssize_t n = ::read(wake_fd, &count, sizeof count);
    }

    std::size_t run_tasks() {
        {
            std::lock_guard lock(task_mutex);
            if (pending.empty()) return 0;
            pending.swap(running_tasks);
            has_tasks.store(false, std::memory_order_seq_cst);
        }
        // Tasks posted by these tasks go to `pending` and run next iteration,
        // after the next I/O wait: no starvation.
        for (Task& task : running_tasks) {
            try {
                task();
            } catch (...) {
                handle_exception(std::current_exception());
            }
        }
        const std::size_t ran = running_tasks.size();
        running_tasks.clear();  // keeps the capacity: no allocation next time
        return ran;
    }

    // ---- signals ------------------------------------------------------------------
    int signal_fd = -1;
    sigset_t signal_set{};
    sigset_t blocked_before{};  // watched signals the thread had blocked already
    // The thread whose mask on_signal() changed, per watched signal: only
    // that thread can undo it (pthread_sigmask changes the caller's mask).
    std::array<std::thread::id, NSIG> blocked_in{};
    // shared_ptr: a callback that replaces or removes its own signal keeps
    // running on the copy taken for the call (a refcount, not an allocation).
    std::array<std::shared_ptr<std::function<void(int)>>, NSIG> signal_callbacks{};

    std::size_t dispatch_signals() {
        signalfd_siginfo infos[16];
        std::size_t ran = 0;
        for (;;) {
            ssize_t n = ::read(signal_fd, infos, sizeof infos);
            if (n <= 0) return ran;  // EAGAIN: all read
            const std::size_t count = static_cast<std::size_t>(n) / sizeof infos[0];
            for (std::size_t i = 0; i < count; ++i) {
                const int signo = static_cast<int>(infos[i].ssi_signo);
                if (signo <= 0 || signo >= NSIG) continue;
                auto callback = signal_callbacks[signo];  // looked up now: may have been removed
                if (!callback) continue;
                ++ran;
                try {
                    (*callback)(signo);
                } catch (...) {
                    handle_exception(std::current_exception());
                }
            }
            if (count < std::size(infos)) return ran;
        }
    }

    // Gives `signo` back as on_signal() found it (remove_signal(), ~EventLoop):
    // an instance that arrived but was not read is discarded (unblocked, it
    // would take its default action, for most signals termination); then
    // unblocked if it was unblocked then, on the thread that blocked it. On
    // another thread nothing is unblocked: that thread's mask is not ours to
    // change, and the blocking thread's cannot be changed from here.
    void give_back_signal(int signo) {
        sigset_t one;
        sigemptyset(&one);
        sigaddset(&one, signo);
        const timespec zero{0, 0};
        while (::sigtimedwait(&one, nullptr, &zero) == signo) {
        }
        if (!sigismember(&blocked_before, signo) && blocked_in[signo] == std::this_thread::get_id())
            ::pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
        sigdelset(&signal_set, signo);
    }

    ~Impl() {
        if (wake_fd >= 0) ::close(wake_fd);
        if (signal_fd >= 0) ::close(signal_fd);
    }
};

const char* to_string(IoMode mode) {
    return mode == IoMode::completion ? "completion" : "readiness";
}

namespace {

// EVMUX_IO as set, "" when unset.
std::string_view io_env() {
    const char* env = std::getenv("EVMUX_IO");
    return env ? env : "";
}

}  // namespace

IoMode requested_io_mode() {
    const std::string_view value = io_env();
    if (value == "readiness") return IoMode::readiness;
    if (value.empty() || value == "completion") return IoMode::completion;
    throw std::invalid_argument("evmux: EVMUX_IO must be 'completion' or 'readiness', not '" +
                                std::string(value) + "'");
}

EventLoop::EventLoop(std::unique_ptr<Selector> selector)
    : EventLoop(std::move(selector), requested_io_mode(), io_env().empty()) {}

EventLoop::EventLoop(std::unique_ptr<Selector> selector, IoMode io)
    : EventLoop(std::move(selector), io, false) {}

EventLoop::EventLoop(std::unique_ptr<Selector> selector, IoMode io, bool by_default)
    : selector_(std::move(selector)),
      scratch_(std::make_unique_for_overwrite<char[]>(scratch_size)),
      impl_(std::make_unique<Impl>()) {
    if (!selector_) throw std::invalid_argument("evmux: EventLoop needs a selector");
    sigemptyset(&impl_->signal_set);
    sigemptyset(&impl_->blocked_before);
    impl_->wake_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (impl_->wake_fd < 0) throw_errno(errno, "eventfd");
    auto w = std::make_unique<Impl::Watcher>(
        Impl::Watcher{impl_->wake_fd, Events::read, Impl::Kind::wake, true, nullptr, nullptr, {}});
    impl_->watchers.resize(static_cast<std::size_t>(impl_->wake_fd) + 1);
    selector_->add(impl_->wake_fd, Events::read, w.get());
    impl_->watchers[impl_->wake_fd] = std::move(w);
    if (io == IoMode::completion) {
        auto* cio = dynamic_cast<detail::CompletionIo*>(selector_.get());
        if (!cio) {
            if (!by_default)
                io_note_ =
                    "the " + selector_->name() + " backend has no completion I/O (io_uring has)";
        } else if (cio->enable_completion(io_note_)) {
            completion_io_ = cio;
            io_note_ = cio->completion_features();
        }
    }
}

EventLoop::~EventLoop() {
    Impl& m = *impl_;
    // A stop() or post() that made run() return may still be waking us.
    m.wait_for_calls_in_flight();
    // Owners first, while the loop is whole: a connection still open closes
    // and runs its on_close here. What they tie anew meanwhile gets its turn
    // in a further (bounded) round.
    for (int pass = 0; pass < 4; ++pass) {
        for (int round = 0; round < 4; ++round)
            if (!m.end_ties()) break;
        // Completion requests still in the kernel point at their owners
        // (closed above, their cancels queued): let them finish, so the
        // owners go. A connection's last request lets its socket go, and a
        // graceful close's socket then lingers, tied anew: ended by the
        // next pass, not dropped with the timers below (the fd leaked).
        if (!completion_io_) break;
        completion_io_->drain();
        if (!m.tied()) break;
    }
    // Destroy the callbacks first, while the loop is still whole: what they
    // captured may reach for the loop from its destructor (an owner that
    // unwatches its fd or cancels its timer, as ~Connection does); those
    // calls then find nothing to do. Destroyed as members of Impl instead,
    // they would run against half-destroyed containers. Whatever such a
    // destructor posts or schedules is destroyed in a further (bounded) round.
    for (int round = 0; round < 4; ++round) {
        std::vector<std::unique_ptr<Impl::Watcher>> watchers;
        for (auto& w : m.watchers)
            if (w && w->kind == Impl::Kind::user) watchers.push_back(std::move(w));
        std::vector<Task> tasks;
        {
            std::lock_guard lock(m.task_mutex);
            tasks.swap(m.pending);
            m.has_tasks.store(false, std::memory_order_relaxed);
        }
        std::vector<Task> timers = m.timers.take_callbacks();
        std::vector<std::shared_ptr<std::function<void(int)>>> signals;
        for (auto& callback : m.signal_callbacks)
            if (callback) signals.push_back(std::move(callback));
        // A capture's destructor may have tied an owner (a socket left to
        // linger): it is ended as the others were, not dropped unended.
        const bool ended = m.end_ties();
        if (ended && completion_io_) completion_io_->drain();
        if (watchers.empty() && tasks.empty() && timers.empty() && signals.empty() && !ended) break;
    }
    // Every signal still delivered here goes back as remove_signal() leaves
    // it: unblocked where on_signal() found it unblocked (Ctrl-C works again
    // during the program's cleanup), one not read yet discarded.
    for (int signo = 1; signo < NSIG; ++signo)
        if (sigismember(&m.signal_set, signo)) m.give_back_signal(signo);
    if (m.pending_error)
        Impl::report_to_stderr("evmux: an exception while the loop was destroyed",
                               std::exchange(m.pending_error, nullptr));
    // Unregister the loop's own fds before Impl closes them (a backend may
    // have a request in flight on them); user fds are simply forgotten with
    // the selector.
    for (int fd : {impl_->wake_fd, impl_->signal_fd}) {
        if (fd < 0 || !selector_->get_key(fd)) continue;
        try {
            selector_->remove(fd);
        } catch (...) {
            // Nothing to do in a destructor; the fd is closed next.
        }
    }
}

// ---- fds ----------------------------------------------------------------------

void EventLoop::watch(int fd, Events interest, IoCallback callback) {
    if (!callback) throw std::invalid_argument("evmux: empty fd callback");
    auto function = std::make_unique<IoCallback>(std::move(callback));
    void* ctx = function.get();
    impl_->add_watcher(*selector_, std::make_unique<Impl::Watcher>(Impl::Watcher{
                                       fd, interest, Impl::Kind::user, true, Impl::call_function,
                                       ctx, std::move(function)}));
}

void EventLoop::watch(int fd, Events interest, RawIoCallback fn, void* ctx) {
    if (!fn) throw std::invalid_argument("evmux: null fd callback");
    impl_->add_watcher(*selector_, std::make_unique<Impl::Watcher>(Impl::Watcher{
                                       fd, interest, Impl::Kind::user, true, fn, ctx, {}}));
}

void EventLoop::change(int fd, Events interest) {
    Impl::Watcher* w = impl_->find_user(fd);
    if (!w) throw std::out_of_range("evmux: fd " + std::to_string(fd) + " is not watched");
    selector_->modify(fd, interest);  // throws: old interest kept
    w->interest = interest;
}

void EventLoop::unwatch(int fd) {
    Impl& m = *impl_;
    if (!m.find_user(fd)) return;
    selector_->remove(fd);
    std::unique_ptr<Impl::Watcher> w = std::move(m.watchers[fd]);
    w->alive = false;
    if (m.dispatching) m.dead.push_back(std::move(w));
}

// ---- owners and exceptions ---------------------------------------------------------

EventLoop::TieId EventLoop::tie(std::shared_ptr<void> owner, Task on_loop_end) {
    Impl& m = *impl_;
    std::uint32_t slot;
    if (!m.free_ties.empty()) {
        slot = m.free_ties.back();
        m.free_ties.pop_back();
    } else {
        if (m.ties.size() >= UINT32_MAX) throw std::length_error("evmux: too many ties");
        m.ties.emplace_back();
        slot = static_cast<std::uint32_t>(m.ties.size() - 1);
        m.free_ties.reserve(m.ties.capacity());  // untie() then never allocates
    }
    Impl::Tie& t = m.ties[slot];
    t.owner = std::move(owner);
    t.on_loop_end = std::move(on_loop_end);
    return static_cast<TieId>(t.generation) << 32 | slot;
}

void EventLoop::untie(TieId id) {
    Impl& m = *impl_;
    const auto slot = static_cast<std::uint32_t>(id);
    const auto generation = static_cast<std::uint32_t>(id >> 32);
    if (slot >= m.ties.size() || m.ties[slot].generation != generation || !m.ties[slot].owner)
        return;
    Impl::Tie& t = m.ties[slot];
    if (++t.generation == 0) t.generation = 1;  // ids are never 0
    // Moved out first: the owner's destructor may reach for the loop.
    std::shared_ptr<void> owner = std::move(t.owner);
    Task on_loop_end = std::move(t.on_loop_end);
    m.free_ties.push_back(slot);
}

void EventLoop::set_exception_handler(ExceptionHandler handler) {
    impl_->exception_handler = std::move(handler);
}

void EventLoop::handle_exception(std::exception_ptr error) noexcept {
    impl_->handle_exception(std::move(error));
}

EventLoop::Clock::time_point EventLoop::iteration_time() {
    Impl& m = *impl_;
    if (!m.now_valid) {
        m.now = Clock::now();
        m.now_valid = true;
    }
    return m.now;
}

bool EventLoop::watching(int fd) const {
    return impl_->find_user(fd) != nullptr;
}

Events EventLoop::interest(int fd) const {
    const Impl::Watcher* w = impl_->find_user(fd);
    return w ? w->interest : Events::none;
}

// ---- timers -------------------------------------------------------------------

EventLoop::TimerId EventLoop::call_after(Duration delay, Task fn) {
    return impl_->timers.add(delay, Duration::zero(), std::move(fn));
}

EventLoop::TimerId EventLoop::call_every(Duration interval, Task fn) {
    if (interval <= Duration::zero()) interval = Duration(1);
    return impl_->timers.add(interval, interval, std::move(fn));
}

bool EventLoop::cancel(TimerId id) {
    return impl_->timers.cancel(id);
}

// ---- threads ------------------------------------------------------------------

void EventLoop::post(Task fn) {
    if (!fn) throw std::invalid_argument("evmux: empty task");
    Impl& m = *impl_;
    const Impl::CallInFlight here(m);  // the task may make run() return: see stop()
    {
        std::lock_guard lock(m.task_mutex);
        m.pending.push_back(std::move(fn));
        m.has_tasks.store(true, std::memory_order_seq_cst);
    }
    m.wake_if_sleeping();
}

void EventLoop::stop() {
    // The loop's thread may return from run() as soon as it sees the request
    // and destroy the loop at once (the usual shutdown: stop() from another
    // thread, then join). ~EventLoop first waits until no stop() or post()
    // is still touching the loop. Lock-free: stop() stays callable from a
    // signal handler.
    Impl& m = *impl_;
    const Impl::CallInFlight here(m);
    m.stop_requested.store(true, std::memory_order_seq_cst);
    m.wake_if_sleeping();
}

bool EventLoop::owned_by_this_thread() const {
    return impl_->owner.load(std::memory_order_relaxed) == std::this_thread::get_id();
}

// ---- signals ------------------------------------------------------------------

void EventLoop::on_signal(int signo, std::function<void(int)> callback) {
    if (signo <= 0 || signo >= NSIG || signo == SIGKILL || signo == SIGSTOP)
        throw std::invalid_argument("evmux: cannot watch signal " + std::to_string(signo));
    if (!callback) throw std::invalid_argument("evmux: empty signal callback");
    Impl& m = *impl_;
    auto shared = std::make_shared<std::function<void(int)>>(std::move(callback));

    sigset_t one, old;
    sigemptyset(&one);
    sigaddset(&one, signo);
    // Blocked first, so that no instance is delivered the default way between
    // here and the signalfd taking it.
    if (int err = ::pthread_sigmask(SIG_BLOCK, &one, &old)) throw_errno(err, "pthread_sigmask");
    sigset_t wanted = m.signal_set;
    sigaddset(&wanted, signo);
    auto undo_block = [&] {
        if (!sigismember(&old, signo)) ::pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
    };
    const int fd = ::signalfd(m.signal_fd, &wanted, SFD_NONBLOCK | SFD_CLOEXEC);
    if (fd < 0) {
        const int err = errno;
        undo_block();
        throw_errno(err, "signalfd");
    }
    if (m.signal_fd < 0) {
        try {
            auto w = std::make_unique<Impl::Watcher>(
                Impl::Watcher{fd, Events::read, Impl::Kind::signal, true, nullptr, nullptr, {}});
            if (static_cast<std::size_t>(fd) >= m.watchers.size())
                m.watchers.resize(static_cast<std::size_t>(fd) + 1);
            selector_->add(fd, Events::read, w.get());
            m.watchers[fd] = std::move(w);
        } catch (...) {
            ::close(fd);
            undo_block();
            throw;
        }
        m.signal_fd = fd;
    }
    m.signal_set = wanted;
    if (!m.signal_callbacks[signo]) {  // first watched: how remove_signal() leaves the mask
        if (sigismember(&old, signo))
            sigaddset(&m.blocked_before, signo);
        else
            sigdelset(&m.blocked_before, signo);
        m.blocked_in[signo] = std::this_thread::get_id();
    }
    m.signal_callbacks[signo] = std::move(shared);
}

void EventLoop::remove_signal(int signo) {
    Impl& m = *impl_;
    if (signo <= 0 || signo >= NSIG || !m.signal_callbacks[signo]) return;
    sigdelset(&m.signal_set, signo);
    ::signalfd(m.signal_fd, &m.signal_set, SFD_NONBLOCK | SFD_CLOEXEC);
    m.signal_callbacks[signo].reset();
    // The mask as on_signal() found it: a LoopGroup's thread, which blocks
    // the asynchronous signals from its start, keeps it blocked.
    m.give_back_signal(signo);
}

// ---- running ------------------------------------------------------------------

constinit thread_local EventLoop* detail::running_loop = nullptr;

namespace {

// detail::running_loop names `loop` while run() or run_once() is on the
// stack; the outer loop's again after (one loop's callback may run another).
class RunningHere {
  public:
    explicit RunningHere(EventLoop* loop) noexcept
        : outer_(std::exchange(detail::running_loop, loop)) {}
    ~RunningHere() { detail::running_loop = outer_; }
    RunningHere(const RunningHere&) = delete;
    RunningHere& operator=(const RunningHere&) = delete;

  private:
    EventLoop* outer_;
};

}  // namespace

void EventLoop::run() {
    Impl& m = *impl_;
    if (m.stop_requested.exchange(false)) return;
    m.now_valid = false;  // the clock was last read in another run, if ever
    m.claim();
    const RunningHere here(this);
    for (;;) {
        iterate(std::nullopt, true);
        if (m.stop_requested.load(std::memory_order_relaxed) && m.stop_requested.exchange(false)) {
            if (completion_io_) completion_io_->submit();  // e.g. the closes on_close made
            return;
        }
    }
}

std::size_t EventLoop::run_once(Timeout timeout) {
    impl_->now_valid = false;
    impl_->claim();
    const RunningHere here(this);
    const std::size_t ran = iterate(timeout, false);
    // Requests made after the wait (a close after on_close) go out now, not
    // with a next wait that may be long in coming.
    if (completion_io_) completion_io_->submit();
    return ran;
}

std::size_t EventLoop::iterate(Timeout timeout, bool stoppable) {
    Impl& m = *impl_;
    if (m.running) throw std::logic_error("evmux: run()/run_once() called from a loop callback");
    m.running = true;
    struct Running {
        Impl& m;
        ~Running() { m.running = false; }
    } running{m};

    // 1. How long to wait: until the nearest timer, at most `timeout`.
    const std::optional<Clock::time_point> next_due = m.timers.next_due();
    const bool have_timers = next_due.has_value();
    if (have_timers) {
        if (!m.now_valid) m.now = Clock::now();  // first iteration of this run
        const Duration left = std::max(*next_due - m.now, Clock::duration::zero());
        if (!timeout || left < *timeout) timeout = left;
    }
    m.sleeping.store(true, std::memory_order_seq_cst);
    if (m.has_tasks.load(std::memory_order_seq_cst) ||
        (stoppable && m.stop_requested.load(std::memory_order_seq_cst)))
        timeout = Duration::zero();

    // 2. Wait (the timeout counts from `now` when there is one), then read the
    // clock: the iteration's one reading, while timers exist.
    std::span<const ReadyEvent> ready;
    try {
        ready = have_timers ? selector_->select(timeout, m.now) : selector_->select(timeout);
    } catch (...) {
        m.sleeping.store(false, std::memory_order_relaxed);
        m.now_valid = false;
        throw;
    }
    // A poster that still sees `true` only sends one needless wake-up.
    m.sleeping.store(false, std::memory_order_relaxed);
    if (have_timers) m.now = Clock::now();
    m.now_valid = have_timers;  // else iteration_time() reads it if asked

    // 3. fd callbacks.
    std::size_t ran = 0;
    {
        m.dispatching = true;
        struct Dispatching {
            Impl& m;
            ~Dispatching() {
                m.dispatching = false;
                m.dead.clear();  // keeps the capacity
            }
        } dispatching{m};
        for (const ReadyEvent& event : ready) {
            auto* w = static_cast<Impl::Watcher*>(event.key.data);
            if (!w || !w->alive) continue;  // unwatched earlier in this batch
            // The interest may have been changed earlier in this batch.
            const Events events = event.events & (w->interest | always_reported);
            if (events == Events::none) continue;
            if (w->kind == Impl::Kind::user) [[likely]] {
                ++ran;
                try {
                    w->fn(w->ctx, events);
                } catch (...) {
                    m.handle_exception(std::current_exception());
                }
            } else if (w->kind == Impl::Kind::wake) {
                m.drain_wake_fd();  // the tasks run in step 5
            } else {
                ran += m.dispatch_signals();
            }
        }
    }

    // 3b. Completions of the connections' own requests (completion I/O).
    if (completion_io_) ran += completion_io_->dispatch();

    // 4. Due timers, against the iteration's one clock read (read now only
    // if the fd callbacks created the first timer).
    if (!m.timers.empty()) {
        iteration_time();
        ran += m.timers.run_due(m.now, *this);
    }

    // 5. Posted tasks. Acquire pairs with the poster's store so a task seen is
    // a task run; one missed here is seen by the next iteration's check.
    if (m.has_tasks.load(std::memory_order_acquire)) ran += m.run_tasks();
    // With the default handler, the iteration's first escaped exception; the
    // requests the iteration made (a reply another callback sent) go out
    // first, as when run() returns: the loop may never run again.
    if (m.pending_error && completion_io_) completion_io_->submit();
    m.rethrow_pending();
    return ran;
}

}  // namespace evmux
