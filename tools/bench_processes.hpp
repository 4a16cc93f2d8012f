// evmux-bench's process handling: start a server or the load client as a child
// process pinned to one CPU, read what it prints, sample its CPU time and RSS
// from /proc, and make sure no child outlives the bench on any exit path.
//
// Internal to tools/; not installed.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace evmux::bench {

/// Clock ticks (1/USER_HZ) in µs.
double ticks_to_us(unsigned long long ticks);
/// utime, stime, cutime, cstime of /proc/PID/stat in µs (every thread, live
/// or exited; the last two for reaped children); false if it cannot be read.
bool read_stat_times(pid_t pid, double out[4]);

using Clock = std::chrono::steady_clock;

/// Installs SIGINT/SIGTERM/SIGHUP handlers that kill every live child's process
/// group and exit 130, and ignores SIGPIPE. Call once, on the main thread, before
/// starting any child.
void install_child_reaper();

/// A child process in its own process group (so that its own children, e.g.
/// a forking server's, are killed with it). Owns the process: the destructor
/// kills the group (SIGTERM, then SIGKILL after a grace period) and reaps it.
/// Not thread-safe; used from the main thread only.
class ChildProcess {
  public:
    /// Starts `argv[0]` with `argv`, pinned to `cpu` (no pinning if cpu < 0).
    /// With `capture_stdout`/`capture_stderr` the stream is readable through
    /// read_stdout()/read_stderr_line(); otherwise it is inherited (stdout) or
    /// sent to /dev/null (stdout). Throws std::system_error if fork or a pipe
    /// fails; if exec fails the child exits with status 127. `env`: "NAME=value"
    /// entries the child gets besides (or instead of) this process's own.
    ChildProcess(const std::vector<std::string>& argv, int cpu, bool capture_stdout,
                 bool capture_stderr, const std::vector<std::string>& env = {});
    ~ChildProcess();
    ChildProcess(const ChildProcess&) = delete;
    ChildProcess& operator=(const ChildProcess&) = delete;

    /// The child's pid (also its process group id).
    pid_t pid() const { return pid_; }

    /// Reads one line of the child's stderr, waiting at most until `deadline`.
    /// Returns false at end of file or timeout (line then holds what was read).
    bool read_stderr_line(std::string& line, Clock::time_point deadline);
    /// Everything the child printed on stderr so far that was not read as a
    /// line, without blocking (for error messages).
    std::string drain_stderr();

    /// Reads the child's stdout until end of file or `deadline`. `on_data(out)`
    /// is called each time bytes arrive, with all read so far. Returns false
    /// on timeout.
    template <class F>
    bool read_stdout(std::string& out, Clock::time_point deadline, F&& on_data);

    /// Waits for the child to exit, at most until `deadline`; returns its exit
    /// status (128+signal if killed) or -1 on timeout.
    int wait(Clock::time_point deadline);
    /// SIGTERM to the process group, wait up to `grace`, then SIGKILL; reaps.
    /// Returns the exit status as wait() does.
    int stop(std::chrono::milliseconds grace = std::chrono::milliseconds(2000));

  private:
    bool read_some(int fd, std::string& into, Clock::time_point deadline);
    pid_t pid_ = -1;
    int out_fd_ = -1;
    int err_fd_ = -1;
    int status_ = -1;  // set once reaped
    std::string err_buf_;
};

/// CPU time and memory of one process, from /proc/PID/stat and /proc/PID/status.
struct ProcSample {
    Clock::time_point when;
    double user_us = 0;        ///< utime
    double sys_us = 0;         ///< stime
    double child_user_us = 0;  ///< cutime: children already reaped
    double child_sys_us = 0;   ///< cstime
    long rss_kib = 0;          ///< VmRSS
    /// Time on CPU of all live threads (schedstat, ns precision), when asked
    /// for; utime/stime count 1/CLK_TCK ticks, too coarse for a 1 s window.
    double run_us = 0;
    /// Voluntary + nonvoluntary context switches of all live threads (and,
    /// for a forking server, of its live children's), when asked for.
    double ctx_switches = 0;
    /// System calls entered so far (a TracepointCounter's), when counted.
    double syscalls = 0;
    /// Waits (epoll_wait, io_uring_enter, poll, select and kin) so far, likewise.
    double waits = 0;
    bool ok = false;  ///< false if the process is gone
};

/// Reads the sample of `pid` now; with `with_run_time` also run_us (one file
/// per thread: keep it for processes with few threads).
ProcSample sample_process(pid_t pid, bool with_run_time);

/// Voluntary + nonvoluntary context switches of every live thread of `pid`
/// (/proc/PID/task/*/status), and with `with_children` of every live thread of
/// its live children too. Exited threads and children are not counted.
double context_switches(pid_t pid, bool with_children);

/// CPU time of the live children of `pid` (every thread's), e.g. a forking
/// server's: the total, ns-precise from schedstat (else from the ticks), and
/// their utime and stime ticks summed (each child alone has too few ticks to
/// split by). Take it at both ends of a window and subtract: children that
/// live through it (one per connection) then count only their CPU in it.
struct ChildrenCpu {
    double total_us = 0;
    double user_us = 0;     ///< utime ticks (with their own reaped children's)
    double sys_us = 0;      ///< stime ticks
    std::size_t count = 0;  ///< how many children were read
};
ChildrenCpu live_children_cpu(pid_t pid);

/// Which mode (user or kernel) a process's threads run in, sampled with
/// perf_event_open(2): one cpu-clock software event per thread, a sample every
/// 250 µs of the thread's time on a CPU (4 kHz), each sample tagged user or
/// kernel by the mode the thread was interrupted in. Unlike utime/stime (timer
/// ticks: 250 a second here), enough samples in a 1 s window to split the
/// CPU time precisely.
///
/// Each sample is a timer interrupt taken by the sampled thread: about 18 µs
/// in this VM, i.e. about 7 % more CPU time at 4 kHz (19 % at 10 kHz, which is
/// why not faster; all of the split's
/// inputs grow by the same factor, so a ratio of two sampled processes is not
/// biased; their absolute CPU time is).
///
/// The threads are the ones listed in /proc/PID/task when the sampler starts
/// (inherit=0): threads created later are not sampled, which is fine for the
/// single-loop servers it is used for (not for a thread per connection).
/// Not thread-safe: drain() and split() from one thread at a time.
class CpuModeSampler {
  public:
    static constexpr std::uint64_t period_ns = 250000;  ///< 4 kHz of CPU time

    /// Starts sampling every thread of `pid`. If perf_event_open (or the
    /// ring's mmap) is refused, available() is false and reason() says why.
    explicit CpuModeSampler(pid_t pid);
    ~CpuModeSampler();
    CpuModeSampler(const CpuModeSampler&) = delete;
    CpuModeSampler& operator=(const CpuModeSampler&) = delete;

    bool available() const { return !rings_.empty(); }
    /// Why not available(), e.g. "perf_event_open: Permission denied
    /// (kernel.perf_event_paranoid = 3)"; empty if available.
    const std::string& reason() const { return reason_; }
    /// Threads sampled.
    std::size_t threads() const { return rings_.size(); }

    /// Reads the samples the kernel wrote since the last call and keeps their
    /// time and mode. Call often enough that no ring fills up (each holds
    /// about 0.8 s of one thread's samples); lost() counts what did not fit.
    void drain();

    struct Split {
        std::uint64_t user = 0;    ///< samples in user mode
        std::uint64_t kernel = 0;  ///< samples in kernel mode (or hypervisor, guest: none here)
        std::uint64_t total() const { return user + kernel; }
        double user_share() const {
            return total() > 0 ? static_cast<double>(user) / static_cast<double>(total()) : 0;
        }
    };
    /// The samples drained so far whose time is within [t0, t1].
    Split split(Clock::time_point t0, Clock::time_point t1) const;

    /// Samples the kernel dropped (PERF_RECORD_LOST: a full ring).
    std::uint64_t lost() const { return lost_; }
    /// PERF_RECORD_THROTTLE records (the kernel lowered the sample rate).
    std::uint64_t throttled() const { return throttled_; }

  private:
    struct Ring {
        int fd = -1;
        void* base = nullptr;  // metadata page, then data_size bytes
        std::size_t map_size = 0;
        std::size_t data_size = 0;
    };
    struct Sample {
        std::int64_t ns;  // CLOCK_MONOTONIC, as Clock
        bool user;
    };
    void drain(Ring& ring);
    std::vector<Ring> rings_;
    std::vector<Sample> samples_;
    std::string reason_;
    std::uint64_t lost_ = 0;
    std::uint64_t throttled_ = 0;
};

/// Number of CPUs this process may run on.
int usable_cpus();

template <class F>
bool ChildProcess::read_stdout(std::string& out, Clock::time_point deadline, F&& on_data) {
    for (;;) {
        std::size_t before = out.size();
        if (!read_some(out_fd_, out, deadline)) return false;  // timeout
        if (out.size() == before) return true;                 // end of file
        on_data(const_cast<const std::string&>(out));
    }
}

}  // namespace evmux::bench
