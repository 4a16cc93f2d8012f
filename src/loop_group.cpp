// LoopGroup: one EventLoop per thread, and the stop that closes its servers'
// connections gracefully on their own loops before joining.
#include "evmux/loop_group.hpp"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <optional>
#include <stdexcept>
#include <system_error>
#include <unordered_map>
#include <utility>

#include "connection_completion.hpp"

namespace evmux {

namespace {

// What a group's threads block from their start: every asynchronous signal,
// so that a process-directed one (kill(1), Ctrl-C, a timer's SIGALRM) is
// never taken by a loop thread, where its default action (for most:
// terminate the process) would run although the user handles it elsewhere
// (a main-thread loop's on_signal(), a sigwait()). The kernel hands it to a
// thread that has it unblocked, or leaves it pending for a signalfd. Left
// unblocked: the synchronous faults, which go to the faulting thread (blocked,
// the kernel kills the process anyway, past any handler), and SIGPROF, which a
// setitimer(ITIMER_PROF) profiler needs delivered to the thread that is
// running. SIGKILL and SIGSTOP cannot be blocked; glibc keeps its own (the
// thread-cancellation and setxid ones) unblocked.
sigset_t loop_thread_blocked_signals() {
    sigset_t set;
    sigfillset(&set);
    for (int fault : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGPROF})
        sigdelset(&set, fault);
    return set;
}

// Blocks them in the calling thread while it starts the group's threads, which
// inherit the mask (blocked from their first instruction: no moment in which
// a signal could reach one), and gives the caller its own mask back after.
// A signal sent to the caller meanwhile is delivered when it is restored.
class BlockedWhileStarting {
  public:
    BlockedWhileStarting() {
        const sigset_t set = loop_thread_blocked_signals();
        ok_ = ::pthread_sigmask(SIG_BLOCK, &set, &saved_) == 0;
    }
    ~BlockedWhileStarting() {
        if (ok_) ::pthread_sigmask(SIG_SETMASK, &saved_, nullptr);
    }
    BlockedWhileStarting(const BlockedWhileStarting&) = delete;
    BlockedWhileStarting& operator=(const BlockedWhileStarting&) = delete;

  private:
    sigset_t saved_{};
    bool ok_ = false;
};

}  // namespace

// ---- LoopGroup ------------------------------------------------------------------------

LoopGroup::LoopGroup(std::size_t threads, const std::string& backend) {
    if (threads == 0) throw std::invalid_argument("LoopGroup: at least one thread");
    loops_.resize(threads);
    stopped_by_group_ = std::make_unique<std::atomic<bool>[]>(threads);
    // Each loop (and its selector) is built on the thread that runs it: a
    // kernel object may belong to its creating thread (io_uring queues its
    // completion work to the submitter, which then sees EINTR in blocking
    // calls), and the user's thread must not be that one. Shared, so no
    // thread touches a promise the constructor has already destroyed.
    auto ready = std::make_shared<std::vector<std::promise<void>>>(threads);
    threads_.reserve(threads);
    std::exception_ptr error;
    try {
        const BlockedWhileStarting blocked;  // for the threads to inherit
        for (std::size_t i = 0; i < threads; ++i) {
            threads_.emplace_back([this, i, ready, backend] {
                try {
                    loops_[i] = std::make_unique<EventLoop>(
                        backend.empty() ? make_selector() : make_selector(backend));
                } catch (...) {
                    (*ready)[i].set_exception(std::current_exception());
                    return;
                }
                (*ready)[i].set_value();
                run_loop(i);
            });
            thread_ids_.push_back(threads_.back().get_id());
        }
    } catch (...) {
        error = std::current_exception();
    }
    for (std::size_t i = 0; i < threads_.size(); ++i) {
        try {
            (*ready)[i].get_future().get();
        } catch (...) {
            if (!error) error = std::current_exception();
        }
    }
    if (error) {
        for (std::size_t i = 0; i < loops_.size(); ++i) {
            stopped_by_group_[i].store(true);
            if (loops_[i]) loops_[i]->stop();
        }
        for (auto& t : threads_) t.join();
        std::rethrow_exception(error);
    }
}

LoopGroup::~LoopGroup() {
    // On one of its loop threads it would join that thread: say so, rather
    // than end in std::terminate with no word of why.
    const auto me = std::this_thread::get_id();
    if (std::find(thread_ids_.begin(), thread_ids_.end(), me) != thread_ids_.end()) {
        std::fputs("evmux: ~LoopGroup on one of its own loop threads (it joins them): aborting\n",
                   stderr);
        std::abort();
    }
    try {
        stop();
    } catch (...) {
        // A callback's exception (already reported to nobody): nothing to do
        // in a destructor.
    }
    // The servers hold connections and timers of the loops: destroy them first.
    servers_.clear();
    loops_.clear();
}

EventLoop& LoopGroup::loop(std::size_t index) const {
    if (index >= loops_.size())
        throw std::out_of_range("LoopGroup: no loop " + std::to_string(index) + " (size " +
                                std::to_string(loops_.size()) + ")");
    return *loops_[index];
}

void LoopGroup::post(std::size_t index, EventLoop::Task fn) {
    loop(index).post(std::move(fn));
}

std::size_t LoopGroup::post(EventLoop::Task fn) {
    const std::size_t index = next_.fetch_add(1, std::memory_order_relaxed) % loops_.size();
    loops_[index]->post(std::move(fn));
    return index;
}

TcpServer& LoopGroup::listen(const Address& address, Callbacks callbacks, ServerOptions options) {
    return listen_on({address}, {}, std::move(callbacks), std::move(options));
}

TcpServer& LoopGroup::listen(std::string_view address, Callbacks callbacks, ServerOptions options) {
    // Before listen_on() takes the lock: a lookup blocks.
    const std::vector<Address> candidates = resolve_address_now(address, options.resolver);
    return listen_on(candidates, address, std::move(callbacks), std::move(options));
}

TcpServer& LoopGroup::listen_on(const std::vector<Address>& candidates, std::string_view text,
                                Callbacks callbacks, ServerOptions options) {
    std::lock_guard lock(mutex_);
    if (stopping_.load()) throw std::logic_error("LoopGroup::listen after stop()");
    std::unique_ptr<TcpServer> server(
        new TcpServer(nullptr, this, candidates, text, std::move(callbacks), std::move(options)));
    TcpServer* ref = server.get();
    servers_.push_back(std::move(server));
    // Posted under the lock, so every loop runs its start task before the
    // stop task that a concurrent stop() posts.
    for (std::size_t i = 0; i < loops_.size(); ++i)
        loops_[i]->post([ref, i] { ref->start_shard(i); });
    return *ref;
}

std::vector<TcpServer*> LoopGroup::servers() {
    std::lock_guard lock(mutex_);
    std::vector<TcpServer*> out;
    out.reserve(servers_.size());
    for (auto& s : servers_) out.push_back(s.get());
    return out;
}

void LoopGroup::run_loop(std::size_t index) {
    EventLoop& loop = *loops_[index];
    for (;;) {
        try {
            loop.run();
            // run() also returns for a stop() of the loop's own (from any
            // thread, or a callback of it, as a one-loop program stops its
            // loop); the thread stays until the group's stop(), or tasks
            // posted to it and connections handed to it would never run.
            if (stopped_by_group_[index].load()) break;
        } catch (...) {
            // The loop stays usable (EventLoop's rule); keep serving the
            // others and report the first failure from stop().
            std::lock_guard lock(mutex_);
            if (!first_error_) first_error_ = std::current_exception();
        }
    }
    finish_loop(index);
}

void LoopGroup::begin_stop(std::size_t index) {
    for (TcpServer* s : servers()) s->begin_stop(index);
    check_drained(index);
}

void LoopGroup::check_drained(std::size_t index) {
    EventLoop& loop = *loops_[index];
    bool drained = true;
    for (TcpServer* s : servers()) drained = drained && s->drained(index);
    // The closes of those connections that linger (ConnectionOptions::linger):
    // the group's loops go after stop(), and closing such a socket with input
    // unread would reset it.
    drained = drained && detail::lingering_closes(loop) == 0;
    if (drained || EventLoop::now() >= deadline_) {
        stopped_by_group_[index].store(true);
        loop.stop();
        return;
    }
    // Poll: a connection closes when its queue drains (or its peer goes), with
    // no single event to wait on for "all of them".
    loop.call_after(std::chrono::milliseconds(1), [this, index] { check_drained(index); });
}

// On the loop thread, after run() returned: close what is left (grace over),
// running each on_close here, so the user sees every connection end on its
// own loop's thread.
void LoopGroup::finish_loop(std::size_t index) {
    EventLoop& loop = *loops_[index];
    for (TcpServer* s : servers()) s->close_rest(index);
    try {
        loop.run_once(std::chrono::nanoseconds(0));  // and the tasks those on_close posted
    } catch (...) {
        std::lock_guard lock(mutex_);
        if (!first_error_) first_error_ = std::current_exception();
    }
}

void LoopGroup::stop(std::chrono::milliseconds grace) {
    const auto me = std::this_thread::get_id();
    if (std::find(thread_ids_.begin(), thread_ids_.end(), me) != thread_ids_.end())
        throw std::logic_error("LoopGroup::stop from one of its own loop threads");
    std::lock_guard stop_lock(stop_mutex_);
    {
        std::lock_guard lock(mutex_);
        if (!stopping_.load()) {
            deadline_ = EventLoop::now() + grace;
            stopping_.store(true);
            for (std::size_t i = 0; i < loops_.size(); ++i)
                loops_[i]->post([this, i] { begin_stop(i); });
        }
    }
    if (!joined_) {
        for (auto& t : threads_) t.join();
        joined_ = true;
    }
    std::exception_ptr error;
    {
        std::lock_guard lock(mutex_);
        error = std::exchange(first_error_, nullptr);
    }
    if (error) std::rethrow_exception(error);
}

}  // namespace evmux
