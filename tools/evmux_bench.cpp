// evmux-bench: compares evmux's backends with each other and with other
// concurrency models (hand-written epoll and io_uring loops, a libevent bufferevent server,
// a thread per connection, a process per connection) by running each server
// as its own process on one CPU and evmux-load on another, and reading the
// server's CPU time and memory from /proc around the load window.
//
//   evmux-bench [--quick] [--out DIR] [--backends a,b] [--servers ...] ...
//   evmux-bench dispatch -n N -a A -w W [--backend B]   (libevent's test/bench.c)
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "bench_c.hpp"
#include "bench_dispatch.hpp"
#include "bench_environment.hpp"
#include "bench_instructions.hpp"
#include "bench_interference.hpp"
#include "bench_processes.hpp"
#include "bench_stats.hpp"
#include "bench_syscalls.hpp"
#include "bench_tls.hpp"
#include "cli_number.hpp"
#include "evmux/selector.hpp"
#include "fd_limit.hpp"

namespace fs = std::filesystem;
using namespace evmux::bench;
using evmux::support::raise_fd_limit;

namespace {

constexpr const char* floor_server = "epoll-floor";
/// The completion-I/O floor: completion rows' second ratio is to it.
constexpr const char* uring_floor_server = "uring-floor";
/// The floor of the UDP rows (--udp).
constexpr const char* udp_floor_server = "udp-floor";

/// One server under test: how to start it, and what it can take.
struct Server {
    std::string name;        // "evmux/epoll", "epoll-floor", ...
    std::string kind;        // "evmux" or the baseline's name
    std::string backend;     // evmux backend, empty for baselines
    fs::path binary;         // executable
    bool per_connection_os;  // a thread or process per connection: skips idle-heavy
    bool forks;              // CPU of live children must be added
    int threads = 1;         // evmux-echo --threads (>1: the server is not pinned)
    std::string model;       // evmux-echo --model (empty: its default, callbacks)
    bool tls = false;        // evmux-echo --tls-cert/--tls-key, evmux-load --tls
    bool udp = false;        // echoes UDP datagrams (evmux-echo --udp, the UDP floor)
    /// evmux-echo --io (completion or readiness): the run is checked against
    /// the io= its listening line says. Empty: not asked (baselines, UDP, TLS
    /// rows on other backends than io_uring).
    std::string io{};
    /// With tls: evmux-echo --tls-records (empty: its default, evmux's layer).
    std::string tls_records{};
    /// "NAME=value" entries of the server's environment (the io_uring floor's
    /// variants: EVMUX_BASELINE_URING_SETUP, EVMUX_BASELINE_URING_SEND).
    std::vector<std::string> env{};
};

/// One load shape: message size, connections opened, connections in ping-pong.
struct Point {
    int size;
    int conns;
    int active;
    bool idle_heavy;
};

/// The figures of one run, or their medians, minima or maxima over rounds.
struct Figures {
    double round_trips = 0, msgs_per_s = 0, mib_per_s = 0;
    double p50_us = 0, p99_us = 0, max_us = 0;
    double user_us_per_msg = 0, sys_us_per_msg = 0;  ///< NaN when unsplit
    double cpu_us_per_msg = 0;                       ///< user + sys, split or not
    double cpu_window_s = 0;
    double rss_start_kib = 0, rss_peak_kib = 0;
    double rss_per_idle_conn_bytes = 0;
    /// The server's context switches in the window (all live threads and
    /// children), per message.
    double ctx_switches_per_msg = 0;
    /// The server's system calls in the window per message; NaN if not counted.
    double syscalls_per_msg = NAN;
    /// Its wait system calls (epoll_wait, io_uring_enter, ...) likewise.
    double waits_per_msg = NAN;
};

/// Every member of Figures, for the statistics over rounds.
constexpr double Figures::*figure_members[] = {&Figures::round_trips,
                                               &Figures::msgs_per_s,
                                               &Figures::mib_per_s,
                                               &Figures::p50_us,
                                               &Figures::p99_us,
                                               &Figures::max_us,
                                               &Figures::user_us_per_msg,
                                               &Figures::sys_us_per_msg,
                                               &Figures::cpu_us_per_msg,
                                               &Figures::cpu_window_s,
                                               &Figures::rss_start_kib,
                                               &Figures::rss_peak_kib,
                                               &Figures::rss_per_idle_conn_bytes,
                                               &Figures::ctx_switches_per_msg,
                                               &Figures::syscalls_per_msg,
                                               &Figures::waits_per_msg};

/// What one (server, point) run measured; after aggregate(), the medians of
/// its rounds, with the rounds themselves and their minima and maxima.
struct Result : Figures {
    const Server* server;
    Point point;
    bool ok = false;
    bool skipped = false;
    std::string note;  // why skipped or failed
    double mismatches = 0, errors = 0;
    /// UDP rows: datagrams sent and lost (no echo within evmux-load's
    /// --timeout); after aggregate(), summed over the rounds.
    double udp_sent = 0, udp_lost = 0;
    // How user and sys were told apart: "perf 4 kHz: N samples, U user" (the
    // user share's own noise is then about 1/sqrt(U) of it) or "ticks ...".
    // After aggregate(), the first round's (each round keeps its own).
    std::string cpu_split;
    /// How system calls were counted, or "unavailable: <why>".
    std::string syscalls;
    std::string waits;           ///< the same for the waits
    std::vector<Result> rounds;  ///< each round's figures, in round order
    Figures min, max;            ///< over the rounds
    /// Other work on the server's or client's CPU in the window; after
    /// aggregate(), flagged if any round was.
    Interference interference;
    int round = 0;                 ///< a round's number (1-based)
    std::size_t probe = 0;         ///< a round's: the index of the speed probe before it
    std::vector<Result> left_out;  ///< rounds other work disturbed, not in the figures
};

/// EVP alone (the TLS target), timed once per round at one point: the
/// rounds in the figures, in order, and those left out with their numbers;
/// beside each, the same cipher's cost in a bare loop with loopback I/O
/// around it (bare_tls_loop_us()) and in a hand-written two-CPU echo
/// (handwritten_tls_echo_us()): the reference columns, kept in step.
struct EvpTimings {
    std::vector<double> kept;
    std::vector<std::pair<int, double>> left_out;  // (round, us)
    std::vector<double> bare;
    std::vector<std::pair<int, double>> bare_left_out;
    std::vector<double> echo;
    std::vector<std::pair<int, double>> echo_left_out;
};

/// One row of the TLS target: a TLS run at a point, the plain run beside it,
/// its point's EVP timings, extra/evp paired by round and the verdict.
struct TlsTarget {
    const Result* tls;
    const Result* plain;
    const EvpTimings* evp;
    Spread ratio;
    std::string verdict;
    Spread bare;  ///< the bare loop's extra/evp, paired by round
    Spread echo;  ///< the hand-written echo's extra/evp, paired by round
};

/// One (server, point)'s rounds as one Result: the medians of their figures,
/// their minima and maxima, and the rounds. Not ok if any round failed (with
/// that round's note), skipped if they were.
Result aggregate(std::vector<Result> rounds) {
    Result r = rounds.front();
    for (std::size_t i = 0; i < rounds.size(); ++i) {
        if (rounds[i].ok) continue;
        r = rounds[i];
        if (!r.skipped && rounds.size() > 1)
            r.note = "round " + std::to_string(i + 1) + " of " + std::to_string(rounds.size()) +
                     ": " + r.note;
        return r;
    }
    for (auto m : figure_members) {
        std::vector<double> values;
        for (const auto& round : rounds) values.push_back(round.*m);
        const Spread s = spread(values);
        r.*m = s.median;
        r.min.*m = s.min;
        r.max.*m = s.max;
    }
    // A split is the same kind in every round or none: a round without one
    // ("unsplit") makes the point's user and sys unknown too, not the median
    // of the rounds that had one.
    for (const auto& round : rounds)
        if (std::isnan(round.user_us_per_msg) && !std::isnan(round.cpu_us_per_msg)) {
            for (auto m : {&Figures::user_us_per_msg, &Figures::sys_us_per_msg})
                r.*m = r.min.*m = r.max.*m = NAN;
            r.cpu_split = round.cpu_split;
            break;
        }
    // Flagged if any round was, naming those; else the figures of the round
    // other work came closest to disturbing.
    std::string flagged;
    const Result* worst = &rounds.front();
    for (std::size_t i = 0; i < rounds.size(); ++i) {
        const Interference& in = rounds[i].interference;
        if (in.flagged)
            flagged += (flagged.empty() ? "" : "; ") + std::string("round ") +
                       std::to_string(i + 1) + ": " + in.details;
        auto most = [](const Interference& x) {
            return std::max(
                {x.other_share[0], x.other_share[1], x.steal_share[0], x.steal_share[1]});
        };
        if (most(in) > most(worst->interference)) worst = &rounds[i];
    }
    r.interference = worst->interference;
    if (!flagged.empty()) r.interference = {true, flagged, {}, {}};
    r.udp_sent = r.udp_lost = 0;
    for (const auto& round : rounds) {
        r.udp_sent += round.udp_sent;
        r.udp_lost += round.udp_lost;
    }
    r.rounds = std::move(rounds);
    return r;
}

/// The figure `m` of each round of `r`.
std::vector<double> round_values(const Result& r, double Figures::*m) {
    std::vector<double> values;
    for (const auto& round : r.rounds) values.push_back(round.*m);
    return values;
}

std::string fmt(double v, int decimals) {
    if (std::isnan(v)) return "-";
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
    return buf;
}

std::string size_label(int size) {
    if (size >= 1024 && size % 1024 == 0) return std::to_string(size / 1024) + "KiB";
    return std::to_string(size) + "B";
}

std::string point_label(const Point& p) {
    std::string s = size_label(p.size) + " x " + std::to_string(p.active);
    if (p.conns != p.active) s += " (+" + std::to_string(p.conns - p.active) + " idle)";
    return s;
}

// The value of "key": in flat-enough JSON (evmux-load's one-line output; each
// key we read occurs once). NaN if absent.
double json_number(const std::string& json, const std::string& key) {
    auto at = json.find("\"" + key + "\"");
    if (at == std::string::npos) return NAN;
    at = json.find(':', at);
    if (at == std::string::npos) return NAN;
    char* end = nullptr;
    double v = std::strtod(json.c_str() + at + 1, &end);
    return end == json.c_str() + at + 1 ? NAN : v;
}

// "NAME listening on HOST:PORT ..." -> HOST, PORT; false if not such a line.
bool parse_listening(const std::string& line, std::string& host, int& port) {
    static const std::string marker = " listening on ";
    auto at = line.find(marker);
    if (at == std::string::npos) return false;
    std::string addr = line.substr(at + marker.size());
    addr = addr.substr(0, addr.find(' '));
    auto colon = addr.rfind(':');
    if (colon == std::string::npos) return false;
    host = addr.substr(0, colon);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
        host = host.substr(1, host.size() - 2);
    port = std::atoi(addr.c_str() + colon + 1);
    return port > 0;
}

/// The io= word of evmux-echo's listening line ("completion", "readiness"),
/// or "" if the line has none.
std::string listening_io(const std::string& line) {
    const auto at = line.find(" io=");
    if (at == std::string::npos) return "";
    const std::string rest = line.substr(at + 4);
    return rest.substr(0, rest.find(' '));
}

/// The first sample taken at or after `t` (or the last one).
template <class Sample>
const Sample& sample_at(const std::vector<Sample>& samples, Clock::time_point t) {
    for (const auto& s : samples)
        if (s.when >= t) return s;
    return samples.back();
}

struct Options {
    std::vector<std::string> backends;
    std::vector<std::string> servers;
    std::vector<int> sizes;
    std::vector<int> sessions;
    double duration = 0;
    bool quick = false;
    std::string out_dir;
    std::string json_file;
    std::string csv_file;
    int idle_conns = 0;
    int idle_active = 100;
    bool no_idle = false;
    bool no_plots = false;
    bool tick_split = false;  // user/sys split by ticks even if perf sampling works
    std::vector<int> sweep_fds;
    std::string tools_dir;
    std::string host = "127.0.0.1";
    int rounds = 0;                   // rounds per point; 0: 5, or 3 with --quick
    double interference_percent = 5;  // other work above this share of a CPU flags a point
    bool keep_disturbed = false;      // keep disturbed rounds in the figures (flagged)
    std::vector<int> threads{1};      // evmux-echo --threads, one server entry per value
    bool instructions = false;        // --instructions: callgrind runs after the rest
    bool udp = false;                 // also the UDP echo rows (evmux-echo --udp, udp-floor)
    double rate = 0;  // --rate: round trips per second of every TCP point (evmux-load --rate)
    /// --io: the io modes of the evmux rows on io_uring (completion,
    /// readiness); default both when io_uring runs. Other backends: readiness.
    std::vector<std::string> io;
};

/// --instructions: one server's user-space instructions per message.
struct InstructionRow {
    const Server* server;
    double per_msg = NAN;
    std::uint64_t ir[2] = {0, 0};  ///< the two runs' instruction totals
    double msgs[2] = {0, 0};       ///< and their round trips
    std::string note;              ///< why there is no figure
};

/// The load shape and the two load lengths of --instructions: start-up and
/// shut-down cancel in the difference. Under callgrind a server runs about
/// 50 times slower, so these are a few thousand messages each.
constexpr Point instructions_point{1024, 10, 10, false};
constexpr double instructions_durations[2] = {1.0, 3.0};
/// How many pairs of runs --instructions tries for one figure (see
/// instructions_min_msgs_ratio).
constexpr int instructions_tries = 3;

/// --rate: a run whose client reached less than this share of the rate did
/// less work per second than the others and is not counted.
constexpr double min_rate_share = 0.97;

/// A server's figures while the load runs: its CPU time and RSS sampled every
/// 20 ms on a thread of ours (the load window is picked from them
/// afterwards) and, where the kernel allows it, perf samples of the mode its
/// threads ran in (see CpuModeSampler), drained by the same thread.
class ServerSampler {
  public:
    /// Starts sampling `pid`. `precise`: with the per-thread schedstat run
    /// time and perf samples (unless `tick_split`); not for a server with a
    /// thread or process per connection, whose threads come and go (the reads
    /// would be heavy and miss the exited ones).
    /// `cpus`: the server's and the client's (see OccupancyDelta), whose other
    /// work is sampled too; `forks`: the server's live children count as its.
    ServerSampler(pid_t pid, bool precise, bool tick_split, std::pair<int, int> cpus, bool forks)
        : pid_(pid), precise_(precise), cpus_(cpus), forks_(forks) {
        if (precise && !tick_split) {
            modes_.emplace(pid);
            static bool told = false;
            if (!modes_->available() && !std::exchange(told, true))
                std::fprintf(stderr,
                             "\nevmux-bench: no perf sampling (%s): user/sys split by ticks\n",
                             modes_->reason().c_str());
        }
        if (precise) {
            syscalls_.emplace(pid, "raw_syscalls/sys_enter");
            waits_.emplace(pid, wait_tracepoints());
        }
        samples_.push_back(sample_process(pid, precise));
        samples_.back().ctx_switches = context_switches(pid, forks);
        if (syscalls_) samples_.back().syscalls = syscalls_->count();
        if (waits_) samples_.back().waits = waits_->count();
        occupancy_.push_back(
            carry_forward(read_occupancy(cpus_.first, cpus_.second, pid_, forks_, 0), {}));
        start_rss_kib_ = samples_.back().rss_kib;
        thread_ = std::thread([this] { sample_until_stopped(); });
    }
    /// Stops and joins the sampling thread on every path out, exceptions
    /// included (a joinable std::thread would terminate the program).
    ~ServerSampler() { stop(); }
    ServerSampler(const ServerSampler&) = delete;
    ServerSampler& operator=(const ServerSampler&) = delete;

    /// Stops sampling and drains the last perf samples; samples() is final after it.
    void stop() {
        running_ = false;
        if (!thread_.joinable()) return;
        thread_.join();
        if (modes_) modes_->drain();
    }

    /// The load client, once started: its CPU time is not other work.
    void set_client(pid_t client) { client_ = client; }
    /// The occupancy samples, the first taken at start. Read them after stop().
    const std::vector<OccupancySample>& occupancy() const { return occupancy_; }

    /// VmRSS when sampling started.
    long start_rss_kib() const { return start_rss_kib_; }
    /// The samples, the first taken at start. Read them after stop().
    const std::vector<ProcSample>& samples() const { return samples_; }
    /// The perf sampler, or null if not `precise` or with `tick_split`.
    const CpuModeSampler* modes() const { return modes_ ? &*modes_ : nullptr; }
    /// How the server's system calls were counted ("raw_syscalls:sys_enter
    /// ...") or "unavailable: <why>"; samples' `syscalls` are valid if counted().
    bool syscalls_counted() const { return syscalls_ && syscalls_->available(); }
    std::string syscalls_how() const {
        return how(syscalls_, "perf_event_open counting tracepoint raw_syscalls:sys_enter");
    }
    /// The same for the waits (samples' `waits`).
    bool waits_counted() const { return waits_ && waits_->available(); }
    std::string waits_how() const {
        return how(waits_,
                   "perf_event_open counting tracepoints syscalls:sys_enter_{epoll_wait,"
                   "epoll_pwait,epoll_pwait2,io_uring_enter,poll,ppoll,select,pselect6}");
    }
    /// The wait system calls' tracepoints.
    static std::vector<std::string> wait_tracepoints() {
        std::vector<std::string> names;
        for (const char* call : {"epoll_wait", "epoll_pwait", "epoll_pwait2", "io_uring_enter",
                                 "poll", "ppoll", "select", "pselect6"})
            names.push_back(std::string("syscalls/sys_enter_") + call);
        return names;
    }

  private:
    void sample_until_stopped() {
        while (running_.load()) {
            std::this_thread::sleep_for(std::chrono::milliseconds(20));
            ProcSample s = sample_process(pid_, precise_);
            // One thread: cheap. A thread or process per connection: read at
            // the window's ends only (run_load).
            if (precise_) s.ctx_switches = context_switches(pid_, forks_);
            if (syscalls_) s.syscalls = syscalls_->count();
            if (waits_) s.waits = waits_->count();
            if (s.ok) samples_.push_back(s);
            occupancy_.push_back(
                carry_forward(read_occupancy(cpus_.first, cpus_.second, pid_, false, client_),
                              occupancy_.back()));
            if (modes_) modes_->drain();
        }
    }

    pid_t pid_;
    bool precise_;
    std::pair<int, int> cpus_;
    bool forks_;
    std::atomic<pid_t> client_{0};
    std::optional<CpuModeSampler> modes_;
    std::vector<ProcSample> samples_;
    std::optional<TracepointCounter> syscalls_, waits_;
    static std::string how(const std::optional<TracepointCounter>& counter,
                           const std::string& counted) {
        if (counter && counter->available()) return counted;
        if (counter) return "unavailable: " + counter->reason();
        return "unavailable: not counted for a thread or process per connection (perf adds "
               "an inherited count only when its thread or process exits)";
    }
    std::vector<OccupancySample> occupancy_;
    long start_rss_kib_ = 0;
    std::atomic<bool> running_{true};
    std::thread thread_;
};

/// What evmux-load printed, when, and how it ended.
/// What is read of a server at one end of the load window (see run_load).
struct WindowEnd {
    Clock::time_point when{};  ///< unset: that end was never seen
    ChildrenCpu children;      ///< a forking server's live children
    double ctx_switches = 0;   ///< every live thread's (and child's, forking)
    OccupancySample occupancy;
};

struct LoadRun {
    std::string json;
    /// The load window: `start` when evmux-load printed "window" (connections
    /// made, warm-up done), `end` when it printed "end" (the duration over;
    /// before the rounds in flight drain and the connections close). A server with a
    /// thread or process per connection is read in full only here: a thousand
    /// threads' or children's /proc files every 20 ms would load the very CPU
    /// being measured.
    WindowEnd start, end;
    int status = -1;  ///< exit status, -1 if it overran
    bool in_time = false;
};

/// Fills `r`'s client figures from evmux-load's JSON and returns the load
/// window's length (duration_s); nullopt, with `r.note` saying why, if the
/// load did not run cleanly.
std::optional<double> read_load_figures(const LoadRun& load, Result& r) {
    if (!load.in_time || load.status < 0) {
        r.note = "evmux-load timed out";
        return std::nullopt;
    }
    const std::string& json = load.json;
    r.round_trips = json_number(json, "round_trips");
    r.msgs_per_s = json_number(json, "round_trips_per_s");
    r.mib_per_s = json_number(json, "mib_per_s");
    r.p50_us = json_number(json, "p50");
    r.p99_us = json_number(json, "p99");
    r.max_us = json_number(json, "max");
    r.mismatches = json_number(json, "mismatches");
    if (const double sent = json_number(json, "sent"); !std::isnan(sent)) {
        r.udp_sent = sent;
        r.udp_lost = json_number(json, "lost");
    }
    r.errors = json_number(json, "errors");
    double duration_s = json_number(json, "duration_s");
    if (load.status != 0 || std::isnan(r.msgs_per_s) || std::isnan(duration_s)) {
        // Its report's counts if it made one; its own error went to stderr.
        std::string why;
        if (r.mismatches > 0 || r.errors > 0)
            why = fmt(r.mismatches, 0) + " mismatches, " + fmt(r.errors, 0) + " errors";
        else if (json.empty())
            why = "no report (its error is above)";
        else
            why = json.substr(0, json.find('\n'));
        r.note = "evmux-load exit " + std::to_string(load.status) + ": " + why;
        return std::nullopt;
    }
    if (r.mismatches > 0 || r.errors > 0) {
        r.note = "evmux-load reported " + fmt(r.mismatches, 0) + " mismatches, " +
                 fmt(r.errors, 0) + " errors";
        return std::nullopt;
    }
    return duration_s;
}

/// b - a in seconds; 0 if either is unset.
double seconds_between(Clock::time_point a, Clock::time_point b) {
    if (a == Clock::time_point{} || b == Clock::time_point{}) return 0;
    return std::chrono::duration<double>(b - a).count();
}

/// The user share of a precise server's CPU time in the window [a, b]: from
/// the perf samples taken in it if there are enough of them (1000: the user
/// share then within about +-1.5 points); else as the ticks split it (the
/// kernel scales utime/stime the same way). The ticks come 1/CONFIG_HZ apart,
/// a few hundred in a 1 s window: a server 5 % in user mode gets a dozen,
/// +-30 %. A window with under 200 ms of ticks splits too coarsely even for
/// that: then the process's whole life (mostly this window) splits it.
/// `user` and `sys` are the window's ticks; `how` says which split was used.
double user_share(const CpuModeSampler* modes, const ProcSample& a, const ProcSample& b,
                  double user, double sys, std::string& how) {
    constexpr std::uint64_t min_perf_samples = 1000;
    constexpr double min_split_us = 200000;
    CpuModeSampler::Split split;
    if (modes && modes->available()) split = modes->split(a.when, b.when);
    if (split.total() >= min_perf_samples) {
        how = "perf " + fmt(1e6 / CpuModeSampler::period_ns, 0) +
              " kHz: " + std::to_string(split.total()) + " samples, " + std::to_string(split.user) +
              " user";
        if (modes->lost() > 0) how += ", " + std::to_string(modes->lost()) + " lost";
        return split.user_share();
    }
    how = !modes               ? "ticks (--tick-split)"
          : modes->available() ? "ticks (only " + std::to_string(split.total()) + " perf samples)"
                               : "ticks (" + modes->reason() + ")";
    if (user + sys >= min_split_us) return user / (user + sys);
    if (b.user_us + b.sys_us > 0) return b.user_us / (b.user_us + b.sys_us);
    how = "unsplit (no ticks to split by)";
    return NAN;
}

/// The server's side of `r`: user and sys CPU per message and peak RSS over
/// the load window, the `duration_s` that ended with the client's "end" line. Connection set-up
/// before it and tear-down after it are left out (they would weigh heavily in the idle-heavy case).
void measure_server(Result& r, const ServerSampler& sampler, const LoadRun& load, double duration_s,
                    bool precise) {
    const auto& samples = sampler.samples();
    auto end = load.end.when;
    auto start = end - std::chrono::microseconds(static_cast<long>(duration_s * 1e6));
    const ProcSample& a = sample_at(samples, start);
    const ProcSample& b = sample_at(samples, end);
    double window_s = std::chrono::duration<double>(b.when - a.when).count();
    double user = b.user_us - a.user_us + b.child_user_us - a.child_user_us;
    double sys = b.sys_us - a.sys_us + b.child_sys_us - a.child_sys_us;
    r.cpu_split = "ticks";
    double total = user + sys;
    if (precise && b.run_us > a.run_us) {
        // The total from the ns-precise run time, split as user_share() says.
        double run = b.run_us - a.run_us;
        total = run;
        user = run * user_share(sampler.modes(), a, b, user, sys, r.cpu_split);
        sys = run - user;
    }
    // A forking server's children: their CPU between the window's two ends
    // (each lives through it, one per connection), split by their summed
    // ticks if there are enough of them (see user_share), else "unsplit":
    // the total stays, user and sys become NaN, never a default share.
    const double child_window_s = seconds_between(load.start.when, load.end.when);
    const bool children_lost = load.end.children.count < load.start.children.count;
    if (children_lost) {
        // Some exited (their connection closed) before the window's end was
        // read: their CPU is gone from the sum. Unknown, not an undercount.
        user = sys = total = NAN;
        r.cpu_split = "unknown (" +
                      std::to_string(load.start.children.count - load.end.children.count) + " of " +
                      std::to_string(load.start.children.count) +
                      " children exited before the window's end was read)";
    } else if (child_window_s > 0 && window_s > 0 && load.end.children.total_us > 0) {
        const double scale = window_s / child_window_s;  // to this window's length
        const double child_total =
            (load.end.children.total_us - load.start.children.total_us) * scale;
        const double child_user = load.end.children.user_us - load.start.children.user_us;
        const double child_sys = load.end.children.sys_us - load.start.children.sys_us;
        total += std::max(0.0, child_total);
        constexpr double min_split_us = 200000;
        if (child_user + child_sys < min_split_us || child_user < 0 || child_sys < 0) {
            user = sys = NAN;
            r.cpu_split = "unsplit (the children's ticks in the window: " +
                          fmt((child_user + child_sys) / 1000, 0) + " ms, too few to split by)";
        } else {
            const double share = child_user / (child_user + child_sys);
            user += child_total * share;
            sys += child_total * (1 - share);
            r.cpu_split = "ticks (children's in the window)";
        }
    }
    for (const auto& s : samples)
        if (s.when >= a.when && s.when <= b.when)
            r.rss_peak_kib = std::max(r.rss_peak_kib, static_cast<double>(s.rss_kib));
    r.cpu_window_s = window_s;
    if (window_s > 0 && r.msgs_per_s > 0) {
        // CPU per second of window divided by messages per second.
        r.user_us_per_msg = user / window_s / r.msgs_per_s;
        r.sys_us_per_msg = sys / window_s / r.msgs_per_s;
        r.cpu_us_per_msg = total / window_s / r.msgs_per_s;
        // Context switches between the window's ends, read in full there
        // (every thread, a forking server's children too).
        const double ctx_window_s = seconds_between(load.start.when, load.end.when);
        // Fewer at the end than at the start: threads or children exited
        // first, taking their counts with them: unknown.
        const double ctx = load.end.ctx_switches - load.start.ctx_switches;
        r.ctx_switches_per_msg = ctx_window_s > 0 && ctx >= 0 && !children_lost
                                     ? ctx / ctx_window_s / r.msgs_per_s
                                     : NAN;
        // System calls: the counters are monotonic (threads live through the
        // run): the last sample before the end.
        r.syscalls = sampler.syscalls_how();
        r.waits = sampler.waits_how();
        const ProcSample* last = nullptr;
        for (const auto& s : samples)
            if (s.when > a.when && s.when <= end) last = &s;
        const double count_window_s =
            last ? std::chrono::duration<double>(last->when - a.when).count() : 0;
        if (sampler.syscalls_counted() && count_window_s > 0)
            r.syscalls_per_msg = (last->syscalls - a.syscalls) / count_window_s / r.msgs_per_s;
        if (sampler.waits_counted() && count_window_s > 0)
            r.waits_per_msg = (last->waits - a.waits) / count_window_s / r.msgs_per_s;
    }
    if (r.point.idle_heavy && r.rss_peak_kib > 0)
        r.rss_per_idle_conn_bytes = (r.rss_peak_kib - r.rss_start_kib) * 1024.0 / r.point.conns;
}

/// Reads the server's stderr until its "NAME listening on HOST:PORT" line, 10 s
/// at most; false, with `note` saying why, if it does not come. For a server
/// asked for an io mode, false too (with `unusable` set) if the line says
/// another: its figures would carry the wrong label.
bool wait_listening(ChildProcess& srv, const Server& server, std::string& host, int& port,
                    std::string& note, bool* unusable = nullptr) {
    std::string line;
    auto deadline = Clock::now() + std::chrono::seconds(10);
    while (!parse_listening(line, host, port)) {
        if (!srv.read_stderr_line(line, deadline)) {
            note = "server did not report listening: " + line + srv.drain_stderr();
            return false;
        }
    }
    if (server.io.empty()) return true;
    const std::string said = listening_io(line);
    if (said == server.io) return true;
    // evmux-echo says why on the next line ("evmux-echo: io=readiness: ...").
    std::string why;
    if (srv.read_stderr_line(why, Clock::now() + std::chrono::seconds(1)) &&
        why.find(" io=" + said + ": ") != std::string::npos)
        why = why.substr(why.find(": ", why.find(" io=")) + 2);
    else
        why.clear();
    note = "unusable: asked for io=" + server.io +
           ", the server runs io=" + (said.empty() ? "(not said)" : said) +
           (why.empty() ? "" : " (" + why + ")");
    if (unusable) *unusable = true;
    return false;
}

class Runner {
  public:
    Runner(const Options& opt, fs::path load, int server_cpu, int client_cpu)
        : opt_(opt), load_(std::move(load)), server_cpu_(server_cpu), client_cpu_(client_cpu) {}

    /// Runs `point` against `server`: the server on its CPU, evmux-load on the
    /// other, the server sampled meanwhile. A run that fails says why in
    /// `note` (ok false); a skipped one sets `skipped`.
    Result run(const Server& server, const Point& point) {
        Result r;
        r.server = &server;
        r.point = point;
        if (server.udp && (point.size < 8 || point.size > 65507)) {
            r.skipped = true;
            r.note = "UDP rows take sizes 8 to 65507 bytes (evmux-load --udp)";
            return r;
        }
        if (point.idle_heavy && server.udp) {
            r.skipped = true;
            r.note = "idle-heavy case skipped: UDP has no connections to hold idle";
            return r;
        }
        if (point.idle_heavy && server.per_connection_os) {
            r.skipped = true;
            r.note = "idle-heavy case skipped: one " +
                     std::string(server.forks ? "process" : "thread") +
                     " per connection would need " + std::to_string(point.conns) + " of them";
            return r;
        }
        // Several loops pinned to one CPU would take turns on it: leave a
        // multi-loop server unpinned (it then shares the client's CPU too).
        ChildProcess srv(server_argv(server), server.threads > 1 ? -1 : server_cpu_, false, true,
                         server.env);
        std::string host;
        int port = 0;
        if (!wait_listening(srv, server, host, port, r.note, &r.skipped)) return r;

        const bool precise = !server.per_connection_os;
        const int cpu = server.threads > 1 ? -1 : server_cpu_;
        ServerSampler sampler(srv.pid(), precise, opt_.tick_split, {cpu, client_cpu_},
                              server.forks);
        r.rss_start_kib = sampler.start_rss_kib();
        const double rate = server.udp ? 0 : opt_.rate;
        LoadRun load = run_load(
            point, host, port, srv.pid(), server.forks, server.tls, server.udp, cpu,
            [&](pid_t client) { sampler.set_client(client); }, 0, rate);
        sampler.stop();  // before reading its samples
        srv.stop();

        std::optional<double> duration_s = read_load_figures(load, r);
        if (!duration_s) return r;
        if (rate > 0 && r.msgs_per_s < min_rate_share * rate) {
            // Behind the schedule: it did less work per second than the
            // others, so its CPU per message is not comparable with theirs.
            r.note = "did not keep up with --rate " + fmt(rate, 0) + ": " + fmt(r.msgs_per_s, 0) +
                     " round trips/s";
            return r;
        }
        measure_server(r, sampler, load, *duration_s, precise);
        r.interference = assess_window(sampler, load, *duration_s, cpu);
        r.ok = true;
        return r;
    }

    /// --instructions for `server`: run it under callgrind for each of
    /// instructions_durations at instructions_point, and divide the
    /// difference of the instruction totals by that of the round trips. A
    /// pair whose longer run did not get clearly more messages (a busy host:
    /// the hypervisor took half the CPUs once, and the 3 s run had fewer
    /// than the 1 s run) is run again, up to instructions_tries pairs.
    InstructionRow instructions(const Server& server, const fs::path& valgrind) const {
        InstructionRow row;
        row.server = &server;
        for (int attempt = 1; attempt <= instructions_tries; ++attempt) {
            for (int i = 0; i < 2; ++i)
                if (!instruction_run(server, valgrind, i, row)) return row;
            row.per_msg = instructions_per_message(row.ir[0], row.msgs[0], row.ir[1], row.msgs[1]);
            if (!std::isnan(row.per_msg)) {
                if (attempt > 1)
                    row.note = "pair " + std::to_string(attempt) + " of " +
                               std::to_string(instructions_tries) +
                               ": the longer run of each earlier pair had too few messages";
                return row;
            }
        }
        row.note = "in each of " + std::to_string(instructions_tries) +
                   " pairs the longer run had under " + fmt(instructions_min_msgs_ratio, 1) +
                   "x the shorter's messages (a busy host)";
        return row;
    }

  private:
    /// Run i (0: the shorter, 1: the longer) of an --instructions pair into
    /// row.ir[i] and row.msgs[i]; false, with row.note saying why, if the
    /// server or the load failed.
    bool instruction_run(const Server& server, const fs::path& valgrind, int i,
                         InstructionRow& row) const {
        const fs::path out = fs::temp_directory_path() /
                             ("evmux-bench-callgrind-" + std::to_string(::getpid()) + ".out");
        std::vector<std::string> argv{valgrind.string(), "-q", "--tool=callgrind",
                                      "--callgrind-out-file=" + out.string()};
        for (const auto& a : server_argv(server)) argv.push_back(a);
        ChildProcess srv(argv, server_cpu_, false, true, server.env);
        std::string host;
        int port = 0;
        if (!wait_listening(srv, server, host, port, row.note)) return false;
        LoadRun load = run_load(
            instructions_point, host, port, srv.pid(), false, server.tls, server.udp, server_cpu_,
            [](pid_t) {}, instructions_durations[i]);
        // callgrind writes its file as the server exits: give it time.
        srv.stop(std::chrono::seconds(20));
        const std::optional<std::uint64_t> total = callgrind_total(out);
        fs::remove(out);
        row.msgs[i] = json_number(load.json, "round_trips");
        if (!load.in_time || load.status != 0 || !(row.msgs[i] > 0) || !total) {
            row.note = !total ? "no callgrind totals (did the server exit cleanly?)"
                              : "evmux-load failed: exit " + std::to_string(load.status);
            return false;
        }
        row.ir[i] = *total;
        return true;
    }

    std::vector<std::string> server_argv(const Server& server) const {
        std::vector<std::string> argv{server.binary.string(), "--port", "0", "--host", opt_.host};
        if (!server.backend.empty()) argv.insert(argv.end(), {"--backend", server.backend});
        if (server.threads > 1)
            argv.insert(argv.end(), {"--threads", std::to_string(server.threads)});
        if (!server.model.empty()) argv.insert(argv.end(), {"--model", server.model});
        if (!server.io.empty()) argv.insert(argv.end(), {"--io", server.io});
        if (server.tls)
            argv.insert(argv.end(),
                        {"--tls-cert", bench_cert().cert, "--tls-key", bench_cert().key});
        if (!server.tls_records.empty())
            argv.insert(argv.end(), {"--tls-records", server.tls_records});
        if (server.udp && server.kind == "evmux") argv.push_back("--udp");
        return argv;
    }

    /// evmux-load against host:port for `point`, on the client CPU; killed if
    /// it overruns by a minute. For a server that forks, the CPU of its live
    /// children is read when the figures arrive; one over TLS gets a TLS client.
    LoadRun run_load(const Point& point, const std::string& host, int port, pid_t server,
                     bool forks, bool tls, bool udp, int server_cpu,
                     const std::function<void(pid_t)>& started, double duration = 0,
                     double rate = 0) const {
        if (duration <= 0) duration = opt_.duration;
        std::vector<std::string> argv{load_.string(),
                                      "--port",
                                      std::to_string(port),
                                      "--host",
                                      host,
                                      "--conns",
                                      std::to_string(point.conns),
                                      "--active",
                                      std::to_string(point.active),
                                      "--size",
                                      std::to_string(point.size),
                                      "--duration",
                                      fmt(duration, 3),
                                      "--json",
                                      "--mark-window"};
        if (tls) argv.insert(argv.end(), {"--tls", "--tls-ca", bench_cert().ca});
        if (udp) argv.push_back("--udp");
        if (rate > 0) argv.insert(argv.end(), {"--rate", fmt(rate, 1)});
        LoadRun run;
        ChildProcess load(argv, client_cpu_, true, false);
        started(load.pid());
        auto limit =
            Clock::now() + std::chrono::milliseconds(static_cast<long>(duration * 1000) + 60000);
        auto read_end = [&](WindowEnd& at) {
            at.when = Clock::now();
            if (forks) at.children = live_children_cpu(server);
            at.ctx_switches = context_switches(server, forks);
            at.occupancy = read_occupancy(server_cpu, client_cpu_, server, forks, load.pid());
        };
        run.in_time = load.read_stdout(run.json, limit, [&](const std::string& out) {
            if (run.start.when == Clock::time_point{} && out.rfind("window\n", 0) == 0)
                read_end(run.start);
            // The duration's end, before the client drains and closes: a
            // forking server's children are all alive then.
            if (run.end.when == Clock::time_point{} && out.rfind("window\nend\n", 0) == 0) {
                read_end(run.end);
                ::kill(load.pid(), SIGUSR1);  // read: it may close its connections now
            }
        });
        if (run.json.rfind("window\nend\n", 0) == 0) run.json.erase(0, 11);
        run.status = run.in_time ? load.wait(limit) : -1;
        return run;
    }  // a load client that overran is killed here

    /// Other work on the server's and client's CPUs over the load window:
    /// between its two ends as run_load() read them (a forking server's live
    /// children included), or, if an end was not seen, the sampler's.
    Interference assess_window(const ServerSampler& sampler, const LoadRun& load, double duration_s,
                               int server_cpu) const {
        const int client_cpu = server_cpu < 0 ? -1 : client_cpu_;
        const double threshold = opt_.interference_percent / 100;
        if (load.start.when != Clock::time_point{} && load.end.when != Clock::time_point{})
            return assess(
                occupancy_delta(load.start.occupancy, load.end.occupancy, server_cpu, client_cpu),
                threshold);
        const auto& samples = sampler.occupancy();
        auto end = load.end.when;
        auto start = end - std::chrono::microseconds(static_cast<long>(duration_s * 1e6));
        return assess(occupancy_delta(sample_at(samples, start), sample_at(samples, end),
                                      server_cpu, client_cpu),
                      threshold);
    }

    const Options& opt_;
    fs::path load_;
    int server_cpu_, client_cpu_;
};

// ---- output ---------------------------------------------------------------------

/// Whether `r` ran at point `p`.
bool at_point(const Result& r, const Point& p) {
    return r.point.size == p.size && r.point.conns == p.conns && r.point.active == p.active;
}

/// `server`'s run at point `p` if it went well, else null.
const Result* run_of(const std::vector<Result>& results, const std::string& server,
                     const Point& p) {
    for (const auto& r : results)
        if (r.ok && r.server->name == server && at_point(r, p)) return &r;
    return nullptr;
}

/// The floor run at point `p`: epoll-floor, or udp-floor for a UDP row.
const Result* floor_of(const std::vector<Result>& results, const Point& p, bool udp = false) {
    return run_of(results, udp ? udp_floor_server : floor_server, p);
}

/// `r`'s figure `m` over the floor's, round i with round i (see paired_ratio);
/// NaN without a floor or for a failed run.
Spread ratio_to(const Result& r, const Result* floor, double Figures::*m) {
    // A figure the point has no median for (e.g. an unsplit user/sys) has no ratio either.
    if (!floor || !r.ok || std::isnan(r.*m)) return {NAN, NAN, NAN};
    return paired_ratio(round_values(r, m), round_values(*floor, m));
}

/// A table cell: the median, then its ratio to the floor with the ratio's
/// range ("≈" if it straddles 1.0); the floor's own row (or any without a
/// floor) shows the half-range of its rounds instead, e.g. "51234 ±3%".
std::string cell(const Result& r, const Result* floor, double Figures::*m, int decimals) {
    std::string s = fmt(r.*m, decimals);
    if (floor && floor != &r) return s + " (" + ratio_text(ratio_to(r, floor, m)) + ")";
    if (r.rounds.size() < 2 || !(r.*m > 0)) return s;
    return s + " ±" + fmt((r.max.*m - r.min.*m) / 2 / (r.*m) * 100, 0) + "%";
}

/// `text` right-aligned in `width` columns. A cell may hold "≈" (3 bytes, 1
/// column): padded by hand, not by printf.
std::string pad_left(const std::string& text, std::size_t width) {
    const std::size_t shown = text.size() - (text.find("≈") != std::string::npos ? 2 : 0);
    return std::string(width > shown ? width - shown : 0, ' ') + text;
}

// The footnote of a point's table: how its rows' user/sys columns were split.
std::string split_legend(const std::vector<Result>& results, const Point& p) {
    std::string perf, ticks, unsplit, unknown;
    std::uint64_t fewest = 0;
    for (const auto& r : results) {
        if (!r.ok || !at_point(r, p)) continue;
        std::string& names = r.cpu_split.starts_with("perf")      ? perf
                             : r.cpu_split.starts_with("unsplit") ? unsplit
                             : r.cpu_split.starts_with("unknown") ? unknown
                                                                  : ticks;
        names += (names.empty() ? "" : ", ") + r.server->name;
        if (r.cpu_split.starts_with("perf")) {
            auto n = std::strtoull(r.cpu_split.c_str() + r.cpu_split.find(':') + 1, nullptr, 10);
            fewest = fewest == 0 ? n : std::min<std::uint64_t>(fewest, n);
        }
    }
    std::string text;
    if (!perf.empty())
        text += "perf cpu-clock samples at " + std::to_string(1000000 / CpuModeSampler::period_ns) +
                " kHz in the load window (at least " + std::to_string(fewest) + " a run) for " +
                perf;
    if (!ticks.empty())
        text += (text.empty() ? "" : "; ") +
                std::string("utime/stime ticks in the load window for ") + ticks;
    if (!unsplit.empty())
        text += (text.empty() ? "" : "; ") +
                std::string(
                    "unsplit (under 200 ms of ticks in the window to split by: user and sys "
                    "shown as -, their sum in the JSON's cpu_us_per_msg) for ") +
                unsplit;
    if (!unknown.empty())
        text += (text.empty() ? "" : "; ") +
                std::string(
                    "unknown in a round (children exited before the window's end was "
                    "read; that round's CPU left out) for ") +
                unknown;
    return text.empty() ? "" : "  user/sys split: " + text + "\n";
}

/// The table header's environment lines.
void print_environment(std::ostream& os, const Environment& env) {
    os << "environment: linux " << env.get("kernel") << ", " << env.get("cpu_model") << ", "
       << env.get("cores_online") << " cores online, governor " << env.get("governor") << ", load "
       << env.get("load_before") << " before / " << env.get("load_after")
       << " after\n  vulnerabilities "
       << env.get("mitigations").substr(0, env.get("mitigations").find(':')) << "; libevent "
       << env.get("libevent") << ", liburing " << env.get("liburing") << ", " << env.get("compiler")
       << ", " << env.get("build_type") << "\n";
    if (const std::string& probe = env.get("speed_probe_us"); !probe.empty())
        os << "  speed probe " << probe
           << " us (median [range] over the runs: a fixed piece of work on the servers' CPU; "
              "a higher median in another run means a slower host then)\n";
}

// The footnote of a point's table: the rows whose `column` (how they were
// counted: `how`) is "-", and why.
std::string count_legend(const std::vector<Result>& results, const Point& p,
                         std::string Result::*how, const std::string& column) {
    std::vector<std::pair<std::string, std::string>> why;  // reason, servers
    for (const auto& r : results) {
        if (!r.ok || !at_point(r, p) || !(r.*how).starts_with("unavailable")) continue;
        auto it =
            std::find_if(why.begin(), why.end(), [&](const auto& w) { return w.first == r.*how; });
        if (it == why.end())
            why.emplace_back(r.*how, r.server->name);
        else
            it->second += ", " + r.server->name;
    }
    std::string text;
    for (const auto& [reason, servers] : why)
        text += "  " + column + " - for " + servers + ": " + reason + "\n";
    return text;
}

/// The width of the server column: the longest name, at least 22.
int name_width(const std::vector<Result>& results) {
    std::size_t width = 22;
    for (const auto& r : results) width = std::max(width, r.server->name.size());
    return static_cast<int>(width);
}

/// The NOTE of a point whose disturbed rounds were left out of its figures:
/// which rounds, what disturbed them (each flagged run, a reason said once),
/// and how many rounds the figures stand on. Empty if none was.
std::string left_out_note(const std::vector<Result>& results, const Point& p) {
    std::map<int, std::vector<std::string>> why;  // round -> "server: details"
    std::size_t kept = 0;
    for (const auto& r : results) {
        if (!at_point(r, p) || r.left_out.empty()) continue;
        kept = r.rounds.size();
        for (const auto& round : r.left_out) {
            std::vector<std::string>& w = why[round.round];
            if (!round.interference.flagged) continue;
            const std::string& d = round.interference.details;
            if (std::none_of(w.begin(), w.end(),
                             [&](const std::string& x) { return x.ends_with(": " + d); }))
                w.push_back(r.server->name + ": " + d);
        }
    }
    if (why.empty()) return {};
    std::string numbers, details;
    for (const auto& [n, w] : why) {
        numbers += (numbers.empty() ? "" : ", ") + std::to_string(n);
        details += std::string(details.empty() ? "" : "; ") + "round " + std::to_string(n) + ": ";
        for (std::size_t i = 0; i < w.size(); ++i) details += (i ? ", " : "") + w[i];
    }
    return "NOTE: " + point_label(p) + ": round" + (why.size() > 1 ? "s " : " ") + numbers +
           " left out of every server's figures, disturbed by other work (" + details +
           "); medians and ratios over the other " + std::to_string(kept) +
           " (--keep-disturbed keeps them)\n";
}

void print_table(std::ostream& os, const std::vector<Result>& results,
                 const std::vector<Point>& points, double rate) {
    char line[512];
    const int width = name_width(results);
    for (const auto& p : points) {
        const Result* fl = floor_of(results, p);
        const Result* udp_fl = floor_of(results, p, true);
        os << "\n== " << point_label(p) << " ping-pong"
           << (rate > 0 ? ", paced at " + fmt(rate, 0) + " round trips/s (TCP rows)" : "")
           << (fl ? "  (median; ratio to epoll-floor [its range over paired rounds])"
                  : "  (median ±half its range; no epoll-floor run: no ratios)")
           << (udp_fl ? "; UDP rows: ratio to udp-floor" : "") << "\n";
        std::snprintf(line, sizeof line, "%-*s %26s %24s %24s %24s %24s %24s %24s %24s %24s\n",
                      width, "server", "messages/s", "MiB/s", "p50 us", "p99 us", "user us/msg",
                      "sys us/msg", "ctx sw/msg", "syscalls/msg", "waits/msg");
        os << line;
        for (const auto& r : results) {
            if (!at_point(r, p)) continue;
            if (!r.ok) {
                os << "  " << r.server->name << ": " << (r.skipped ? "" : "FAILED: ") << r.note
                   << "\n";
                continue;
            }
            auto f = [&](double Figures::*m, int d) {
                return cell(r, r.server->udp ? udp_fl : fl, m, d);
            };
            os << r.server->name << std::string(width - r.server->name.size(), ' ') << ' '
               << pad_left(f(&Figures::msgs_per_s, 0), 26) << ' '
               << pad_left(f(&Figures::mib_per_s, 1), 24) << ' '
               << pad_left(f(&Figures::p50_us, 0), 24) << ' '
               << pad_left(f(&Figures::p99_us, 0), 24) << ' '
               << pad_left(f(&Figures::user_us_per_msg, 2), 24) << ' '
               << pad_left(f(&Figures::sys_us_per_msg, 2), 24) << ' '
               << pad_left(f(&Figures::ctx_switches_per_msg, 3), 24) << ' '
               << pad_left(f(&Figures::syscalls_per_msg, 2), 24) << ' '
               << pad_left(f(&Figures::waits_per_msg, 2), 24) << "\n";
            if (p.idle_heavy)
                os << "    rss " << fmt(r.rss_start_kib, 0) << " KiB -> " << fmt(r.rss_peak_kib, 0)
                   << " KiB: " << fmt(r.rss_per_idle_conn_bytes, 0) << " B per idle connection\n";
        }
        for (const auto& r : results)
            if (r.ok && r.udp_lost > 0 && at_point(r, p))
                os << "  UDP loss: " << r.server->name << " lost " << fmt(r.udp_lost, 0) << " of "
                   << fmt(r.udp_sent, 0) << " datagrams over its rounds (no echo within "
                   << "evmux-load's --timeout; each loss stalls its session that long)\n";
        os << split_legend(results, p);
        os << count_legend(results, p, &Result::syscalls, "syscalls/msg");
        os << count_legend(results, p, &Result::waits, "waits/msg");
        for (const auto& r : results)
            if (r.ok && r.interference.flagged && at_point(r, p))
                os << "WARNING: " << r.server->name << " at " << point_label(p)
                   << " disturbed by other work: " << r.interference.details << "\n";
        os << left_out_note(results, p);
    }
}

std::string json_num(double v, int decimals = 3) {
    return std::isnan(v) || std::isinf(v) ? "null" : fmt(v, decimals);
}

std::string json_str(const std::string& s) {
    std::string out = "\"";
    for (char c : s) {
        if (c == '"' || c == '\\')
            out += '\\', out += c;
        else if (static_cast<unsigned char>(c) < 0x20)
            out += ' ';
        else
            out += c;
    }
    return out + "\"";
}

/// The keys of "ratio_to_floor".
const std::pair<const char*, double Figures::*> ratio_keys[] = {
    {"msgs_per_s", &Figures::msgs_per_s},
    {"mib_per_s", &Figures::mib_per_s},
    {"p50_us", &Figures::p50_us},
    {"p99_us", &Figures::p99_us},
    {"user_us_per_msg", &Figures::user_us_per_msg},
    {"sys_us_per_msg", &Figures::sys_us_per_msg},
    {"cpu_us_per_msg", &Figures::cpu_us_per_msg},
    {"ctx_switches_per_msg", &Figures::ctx_switches_per_msg},
    {"syscalls_per_msg", &Figures::syscalls_per_msg},
    {"waits_per_msg", &Figures::waits_per_msg}};

std::string json_interference(const Interference& in) {
    return std::string("{\"flagged\": ") + (in.flagged ? "true" : "false") +
           ", \"details\": " + json_str(in.details) + "}";
}

/// The figures as JSON members (no braces).
std::string json_figures(const Figures& f, bool idle_heavy) {
    std::ostringstream os;
    os << "\"round_trips\": " << json_num(f.round_trips, 0)
       << ", \"msgs_per_s\": " << json_num(f.msgs_per_s, 1)
       << ", \"mib_per_s\": " << json_num(f.mib_per_s) << ", \"p50_us\": " << json_num(f.p50_us, 1)
       << ", \"p99_us\": " << json_num(f.p99_us, 1) << ", \"max_us\": " << json_num(f.max_us, 1)
       << ", \"user_us_per_msg\": " << json_num(f.user_us_per_msg, 4)
       << ", \"sys_us_per_msg\": " << json_num(f.sys_us_per_msg, 4)
       << ", \"cpu_us_per_msg\": " << json_num(f.cpu_us_per_msg, 4)
       << ", \"cpu_window_s\": " << json_num(f.cpu_window_s)
       << ", \"rss_start_kib\": " << json_num(f.rss_start_kib, 0)
       << ", \"rss_peak_kib\": " << json_num(f.rss_peak_kib, 0) << ", \"rss_per_idle_conn_bytes\": "
       << json_num(idle_heavy ? f.rss_per_idle_conn_bytes : NAN, 0)
       << ", \"ctx_switches_per_msg\": " << json_num(f.ctx_switches_per_msg, 4)
       << ", \"syscalls_per_msg\": " << json_num(f.syscalls_per_msg, 3)
       << ", \"waits_per_msg\": " << json_num(f.waits_per_msg, 3);
    return os.str();
}

void write_json(const fs::path& file, const std::vector<Result>& results,
                const std::vector<TlsTarget>& tls, const Options& opt,
                const std::vector<DispatchSweep>& sweeps,
                const std::vector<InstructionRow>& instructions, bool pinned, double total_s,
                const Environment& env) {
    std::ofstream os(file);
    os << "{\n  \"tool\": \"evmux-bench\",\n  \"quick\": " << (opt.quick ? "true" : "false")
       << ",\n  \"duration_s\": " << json_num(opt.duration) << ",\n  \"cpus\": " << usable_cpus()
       << ",\n  \"pinned\": " << (pinned ? "true" : "false") << ",\n  \"rounds\": " << opt.rounds
       << ",\n  \"rate\": " << (opt.rate > 0 ? json_num(opt.rate, 1) : "null")
       << ",\n  \"interference_threshold_percent\": " << json_num(opt.interference_percent, 1)
       << ",\n  \"keep_disturbed\": " << (opt.keep_disturbed ? "true" : "false")
       << ",\n  \"ratio_ranges\": \"paired: round i of a server over round i of epoll-floor "
          "(ratio_to_floor) or of uring-floor (ratio_to_uring_floor)\""
       << ",\n  \"total_s\": " << json_num(total_s, 1) << ",\n  \"environment\": {";
    for (std::size_t i = 0; i < env.fields.size(); ++i)
        os << (i ? ", " : "") << json_str(env.fields[i].first) << ": "
           << json_str(env.fields[i].second);
    os << "},\n  \"runs\": [";
    bool first = true;
    for (const auto& r : results) {
        const Result* fl = floor_of(results, r.point, r.server->udp);
        // The second floor, for TCP rows: null ratios where it did not run.
        const Result* ufl = r.server->udp ? nullptr : run_of(results, uring_floor_server, r.point);
        os << (first ? "\n" : ",\n") << "    {\"server\": " << json_str(r.server->name)
           << ", \"kind\": " << json_str(r.server->kind)
           << ", \"backend\": " << json_str(r.server->backend)
           << ", \"io\": " << json_str(r.server->io) << ", \"size\": " << r.point.size
           << ", \"conns\": " << r.point.conns << ", \"active\": " << r.point.active
           << ", \"idle_heavy\": " << (r.point.idle_heavy ? "true" : "false")
           << ", \"ok\": " << (r.ok ? "true" : "false")
           << ", \"skipped\": " << (r.skipped ? "true" : "false")
           << ", \"note\": " << json_str(r.note);
        if (r.ok && r.server->udp)
            os << ", \"udp_sent\": " << json_num(r.udp_sent, 0)
               << ", \"udp_lost\": " << json_num(r.udp_lost, 0);
        if (r.ok) {
            // The medians (and the median paired ratios), then the same keys
            // as "min" and "max", then each round's.
            auto ratios = [&](double Spread::*pick, const Result* floor) {
                std::string text;
                for (const auto& [key, m] : ratio_keys)
                    text += std::string(text.empty() ? "{" : ", ") + "\"" + key +
                            "\": " + json_num(ratio_to(r, floor, m).*pick);
                return text + "}";
            };
            auto both_ratios = [&](double Spread::*pick) {
                return ", \"ratio_to_floor\": " + ratios(pick, fl) +
                       ", \"ratio_to_uring_floor\": " + ratios(pick, ufl);
            };
            os << ", " << json_figures(r, r.point.idle_heavy)
               << ", \"cpu_split\": " << json_str(r.cpu_split)
               << ", \"syscalls\": " << json_str(r.syscalls) << ", \"waits\": " << json_str(r.waits)
               << ", \"interference\": " << json_interference(r.interference)
               << ", \"rounds_left_out\": [";
            for (std::size_t i = 0; i < r.left_out.size(); ++i) {
                const Result& round = r.left_out[i];
                os << (i ? ", " : "") << "{" << json_figures(round, r.point.idle_heavy)
                   << ", \"interference\": " << json_interference(round.interference)
                   << ", \"round\": " << round.round << "}";
            }
            os << "]" << both_ratios(&Spread::median) << ", \"min\": {"
               << json_figures(r.min, r.point.idle_heavy) << both_ratios(&Spread::min)
               << "}, \"max\": {" << json_figures(r.max, r.point.idle_heavy)
               << both_ratios(&Spread::max) << "}, \"rounds\": [";
            for (std::size_t i = 0; i < r.rounds.size(); ++i) {
                const Result& round = r.rounds[i];
                os << (i ? ", " : "") << "{" << json_figures(round, r.point.idle_heavy)
                   << ", \"cpu_split\": " << json_str(round.cpu_split)
                   << ", \"syscalls\": " << json_str(round.syscalls)
                   << ", \"waits\": " << json_str(round.waits)
                   << ", \"interference\": " << json_interference(round.interference)
                   << ", \"ratio_to_floor\": {";
                bool first_key = true;
                for (const auto& [key, m] : ratio_keys) {
                    double q = fl && i < fl->rounds.size() && fl->rounds[i].*m > 0
                                   ? round.*m / fl->rounds[i].*m
                                   : NAN;
                    os << (std::exchange(first_key, false) ? "" : ", ") << "\"" << key
                       << "\": " << json_num(q);
                }
                os << "}, \"round\": " << round.round << "}";
            }
            os << "]";
        }
        os << "}";
        first = false;
    }
    // The TLS target's rows (print_tls_target()), with every EVP timing and
    // the reference loops'.
    os << "\n  ],\n  \"tls_target\": [";
    // "NAME": [us, ...], "NAME_left_out": [{"round": N, "us": us}, ...]
    auto timings = [&os](const char* name, const std::vector<double>& kept,
                         const std::vector<std::pair<int, double>>& left) {
        os << ", \"" << name << "\": [";
        for (std::size_t i = 0; i < kept.size(); ++i) os << (i ? ", " : "") << json_num(kept[i], 4);
        os << "], \"" << name << "_left_out\": [";
        for (std::size_t i = 0; i < left.size(); ++i)
            os << (i ? ", " : "") << "{\"round\": " << left[i].first
               << ", \"us\": " << json_num(left[i].second, 4) << "}";
        os << "]";
    };
    auto ratio = [&os](const char* name, const Spread& r) {
        os << ", \"" << name << "\": {\"median\": " << json_num(r.median)
           << ", \"min\": " << json_num(r.min) << ", \"max\": " << json_num(r.max) << "}";
    };
    first = true;
    for (const TlsTarget& t : tls) {
        os << (first ? "\n" : ",\n") << "    {\"server\": " << json_str(t.tls->server->name)
           << ", \"plain_server\": " << json_str(t.plain->server->name)
           << ", \"size\": " << t.tls->point.size << ", \"conns\": " << t.tls->point.conns
           << ", \"active\": " << t.tls->point.active;
        timings("evp_us", t.evp->kept, t.evp->left_out);
        ratio("extra_over_evp", t.ratio);
        os << ", \"limit\": 1.3, \"verdict\": " << json_str(t.verdict);
        timings("bare_us", t.evp->bare, t.evp->bare_left_out);
        ratio("bare_extra_over_evp", t.bare);
        timings("handwritten_us", t.evp->echo, t.evp->echo_left_out);
        ratio("handwritten_extra_over_evp", t.echo);
        os << "}";
        first = false;
    }
    os << "\n  ],\n  \"dispatch\": [";
    first = true;
    for (const auto& s : sweeps) {
        os << (first ? "\n" : ",\n") << "    {\"backend\": " << json_str(s.backend)
           << ", \"fds\": " << s.fds << ", \"active\": " << s.active << ", \"writes\": " << s.writes
           << ", \"median_us\": " << json_num(s.median_us, 1)
           << ", \"us_per_event\": " << json_num(s.us_per_event, 4) << "}";
        first = false;
    }
    // --instructions: one entry per single-process server (absent without it).
    os << "\n  ],\n  \"instructions\": [";
    first = true;
    for (const auto& r : instructions) {
        os << (first ? "\n" : ",\n") << "    {\"server\": " << json_str(r.server->name)
           << ", \"size\": " << instructions_point.size
           << ", \"sessions\": " << instructions_point.active
           << ", \"instructions_per_msg\": " << json_num(r.per_msg, 1)
           << ", \"runs\": [{\"duration_s\": " << json_num(instructions_durations[0], 1)
           << ", \"instructions\": " << r.ir[0] << ", \"round_trips\": " << json_num(r.msgs[0], 0)
           << "}, {\"duration_s\": " << json_num(instructions_durations[1], 1)
           << ", \"instructions\": " << r.ir[1] << ", \"round_trips\": " << json_num(r.msgs[1], 0)
           << "}], \"note\": " << json_str(r.note) << "}";
        first = false;
    }
    os << "\n  ]\n}\n";
    if (!os) throw std::runtime_error("cannot write " + file.string());
}

void write_csv(const fs::path& file, const std::vector<Result>& results) {
    // The figures of the table, each as its median, min and max over the
    // rounds, then its ratio to the floor as the median, min and max of the
    // paired round ratios (empty where unknown: no floor, unsplit, uncounted);
    // the server CPU per message also over uring-floor's.
    struct Column {
        const char* name;
        double Figures::*member;
        int decimals;
        bool ratio;
    };
    static constexpr Column columns[] = {
        {"msgs_per_s", &Figures::msgs_per_s, 1, true},
        {"mib_per_s", &Figures::mib_per_s, 3, true},
        {"p50_us", &Figures::p50_us, 1, true},
        {"p99_us", &Figures::p99_us, 1, true},
        {"max_us", &Figures::max_us, 1, false},
        {"user_us_per_msg", &Figures::user_us_per_msg, 4, true},
        {"sys_us_per_msg", &Figures::sys_us_per_msg, 4, true},
        {"cpu_us_per_msg", &Figures::cpu_us_per_msg, 4, true},
        {"ctx_switches_per_msg", &Figures::ctx_switches_per_msg, 4, true},
        {"syscalls_per_msg", &Figures::syscalls_per_msg, 3, true},
        {"waits_per_msg", &Figures::waits_per_msg, 3, true},
        {"rss_start_kib", &Figures::rss_start_kib, 0, false},
        {"rss_peak_kib", &Figures::rss_peak_kib, 0, false},
        {"rss_per_idle_conn_bytes", &Figures::rss_per_idle_conn_bytes, 0, false},
    };
    std::ofstream os(file);
    os << "server,kind,backend,io,size,conns,active,idle_heavy,ok,rounds";
    for (const Column& c : columns) {
        os << ',' << c.name << ',' << c.name << "_min," << c.name << "_max";
        if (c.ratio)
            os << ',' << c.name << "_ratio," << c.name << "_ratio_min," << c.name << "_ratio_max";
        if (c.member == &Figures::cpu_us_per_msg)
            os << ',' << c.name << "_ratio_uring_floor," << c.name << "_ratio_uring_floor_min,"
               << c.name << "_ratio_uring_floor_max";
    }
    os << ",cpu_split,interference_flagged,interference,rounds_left_out,note\n";
    auto text = [](std::string t) {
        std::replace(t.begin(), t.end(), ',', ';');
        std::replace(t.begin(), t.end(), '\n', ' ');
        return t;
    };
    for (const auto& r : results) {
        const Result* fl = floor_of(results, r.point, r.server->udp);
        const Result* ufl = r.server->udp ? nullptr : run_of(results, uring_floor_server, r.point);
        auto num = [&](double v, int d) {
            return r.ok && !std::isnan(v) ? fmt(v, d) : std::string();
        };
        os << r.server->name << ',' << r.server->kind << ',' << r.server->backend << ','
           << r.server->io << ',' << r.point.size << ',' << r.point.conns << ',' << r.point.active
           << ',' << r.point.idle_heavy << ',' << r.ok << ',' << r.rounds.size();
        for (const Column& c : columns) {
            const bool shown = c.member != &Figures::rss_per_idle_conn_bytes || r.point.idle_heavy;
            os << ',' << (shown ? num(r.*c.member, c.decimals) : "") << ','
               << (shown ? num(r.min.*c.member, c.decimals) : "") << ','
               << (shown ? num(r.max.*c.member, c.decimals) : "");
            if (!c.ratio) continue;
            const Spread q = fl && fl != &r ? ratio_to(r, fl, c.member) : Spread{NAN, NAN, NAN};
            os << ',' << num(q.median, 3) << ',' << num(q.min, 3) << ',' << num(q.max, 3);
            if (c.member != &Figures::cpu_us_per_msg) continue;
            const Spread u = ufl && ufl != &r ? ratio_to(r, ufl, c.member) : Spread{NAN, NAN, NAN};
            os << ',' << num(u.median, 3) << ',' << num(u.min, 3) << ',' << num(u.max, 3);
        }
        std::string left;  // "2 5": the rounds' numbers
        for (const auto& round : r.left_out) {
            if (!left.empty()) left += ' ';
            left += std::to_string(round.round);
        }
        os << ',' << text(r.cpu_split) << ',' << r.interference.flagged << ','
           << text(r.interference.details) << ',' << left << ',' << text(r.note) << '\n';
    }
    if (!os) throw std::runtime_error("cannot write " + file.string());
}

// ---- set-up ---------------------------------------------------------------------

fs::path self_dir() {
    std::error_code ec;
    fs::path exe = fs::read_symlink("/proc/self/exe", ec);
    return ec ? fs::current_path() : exe.parent_path();
}

// plot_bench.py: beside the executable (build tree or a copy), installed data,
// or the source tree this was built from.
std::optional<fs::path> find_plot_script(const fs::path& dir) {
    for (const fs::path& p :
         {dir / "plot_bench.py", dir / ".." / "share" / "evmux" / "plot_bench.py",
          fs::path(EVMUX_SOURCE_DIR) / "tools" / "plot_bench.py"})
        if (fs::exists(p)) return p;
    return std::nullopt;
}

// A baseline server: beside evmux-load (the build tree, or --tools-dir), else
// where `meson install` puts them, <libexecdir>/evmux. That one is looked for
// relative to this program first (a moved or DESTDIR-staged prefix), then at
// its configured path. Empty if none is there.
fs::path find_baseline(const fs::path& tools, const std::string& exe) {
    const fs::path installed(EVMUX_LIBEXECDIR);
    const fs::path relocated = self_dir() / installed.lexically_relative(EVMUX_BINDIR);
    for (const fs::path& dir : {tools, relocated, installed})
        if (fs::exists(dir / exe)) return (dir / exe).lexically_normal();
    return {};
}

[[noreturn]] void usage_error(const std::string& message) {
    std::cerr << "evmux-bench: " << message << " (see --help)\n";
    std::exit(2);
}

/// Why io_uring is not usable here (the registry's reason), or "" if it is.
std::string io_uring_unusable() {
    for (const auto& b : evmux::backends())
        if (b.name == "io_uring") return b.usable ? "" : b.reason;
    return "no io_uring backend in the registry";
}

// Every usable backend, or the requested ones after checking each.
/// `requested` checked against the usable backends (exit 2 naming `source`,
/// the flag or variable they came from, for one that is not), or every usable
/// one if it is empty.
std::vector<std::string> pick_backends(const std::vector<std::string>& requested,
                                       const std::string& source = "") {
    std::vector<std::string> usable, all;
    for (const auto& b : evmux::backends()) {
        all.push_back(b.name);
        if (b.usable) usable.push_back(b.name);
    }
    if (requested.empty()) return usable;
    std::string usable_list;
    for (const auto& u : usable) usable_list += (usable_list.empty() ? "" : ", ") + u;
    for (const auto& name : requested) {
        if (std::find(usable.begin(), usable.end(), name) != usable.end()) continue;
        const std::string from = source.empty() ? "" : source + ": ";
        if (std::find(all.begin(), all.end(), name) != all.end())
            usage_error(from + "backend '" + name +
                        "' is not usable here; usable backends: " + usable_list);
        usage_error(from + "unknown backend '" + name + "'; usable backends: " + usable_list);
    }
    return requested;
}

int run_dispatch_command(int n, int a, int w, const std::string& backend, int iterations) {
    pick_backends({backend});
    raise_fd_limit(evmux::support::bench_c_fds(n));
    for (double us : dispatch_iterations(backend, n, a, w, iterations)) std::printf("%.0f\n", us);
    return 0;
}

/// The flags of the comparison (everything but `dispatch`).
void add_bench_options(CLI::App& app, Options& opt) {
    app.add_option("--backends", opt.backends,
                   "evmux backends (default: EVMUX_BACKEND if set, else every usable one)")
        ->delimiter(',');
    app.add_option("--servers", opt.servers,
                   "servers: evmux, evmux-coroutines, evmux-tls, epoll-floor, uring-floor, "
                   "libevent-bufferevent, threads, fork (default: all, uring-floor where "
                   "io_uring is usable; evmux-coroutines and evmux-tls run on the first backend "
                   "only); only when named: evmux-tls-openssl (OpenSSL's record layer), "
                   "uring-floor-coop (the io_uring floor without SINGLE_ISSUER|DEFER_TASKRUN), "
                   "uring-floor-zc (with zero-copy sends)")
        ->delimiter(',');
    app.add_option("--sizes", opt.sizes, "message sizes in bytes (default 64,1024,16384)")
        ->delimiter(',')
        ->check(evmux::support::number_in(1, 1 << 24));
    app.add_option("--sessions", opt.sessions,
                   "concurrent ping-pong sessions (default 1,10,100,1000)")
        ->delimiter(',')
        ->check(evmux::support::number_in(1, 100000));
    app.add_option("--duration", opt.duration, "seconds per point (default 2; 1 with --quick)")
        ->check(evmux::support::number_in(0.05, 3600.0));
    app.add_option("--rounds", opt.rounds,
                   "rounds per point, the servers interleaved in each; medians and ranges "
                   "over them (default 5; 3 with --quick)")
        ->check(evmux::support::number_in(1, 1000));
    app.add_option("--interference-threshold", opt.interference_percent,
                   "flag a run when other work took more than this percentage of the server's "
                   "or the client's CPU, or steal did (default 5)")
        ->check(evmux::support::number_in(0.0, 100.0));
    app.add_flag("--keep-disturbed", opt.keep_disturbed,
                 "keep the rounds other work disturbed in the figures, flagged, and run no "
                 "extra round; by default each is replaced by an extra round (up to --rounds "
                 "more) and left out of every server's figures at its point while at least "
                 "half of the rounds run, and 3, remain");
    app.add_flag("--quick", opt.quick,
                 "a subset that finishes in 3-7 minutes (1 s points, fewer idle connections)");
    app.add_option("--out", opt.out_dir, "directory for bench.json, bench.csv and the plots");
    app.add_option("--json", opt.json_file, "write the results as JSON to this file");
    app.add_option("--csv", opt.csv_file, "write the results as CSV to this file");
    app.add_option("--idle-conns", opt.idle_conns,
                   "connections in the idle-heavy case (default 10000; 2000 with --quick)")
        ->check(evmux::support::number_in(1, 1000000));
    app.add_option("--idle-active", opt.idle_active,
                   "active connections in the idle-heavy case (default 100)")
        ->check(evmux::support::number_in(1, 1000000));
    app.add_flag("--no-idle", opt.no_idle, "skip the idle-heavy case");
    app.add_flag("--no-plots", opt.no_plots, "do not run plot_bench.py");
    app.add_flag("--instructions", opt.instructions,
                 "also count user-space instructions per message: each single-process server "
                 "under valgrind's callgrind at 10 sessions x 1 KiB, for 1 s and 3 s of load "
                 "(the difference cancels start-up); about 10 s per server");
    app.add_flag("--tick-split", opt.tick_split,
                 "split user/sys CPU by the utime/stime ticks, not by perf samples (to compare)");
    app.add_option("--sweep-fds", opt.sweep_fds,
                   "socketpair counts of the dispatch sweep (default 100,1000,10000; "
                   "100,1000,5000 with --quick)")
        ->delimiter(',')
        ->check(evmux::support::number_in(1, 1000000));
    app.add_option("--tools-dir", opt.tools_dir,
                   "where evmux-echo, evmux-load and the baselines are (default: beside this "
                   "program; baselines also in the installed libexec/evmux)");
    app.add_option("--threads", opt.threads,
                   "evmux-echo loop threads, e.g. 1,2 for throughput vs threads (default 1; "
                   "a server with more than 1 is not pinned)")
        ->delimiter(',')
        ->check(evmux::support::number_in(1, 1024));
    app.add_option("--host", opt.host, "address the servers listen on (default 127.0.0.1)");
    app.add_option("--io", opt.io,
                   "io modes of the evmux rows on io_uring, one row each: completion "
                   "(evmux/io_uring+completion), readiness (evmux/io_uring) (default: both when "
                   "io_uring is among the backends; the other backends have readiness only)")
        ->delimiter(',');
    app.add_option("--rate", opt.rate,
                   "paced load: evmux-load sends this many round trips per second in all at "
                   "every TCP point (evmux-load --rate), so the servers compare doing the same "
                   "work per second rather than each as fast as the client and it can go; a run "
                   "below 97% of it is not counted (not --instructions, not UDP rows)")
        ->check(evmux::support::number_in(1.0, 1e9));
    app.add_flag("--udp", opt.udp,
                 "also UDP echo rows: evmux-echo --udp on each backend (evmux/BACKEND/udp) and "
                 "the recvmmsg/sendmmsg floor (udp-floor), against evmux-load --udp");
}

/// `evmux-bench dispatch`'s flags.
struct DispatchOptions {
    int n = 100, a = 1, w = 100, iterations = 25;
    std::string backend = evmux::default_backend_name();
};

CLI::App* add_dispatch_command(CLI::App& app, DispatchOptions& d) {
    CLI::App* dispatch = app.add_subcommand(
        "dispatch",
        "libevent's test/bench.c on an evmux EventLoop: N socketpairs, A active, W writes; "
        "prints the microseconds of each of 25 iterations");
    dispatch->add_option("-n", d.n, "socketpairs (default 100)")
        ->check(evmux::support::number_in(1, 1000000));
    dispatch->add_option("-a", d.a, "active chains (default 1)")
        ->check(evmux::support::number_in(1, 1000000));
    dispatch->add_option("-w", d.w, "writes (default 100)")
        ->check(evmux::support::number_in(0, 100000000));
    dispatch->add_option("--backend", d.backend, "evmux backend (default: EVMUX_BACKEND or best)");
    dispatch->add_option("--iterations", d.iterations, "iterations (default 25, as bench.c)")
        ->check(evmux::support::number_in(1, 100000));
    return dispatch;
}

// ---- the plan -------------------------------------------------------------------

/// Whether --servers asks for `server` (every server without --servers).
bool wanted(const Options& opt, const std::string& server) {
    return opt.servers.empty() ||
           std::find(opt.servers.begin(), opt.servers.end(), server) != opt.servers.end();
}

/// Exit 2 unless `file` can be written (opened for appending; a file that
/// was not there is removed again): `flag` names it in the message.
void check_writable(const char* flag, const std::string& file) {
    std::error_code ec;
    const bool existed = fs::exists(file, ec);
    FILE* f = std::fopen(file.c_str(), "a");
    if (!f) usage_error(std::string(flag) + " " + file + ": " + std::strerror(errno));
    std::fclose(f);
    if (!existed) fs::remove(file, ec);
}

/// Checks --servers, --backends and --idle-active (exit 2 on a mistake), fills
/// in the defaults that depend on --quick, and returns the backends to run.
std::vector<std::string> check_and_complete(Options& opt) {
    static const std::vector<std::string> known_servers{
        "evmux",       "evmux-coroutines", "evmux-tls",      "evmux-tls-openssl",    "epoll-floor",
        "uring-floor", "uring-floor-coop", "uring-floor-zc", "libevent-bufferevent", "threads",
        "fork",        "udp-floor"};
    for (const auto& s : opt.servers)
        if (std::find(known_servers.begin(), known_servers.end(), s) == known_servers.end())
            usage_error("unknown server '" + s +
                        "'; known: evmux, evmux-coroutines, evmux-tls, evmux-tls-openssl, "
                        "epoll-floor, uring-floor, uring-floor-coop, uring-floor-zc, "
                        "libevent-bufferevent, threads, fork, udp-floor (with --udp)");
    for (const char* name : {uring_floor_server, "uring-floor-coop", "uring-floor-zc"})
        if (!opt.servers.empty() && wanted(opt, name)) {
            const std::string why = io_uring_unusable();
            if (!why.empty())
                usage_error(std::string(name) + ": io_uring is not usable here: " + why);
        }
    for (const char* name : {"evmux-tls", "evmux-tls-openssl"})
        if (!opt.servers.empty() && wanted(opt, name) && !tls_built())
            usage_error(std::string(name) + ": not compiled in (needs libssl-dev)");
    if (!opt.udp && wanted(opt, "udp-floor") && !opt.servers.empty())
        usage_error("udp-floor is a UDP server: add --udp");
    const bool on_evmux =
        wanted(opt, "evmux") || wanted(opt, "evmux-coroutines") ||
        ((wanted(opt, "evmux-tls") || wanted(opt, "evmux-tls-openssl")) && tls_built());
    // Without --backends, EVMUX_BACKEND picks the backend as for every evmux
    // program (said on stderr: the bench compares every usable one otherwise).
    std::string source;
    if (const char* env = std::getenv("EVMUX_BACKEND");
        env && *env && on_evmux && opt.backends.empty()) {
        opt.backends = {env};
        source = "EVMUX_BACKEND";
    }
    std::vector<std::string> backends =
        on_evmux ? pick_backends(opt.backends, source) : std::vector<std::string>{};
    if (!source.empty())
        std::cerr << "evmux-bench: backend " << backends.front()
                  << " from EVMUX_BACKEND (--backends overrides it)\n";
    if (!on_evmux && !opt.backends.empty())
        usage_error(
            "--backends given but none of 'evmux', 'evmux-coroutines', 'evmux-tls' is among "
            "--servers");
    for (const auto& mode : opt.io)
        if (mode != "completion" && mode != "readiness")
            usage_error("--io: unknown mode '" + mode + "'; known: completion, readiness");
    for (std::size_t i = 1; i < opt.io.size(); ++i)  // once each: one row per mode
        if (std::find(opt.io.begin(), opt.io.begin() + i, opt.io[i]) != opt.io.begin() + i)
            opt.io.erase(opt.io.begin() + i--);
    const bool on_uring = std::find(backends.begin(), backends.end(), "io_uring") != backends.end();
    if (!on_uring && std::find(opt.io.begin(), opt.io.end(), "completion") != opt.io.end())
        usage_error(
            "--io completion: only the io_uring backend has it, and it is not among "
            "the backends run");
    if (opt.io.empty())
        opt.io = on_uring ? std::vector<std::string>{"readiness", "completion"}
                          : std::vector<std::string>{"readiness"};

    if (const char* env = std::getenv("EVMUX_IO");
        env && *env && std::string(env) != "completion" && std::string(env) != "readiness")
        usage_error(std::string("EVMUX_IO must be completion or readiness, not '") + env + "'");
    // Where the results go, tried now: not found unwritable after the run.
    if (!opt.out_dir.empty()) {
        std::error_code ec;
        fs::create_directories(opt.out_dir, ec);
        if (ec) usage_error("--out " + opt.out_dir + ": " + ec.message());
        check_writable("--out", (fs::path(opt.out_dir) / "bench.json").string());
    }
    if (!opt.json_file.empty()) check_writable("--json", opt.json_file);
    if (!opt.csv_file.empty()) check_writable("--csv", opt.csv_file);

    if (opt.duration <= 0) opt.duration = opt.quick ? 1.0 : 2.0;
    if (opt.rounds <= 0) opt.rounds = opt.quick ? 3 : 5;
    if (opt.idle_conns <= 0) opt.idle_conns = opt.quick ? 2000 : 10000;
    if (opt.idle_active > opt.idle_conns) usage_error("--idle-active exceeds --idle-conns");
    return backends;
}

/// The load shapes: --quick's five, or every size x sessions; then the
/// idle-heavy case unless --no-idle.
std::vector<Point> plan_points(Options& opt) {
    std::vector<Point> points;
    if (opt.quick && opt.sizes.empty() && opt.sessions.empty()) {
        points = {{64, 100, 100, false},
                  {1024, 100, 100, false},
                  {16384, 100, 100, false},
                  {1024, 10, 10, false},
                  {1024, 1000, 1000, false}};
    } else {
        if (opt.sizes.empty()) opt.sizes = {64, 1024, 16384};
        if (opt.sessions.empty()) opt.sessions = {1, 10, 100, 1000};
        for (int size : opt.sizes)
            for (int s : opt.sessions) points.push_back({size, s, s, false});
    }
    if (!opt.no_idle) points.push_back({64, opt.idle_conns, opt.idle_active, true});
    return points;
}

/// The servers to run, in table order: evmux-echo from `tools_dir`, the
/// baselines where find_baseline() finds them; one not found is skipped with a
/// line on stderr.
std::vector<Server> plan_servers(const Options& opt, const fs::path& tools_dir,
                                 const std::vector<std::string>& backends) {
    std::vector<Server> servers;
    auto add_baseline = [&](const std::string& name, const std::string& exe, bool per_conn,
                            bool forks, bool udp = false, std::vector<std::string> env = {}) {
        if (!wanted(opt, name)) return;
        fs::path bin = find_baseline(tools_dir, exe);
        if (bin.empty()) {
            std::cerr << "evmux-bench: skipping " << name << ": " << exe << " not found in "
                      << tools_dir.string() << " or " << EVMUX_LIBEXECDIR << "\n";
            return;
        }
        if (bin != (tools_dir / exe).lexically_normal())
            std::cerr << "evmux-bench: " << name << ": " << bin.string() << "\n";
        servers.push_back(
            {name, name, "", bin, per_conn, forks, 1, "", false, udp, "", "", std::move(env)});
    };
    add_baseline(floor_server, "evmux-baseline-epoll", false, false);
    // The io_uring floor by default only where io_uring works.
    if (!opt.servers.empty() || io_uring_unusable().empty())
        add_baseline(uring_floor_server, "evmux-baseline-uring", false, false);
    // Its variants, only when asked for: what SINGLE_ISSUER|DEFER_TASKRUN and
    // zero-copy sends are worth here (ratios to uring-floor, same rounds).
    if (!opt.servers.empty()) {
        add_baseline("uring-floor-coop", "evmux-baseline-uring", false, false, false,
                     {"EVMUX_BASELINE_URING_SETUP=coop"});
        add_baseline("uring-floor-zc", "evmux-baseline-uring", false, false, false,
                     {"EVMUX_BASELINE_URING_SEND=zc"});
    }
    if (!backends.empty()) {
        fs::path echo = tools_dir / "evmux-echo";
        if (!fs::exists(echo)) {
            std::cerr << "evmux-bench: skipping evmux: " << echo.string() << " not found\n";
        } else {
            for (const auto& b : backends) {
                // io_uring: a row per --io mode; readiness keeps the old name
                // (old results compare), completion adds "+completion".
                const std::vector<std::string> modes =
                    b == "io_uring" ? opt.io : std::vector<std::string>{"readiness"};
                for (int t : opt.threads) {
                    const std::string name =
                        t == 1 ? "evmux/" + b : "evmux/" + b + "/threads" + std::to_string(t);
                    for (const auto& io : modes) {
                        const std::string suffix = io == "readiness" ? "" : "+" + io;
                        if (wanted(opt, "evmux"))
                            servers.push_back({name + suffix, "evmux", b, echo, false, false, t, "",
                                               false, false, io});
                        // The coroutine model beside the callbacks, on the first
                        // (best) backend: the same server, a coroutine per connection.
                        if (wanted(opt, "evmux-coroutines") && b == backends.front())
                            servers.push_back({name + "/coroutines" + suffix, "evmux-coroutines", b,
                                               echo, false, false, t, "coroutines", false, false,
                                               io});
                    }
                }
            }
            // TLS on the first backend only, one thread: beside evmux/<it>, the
            // same echo over plain TCP, for the TLS target (print_tls_target);
            // on io_uring a row per --io mode, as the plain rows (a TLS
            // connection goes on with completion requests after its handshake).
            if (wanted(opt, "evmux-tls") && tls_built()) {
                const std::string& b = backends[0];
                for (const auto& io : b == "io_uring" ? opt.io : std::vector<std::string>{""}) {
                    const std::string suffix = io.empty() || io == "readiness" ? "" : "+" + io;
                    servers.push_back({"evmux/" + b + suffix + "/tls", "evmux", b, echo, false,
                                       false, 1, "", true, false, io});
                }
            }
            // OpenSSL's record layer throughout, against the same client: only
            // when asked for (--servers evmux-tls-openssl).
            if (!opt.servers.empty() && wanted(opt, "evmux-tls-openssl") && tls_built())
                servers.push_back({"evmux/" + backends[0] + "/tls-openssl", "evmux", backends[0],
                                   echo, false, false, 1, "", true, false, "", "openssl"});
        }
    }
    add_baseline("libevent-bufferevent", "evmux-baseline-libevent", false, false);
    add_baseline("threads", "evmux-baseline-threads", true, false);
    add_baseline("fork", "evmux-baseline-fork", true, true);
    if (!opt.udp) return servers;
    add_baseline(udp_floor_server, "evmux-baseline-udp", false, false, true);
    if (wanted(opt, "evmux") && !backends.empty() && fs::exists(tools_dir / "evmux-echo"))
        for (const auto& b : backends)
            servers.push_back({"evmux/" + b + "/udp", "evmux", b, tools_dir / "evmux-echo", false,
                               false, 1, "", false, true});
    return servers;
}

/// The servers' CPU and the client's: the first two this process may run on,
/// or -1 and -1 (not pinned) with a single CPU. Says which on stderr.
std::pair<int, int> pick_cpus() {
    int server_cpu = -1, client_cpu = -1;
    if (usable_cpus() >= 2) {
        cpu_set_t set;
        CPU_ZERO(&set);
        sched_getaffinity(0, sizeof set, &set);
        for (int c = 0; c < CPU_SETSIZE && client_cpu < 0; ++c) {
            if (!CPU_ISSET(c, &set)) continue;
            (server_cpu < 0 ? server_cpu : client_cpu) = c;
        }
        std::cerr << "evmux-bench: servers on CPU " << server_cpu << ", evmux-load on CPU "
                  << client_cpu << "\n";
    } else {
        std::cerr << "evmux-bench: only 1 CPU: server and client share it (not pinned); "
                     "figures are not comparable with a 2-CPU run\n";
    }
    return {server_cpu, client_cpu};
}

/// The socketpair counts of the dispatch sweep, ascending: --sweep-fds or the
/// default, the largest lowered to what the fd limit allows (raised as far as
/// it goes first). Empty if no evmux backend runs or the limit is too low.
std::vector<int> plan_sweep(const Options& opt, const std::vector<std::string>& backends) {
    std::vector<int> fd_counts = opt.sweep_fds;
    if (fd_counts.empty())
        fd_counts =
            opt.quick ? std::vector<int>{100, 1000, 5000} : std::vector<int>{100, 1000, 10000};
    std::sort(fd_counts.begin(), fd_counts.end());
    if (backends.empty()) return {};
    // Two fds per socketpair; as many pairs as the fd limit allows.
    long limit = raise_fd_limit(evmux::support::bench_c_fds(fd_counts.back()));
    int most = evmux::support::bench_c_most_pairs(limit);
    if (fd_counts.back() > most) {
        std::cerr << "evmux-bench: fd limit " << limit << ": dispatch sweep up to " << most
                  << " socketpairs\n";
        std::erase_if(fd_counts, [&](int n) { return n >= most; });
        if (most > 0) fd_counts.push_back(most);
    }
    if (fd_counts.empty()) std::cerr << "evmux-bench: fd limit too low for dispatch sweep\n";
    return fd_counts;
}

// ---- the runs -------------------------------------------------------------------

/// A run whose speed probe just before or just after it took this much
/// longer than the median of all probes ran on a slower machine: it is
/// flagged as disturbed.
constexpr double slow_probe_limit = 1.15;

/// Flags every run whose speed probe before or after it (`probes`, in run
/// order: one before each run and one after the last; Result::probe indexes
/// the one before) says the machine ran slower then (slow_probe_limit), with
/// how much slower; a warning on stderr each.
void flag_slow_runs(const std::vector<Point>& points,
                    std::vector<std::vector<std::vector<Result>>>& all_runs,
                    const std::vector<double>& probes) {
    const double median = spread(probes).median;
    const std::vector<std::size_t> slow = above_median(probes, slow_probe_limit);
    auto is_slow = [&](std::size_t k) {
        return std::find(slow.begin(), slow.end(), k) != slow.end();
    };
    for (std::size_t pi = 0; pi < all_runs.size(); ++pi)
        for (auto& server_rounds : all_runs[pi])
            for (Result& r : server_rounds) {
                if (!r.ok || r.probe + 1 >= probes.size()) continue;
                const std::size_t k = is_slow(r.probe) ? r.probe : r.probe + 1;
                if (!is_slow(k)) continue;
                const std::string why =
                    "the CPU ran " + fmt((probes[k] / median - 1) * 100, 0) + "% slower " +
                    (k == r.probe ? "before" : "after") +
                    " this run than the bench's median (a fixed probe of work on the servers' "
                    "CPU: the host, not other work here)";
                std::fprintf(stderr, "WARNING: round %d at %s, %s: %s\n", r.round,
                             point_label(points[pi]).c_str(), r.server->name.c_str(), why.c_str());
                r.interference.details =
                    r.interference.flagged ? r.interference.details + "; " + why : why;
                r.interference.flagged = true;
            }
}

/// Per round of one point's runs, whether any server's ok run in it has
/// `flagged(run)`.
template <class Flagged>
std::vector<bool> rounds_where(const std::vector<std::vector<Result>>& runs, Flagged flagged) {
    std::vector<bool> out;
    for (const auto& server_rounds : runs)
        for (std::size_t i = 0; i < server_rounds.size(); ++i) {
            if (i >= out.size()) out.resize(i + 1, false);
            if (server_rounds[i].ok && flagged(server_rounds[i])) out[i] = true;
        }
    return out;
}

/// How many of one point's rounds look disturbed so far: a run in them was
/// flagged by the busy-time check, or the speed probe before it took over
/// slow_probe_limit times the median of the probes so far (flag_slow_runs()
/// judges every run again at the end, against all the probes).
std::size_t disturbed_so_far(const std::vector<std::vector<Result>>& runs,
                             const std::vector<double>& probes) {
    const double median = spread(probes).median;
    const std::vector<bool> disturbed = rounds_where(runs, [&](const Result& r) {
        return r.interference.flagged || probes[r.probe] > median * slow_probe_limit;
    });
    return static_cast<std::size_t>(std::count(disturbed.begin(), disturbed.end(), true));
}

/// Takes the rounds other work disturbed (flagged in any server's run of the
/// round) out of one point's runs, each server's and the EVP timings alike,
/// so that every ratio stays paired, if enough rounds remain
/// (rounds_to_leave_out()); returns each server's rounds taken out. A
/// server with a failed round keeps its rounds: its result is that failure.
std::vector<std::vector<Result>> leave_out_disturbed(std::vector<std::vector<Result>>& runs,
                                                     EvpTimings& evp) {
    std::vector<std::vector<Result>> left(runs.size());
    const std::vector<std::size_t> out = rounds_to_leave_out(
        rounds_where(runs, [](const Result& r) { return r.interference.flagged; }));
    for (std::size_t s = 0; s < runs.size(); ++s) {
        if (std::any_of(runs[s].begin(), runs[s].end(), [](const Result& r) { return !r.ok; }))
            continue;
        for (std::size_t i : out)
            if (i < runs[s].size()) left[s].push_back(std::move(runs[s][i]));
        for (auto i = out.rbegin(); i != out.rend(); ++i)
            if (*i < runs[s].size())
                runs[s].erase(runs[s].begin() + static_cast<std::ptrdiff_t>(*i));
    }
    auto take_out = [&out](std::vector<double>& kept, std::vector<std::pair<int, double>>& left) {
        for (std::size_t i : out)
            if (i < kept.size()) left.emplace_back(static_cast<int>(i) + 1, kept[i]);
        for (auto i = out.rbegin(); i != out.rend(); ++i)
            if (*i < kept.size()) kept.erase(kept.begin() + static_cast<std::ptrdiff_t>(*i));
    };
    take_out(evp.kept, evp.left_out);
    take_out(evp.bare, evp.bare_left_out);
    take_out(evp.echo, evp.echo_left_out);
    return left;
}

/// Every server at every point, `rounds` times, the servers interleaved within
/// each round (A B C A B C ...: a slow spell of the machine then touches every
/// server, not one), with a progress line each on stderr; one aggregated
/// Result per (point, server), without the rounds other work disturbed
/// (leave_out_disturbed()) unless `keep_disturbed`; a disturbed round is
/// replaced by an extra one (up to `rounds` more per point). A server skipped or
/// failed in a round is not run again at that point. False if any run failed
/// (skipped ones do not count). `probes`: the speed probes, in run order:
/// one before each run, one after the last.
bool run_servers(Runner& runner, const std::vector<Point>& points,
                 const std::vector<Server>& servers, int rounds, bool keep_disturbed,
                 std::vector<Result>& results, std::vector<EvpTimings>& evp_rounds,
                 std::vector<double>& probes, int evp_cpu, int client_cpu) {
    std::size_t total = points.size() * servers.size() * static_cast<std::size_t>(rounds), done = 0;
    bool all_ok = true;
    const bool any_tls =
        std::any_of(servers.begin(), servers.end(), [](const Server& s) { return s.tls; });
    evp_rounds.assign(points.size(), {});
    // Per point, per server, its rounds; aggregated once every round has run
    // and the rounds the machine itself ran slower are known (speed probes).
    std::vector<std::vector<std::vector<Result>>> all_runs(points.size());
    probes.clear();
    for (std::size_t pi = 0; pi < points.size(); ++pi) {
        const Point& p = points[pi];
        std::vector<std::vector<Result>>& runs = all_runs[pi];
        runs.resize(servers.size());
        // One round: EVP alone for the TLS target and the reference loops
        // beside it, then every server.
        auto run_round = [&](int round, bool extra) {
            if (any_tls && !p.idle_heavy) {
                evp_rounds[pi].kept.push_back(evp_seal_open_us(p.size, evp_cpu));
                evp_rounds[pi].bare.push_back(bare_tls_loop_us(p.size, evp_cpu));
                evp_rounds[pi].echo.push_back(
                    handwritten_tls_echo_us(p.size, p.active, evp_cpu, client_cpu));
            }
            for (std::size_t i = 0; i < servers.size(); ++i) {
                const Server& s = servers[i];
                if (!extra) ++done;
                if (!runs[i].empty() && !runs[i].back().ok) continue;
                if (extra)
                    std::fprintf(stderr, "[extra] round %d, in place of a disturbed one, %s %s ...",
                                 round, s.name.c_str(), point_label(p).c_str());
                else
                    std::fprintf(stderr, "[%zu/%zu] round %d/%d %s %s ...", done, total, round,
                                 rounds, s.name.c_str(), point_label(p).c_str());
                std::fflush(stderr);
                probes.push_back(speed_probe_us(evp_cpu));
                Result r = runner.run(s, p);
                r.probe = probes.size() - 1;
                if (r.ok)
                    std::fprintf(stderr, " %.0f msg/s, p99 %.0f us, user/sys split: %s%s%s\n",
                                 r.msgs_per_s, r.p99_us, r.cpu_split.c_str(),
                                 r.interference.flagged ? "\n  WARNING: disturbed: " : "",
                                 r.interference.flagged ? r.interference.details.c_str() : "");
                else
                    std::fprintf(stderr, " %s%s\n", r.skipped ? "" : "FAILED: ", r.note.c_str());
                if (!r.ok && !r.skipped) all_ok = false;
                r.round = round;
                runs[i].push_back(std::move(r));
            }
        };
        for (int round = 1; round <= rounds; ++round) run_round(round, false);
        // Each disturbed round is replaced by another, up to `rounds` more,
        // until `rounds` undisturbed ones have run; leave_out_disturbed()
        // then takes the disturbed ones out. (Below 3 rounds none would be.)
        for (int round = rounds + 1;
             !keep_disturbed && rounds >= 3 && round <= 2 * rounds &&
             static_cast<std::size_t>(round - 1) - disturbed_so_far(runs, probes) <
                 static_cast<std::size_t>(rounds);
             ++round)
            run_round(round, true);
    }
    probes.push_back(speed_probe_us(evp_cpu));  // after the last run
    flag_slow_runs(points, all_runs, probes);
    for (std::size_t pi = 0; pi < points.size(); ++pi) {
        std::vector<std::vector<Result>> left(all_runs[pi].size());
        if (!keep_disturbed) left = leave_out_disturbed(all_runs[pi], evp_rounds[pi]);
        for (std::size_t i = 0; i < all_runs[pi].size(); ++i) {
            results.push_back(aggregate(std::move(all_runs[pi][i])));
            results.back().left_out = std::move(left[i]);
        }
    }
    return all_ok;
}

/// --instructions: every server that is one process (not the thread or fork
/// server: callgrind runs threads one at a time and follows no children).
std::vector<InstructionRow> run_instructions(const Runner& runner,
                                             const std::vector<Server>& servers) {
    std::vector<InstructionRow> rows;
    std::string why;
    const std::optional<fs::path> valgrind = find_valgrind(why);
    for (const auto& s : servers) {
        if (s.per_connection_os || s.threads > 1) continue;
        std::fprintf(stderr, "instructions %s (callgrind) ...", s.name.c_str());
        std::fflush(stderr);
        InstructionRow row;
        row.server = &s;
        if (valgrind)
            row = runner.instructions(s, *valgrind);
        else
            row.note = why;
        if (std::isnan(row.per_msg))
            std::fprintf(stderr, " %s\n", row.note.c_str());
        else
            std::fprintf(stderr, " %.0f per message\n", row.per_msg);
        rows.push_back(row);
    }
    return rows;
}

/// The --instructions table, each server's count and its ratio to the floor's.
void print_instructions(std::ostream& os, const std::vector<InstructionRow>& rows) {
    const InstructionRow *floor = nullptr, *udp_floor = nullptr, *uring_floor = nullptr;
    for (const auto& r : rows) {
        if (r.server->name == floor_server) floor = &r;
        if (r.server->name == udp_floor_server) udp_floor = &r;
        if (r.server->name == uring_floor_server) uring_floor = &r;
    }
    os << "\n== user-space instructions per echoed message (callgrind; "
       << instructions_point.active << " sessions x " << instructions_point.size << " B; runs of "
       << fmt(instructions_durations[0], 0) << " s and " << fmt(instructions_durations[1], 0)
       << " s of load, their difference)\n";
    std::size_t width = 22;  // the server column: the longest name
    for (const auto& r : rows) width = std::max(width, r.server->name.size());
    for (const auto& r : rows) {
        os << r.server->name << std::string(width - r.server->name.size(), ' ');
        if (std::isnan(r.per_msg)) {
            os << pad_left("-", 11) << "   " << r.note << "\n";
        } else {
            const InstructionRow* f = r.server->udp ? udp_floor : floor;  // UDP: udp-floor
            std::string ratios;
            if (f && f != &r && f->per_msg > 0)
                ratios = fmt(r.per_msg / f->per_msg, 2) + "x the floor";
            // Completion rows also against the io_uring floor.
            if (r.server->io == "completion" && uring_floor && uring_floor->per_msg > 0)
                ratios += (ratios.empty() ? "" : ", ") + fmt(r.per_msg / uring_floor->per_msg, 2) +
                          "x uring-floor";
            os << pad_left(fmt(r.per_msg, 0), 11) << "   "
               << (ratios.empty() ? "" : "(" + ratios + ")") << "\n";
        }
    }
}

/// Dispatch cost as idle fds grow, in this process, for each evmux backend at
/// each of `fd_counts`; false if a backend's sweep failed.
bool run_sweeps(const std::vector<std::string>& backends, const std::vector<int>& fd_counts,
                bool quick, std::vector<DispatchSweep>& sweeps) {
    bool all_ok = true;
    for (const auto& b : fd_counts.empty() ? std::vector<std::string>{} : backends) {
        std::fprintf(stderr, "dispatch sweep %s ...", b.c_str());
        std::fflush(stderr);
        try {
            for (int n : fd_counts) sweeps.push_back(dispatch_sweep(b, n, quick ? 3 : 10));
            std::fprintf(stderr, " done\n");
        } catch (const std::exception& e) {
            std::fprintf(stderr, " FAILED: %s\n", e.what());
            all_ok = false;
        }
    }
    return all_ok;
}

// ---- the report -----------------------------------------------------------------

void print_sweeps(const std::vector<std::string>& backends, const std::vector<int>& fd_counts,
                  const std::vector<DispatchSweep>& sweeps) {
    std::cout << "\n== dispatch cost per ready event vs registered fds (bench.c shape, "
                 "10 active chains, 1000 writes; median of iterations)\n";
    std::printf("%-10s", "backend");
    for (int n : fd_counts) std::printf(" %12s", (std::to_string(n) + " fds").c_str());
    std::printf("\n");
    for (const auto& b : backends) {
        std::printf("%-10s", b.c_str());
        for (const auto& s : sweeps)
            if (s.backend == b) std::printf(" %9.3f us", s.us_per_event);
        std::printf("\n");
    }
}

/// bench.json and bench.csv in --out, --json, --csv; returns the JSON file
/// the plots are made from (--out's, else --json's), if any.
std::optional<fs::path> write_files(const Options& opt, const std::vector<Result>& results,
                                    const std::vector<TlsTarget>& tls,
                                    const std::vector<DispatchSweep>& sweeps,
                                    const std::vector<InstructionRow>& instructions, bool pinned,
                                    double total_s, const Environment& env) {
    std::optional<fs::path> json_path;
    if (!opt.out_dir.empty()) {
        fs::create_directories(opt.out_dir);
        json_path = fs::path(opt.out_dir) / "bench.json";
        write_json(*json_path, results, tls, opt, sweeps, instructions, pinned, total_s, env);
        write_csv(fs::path(opt.out_dir) / "bench.csv", results);
    }
    if (!opt.json_file.empty()) {
        write_json(opt.json_file, results, tls, opt, sweeps, instructions, pinned, total_s, env);
        if (!json_path) json_path = opt.json_file;
    }
    if (!opt.csv_file.empty()) write_csv(opt.csv_file, results);
    return json_path;
}

/// plot_bench.py on `json` into `out_dir`; a missing script or matplotlib is
/// a line on stderr, not a failure.
void make_plots(const fs::path& json, const std::string& out_dir) {
    auto script = find_plot_script(self_dir());
    if (!script) {
        std::cerr << "evmux-bench: plot_bench.py not found; no plots\n";
        return;
    }
    std::string cmd =
        "/usr/bin/python3 '" + script->string() + "' '" + json.string() + "' '" + out_dir + "'";
    if (std::system(cmd.c_str()) != 0)
        std::cerr << "evmux-bench: plot_bench.py failed (is python3-matplotlib "
                     "installed?); the data are in "
                  << json.string() << "\n";
}

/// A target on a paired ratio: "met" (the median's interval within `limit`),
/// "missed" (all of it above), "unclear" (it straddles `limit`) or "unknown"
/// (a figure missing).
const char* target_verdict(const Spread& ratio, double limit) {
    return std::isnan(ratio.min) || std::isnan(ratio.max) ? "unknown"
           : ratio.max <= limit                           ? "met"
           : ratio.min > limit                            ? "missed"
                                                          : "unclear";
}

/// What a target's verdict adds when a run it stands on kept rounds other
/// work disturbed (too many to leave out): its figures are not comparable.
std::string disturbed_mark(std::initializer_list<const Result*> runs) {
    for (const Result* r : runs)
        if (r && r->interference.flagged) return " (disturbed)";
    return "";
}

/// The TLS target, per point where both evmux/<b> and evmux/<b>/tls ran: the
/// server CPU per message over TLS against the plain echo's plus 1.3x what
/// sealing and opening that message costs with EVP alone, timed in each round
/// beside the servers (`evp`: per point). extra/evp is paired round by
/// round, (tls - plain) / evp, as the other ratios: its median and that
/// median's interval; the target is met if the whole interval is <= 1.3,
/// missed if all of it is above, unclear otherwise.
std::vector<TlsTarget> tls_targets(const std::vector<Result>& results,
                                   const std::vector<Point>& points,
                                   const std::vector<EvpTimings>& evp) {
    std::vector<TlsTarget> rows;
    for (std::size_t pi = 0; pi < points.size(); ++pi) {
        const Point& p = points[pi];
        if (p.idle_heavy || pi >= evp.size() || evp[pi].kept.empty()) continue;
        for (const auto& tls : results) {
            if (!tls.ok || !tls.server->tls || !at_point(tls, p)) continue;
            const Result* plain = nullptr;
            for (const auto& r : results)
                if (r.ok && !r.server->tls && r.server->kind == "evmux" && r.server->threads == 1 &&
                    r.server->backend == tls.server->backend && at_point(r, p) &&
                    (r.server->io == "completion") == (tls.server->io == "completion"))
                    plain = &r;
            if (!plain) continue;
            const std::vector<double> tls_cpu = round_values(tls, &Figures::cpu_us_per_msg);
            const std::vector<double> plain_cpu = round_values(*plain, &Figures::cpu_us_per_msg);
            std::vector<double> extra(tls_cpu.size(), NAN);
            for (std::size_t i = 0; i < extra.size() && i < plain_cpu.size(); ++i)
                extra[i] = tls_cpu[i] - plain_cpu[i];
            const Spread ratio = paired_ratio(extra, evp[pi].kept);
            rows.push_back({&tls, plain, &evp[pi], ratio,
                            target_verdict(ratio, 1.3) + disturbed_mark({&tls, plain}),
                            paired_ratio(evp[pi].bare, evp[pi].kept),
                            paired_ratio(evp[pi].echo, evp[pi].kept)});
        }
    }
    return rows;
}

void print_tls_target(std::ostream& os, const std::vector<TlsTarget>& rows, int width) {
    if (rows.empty()) return;
    os << "\n== TLS: server CPU us/msg (user + sys, medians) over TLS against plain "
          "TCP and EVP AES-256-GCM seal+open alone (timed each round; extra/evp "
          "paired by round: median [interval])\n";
    char line[320];
    std::snprintf(line, sizeof line, "%-22s %-*s %10s %10s %10s %18s %8s  %-21s  %s\n", "point",
                  width, "tls row", "plain", "tls", "evp", "extra/evp", "target",
                  "bare loop's extra/evp", "hand-written echo's extra/evp");
    os << line;
    for (const TlsTarget& t : rows) {
        std::snprintf(line, sizeof line, "%-22s %-*s %10.2f %10.2f %10.2f %18s %8s  %-21s  %s\n",
                      point_label(t.tls->point).c_str(), width, t.tls->server->name.c_str(),
                      t.plain->cpu_us_per_msg, t.tls->cpu_us_per_msg, spread(t.evp->kept).median,
                      median_range_text(t.ratio).c_str(), t.verdict.c_str(),
                      median_range_text(t.bare).c_str(), median_range_text(t.echo).c_str());
        os << line;
    }
    os << "(target: tls <= plain + 1.3 x evp, i.e. extra/evp <= 1.3; met if the interval "
          "is, missed if none of it is; the client: evmux-load --tls, its own record "
          "layer)\n"
          "(bare loop: no server; the same seal+open with each message sent over loopback "
          "TCP and received between them, in one thread, (with - without the cipher) / evp: "
          "what the system calls around a record cost its cipher on this machine; a "
          "reference, not the target's measure)\n"
          "(hand-written echo: no framework; on the servers' CPU, the sessions' loopback "
          "connections served in turn (recv, EVP open and seal, send), a thread on the "
          "client's CPU echoing the bytes back; (with - without the cipher) / evp: what a "
          "TLS echo with no framework pays here; a reference, not the target's measure; "
          "'-' above 64 KiB, or where the fd limit has no room for both ends of the "
          "sessions)\n";
}

/// The completion-I/O targets (issue 18), per completion row: its server CPU
/// per message (user + sys) over both floors' and its system calls per
/// message over epoll-floor's, as paired-round ratios, and whether their
/// ranges meet the targets of its point: at 100 and 1000 sessions x 64 B
/// and 1 KiB, syscalls <= 0.5x epoll-floor, CPU <= 1.05x uring-floor and
/// <= 1.0x epoll-floor; at 1 session, CPU <= 1.05x uring-floor.
void print_completion_targets(std::ostream& os, const std::vector<Result>& results) {
    bool header = false;
    const int width = name_width(results);
    for (const auto& r : results) {
        if (!r.ok || r.server->io != "completion") continue;
        const Result* fl = floor_of(results, r.point);
        const Result* ufl = run_of(results, uring_floor_server, r.point);
        if (!header) {
            os << "\n== completion I/O against both floors (medians; paired-round ratios "
                  "[range])\n";
            char line[256];
            std::snprintf(line, sizeof line, "%-22s %-*s %10s %18s %18s %12s %18s  %s\n", "point",
                          width, "server", "cpu us/msg", "/ epoll-floor", "/ uring-floor",
                          "syscalls/msg", "/ epoll-floor", "targets");
            os << line;
            header = true;
        }
        const Spread cpu_e = ratio_to(r, fl, &Figures::cpu_us_per_msg);
        const Spread cpu_u = ratio_to(r, ufl, &Figures::cpu_us_per_msg);
        const Spread sys_e = ratio_to(r, fl, &Figures::syscalls_per_msg);
        const Point& p = r.point;
        const bool many = !p.idle_heavy && (p.active == 100 || p.active == 1000) &&
                          (p.size == 64 || p.size == 1024);
        const bool one = !p.idle_heavy && p.active == 1;
        // Each target: met (the median ratio's interval within it: up to 8
        // rounds, every paired round), missed (the interval above it), unclear
        // (it straddles the target) or unknown (a figure or floor missing).
        std::string verdict;
        auto check = [&](const char* what, const Spread& ratio, double limit) {
            verdict += (verdict.empty() ? "" : ", ") + std::string(what) + " " +
                       target_verdict(ratio, limit);
        };
        if (many) {
            check("syscalls <= 0.5x epoll", sys_e, 0.5);
            check("cpu <= 1.05x uring", cpu_u, 1.05);
            check("cpu <= 1.0x epoll", cpu_e, 1.0);
        } else if (one) {
            check("cpu <= 1.05x uring", cpu_u, 1.05);
        }
        if (!verdict.empty()) verdict += disturbed_mark({&r, fl, ufl});
        char head[128];
        std::snprintf(head, sizeof head, "%-22s %-*s", point_label(p).c_str(), width,
                      r.server->name.c_str());
        os << head << ' ' << pad_left(fmt(r.cpu_us_per_msg, 2), 10) << ' '
           << pad_left(ratio_text(cpu_e), 18) << ' ' << pad_left(ratio_text(cpu_u), 18) << ' '
           << pad_left(fmt(r.syscalls_per_msg, 2), 12) << ' ' << pad_left(ratio_text(sys_e), 18)
           << "  " << (verdict.empty() ? "-" : verdict) << "\n";
    }
}

/// The io_uring floor's variants (--servers uring-floor-coop,uring-floor-zc)
/// against uring-floor itself: server CPU and system calls per message as
/// paired-round ratios, i.e. what SINGLE_ISSUER|DEFER_TASKRUN (coop lacks
/// them) and zero-copy sends are worth on this machine.
void print_uring_variants(std::ostream& os, const std::vector<Result>& results) {
    bool header = false;
    const int width = name_width(results);
    for (const auto& r : results) {
        const std::string& n = r.server->name;
        if (!r.ok || (n != "uring-floor-coop" && n != "uring-floor-zc")) continue;
        const Result* ufl = run_of(results, uring_floor_server, r.point);
        if (!header) {
            os << "\n== the io_uring floor's variants against it (medians; paired-round ratios "
                  "[range]; coop: without SINGLE_ISSUER|DEFER_TASKRUN, zc: zero-copy sends)\n";
            char line[256];
            std::snprintf(line, sizeof line, "%-22s %-*s %10s %18s %12s %18s\n", "point", width,
                          "server", "cpu us/msg", "/ uring-floor", "syscalls/msg", "/ uring-floor");
            os << line;
            header = true;
        }
        char head[128];
        std::snprintf(head, sizeof head, "%-22s %-*s", point_label(r.point).c_str(), width,
                      n.c_str());
        os << head << ' ' << pad_left(fmt(r.cpu_us_per_msg, 2), 10) << ' '
           << pad_left(ratio_text(ratio_to(r, ufl, &Figures::cpu_us_per_msg)), 18) << ' '
           << pad_left(fmt(r.syscalls_per_msg, 2), 12) << ' '
           << pad_left(ratio_text(ratio_to(r, ufl, &Figures::syscalls_per_msg)), 18) << "\n";
    }
}

/// The first and last line of the report: how many runs other work disturbed.
std::string disturbance_summary(const std::vector<Result>& results, double percent) {
    std::size_t measured = 0, flagged = 0;
    std::string which;
    for (const auto& r : results) {
        if (!r.ok) continue;
        ++measured;
        if (!r.interference.flagged) continue;
        if (++flagged <= 3)
            which += (which.empty() ? "" : ", ") + r.server->name + " at " + point_label(r.point);
    }
    // Rounds left out: counted once per point (every server's are the same).
    std::size_t left_out = 0;
    std::vector<const Result*> counted;
    for (const auto& r : results) {
        if (r.left_out.empty() || std::any_of(counted.begin(), counted.end(), [&](const Result* c) {
                return at_point(*c, r.point);
            }))
            continue;
        counted.push_back(&r);
        left_out += r.left_out.size();
    }
    const std::string left_text =
        std::to_string(left_out) + " disturbed round" + (left_out > 1 ? "s" : "") + " left out";
    if (flagged == 0)
        return "evmux-bench: no " + std::string(left_out ? "figure from a " : "") +
               "run disturbed by other work (threshold " + fmt(percent, 1) + "% of a CPU" +
               (left_out ? "; " + left_text + ", see NOTE" : "") + ")\n";
    return "WARNING: " + std::to_string(flagged) + " of " + std::to_string(measured) +
           " runs disturbed by other work (" + which + (flagged > 3 ? ", ..." : "") +
           "); their figures are not comparable" + (left_out ? "; elsewhere " + left_text : "") +
           "\n";
}

/// The comparison: plan, run every server and the dispatch sweep, report.
/// Returns the exit status.
int run_bench(Options& opt) {
    const std::vector<std::string> backends = check_and_complete(opt);
    const std::vector<Point> points = plan_points(opt);
    fs::path tools = opt.tools_dir.empty() ? self_dir() : fs::path(opt.tools_dir);
    fs::path load = tools / "evmux-load";
    if (!fs::exists(load)) {
        std::cerr << "evmux-bench: " << load.string()
                  << " not found (build it, or point --tools-dir at it)\n";
        return 1;
    }
    const std::vector<Server> servers = plan_servers(opt, tools, backends);
    if (servers.empty()) {
        std::cerr << "evmux-bench: no server to run\n";
        return 1;
    }

    // 10 000 connections: raise the fd limit (children inherit it); this
    // process holds both ends of the hand-written TLS echo's.
    int max_conns = 0;
    for (const auto& p : points) max_conns = std::max(max_conns, p.conns);
    raise_fd_limit(2 * max_conns + 256);
    const bool pinned = usable_cpus() >= 2;
    const auto [server_cpu, client_cpu] = pick_cpus();

    install_child_reaper();
    Environment env = gather_environment();
    auto t0 = Clock::now();
    Runner runner(opt, load, server_cpu, client_cpu);
    std::vector<Result> results;
    std::vector<EvpTimings> evp_us;  // per point: EVP alone (TLS target)
    std::vector<double> probes;      // before each run and after the last
    bool all_ok = run_servers(runner, points, servers, opt.rounds, opt.keep_disturbed, results,
                              evp_us, probes, pinned ? server_cpu : -1, pinned ? client_cpu : -1);
    // The host's speed, for comparing runs: the probes' median and range.
    if (const Spread probe = spread(probes); !std::isnan(probe.median))
        env.fields.emplace_back("speed_probe_us", median_range_text(probe, 1));
    std::vector<int> fd_counts = plan_sweep(opt, backends);
    std::vector<DispatchSweep> sweeps;
    all_ok = run_sweeps(backends, fd_counts, opt.quick, sweeps) && all_ok;
    std::vector<InstructionRow> instructions;
    if (opt.instructions) instructions = run_instructions(runner, servers);
    double total_s = std::chrono::duration<double>(Clock::now() - t0).count();
    record_load_after(env);

    const std::string disturbed = disturbance_summary(results, opt.interference_percent);
    std::cout << disturbed;
    print_environment(std::cout, env);
    print_table(std::cout, results, points, opt.rate);
    const std::vector<TlsTarget> tls = tls_targets(results, points, evp_us);
    print_tls_target(std::cout, tls, name_width(results));
    print_completion_targets(std::cout, results);
    print_uring_variants(std::cout, results);
    if (!sweeps.empty()) print_sweeps(backends, fd_counts, sweeps);
    if (opt.instructions) print_instructions(std::cout, instructions);
    std::printf("\nevmux-bench: %zu server x point entries, %d rounds each, in %.1f s\n",
                results.size(), opt.rounds, total_s);
    std::cout << disturbed;
    std::fflush(stdout);

    std::optional<fs::path> json_path =
        write_files(opt, results, tls, sweeps, instructions, pinned, total_s, env);
    if (!opt.out_dir.empty() && !opt.no_plots) make_plots(*json_path, opt.out_dir);
    return all_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    Options opt;
    CLI::App app{
        "evmux-bench: evmux's backends against each other and against an epoll floor, an "
        "io_uring floor, a libevent bufferevent server, thread-per-connection and "
        "fork-per-connection servers"};
    add_bench_options(app, opt);
    DispatchOptions d;
    CLI::App* dispatch = add_dispatch_command(app, d);
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        std::string what = e.what();
        usage_error(what.substr(0, what.find('\n')));
    }

    try {
        if (!dispatch->parsed()) return run_bench(opt);
        if (d.a > d.n) usage_error("-a must not exceed -n");
        return run_dispatch_command(d.n, d.a, d.w, d.backend, d.iterations);
    } catch (const std::exception& e) {
        std::cerr << "evmux-bench: " << e.what() << "\n";
        return 1;
    }
}
