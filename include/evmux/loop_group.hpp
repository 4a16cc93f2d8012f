// evmux loop group: one EventLoop per thread (muduo's one-loop-per-thread
// model), and servers whose connections are spread over those loops.
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
#include <thread>
#include <vector>

#include "evmux/address.hpp"
#include "evmux/connection.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/server.hpp"

namespace evmux {

/// How a GroupServer spreads accepted connections over the loops of a group.
enum class Distribution {
    /// One SO_REUSEPORT listener per loop; the kernel picks the listener (by a
    /// hash of the connection's addresses), so no thread hands anything over.
    reuse_port,
    /// One listener on loop 0, which accepts and hands each fd to the next
    /// loop in turn (itself included), exactly round-robin.
    round_robin,
};

/// "reuse_port" or "round_robin".
const char* to_string(Distribution distribution);

/// How a GroupServer listens. The default distribution was chosen by
/// measurement (see README "Many cores").
struct GroupServerOptions {
    /// How connections are spread; a Unix socket address always uses round_robin.
    Distribution distribution = Distribution::reuse_port;
    /// listen() backlog of each listener.
    int backlog = 1024;
    /// Connections open at once in the whole group (all loops together); 0 =
    /// no limit. Beyond it a new connection is accepted and closed at once
    /// (the peer sees EOF), and counted as rejected: as TcpServer.
    std::size_t max_connections = 0;
    /// accept4() calls per wake-up of a listener.
    std::size_t accept_budget = 64;
    /// Close connections with no I/O either way for this long (reason
    /// `timeout`); zero = never. As ServerOptions::idle_timeout, with one
    /// sweep per loop.
    std::chrono::milliseconds idle_timeout{0};
    /// Close connections that have read nothing for this long; as
    /// ServerOptions::read_idle_timeout.
    std::chrono::milliseconds read_idle_timeout{0};
    /// Close connections that have written nothing for this long; as
    /// ServerOptions::write_idle_timeout.
    std::chrono::milliseconds write_idle_timeout{0};
    /// After EMFILE/ENFILE/ENOBUFS/ENOMEM that the spare fd cannot absorb,
    /// stop accepting for this long instead of spinning.
    std::chrono::milliseconds accept_pause{100};
    /// Limits for each accepted connection.
    ConnectionOptions connection;
};

class LoopGroup;

/// A server whose connections live on the loops of a LoopGroup: each accepted
/// connection is a Connection on one loop for its whole life. Created by
/// LoopGroup::listen() and owned by the group. The user's callbacks run on
/// every loop's thread, concurrently: they must be safe to call from several
/// threads at once (each call only for connections of the calling thread's
/// loop). Thread rule: every member may be called from any thread.
class GroupServer {
  public:
    ~GroupServer();
    GroupServer(const GroupServer&) = delete;
    GroupServer& operator=(const GroupServer&) = delete;

    /// The address bound (with the chosen port when 0 was asked).
    const Address& local_address() const { return local_; }
    /// The distribution in use (round_robin for a Unix socket).
    Distribution distribution() const { return distribution_; }
    /// Connections served so far by each loop (index = loop index).
    std::vector<std::uint64_t> connections_per_loop() const;
    /// Connections served so far, all loops.
    std::uint64_t connections_total() const;
    /// Connections open right now, all loops.
    std::size_t connections_now() const;
    /// Counters summed over all loops, as TcpServer::stats(), read without
    /// stopping the loops (each loop keeps its counters in atomics). One
    /// difference: bytes_in and bytes_out count the bytes of connections that
    /// have closed (added when each one closes, after its on_close); the bytes
    /// of connections still open are not included, since only their own loop
    /// may read them. The counters are read one by one, so a snapshot taken
    /// while connections come and go need not be consistent across fields.
    ServerStats stats() const;

  private:
    friend class LoopGroup;
    struct Shard;
    GroupServer(LoopGroup& group, const Address& address, Callbacks callbacks,
                GroupServerOptions options);
    bool reserve_slot();
    void release_slot();

    Distribution distribution_;
    Address local_;
    std::size_t max_connections_;
    std::atomic<std::size_t> open_{0};  // all loops: the max_connections count
    std::vector<std::unique_ptr<Shard>> shards_;
};

/// N threads, each running its own EventLoop on its own selector (same
/// backend on all). The threads start in the constructor and run until stop().
/// Thread rule: every member may be called from any thread, except stop()
/// and the destructor, which must not be called from one of the group's loop
/// threads (they join them). Non-copyable, non-movable.
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
    EventLoop& loop(std::size_t index) const;
    /// The backend name of the loops, e.g. "epoll".
    std::string backend_name() const { return loops_.front()->backend_name(); }

    /// Run `fn` on loop `index`'s thread (throws std::out_of_range; as
    /// EventLoop::post otherwise). After stop() the task is destroyed unrun.
    void post(std::size_t index, EventLoop::Task fn);
    /// Run `fn` on the next loop in round-robin order; returns its index.
    std::size_t post(EventLoop::Task fn);

    /// Listen on `address` and serve each accepted connection with
    /// `callbacks` on one of the loops (see GroupServer for the thread rules
    /// of the callbacks). Sockets are bound here, so errors are thrown here:
    /// std::system_error reading like "bind 127.0.0.1:5555: Address already
    /// in use"; std::logic_error once stop() has begun. The server is owned
    /// by the group and lives until the group is destroyed.
    GroupServer& listen(const Address& address, Callbacks callbacks,
                        GroupServerOptions options = {});

    /// Stop every loop and join its thread. Each loop first stops accepting
    /// and closes its connections gracefully (CloseMode::graceful: a queued
    /// reply is still sent), waits until they have closed or `grace` has
    /// passed (then closes the rest immediately, reason `local`), runs every
    /// on_close, and exits. Idempotent; concurrent calls wait for the first. Throws
    /// std::logic_error from a loop thread of this group; after joining,
    /// rethrows the first exception that escaped a callback on any loop (that
    /// loop went on running).
    void stop(std::chrono::milliseconds grace = std::chrono::seconds(5));
    /// True once stop() has begun.
    bool stopping() const { return stopping_.load(); }

  private:
    friend class GroupServer;
    void run_loop(std::size_t index);
    void begin_stop(std::size_t index);
    void check_drained(std::size_t index);
    void finish_loop(std::size_t index);
    std::vector<GroupServer::Shard*> shards_of(std::size_t index);

    std::vector<std::unique_ptr<EventLoop>> loops_;
    std::vector<std::thread> threads_;
    std::vector<std::thread::id> thread_ids_;  // fixed after construction (join clears get_id())
    std::atomic<std::size_t> next_{0};
    std::atomic<bool> stopping_{false};
    EventLoop::Clock::time_point deadline_{};  // written before the stop tasks are posted
    std::mutex mutex_;                         // servers_, first_error_
    std::mutex stop_mutex_;                    // one stop() at a time; guards joined_
    bool joined_ = false;
    std::exception_ptr first_error_;
    std::vector<std::unique_ptr<GroupServer>> servers_;
};

}  // namespace evmux
