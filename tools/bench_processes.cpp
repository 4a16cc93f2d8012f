// See bench_processes.hpp.
#include "bench_processes.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string_view>
#include <system_error>
#include <thread>

namespace evmux::bench {
namespace {

// Live children's pids, for the signal handler: a fixed array of atomics, since
// a handler may neither lock nor allocate. The bench has at most two children
// at a time (a server and the load client).
constexpr int max_children = 8;
std::atomic<pid_t> live_children[max_children];

void remember(pid_t pid) {
    for (auto& slot : live_children) {
        pid_t empty = 0;
        if (slot.compare_exchange_strong(empty, pid)) return;
    }
}

void forget(pid_t pid) {
    for (auto& slot : live_children) {
        pid_t expected = pid;
        slot.compare_exchange_strong(expected, 0);
    }
}

extern "C" void kill_children_and_exit(int) {
    // Only async-signal-safe calls here: kill, write, _exit.
    for (auto& slot : live_children) {
        pid_t pid = slot.load();
        if (pid > 0) ::kill(-pid, SIGKILL);
    }
    static const char msg[] = "evmux-bench: interrupted; children killed\n";
    (void)!::write(STDERR_FILENO, msg, sizeof msg - 1);
    ::_exit(130);
}

[[noreturn]] void throw_errno(const char* what) {
    throw std::system_error(errno, std::generic_category(), what);
}

int status_code(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return -1;
}

}  // namespace

double ticks_to_us(unsigned long long ticks) {
    static const long hz = ::sysconf(_SC_CLK_TCK);
    return static_cast<double>(ticks) * 1e6 / static_cast<double>(hz > 0 ? hz : 100);
}

bool read_stat_times(pid_t pid, double out[4]) {
    std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
    std::string text;
    if (!std::getline(in, text)) return false;
    // The command name (field 2) may hold spaces and parentheses: the fields we
    // want are counted from the last ')'.
    auto close = text.rfind(')');
    if (close == std::string::npos) return false;
    std::istringstream fields(text.substr(close + 1));
    std::string field;
    // After ')': state (3), ppid (4) ... utime is field 14, i.e. the 12th here.
    for (int i = 3; i < 14; ++i) fields >> field;
    unsigned long long t[4] = {};
    for (auto& v : t) fields >> v;
    if (!fields) return false;
    for (int i = 0; i < 4; ++i) out[i] = ticks_to_us(t[i]);
    return true;
}

void install_child_reaper() {
    struct sigaction sa {};
    sa.sa_handler = kill_children_and_exit;
    sigemptyset(&sa.sa_mask);
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(sig, &sa, nullptr);
    ::signal(SIGPIPE, SIG_IGN);
}

ChildProcess::ChildProcess(const std::vector<std::string>& argv, int cpu, bool capture_stdout,
                           bool capture_stderr, const std::vector<std::string>& env) {
    // Everything the child needs is prepared before fork: after it, only
    // async-signal-safe calls (another thread may hold the allocator's lock).
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    // The environment: ours, less the names `env` sets, plus `env`.
    std::vector<char*> envp;
    for (char** e = environ; *e; ++e) {
        const std::string_view entry(*e);
        const bool replaced = std::any_of(env.begin(), env.end(), [&](const std::string& mine) {
            const std::size_t eq = mine.find('=');
            return entry.size() > eq && entry.compare(0, eq + 1, mine, 0, eq + 1) == 0;
        });
        if (!replaced) envp.push_back(*e);
    }
    for (const auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    if (cpu >= 0) CPU_SET(cpu, &cpus);

    int out[2] = {-1, -1}, err[2] = {-1, -1};
    if (capture_stdout && ::pipe2(out, O_CLOEXEC) < 0) throw_errno("pipe2");
    if (capture_stderr && ::pipe2(err, O_CLOEXEC) < 0) {
        int saved = errno;
        if (out[0] >= 0) ::close(out[0]), ::close(out[1]);
        errno = saved;
        throw_errno("pipe2");
    }
    int devnull = capture_stdout ? -1 : ::open("/dev/null", O_WRONLY | O_CLOEXEC);

    pid_t pid = ::fork();
    if (pid < 0) {
        int saved = errno;
        for (int fd : {out[0], out[1], err[0], err[1], devnull})
            if (fd >= 0) ::close(fd);
        errno = saved;
        throw_errno("fork");
    }
    if (pid == 0) {
        ::setpgid(0, 0);
        if (cpu >= 0) ::sched_setaffinity(0, sizeof cpus, &cpus);
        // The bench ignores SIGPIPE and handles SIGINT; the child starts clean.
        ::signal(SIGPIPE, SIG_DFL);
        ::signal(SIGINT, SIG_DFL);
        ::signal(SIGTERM, SIG_DFL);
        ::signal(SIGHUP, SIG_DFL);
        if (capture_stdout) ::dup2(out[1], STDOUT_FILENO);
        if (devnull >= 0) ::dup2(devnull, STDOUT_FILENO);
        if (capture_stderr) ::dup2(err[1], STDERR_FILENO);
        ::execve(args[0], args.data(), envp.data());
        static const char msg[] = "evmux-bench: exec failed\n";
        (void)!::write(STDERR_FILENO, msg, sizeof msg - 1);
        ::_exit(127);
    }
    // Also set the group from the parent, so that a kill(-pid) right after
    // fork cannot miss a child that has not run setpgid yet.
    ::setpgid(pid, pid);
    pid_ = pid;
    remember(pid);
    if (devnull >= 0) ::close(devnull);
    if (capture_stdout) {
        ::close(out[1]);
        out_fd_ = out[0];
    }
    if (capture_stderr) {
        ::close(err[1]);
        err_fd_ = err[0];
    }
}

ChildProcess::~ChildProcess() {
    if (status_ < 0 && pid_ > 0) stop(std::chrono::milliseconds(1000));
    if (out_fd_ >= 0) ::close(out_fd_);
    if (err_fd_ >= 0) ::close(err_fd_);
}

bool ChildProcess::read_some(int fd, std::string& into, Clock::time_point deadline) {
    for (;;) {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
        if (left.count() < 0) return false;
        pollfd p{fd, POLLIN, 0};
        int n = ::poll(&p, 1, static_cast<int>(std::min<long long>(left.count() + 1, 1000)));
        if (n < 0 && errno != EINTR) throw_errno("poll");
        if (n <= 0) continue;
        char buf[4096];
        ssize_t got = ::read(fd, buf, sizeof buf);
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            throw_errno("read");
        }
        into.append(buf, static_cast<std::size_t>(got));
        return true;  // got == 0: end of file, nothing appended
    }
}

bool ChildProcess::read_stderr_line(std::string& line, Clock::time_point deadline) {
    for (;;) {
        auto nl = err_buf_.find('\n');
        if (nl != std::string::npos) {
            line = err_buf_.substr(0, nl);
            err_buf_.erase(0, nl + 1);
            return true;
        }
        std::size_t before = err_buf_.size();
        if (err_fd_ < 0 || !read_some(err_fd_, err_buf_, deadline) || err_buf_.size() == before) {
            line = err_buf_;
            return false;
        }
    }
}

std::string ChildProcess::drain_stderr() {
    if (err_fd_ >= 0) {
        // A short deadline: only what is already in the pipe.
        while (true) {
            pollfd p{err_fd_, POLLIN, 0};
            if (::poll(&p, 1, 0) <= 0) break;
            std::size_t before = err_buf_.size();
            if (!read_some(err_fd_, err_buf_, Clock::now() + std::chrono::milliseconds(10)) ||
                err_buf_.size() == before)
                break;
        }
    }
    std::string text;
    text.swap(err_buf_);
    return text;
}

int ChildProcess::wait(Clock::time_point deadline) {
    if (status_ >= 0) return status_;
    for (;;) {
        int status = 0;
        pid_t r = ::waitpid(pid_, &status, WNOHANG);
        if (r == pid_) {
            status_ = status_code(status);
            forget(pid_);
            // Whatever the child left behind in its group (e.g. a forking
            // server's children) goes with it.
            ::kill(-pid_, SIGKILL);
            return status_;
        }
        if (r < 0 && errno != EINTR) throw_errno("waitpid");
        if (Clock::now() >= deadline) return -1;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
}

int ChildProcess::stop(std::chrono::milliseconds grace) {
    if (status_ >= 0) return status_;
    ::kill(-pid_, SIGTERM);
    int status = wait(Clock::now() + grace);
    if (status >= 0) return status;
    ::kill(-pid_, SIGKILL);
    return wait(Clock::now() + std::chrono::seconds(10));
}

ProcSample sample_process(pid_t pid, bool with_run_time) {
    ProcSample s;
    s.when = Clock::now();
    double t[4];
    if (!read_stat_times(pid, t)) return s;
    s.user_us = t[0];
    s.sys_us = t[1];
    s.child_user_us = t[2];
    s.child_sys_us = t[3];
    std::ifstream status("/proc/" + std::to_string(pid) + "/status");
    std::string line;
    while (std::getline(status, line)) {
        if (line.rfind("VmRSS:", 0) == 0) {
            s.rss_kib = std::strtol(line.c_str() + 6, nullptr, 10);
            break;
        }
    }
    if (with_run_time) {
        std::string task_dir = "/proc/" + std::to_string(pid) + "/task";
        if (DIR* dir = ::opendir(task_dir.c_str())) {
            while (dirent* entry = ::readdir(dir)) {
                if (entry->d_name[0] == '.') continue;
                std::ifstream stat(task_dir + "/" + entry->d_name + "/schedstat");
                unsigned long long ns = 0;
                if (stat >> ns) s.run_us += static_cast<double>(ns) / 1000.0;
            }
            ::closedir(dir);
        }
    }
    s.ok = true;
    return s;
}

namespace {

double task_context_switches(const std::string& status_file) {
    std::ifstream status(status_file);
    std::string line;
    double n = 0;
    while (std::getline(status, line))
        if (line.starts_with("voluntary_ctxt_switches:") ||
            line.starts_with("nonvoluntary_ctxt_switches:"))
            n += std::strtod(line.c_str() + line.find(':') + 1, nullptr);
    return n;
}

}  // namespace

double context_switches(pid_t pid, bool with_children) {
    double n = 0;
    std::string task_dir = "/proc/" + std::to_string(pid) + "/task";
    DIR* dir = ::opendir(task_dir.c_str());
    if (!dir) return 0;
    while (dirent* entry = ::readdir(dir)) {
        if (entry->d_name[0] == '.') continue;
        const std::string task = task_dir + "/" + entry->d_name;
        n += task_context_switches(task + "/status");
        if (!with_children) continue;
        std::ifstream children(task + "/children");
        pid_t child;
        while (children >> child) n += context_switches(child, false);
    }
    ::closedir(dir);
    return n;
}

ChildrenCpu live_children_cpu(pid_t pid) {
    double user = 0, sys = 0, run = 0;
    std::size_t count = 0;
    std::string task_dir = "/proc/" + std::to_string(pid) + "/task";
    DIR* dir = ::opendir(task_dir.c_str());
    if (!dir) return {0, 0};
    while (dirent* entry = ::readdir(dir)) {
        if (entry->d_name[0] == '.') continue;
        std::ifstream children(task_dir + "/" + entry->d_name + "/children");
        pid_t child;
        while (children >> child) {
            double t[4];
            if (!read_stat_times(child, t)) continue;  // exited meanwhile
            ++count;
            user += t[0] + t[2];
            sys += t[1] + t[3];
            std::ifstream sched("/proc/" + std::to_string(child) + "/schedstat");
            unsigned long long ns = 0;
            if (sched >> ns) run += static_cast<double>(ns) / 1000.0;
        }
    }
    ::closedir(dir);
    return {run > 0 ? run : user + sys, user, sys, count};
}

namespace {

std::string perf_refusal(int err) {
    std::string text = "perf_event_open: " + std::string(std::strerror(err));
    if (err == EACCES || err == EPERM) {
        std::ifstream in("/proc/sys/kernel/perf_event_paranoid");
        int level = 0;
        if (in >> level) text += " (kernel.perf_event_paranoid = " + std::to_string(level) + ")";
    }
    return text;
}

}  // namespace

CpuModeSampler::CpuModeSampler(pid_t pid) {
    perf_event_attr attr{};
    attr.size = sizeof attr;
    attr.type = PERF_TYPE_SOFTWARE;
    attr.config = PERF_COUNT_SW_CPU_CLOCK;
    attr.sample_period = period_ns;
    attr.sample_type = PERF_SAMPLE_TIME;
    attr.use_clockid = 1;
    attr.clockid = CLOCK_MONOTONIC;  // std::chrono::steady_clock's clock
    attr.exclude_hv = 1;
    attr.disabled = 0;
    attr.inherit = 0;  // see the class comment: threads made later are not sampled

    std::string task_dir = "/proc/" + std::to_string(pid) + "/task";
    std::vector<pid_t> tids;
    if (DIR* dir = ::opendir(task_dir.c_str())) {
        while (dirent* entry = ::readdir(dir))
            if (entry->d_name[0] != '.') tids.push_back(std::atoi(entry->d_name));
        ::closedir(dir);
    }
    if (tids.empty()) {
        reason_ = "no threads in " + task_dir;
        return;
    }
    const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    for (pid_t tid : tids) {
        int fd = static_cast<int>(
            ::syscall(SYS_perf_event_open, &attr, tid, -1, -1, PERF_FLAG_FD_CLOEXEC));
        if (fd < 0) {
            if (errno == ESRCH) continue;  // the thread ended meanwhile
            reason_ = perf_refusal(errno);
            break;
        }
        // 1 + 2^k pages: 32 data pages hold about 0.8 s of one busy thread's
        // 16-byte samples. Fewer if the mlock allowance for perf buffers
        // (kernel.perf_event_mlock_kb) refuses that many.
        Ring ring;
        ring.fd = fd;
        for (std::size_t pages = 32; pages >= 2 && !ring.base; pages /= 2) {
            std::size_t size = (1 + pages) * page;
            void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (base == MAP_FAILED) continue;
            ring.base = base;
            ring.map_size = size;
            ring.data_size = pages * page;
        }
        if (!ring.base) {
            reason_ = "mmap of the perf ring: " + std::string(std::strerror(errno));
            ::close(fd);
            break;
        }
        rings_.push_back(ring);
    }
    if (rings_.empty() && reason_.empty()) reason_ = "every thread of " + task_dir + " ended";
    if (!reason_.empty()) {
        // All threads or none: a split from some threads only would be biased.
        for (auto& ring : rings_) {
            ::munmap(ring.base, ring.map_size);
            ::close(ring.fd);
        }
        rings_.clear();
    }
}

CpuModeSampler::~CpuModeSampler() {
    for (auto& ring : rings_) {
        ::munmap(ring.base, ring.map_size);
        ::close(ring.fd);
    }
}

void CpuModeSampler::drain() {
    for (auto& ring : rings_) drain(ring);
}

void CpuModeSampler::drain(Ring& ring) {
    auto* meta = static_cast<perf_event_mmap_page*>(ring.base);
    // The kernel's data_offset/data_size (set since Linux 4.1), else the
    // older layout: the data right after the first page.
    const std::uint64_t offset =
        meta->data_offset ? meta->data_offset : ring.map_size - ring.data_size;
    const std::uint64_t size = meta->data_size ? meta->data_size : ring.data_size;
    const auto* data = static_cast<const unsigned char*>(ring.base) + offset;
    // Acquire: the records up to data_head are visible once we see it.
    const std::uint64_t head = __atomic_load_n(&meta->data_head, __ATOMIC_ACQUIRE);
    std::uint64_t tail = meta->data_tail;  // only we write it
    // Copies `len` bytes at ring offset `at` (which may wrap around the end).
    auto copy = [&](void* to, std::uint64_t at, std::size_t len) {
        const std::size_t off = static_cast<std::size_t>(at % size);
        const std::size_t first = std::min<std::size_t>(len, static_cast<std::size_t>(size) - off);
        std::memcpy(to, data + off, first);
        std::memcpy(static_cast<unsigned char*>(to) + first, data, len - first);
    };
    while (head - tail >= sizeof(perf_event_header)) {
        perf_event_header header;
        copy(&header, tail, sizeof header);
        if (header.size < sizeof header || head - tail < header.size) {
            tail = head;  // a torn record cannot happen; resynchronise if it does
            break;
        }
        if (header.type == PERF_RECORD_SAMPLE && header.size >= sizeof header + 8) {
            std::uint64_t time = 0;
            copy(&time, tail + sizeof header, sizeof time);
            const unsigned mode = header.misc & PERF_RECORD_MISC_CPUMODE_MASK;
            samples_.push_back({static_cast<std::int64_t>(time), mode == PERF_RECORD_MISC_USER});
        } else if (header.type == PERF_RECORD_LOST && header.size >= sizeof header + 16) {
            std::uint64_t lost = 0;  // after the u64 id
            copy(&lost, tail + sizeof header + 8, sizeof lost);
            lost_ += lost;
        } else if (header.type == PERF_RECORD_THROTTLE) {
            ++throttled_;
        }
        tail += header.size;
    }
    // Release: our reads of the records are done before the kernel may
    // overwrite them.
    __atomic_store_n(&meta->data_tail, tail, __ATOMIC_RELEASE);
}

CpuModeSampler::Split CpuModeSampler::split(Clock::time_point t0, Clock::time_point t1) const {
    const auto ns = [](Clock::time_point t) {
        return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
    };
    const std::int64_t from = ns(t0), to = ns(t1);
    Split s;
    for (const auto& sample : samples_)
        if (sample.ns >= from && sample.ns <= to) ++(sample.user ? s.user : s.kernel);
    return s;
}

int usable_cpus() {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (::sched_getaffinity(0, sizeof set, &set) < 0) return 1;
    return CPU_COUNT(&set);
}

}  // namespace evmux::bench
