// evmux loop group: one EventLoop per thread (muduo's one-loop-per-thread
// model, its EventLoopThreadPool), and the TcpServers whose connections are
// spread over those loops.
//
// This header includes only evmux's public headers and the standard library.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "evmux/address.hpp"
#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/server.hpp"

namespace evmux {

/// N threads, each running its own EventLoop on its own selector (same
/// backend on all). The threads start in the constructor and run until stop().
/// Thread rule: every member may be called from any thread, except stop()
/// and the destructor, which must not be called from one of the group's loop
/// threads (they join them). Non-copyable, non-movable.
///
/// Signals: the threads block every asynchronous signal from their start
/// (all but the faults SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, and
/// SIGPROF for profilers), so a process-directed signal (kill, Ctrl-C) is
/// never taken by a loop thread: the kernel gives it to a thread of yours that
/// has it unblocked (the main thread: its default action, as without a
/// group), or leaves it to the signalfd of a loop whose on_signal() takes it.
/// A main-thread loop's on_signal(SIGTERM, ...) calling stop() therefore works
/// whether it is set up before or after the group. A loop of the group may
/// call on_signal() too; every thread not of the group (the main thread
/// included) must then block that signal, and that loop's remove_signal()
/// unblocks it in its thread again.
class LoopGroup {
  public:
    /// Start `threads` loops (at least 1) on backend `backend` (empty: what
    /// make_selector() picks, i.e. EVMUX_BACKEND or the best usable one).
    /// Throws std::invalid_argument for 0 threads or an unknown/unusable
    /// backend (as make_selector() does), std::system_error if a loop or a
    /// thread cannot be created (no thread is left running then).
    explicit LoopGroup(std::size_t threads, const std::string& backend = {});
    /// stop() with the default grace, swallowing what stop() would rethrow;
    /// then destroys the servers and loops on the calling thread. Every
    /// connection of a server has had its on_close by then (on its loop's
    /// thread); one made otherwise on a loop (connect(), adopt()) and still
    /// open gets it here, on the calling thread, from ~EventLoop. (With
    /// io_uring, closing the rings here may make this thread's next blocking
    /// call that has a timeout, e.g. connect() with SO_SNDTIMEO, fail with
    /// EINTR once: observed in the tests, which connect before setting it.)
    ~LoopGroup();
    LoopGroup(const LoopGroup&) = delete;
    LoopGroup& operator=(const LoopGroup&) = delete;

    /// Number of loops.
    std::size_t size() const { return loops_.size(); }
    /// Loop `index` (throws std::out_of_range). The reference stays valid
    /// until the group is destroyed; from other threads only its post(),
    /// stop() and in_loop_thread() may be used (the EventLoop thread rule).
    /// Its stop() (from anywhere) returns it to the group, which runs it
    /// again: a group's loop ends only with the group's stop().
    EventLoop& loop(std::size_t index) const;
    /// The backend name of the loops, e.g. "epoll".
    std::string backend_name() const { return loops_.front()->backend_name(); }

    /// Run `fn` on loop `index`'s thread (throws std::out_of_range; as
    /// EventLoop::post otherwise). After stop() the task is destroyed unrun.
    void post(std::size_t index, EventLoop::Task fn);
    /// Run `fn` on the next loop in round-robin order; returns its index.
    std::size_t post(EventLoop::Task fn);

    /// A TcpServer on `address` whose connections are spread over the loops
    /// (options.distribution), each served with `callbacks` on its loop (see
    /// TcpServer for the thread rules of the callbacks). Sockets are bound
    /// here, so errors are thrown here: std::system_error reading like "bind
    /// 127.0.0.1:5555: Address already in use"; std::logic_error once stop()
    /// has begun. The server is owned by the group and lives until the group
    /// is destroyed.
    TcpServer& listen(const Address& address, Callbacks callbacks, ServerOptions options = {});
    /// listen() on "host:port" text, as TcpServer's constructor takes it: a
    /// name is resolved here, blocking the calling thread (with
    /// options.resolver), and the first of its addresses that binds is
    /// listened on. Throws as that constructor does.
    TcpServer& listen(std::string_view address, Callbacks callbacks, ServerOptions options = {});

    /// Stop every loop and join its thread. Each loop first stops accepting
    /// and closes its connections gracefully (CloseMode::graceful: a queued
    /// reply is still sent), waits until they have closed, and their sockets
    /// have finished lingering (ConnectionOptions::linger), or `grace` has
    /// passed (then closes the rest immediately, reason `local`), runs every
    /// on_close, and exits. Idempotent; concurrent calls wait for the first. Throws
    /// std::logic_error from a loop thread of this group; after joining,
    /// rethrows the first exception that escaped a callback on any loop (that
    /// loop went on running).
    void stop(std::chrono::milliseconds grace = std::chrono::seconds(5));
    /// True once stop() has begun.
    bool stopping() const { return stopping_.load(); }

  private:
    TcpServer& listen_on(const std::vector<Address>& candidates, std::string_view text,
                         Callbacks callbacks, ServerOptions options);
    void run_loop(std::size_t index);
    void begin_stop(std::size_t index);
    void check_drained(std::size_t index);
    void finish_loop(std::size_t index);
    std::vector<TcpServer*> servers();

    std::vector<std::unique_ptr<EventLoop>> loops_;
    std::vector<std::thread> threads_;
    std::vector<std::thread::id> thread_ids_;  // fixed after construction (join clears get_id())
    // Per loop: the group (its stop(), or a failed construction) ended it,
    // not a stop() of the loop's own.
    std::unique_ptr<std::atomic<bool>[]> stopped_by_group_;
    std::atomic<std::size_t> next_{0};
    std::atomic<bool> stopping_{false};
    EventLoop::Clock::time_point deadline_{};  // written before the stop tasks are posted
    std::mutex mutex_;                         // servers_, first_error_
    std::mutex stop_mutex_;                    // one stop() at a time; guards joined_
    bool joined_ = false;
    std::exception_ptr first_error_;
    std::vector<std::unique_ptr<TcpServer>> servers_;
};

}  // namespace evmux
