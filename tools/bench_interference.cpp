// See bench_interference.hpp.
#include "bench_interference.hpp"

#include "bench_processes.hpp"

#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>

namespace evmux::bench {
namespace {

std::string percent(double share) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f%%", share * 100);
    return buf;
}

double tick_us() {
    static const long hz = ::sysconf(_SC_CLK_TCK);
    return 1e6 / static_cast<double>(hz > 0 ? hz : 100);
}

// busy (user + nice + system) and steal of /proc/stat's line for `cpu`
// ("cpu" for all of them when cpu < 0), in µs.
void read_cpu_line(int cpu, double& busy, double& steal) {
    busy = steal = 0;
    std::ifstream in("/proc/stat");
    const std::string want = cpu < 0 ? "cpu" : "cpu" + std::to_string(cpu);
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream fields(line);
        std::string name;
        fields >> name;
        if (name != want) continue;
        unsigned long long user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0,
                           softirq = 0, st = 0;
        fields >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> st;
        busy = static_cast<double>(user + nice + system) * tick_us();
        steal = static_cast<double>(st) * tick_us();
        return;
    }
}

// utime + stime of /proc/PID/stat (every thread, live or exited), with
// `reaped_children` also cutime + cstime, in µs; NaN if gone.
double process_cpu_us(pid_t pid, bool reaped_children) {
    double t[4];
    if (!read_stat_times(pid, t)) return NAN;
    return t[0] + t[1] + (reaped_children ? t[2] + t[3] : 0);
}

}  // namespace

Interference assess(const OccupancyDelta& d, double threshold) {
    Interference result;
    if (d.seconds <= 0) {
        result.details = "no window";
        return result;
    }
    const double window_us = d.seconds * 1e6;
    const double resolution_us = 3 * d.tick_us;
    const bool pinned = d.cpu[0] >= 0;
    std::string figures, causes;
    for (int i = 0; i < (pinned ? 2 : 1); ++i) {
        const double own =
            pinned ? (i == 0 ? d.server_us : d.client_us) : d.server_us + d.client_us;
        const double other = std::max(0.0, d.busy_us[i] - own - d.bench_us);
        const double stolen = std::max(0.0, d.steal_us[i]);
        result.other_share[i] = other / window_us;
        result.steal_share[i] = stolen / window_us;
        const std::string where =
            !pinned ? std::string("all CPUs")
                    : "CPU " + std::to_string(d.cpu[i]) + (i == 0 ? " (server)" : " (client)");
        figures += (figures.empty() ? "" : "; ") + where + ": other work " +
                   percent(result.other_share[i]) + ", steal " + percent(result.steal_share[i]);
        if (result.other_share[i] > threshold && other > resolution_us)
            causes += (causes.empty() ? "" : "; ") + std::string("other processes took ") +
                      percent(result.other_share[i]) + " of " + where;
        if (result.steal_share[i] > threshold && stolen > resolution_us)
            causes += (causes.empty() ? "" : "; ") + std::string("the hypervisor stole ") +
                      percent(result.steal_share[i]) + " of " + where;
    }
    char load[64];
    std::snprintf(load, sizeof load, "; load average %.2f -> %.2f", d.load_before, d.load_after);
    result.flagged = !causes.empty();
    result.details = (result.flagged ? causes : figures) + load;
    return result;
}

OccupancySample read_occupancy(int server_cpu, int client_cpu, pid_t server, bool forks,
                               pid_t client) {
    OccupancySample s;
    s.when = Clock::now();
    read_cpu_line(server_cpu, s.busy_us[0], s.steal_us[0]);
    if (server_cpu >= 0) read_cpu_line(client_cpu, s.busy_us[1], s.steal_us[1]);
    s.server_us = process_cpu_us(server, true);
    // Gone (reaped) is not an error: the caller keeps the last value.
    if (forks) {
        s.server_us += live_children_cpu(server).total_us;
    }
    s.client_us = client > 0 ? process_cpu_us(client, true) : 0;
    // Not the bench's reaped children: they are the servers and clients.
    s.bench_us = process_cpu_us(::getpid(), false);
    std::ifstream loadavg("/proc/loadavg");
    loadavg >> s.load1;
    return s;
}

OccupancySample carry_forward(OccupancySample s, const OccupancySample& previous) {
    for (auto m :
         {&OccupancySample::server_us, &OccupancySample::client_us, &OccupancySample::bench_us})
        if (std::isnan(s.*m)) s.*m = previous.*m;
    return s;
}

OccupancyDelta occupancy_delta(const OccupancySample& a, const OccupancySample& b, int server_cpu,
                               int client_cpu) {
    OccupancyDelta d;
    d.seconds = std::chrono::duration<double>(b.when - a.when).count();
    d.cpu[0] = server_cpu;
    d.cpu[1] = client_cpu;
    for (int i = 0; i < 2; ++i) {
        d.busy_us[i] = b.busy_us[i] - a.busy_us[i];
        d.steal_us[i] = b.steal_us[i] - a.steal_us[i];
    }
    d.server_us = b.server_us - a.server_us;
    d.client_us = b.client_us - a.client_us;
    d.bench_us = b.bench_us - a.bench_us;
    d.load_before = a.load1;
    d.load_after = b.load1;
    d.tick_us = tick_us();
    return d;
}

PinnedTo::PinnedTo(int cpu) {
    if (cpu < 0 || ::sched_getaffinity(0, sizeof before_, &before_) != 0) return;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pinned_ = ::sched_setaffinity(0, sizeof one, &one) == 0;
}

PinnedTo::~PinnedTo() {
    if (pinned_) ::sched_setaffinity(0, sizeof before_, &before_);
}

double thread_cpu_us() {
    timespec ts{};
    ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) * 1e6 + static_cast<double>(ts.tv_nsec) / 1e3;
}

double speed_probe_us(int cpu) {
    const PinnedTo pin(cpu);
    double best = INFINITY;
    for (int attempt = 0; attempt < 3; ++attempt) {
        const double t0 = thread_cpu_us();
        // 8 independent chains of 1 M multiply-xors each, about 5 ms here:
        // bound by the core's throughput, not by one multiply's latency, so
        // a core whose other hyperthread is busy (another guest) runs it
        // slower, as it runs the servers and EVP slower. One dependent chain
        // did not see that: on 2026-12-01 it took 6.8 ms throughout while
        // EVP alone went from 0.90 to 1.45 us a message pair and these 8
        // chains (4x as long) from 21 to 33-41 ms.
        std::uint64_t x[8];
        for (int k = 0; k < 8; ++k)
            x[k] = 0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(k + 1) +
                   static_cast<std::uint64_t>(attempt);
        for (int i = 0; i < 1'000'000; ++i)
            for (auto& v : x) v = (v ^ (v >> 29)) * 0xBF58476D1CE4E5B9ull;
        volatile std::uint64_t sink = 0;
        for (auto v : x) sink = sink ^ v;
        (void)sink;
        best = std::min(best, thread_cpu_us() - t0);
    }
    return best;
}

}  // namespace evmux::bench
