#include "bench_syscalls.hpp"

#include <dirent.h>
#include <linux/perf_event.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <string>

namespace evmux::bench {

std::optional<std::uint64_t> tracepoint_id(const std::string& name, std::string& reason) {
    const std::string roots[] = {"/sys/kernel/tracing", "/sys/kernel/debug/tracing"};
    for (const auto& root : roots) {
        std::ifstream in(root + "/events/" + name + "/id");
        std::uint64_t id = 0;
        if (in >> id) return id;
    }
    reason = "no tracefs: " + roots[0] + "/events/" + name + "/id (nor under " + roots[1] +
             ") not readable; mount it as root: mount -t tracefs nodev /sys/kernel/tracing";
    return std::nullopt;
}

TracepointCounter::TracepointCounter(pid_t pid, const std::vector<std::string>& names) {
    // The tracepoints tracefs has (a system call the kernel lacks has none);
    // the first one's reason if it has none of them.
    std::vector<std::pair<std::string, std::uint64_t>> ids;
    for (const auto& name : names) {
        std::string why;
        if (auto id = tracepoint_id(name, why))
            ids.emplace_back(name, *id);
        else if (reason_.empty())
            reason_ = why;
    }
    if (ids.empty()) return;
    reason_.clear();
    const std::string task_dir = "/proc/" + std::to_string(pid) + "/task";
    DIR* dir = ::opendir(task_dir.c_str());
    if (!dir) {
        reason_ = "no " + task_dir;
        return;
    }
    while (dirent* entry = ::readdir(dir)) {
        if (entry->d_name[0] == '.' || !reason_.empty()) continue;
        const pid_t tid = static_cast<pid_t>(std::strtol(entry->d_name, nullptr, 10));
        for (const auto& [name, id] : ids) {
            perf_event_attr attr{};
            attr.size = sizeof attr;
            attr.type = PERF_TYPE_TRACEPOINT;
            attr.config = id;
            attr.inherit = 1;
            attr.exclude_hv = 1;
            const long fd =
                ::syscall(SYS_perf_event_open, &attr, tid, -1, -1, PERF_FLAG_FD_CLOEXEC);
            if (fd < 0) {
                if (errno == ESRCH) break;  // the thread ended meanwhile
                reason_ = "perf_event_open(tracepoint " + name + "): " + std::strerror(errno);
                break;
            }
            fds_.push_back(static_cast<int>(fd));
        }
    }
    ::closedir(dir);
    if (!reason_.empty()) {
        for (int fd : fds_) ::close(fd);
        fds_.clear();
    } else if (fds_.empty()) {
        reason_ = "no threads in " + task_dir;
    }
}

TracepointCounter::~TracepointCounter() {
    for (int fd : fds_) ::close(fd);
}

double TracepointCounter::count() const {
    if (fds_.empty()) return NAN;
    double total = 0;
    for (int fd : fds_) {
        std::uint64_t n = 0;
        if (::read(fd, &n, sizeof n) == static_cast<ssize_t>(sizeof n))
            total += static_cast<double>(n);
    }
    return total;
}

}  // namespace evmux::bench
