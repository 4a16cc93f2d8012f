// evmux-bench's system-call counter: perf_event_open(2) counting a tracepoint
// (raw_syscalls:sys_enter, or one system call's sys_enter_*) in a server.
// Needs no PMU, but needs tracefs for the tracepoint's id.
//
// Internal to tools/; not installed.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace evmux::bench {

/// The id of tracepoint `name` ("raw_syscalls/sys_enter") from tracefs
/// (/sys/kernel/tracing, else /sys/kernel/debug/tracing); nullopt with
/// `reason` set if neither has it.
std::optional<std::uint64_t> tracepoint_id(const std::string& name, std::string& reason);

/// Counts tracepoint `name` (or the sum of several: those of `names` that
/// tracefs has) in every thread of `pid` (one counter per thread
/// listed in /proc/PID/task, inherit=1: threads and processes they create
/// later count too, but only once they exit, so keep it for servers whose
/// threads live through the run). Counting, not sampling.
class TracepointCounter {
  public:
    TracepointCounter(pid_t pid, const std::string& name)
        : TracepointCounter(pid, std::vector<std::string>{name}) {}
    TracepointCounter(pid_t pid, const std::vector<std::string>& names);
    ~TracepointCounter();
    TracepointCounter(const TracepointCounter&) = delete;
    TracepointCounter& operator=(const TracepointCounter&) = delete;

    bool available() const { return !fds_.empty(); }
    /// Why not available(); empty if available.
    const std::string& reason() const { return reason_; }
    /// The count so far, summed over the threads; NaN if not available.
    double count() const;

  private:
    std::vector<int> fds_;
    std::string reason_;
};

}  // namespace evmux::bench
