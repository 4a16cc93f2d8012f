// evmux selector: "which of these fds are ready?", asked of one of several kernel
// interfaces chosen at run time. Mirrors Python's `selectors` module.
//
// This header includes only the standard library.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace evmux {

/// Interest and readiness flags. Interest uses only `read` and `write`; ready
/// events may also carry `error` and `hangup`, which are reported whatever the
/// interest (as epoll does).
///
/// Every backend reports the same flags for the same situation:
///  - read:   a read will not block (data, end of file, or a pending error).
///  - write:  a write will not block (or will fail at once).
///  - error:  the socket has a pending error (POLLERR, EPOLLERR), e.g. after a reset.
///  - hangup: the peer will send no more: it shut down its write side or the
///            connection is gone (POLLHUP; POLLRDHUP while read interest is set).
/// error implies read and write, hangup implies read (each masked to the
/// interest), so a pipe at end of file (POLLHUP alone) is read|hangup like a
/// socket. What every backend reports, with read interest:
///  - peer closed or shut down its write side: read|hangup
///  - TCP peer reset (RST): read|error|hangup
///  - fd closed while registered: nothing (remove() it; see README)
/// A write-only watcher is not told about a half-close (no POLLRDHUP asked).
enum class Events : std::uint32_t {
    none = 0,
    read = 1u << 0,
    write = 1u << 1,
    error = 1u << 2,
    hangup = 1u << 3,
};

/// The union of two flag sets.
constexpr Events operator|(Events a, Events b) {
    return static_cast<Events>(static_cast<std::uint32_t>(a) | static_cast<std::uint32_t>(b));
}
/// The flags in both sets.
constexpr Events operator&(Events a, Events b) {
    return static_cast<Events>(static_cast<std::uint32_t>(a) & static_cast<std::uint32_t>(b));
}
/// The defined flags (read, write, error, hangup) not in `a`.
constexpr Events operator~(Events a) {
    return static_cast<Events>(~static_cast<std::uint32_t>(a) & 0xfu);
}
/// Adds the flags of `b` to `a`.
constexpr Events& operator|=(Events& a, Events b) {
    return a = a | b;
}
/// Keeps in `a` only the flags also in `b`.
constexpr Events& operator&=(Events& a, Events b) {
    return a = a & b;
}
/// True when `set` has any of the flags in `flags`.
constexpr bool any(Events set, Events flags) {
    return (set & flags) != Events::none;
}

/// "read|write|error|hangup" style text, for messages and tests.
std::string to_string(Events events);

/// One registration: the fd, what it is watched for, and the caller's data.
/// `generation` is unique per registration within a selector, so that an event
/// captured for an earlier registration of the same fd number can be told apart.
struct SelectorKey {
    int fd = -1;                     ///< the watched fd (not owned); -1 in an empty key
    Events interest = Events::none;  ///< read, write or both
    void* data = nullptr;            ///< the caller's pointer, never dereferenced by evmux
    std::uint32_t generation = 0;    ///< unique per registration; never 0 once registered
};

/// One ready fd: a copy of its key as it was when the wait returned, and what
/// it is ready for (already masked to the interest, plus error/hangup).
struct ReadyEvent {
    SelectorKey key;               ///< the registration, as it was when the wait returned
    Events events = Events::none;  ///< what the fd is ready for: never none
};

/// Timeout of a wait: std::nullopt waits forever, zero does not block, any
/// other value is rounded *up* to the backend's resolution (a 0.3 ms wait on
/// a millisecond backend waits 1 ms, it never busy-spins).
using Timeout = std::optional<std::chrono::nanoseconds>;

/// `d` in nanoseconds, clamped to nanoseconds::min()/max() instead of
/// overflowing. Plain conversion wraps beyond ~292 years (hours(24*365*1000)
/// becomes a negative count, i.e. "now"); the duration overloads of the
/// waiting and timer functions go through this. Thread-safe, never throws.
template <class Rep, class Period>
constexpr std::chrono::nanoseconds saturating_nanoseconds(std::chrono::duration<Rep, Period> d) {
    using ns = std::chrono::nanoseconds;
    const long double x = std::chrono::duration<long double, std::nano>(d).count();
    if (x >= static_cast<long double>(ns::max().count())) return ns::max();
    if (x <= static_cast<long double>(ns::min().count())) return ns::min();
    return ns(static_cast<ns::rep>(x));
}

/// The selector interface. Not thread-safe: one thread uses a selector at a
/// time. All bookkeeping and argument checks are done here once; a backend
/// implements only the kernel calls (see `backend_*`).
class Selector {
  public:
    virtual ~Selector();
    Selector(const Selector&) = delete;
    Selector& operator=(const Selector&) = delete;

    /// Start watching `fd` for `interest` (read, write or both).
    ///
    /// The same fds are refused on every backend, with a std::system_error:
    ///  - EBADF if `fd` is not an open file descriptor;
    ///  - EPERM if its file cannot be polled: a regular file on disk, a
    ///    directory, a device whose driver has no poll (/dev/null, /dev/zero).
    ///    Such a file is always "ready", so watching it would spin; epoll
    ///    refuses exactly these, and the rule is epoll's: a file whose driver
    ///    implements poll is accepted even if it looks like a file
    ///    (/proc/self/mounts, sysfs attributes, a tty, eventfd, timerfd).
    /// Pipes, sockets, eventfd, signalfd, timerfd, ttys are accepted.
    /// Also throws std::invalid_argument for a negative fd or an empty or
    /// unknown interest, std::logic_error if `fd` is already registered, and
    /// std::system_error (naming the call) if the kernel refuses for another
    /// reason. On failure nothing is registered.
    const SelectorKey& add(int fd, Events interest, void* data = nullptr);

    /// Change the interest and data of a registered fd. Throws like add(), and
    /// std::out_of_range if `fd` is not registered (a negative fd never is).
    /// On failure the old registration is kept. The returned reference (like
    /// add()'s) is valid until the next add, modify or remove.
    const SelectorKey& modify(int fd, Events interest, void* data);
    /// Change only the interest; keeps the data.
    const SelectorKey& modify(int fd, Events interest);

    /// Stop watching `fd` and return its key. Throws std::out_of_range if it
    /// is not registered. An fd that was already closed is not an error.
    SelectorKey remove(int fd);

    /// Wait for readiness. Returns the ready fds; the span stays valid until
    /// the next select() on this selector (the storage is reused, so a wait
    /// allocates nothing). An interrupted wait (EINTR) resumes with the
    /// remaining time; an empty result means the timeout expired (never
    /// earlier), and an infinite wait returns only with events. Events for
    /// fds removed since are never returned. Throws std::system_error if the
    /// kernel call fails for another reason.
    std::span<const ReadyEvent> select(Timeout timeout = std::nullopt);
    /// select() for a caller that has just read the clock: `timeout` counts
    /// from `start` (a std::chrono::steady_clock reading), so the selector
    /// reads the clock itself only if a wait is interrupted and must resume.
    /// The event loop uses this to read the clock once per iteration.
    std::span<const ReadyEvent> select(Timeout timeout,
                                       std::chrono::steady_clock::time_point start);
    /// select() with any std::chrono duration, clamped rather than overflowed
    /// (see saturating_nanoseconds()).
    template <class Rep, class Period>
    std::span<const ReadyEvent> select(std::chrono::duration<Rep, Period> timeout) {
        return select(Timeout(saturating_nanoseconds(timeout)));
    }

    /// The key of a registered fd, or nullptr.
    const SelectorKey* get_key(int fd) const {
        // A negative fd becomes a huge index: one comparison rejects both.
        const auto i = static_cast<std::size_t>(fd);
        return i < keys_.size() && keys_[i].fd >= 0 ? &keys_[i] : nullptr;
    }
    /// Number of registered fds.
    std::size_t size() const { return count_; }
    /// The backend name, e.g. "epoll" or "libevent (epoll)".
    virtual std::string name() const = 0;

  protected:
    /// A backend whose backend_add() would accept any fd: add() checks first
    /// (one fstat per add, plus a probe for files that are not sockets or pipes).
    Selector();
    /// `kernel_checks_fds`: backend_add() itself fails with EBADF for an fd that
    /// is not open and EPERM for one that cannot be polled (epoll_ctl does), so
    /// add() makes no check of its own and only words those two errors alike
    /// on every backend.
    explicit Selector(bool kernel_checks_fds);

    // ---- The backend's part: only kernel calls. -----------------------------
    // The base class has already validated the arguments and updates its
    // table only after these succeed. `key.generation` is the registration's
    // generation, for backends that can carry a token through the kernel.

    /// Register with the kernel; throw std::system_error on failure.
    virtual void backend_add(const SelectorKey& key) = 0;
    /// Change the interest; throw std::system_error on failure.
    virtual void backend_modify(const SelectorKey& old_key, const SelectorKey& new_key) = 0;
    /// Unregister; must not throw because the fd was closed already.
    virtual void backend_remove(const SelectorKey& key) = 0;
    /// Wait at most `timeout` (nullopt: forever) and call report() for each
    /// ready fd. Return false if interrupted by a signal (EINTR), true
    /// otherwise; throw std::system_error on any other failure.
    virtual bool backend_wait(Timeout timeout) = 0;

    /// Called by backend_wait() for each ready fd. `generation` 0 means "the
    /// current registration" (backends that cannot carry a token). Masks
    /// `events` to the key's interest plus error/hangup and drops the event if
    /// nothing is left. Returns false, ignoring the event, if it belongs to no
    /// current registration (the fd was removed, or it is an earlier
    /// registration of a reused fd number).
    /// Inline: it runs once per ready fd.
    bool report(int fd, Events events, std::uint32_t generation = 0) {
        const SelectorKey* key = get_key(fd);
        if (!key) return false;                                              // removed
        if (generation != 0 && generation != key->generation) return false;  // earlier registration
        // Without error or hang-up (the usual case) there is nothing to widen.
        if (any(events, Events::error | Events::hangup)) events = widen(events);
        events &= key->interest | Events::error | Events::hangup;
        if (events == Events::none) return true;
        ready_.push_back(ReadyEvent{*key, events});
        // The caller will look at its data soon (the event loop's watcher):
        // start loading it now, beside the rest of the wait's work.
        __builtin_prefetch(key->data);
        return true;
    }

    /// A backend with work of its own to hand over after a wait (io_uring's
    /// completions) says so here: select() then returns even with no ready fd.
    void set_other_work(bool pending) { other_work_ = pending; }

    /// The registered keys in no particular order, for backends that rebuild
    /// their kernel arguments (select, poll). Entries with fd < 0 are free.
    std::span<const SelectorKey> keys_by_fd() const { return keys_; }
    /// Highest registered fd, or -1.
    int max_fd() const;

    /// Rounds a timeout up to whole milliseconds for the poll/epoll_wait
    /// family: -1 for forever, clamped to INT_MAX.
    static int timeout_ms(Timeout timeout);

  private:
    // The kernel flags describe the file; the contract on Events describes
    // what a call will do. A pending error makes a read and a write return at
    // once, and a hang-up makes a read return end-of-file: a pipe at EOF gives
    // POLLHUP without POLLIN, a pipe without reader POLLERR without POLLOUT.
    static constexpr Events widen(Events events) {
        if (any(events, Events::error)) events |= Events::read | Events::write;
        if (any(events, Events::hangup)) events |= Events::read;
        return events;
    }

    std::vector<SelectorKey> keys_;  // indexed by fd; fd == -1 marks a free slot
    std::vector<ReadyEvent> ready_;
    std::size_t count_ = 0;
    std::uint32_t next_generation_ = 1;  // never 0: 0 means "current" in report()
    mutable int max_fd_hint_ = -1;
    bool kernel_checks_fds_ = false;
    bool other_work_ = false;  // set_other_work()

    static void check_interest(Events interest);
};

/// What the registry knows about one backend.
struct BackendInfo {
    std::string name;          ///< "select", "poll", "epoll", "io_uring", "libevent"
    bool compiled_in = false;  ///< built into this library
    bool usable = false;       ///< works on this kernel, now
    std::string reason;        ///< why not usable (empty when usable); details otherwise
    bool completion = false;   ///< usable, with completion I/O on here (io_uring only)
};

/// Every backend in preference order (best first), with whether it can be used here.
std::vector<BackendInfo> backends();

/// Create a selector by name ("epoll", "poll", ...). Throws std::invalid_argument
/// naming the usable backends if `name` is unknown, not compiled in, or not
/// usable here (with the reason); std::system_error (EMFILE, ENFILE, ENOMEM)
/// if it is usable but this process is out of fds or memory.
std::unique_ptr<Selector> make_selector(std::string_view name);

/// Create the default selector: the EVMUX_BACKEND environment variable if set
/// and non-empty, else the best usable backend.
std::unique_ptr<Selector> make_selector();

/// The name make_selector() would use: EVMUX_BACKEND or the best usable backend.
std::string default_backend_name();

}  // namespace evmux
