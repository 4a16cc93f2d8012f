// evmux-bench's interference detector: was a point's window disturbed by
// other work on the server's or the client's CPU (other programs, the
// hypervisor)? Compares each CPU's busy time (/proc/stat) over the window with
// what the server, the client and the bench itself used, and reads steal time
// and the load average. read_occupancy() samples; assess() is the arithmetic,
// pure, so that it can be tested with synthetic figures.
//
// Internal to tools/; not installed.
#pragma once

#include <sched.h>
#include <sys/types.h>

#include <string>
#include <vector>

#include "bench_processes.hpp"

namespace evmux::bench {

/// What a window's two ends differ by, as assess() needs it. CPU index 0 is
/// the server's CPU, 1 the client's; cpu[i] < 0: not pinned (then the busy
/// and steal figures are those of all CPUs together, in busy[0]/steal[0]).
struct OccupancyDelta {
    double seconds = 0;                      ///< the window's length
    int cpu[2] = {-1, -1};                   ///< the server's and the client's CPU
    double busy_us[2] = {0, 0};              ///< user+nice+system time of each CPU
    double steal_us[2] = {0, 0};             ///< steal time of each CPU
    double server_us = 0, client_us = 0;     ///< their own CPU time (threads, children)
    double bench_us = 0;                     ///< this process's (not pinned: either CPU)
    double load_before = 0, load_after = 0;  ///< 1-minute load average at each end
    double tick_us = 10000;                  ///< /proc/stat's resolution (1/USER_HZ)
};

struct Interference {
    bool flagged = false;
    std::string details;             ///< the figures, and the cause when flagged
    double other_share[2] = {0, 0};  ///< CPU share other work took on each CPU
    double steal_share[2] = {0, 0};  ///< share stolen by the hypervisor
};

/// Flags the window if other work took more than `threshold` (a share of one
/// CPU, e.g. 0.05) of the server's or the client's CPU, or the hypervisor
/// stole more than that. "Other work" is a CPU's busy time less the server's
/// (on the server CPU), the client's (on the client CPU) and the bench's own
/// (subtracted from each: it is not pinned, and it is the instrument). The
/// busy times count USER_HZ ticks: a difference under 3 ticks (30 ms) is
/// within their resolution and never flagged, whatever the window's length.
/// IRQ and softirq time is not counted as busy: the kernel may charge the
/// server's own loopback traffic there. Unpinned (cpu[0] < 0): the other work
/// on all CPUs together, against the same threshold.
Interference assess(const OccupancyDelta& d, double threshold);

/// One end of a window: the watched CPUs' times, the processes' CPU times.
struct OccupancySample {
    Clock::time_point when;
    double busy_us[2] = {0, 0}, steal_us[2] = {0, 0};
    double server_us = 0, client_us = 0, bench_us = 0;
    double load1 = 0;
};

/// Reads the figures now. `server_cpu`/`client_cpu` as in OccupancyDelta;
/// `server` with its threads and reaped children, with `forks` also its live
/// children (one read per child); `client` 0 if none yet (its time then 0).
/// A process that is gone (e.g. the client, reaped) reads as NaN: keep the
/// previous sample's value then (see carry_forward).
OccupancySample read_occupancy(int server_cpu, int client_cpu, pid_t server, bool forks,
                               pid_t client);

/// `s` with its NaN process times replaced by `previous`'s.
OccupancySample carry_forward(OccupancySample s, const OccupancySample& previous);

/// The delta from `a` to `b`.
OccupancyDelta occupancy_delta(const OccupancySample& a, const OccupancySample& b, int server_cpu,
                               int client_cpu);

/// This thread pinned to CPU `cpu` for the object's life (nothing if
/// cpu < 0 or the affinity cannot be read), then back to where it could run.
class PinnedTo {
  public:
    explicit PinnedTo(int cpu);
    ~PinnedTo();
    PinnedTo(const PinnedTo&) = delete;
    PinnedTo& operator=(const PinnedTo&) = delete;

  private:
    bool pinned_ = false;
    cpu_set_t before_{};
};

/// This thread's CPU time in µs.
double thread_cpu_us();

/// The CPU time (µs) a fixed piece of work (8 independent chains of
/// multiplies: the core's throughput) takes on CPU `cpu` (-1: where this
/// thread runs), the least of three tries. Taken around every run, it shows a
/// machine that ran slower for a while without other work on it or steal to
/// show for it: a host that lowered the clock or shared the core with
/// another guest. Other processes do not move it (it is CPU time).
double speed_probe_us(int cpu);

}  // namespace evmux::bench
