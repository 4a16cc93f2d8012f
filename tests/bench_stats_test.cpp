// evmux-bench's statistics (tools/bench_stats.cpp): medians, ranges, paired
// ratios and the "≈" rule for a ratio whose range straddles 1.0; and its
// interference detector (tools/bench_interference.cpp), on synthetic figures
// and against a real CPU hog.
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <optional>
#include <thread>

#include "../tools/bench_instructions.hpp"
#include "../tools/bench_interference.hpp"
#include "../tools/bench_stats.hpp"

namespace {

using evmux::bench::median_range_text;
using evmux::bench::paired_ratio;
using evmux::bench::ratio_text;
using evmux::bench::spread;
using evmux::bench::Verdict;
using evmux::bench::verdict;

TEST(Spread, OddCountTakesTheMiddleValueWhateverTheOrder) {
    const auto s = spread({5, 1, 4, 2, 3});
    EXPECT_EQ(s.median, 3);
    EXPECT_EQ(s.min, 1);
    EXPECT_EQ(s.max, 5);
}

TEST(Spread, EvenCountAveragesTheMiddleTwo) {
    const auto s = spread({10, 1, 4, 2});
    EXPECT_EQ(s.median, 3);  // (2 + 4) / 2, not 2 or 4
    EXPECT_EQ(s.min, 1);
    EXPECT_EQ(s.max, 10);
}

TEST(Spread, LeavesOutMissingRoundsAndIsNanWithNone) {
    const auto s = spread({NAN, 7, 9, NAN});
    EXPECT_EQ(s.median, 8);
    EXPECT_EQ(s.min, 7);
    EXPECT_TRUE(std::isnan(spread({}).median));
    EXPECT_TRUE(std::isnan(spread({NAN}).max));
}

TEST(PairedRatio, PairsRoundIWithRoundI) {
    // A is 10 % above B in every round although both drift by 2x: paired,
    // the ratio is 1.1 throughout; min(A)/max(B) .. max(A)/min(B) would say
    // 0.55 .. 2.2.
    const auto q = paired_ratio({110, 220, 165}, {100, 200, 150});
    EXPECT_NEAR(q.median, 1.1, 1e-12);
    EXPECT_NEAR(q.min, 1.1, 1e-12);
    EXPECT_NEAR(q.max, 1.1, 1e-12);
    EXPECT_EQ(verdict(q), Verdict::above);
}

TEST(PairedRatio, SkipsRoundsMissingOnEitherSideOrWithAZeroDivisor) {
    const auto q = paired_ratio({2, NAN, 3, 8}, {1, 1, 0, 4});
    EXPECT_EQ(q.median, 2);  // rounds 0 and 3 only
    EXPECT_EQ(q.min, 2);
    EXPECT_TRUE(std::isnan(paired_ratio({1, 2}, {1}).median));  // unequal lengths
}

// The interval of a median ratio: with up to 8 rounds the smallest and the
// largest ratio; with more, the order statistics that hold the median with
// the same probability (>= 93.75 %, the sign test), so that an outlier round
// among 11 does not decide the verdict alone.
TEST(PairedRatio, MoreRoundsNarrowTheMediansIntervalInsteadOfWideningIt) {
    EXPECT_EQ(evmux::bench::median_interval_rank(3), 1u);
    EXPECT_EQ(evmux::bench::median_interval_rank(5), 1u);
    EXPECT_EQ(evmux::bench::median_interval_rank(8), 1u);
    EXPECT_EQ(evmux::bench::median_interval_rank(9), 2u);
    EXPECT_EQ(evmux::bench::median_interval_rank(11), 2u);
    EXPECT_EQ(evmux::bench::median_interval_rank(12), 3u);
    EXPECT_EQ(evmux::bench::median_interval_rank(15), 4u);
    EXPECT_EQ(evmux::bench::median_interval_rank(21), 6u);
    const std::vector<double> floor(11, 1.0);
    // Eleven rounds, one disturbed each way: the interval is the 2nd..10th.
    const auto q =
        paired_ratio({1.30, 1.02, 1.03, 1.01, 1.04, 0.80, 1.02, 1.03, 1.04, 1.02, 1.03}, floor);
    EXPECT_NEAR(q.median, 1.03, 1e-12);
    EXPECT_NEAR(q.min, 1.01, 1e-12);
    EXPECT_NEAR(q.max, 1.04, 1e-12);
    EXPECT_EQ(verdict(q), Verdict::above);
    // Five rounds: the interval is every round's, as before.
    const auto five = paired_ratio({1.30, 1.02, 1.03, 1.01, 0.80}, std::vector<double>(5, 1.0));
    EXPECT_NEAR(five.min, 0.80, 1e-12);
    EXPECT_NEAR(five.max, 1.30, 1e-12);
    EXPECT_EQ(verdict(five), Verdict::about);
}

TEST(Verdict, AStraddlingRangeIsNeitherWinNorLoss) {
    EXPECT_EQ(verdict({1.05, 0.97, 1.12}), Verdict::about);
    EXPECT_EQ(verdict({0.95, 0.90, 1.0}), Verdict::about);  // touching 1.0 is not clear of it
    EXPECT_EQ(verdict({1.05, 1.01, 1.12}), Verdict::above);
    EXPECT_EQ(verdict({0.42, 0.40, 0.99}), Verdict::below);
    EXPECT_EQ(verdict({NAN, NAN, NAN}), Verdict::about);
}

TEST(RatioText, ShowsTheMedianOnlyWhenTheRangeIsClearOfOne) {
    EXPECT_EQ(ratio_text({1.123, 1.08, 1.154}), "1.12 [1.08-1.15]");
    EXPECT_EQ(ratio_text({1.02, 0.96, 1.05}), "≈ [0.96-1.05]");
    EXPECT_EQ(ratio_text({0.5, 0.5, 0.5}), "0.50");  // one round
    EXPECT_EQ(ratio_text({NAN, NAN, NAN}), "-");
}

// The TLS table's extra/evp: its target is 1.3, not 1.0, so the median is
// always shown with its range.
TEST(MedianRangeText, ShowsTheMedianAndTheRangeWhateverTheyStraddle) {
    EXPECT_EQ(median_range_text({1.02, 0.96, 1.05}), "1.02 [0.96-1.05]");
    EXPECT_EQ(median_range_text({2.014, 1.93, 2.1}), "2.01 [1.93-2.10]");
    EXPECT_EQ(median_range_text({0.5, 0.5, 0.5}), "0.50");  // one round
    EXPECT_EQ(median_range_text({0.5, NAN, NAN}), "0.50");
    EXPECT_EQ(median_range_text({NAN, NAN, NAN}), "-");
}

// ---- the interference detector -----------------------------------------------

using evmux::bench::assess;
using evmux::bench::OccupancyDelta;

/// A 1 s window, server on CPU 0 (busy 0.6 s, all its own), client on CPU 1
/// (busy 0.4 s, all its own), the bench 10 ms: nothing else ran.
OccupancyDelta quiet_window() {
    OccupancyDelta d;
    d.seconds = 1;
    d.cpu[0] = 0;
    d.cpu[1] = 1;
    d.busy_us[0] = 600000;
    d.busy_us[1] = 400000;
    d.server_us = 600000;
    d.client_us = 400000;
    d.bench_us = 10000;
    d.load_before = d.load_after = 2;
    return d;
}

TEST(Interference, AWindowWithOnlyTheServerClientAndBenchIsNotFlagged) {
    const auto in = assess(quiet_window(), 0.05);
    EXPECT_FALSE(in.flagged) << in.details;
    EXPECT_EQ(in.other_share[0], 0);
    EXPECT_NE(in.details.find("load average 2.00 -> 2.00"), std::string::npos) << in.details;
}

TEST(Interference, OtherWorkAboveTheThresholdOnEitherCpuIsFlaggedAndNamed) {
    auto d = quiet_window();
    d.busy_us[0] += 80000;  // 8 % of the server's CPU (the bench's 1 % is subtracted)
    auto in = assess(d, 0.05);
    EXPECT_TRUE(in.flagged);
    EXPECT_NEAR(in.other_share[0], 0.07, 1e-9);
    EXPECT_NE(in.details.find("of CPU 0 (server)"), std::string::npos) << in.details;
    EXPECT_EQ(in.details.find("CPU 1"), std::string::npos) << in.details;
    EXPECT_FALSE(assess(d, 0.10).flagged);  // the threshold is a flag

    d = quiet_window();
    d.busy_us[1] += 100000;
    in = assess(d, 0.05);
    EXPECT_TRUE(in.flagged);
    EXPECT_NE(in.details.find("of CPU 1 (client)"), std::string::npos) << in.details;
}

TEST(Interference, StealAboveTheThresholdIsFlagged) {
    auto d = quiet_window();
    d.steal_us[0] = 60000;
    const auto in = assess(d, 0.05);
    EXPECT_TRUE(in.flagged);
    EXPECT_NE(in.details.find("hypervisor stole 6.0% of CPU 0"), std::string::npos) << in.details;
}

TEST(Interference, DifferencesWithinThreeTicksAreNotFlaggedInAShortWindow) {
    auto d = quiet_window();
    d.seconds = 0.2;
    d.busy_us[0] = d.server_us + d.bench_us + 20000;  // 10 % of 0.2 s, but 2 ticks
    EXPECT_FALSE(assess(d, 0.05).flagged);
    d.busy_us[0] += 20000;  // 4 ticks
    EXPECT_TRUE(assess(d, 0.05).flagged);
}

TEST(Interference, UnpinnedComparesAllCpusWithBothProcesses) {
    OccupancyDelta d;
    d.seconds = 1;
    d.busy_us[0] = 1000000;  // both CPUs together
    d.server_us = 500000;
    d.client_us = 400000;
    auto in = assess(d, 0.05);
    EXPECT_TRUE(in.flagged);  // 10 % of a CPU elsewhere
    EXPECT_NE(in.details.find("all CPUs"), std::string::npos) << in.details;
    d.busy_us[0] = 920000;
    EXPECT_FALSE(assess(d, 0.05).flagged);
}

/// A child spinning on `cpu` until killed.
pid_t start_hog(int cpu) {
    pid_t pid = ::fork();
    if (pid == 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        ::sched_setaffinity(0, sizeof set, &set);
        for (;;) __asm__ volatile("");  // a loop the compiler may not remove
    }
    return pid;
}

TEST(Interference, AHogPinnedToTheServersCpuIsDetected) {
    // Only the hog case is asserted on a real machine: without the hog, a
    // shared CI machine may well be busy with other work, which the detector
    // must then (rightly) flag; the quiet case is tested on synthetic figures.
    cpu_set_t set;
    CPU_ZERO(&set);
    ASSERT_EQ(::sched_getaffinity(0, sizeof set, &set), 0);
    int cpus[2] = {-1, -1};
    for (int c = 0, found = 0; c < CPU_SETSIZE && found < 2; ++c)
        if (CPU_ISSET(c, &set)) cpus[found++] = c;
    // A "server" that sleeps: the window's CPU time on its CPU is the hog's.
    pid_t server = ::fork();
    if (server == 0) {
        ::pause();
        ::_exit(0);
    }
    ASSERT_GT(server, 0);
    pid_t hog = start_hog(cpus[0]);
    ASSERT_GT(hog, 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    const int server_cpu = cpus[1] >= 0 ? cpus[0] : -1;  // one CPU: unpinned mode
    const auto a = evmux::bench::read_occupancy(server_cpu, cpus[1], server, false, 0);
    std::this_thread::sleep_for(std::chrono::milliseconds(600));
    const auto b = evmux::bench::read_occupancy(server_cpu, cpus[1], server, false, 0);
    for (pid_t p : {hog, server}) {
        ::kill(p, SIGKILL);
        ::waitpid(p, nullptr, 0);
    }
    const auto in = assess(evmux::bench::occupancy_delta(a, b, server_cpu, cpus[1]), 0.05);
    EXPECT_TRUE(in.flagged) << in.details;
    // However busy the machine, the hog gets a fair share of its CPU: with
    // three others wanting it, a quarter.
    EXPECT_GT(in.other_share[0], 0.2) << in.details;
    EXPECT_NE(in.details.find("other processes took"), std::string::npos) << in.details;
}

}  // namespace

// --instructions' arithmetic and callgrind's file format.
TEST(Instructions, CallgrindTotalsLineIsReadAndTheDifferenceDividesByMessages) {
    char path[] = "/tmp/evmux-callgrind-test-XXXXXX";
    const int fd = ::mkstemp(path);
    ASSERT_GE(fd, 0);
    ::close(fd);
    {
        std::ofstream out(path);
        out << "# callgrind format\nversion: 1\ncmd: evmux-echo\nevents: Ir\nsummary: 1234\n"
               "fn=(1) main\n5 1234\n\ntotals: 1234\n";
    }
    EXPECT_EQ(evmux::bench::callgrind_total(path), std::optional<std::uint64_t>(1234));
    {
        std::ofstream out(path);
        out << "events: Ir\nfn=(1) main\n5 10\n";  // cut short: no totals
    }
    EXPECT_EQ(evmux::bench::callgrind_total(path), std::nullopt);
    std::remove(path);
    EXPECT_EQ(evmux::bench::callgrind_total("/nonexistent/evmux"), std::nullopt);

    EXPECT_DOUBLE_EQ(evmux::bench::instructions_per_message(1000, 10, 31000, 110), 300.0);
    EXPECT_TRUE(std::isnan(evmux::bench::instructions_per_message(1000, 10, 2000, 10)));
    EXPECT_TRUE(std::isnan(evmux::bench::instructions_per_message(2000, 10, 1000, 20)));
    // The longer run must have clearly more messages (1.5x): 14 against 10 is
    // a busy host's pair, not a figure; 15 is.
    EXPECT_TRUE(std::isnan(evmux::bench::instructions_per_message(1000, 10, 2000, 14)));
    EXPECT_DOUBLE_EQ(evmux::bench::instructions_per_message(1000, 10, 2000, 15), 200.0);
    EXPECT_TRUE(std::isnan(evmux::bench::instructions_per_message(0, 0, 2000, 15)));
}

// A server's environment entries (the io_uring floor's variants) reach the
// child: added, or replacing the bench's own value of that name, once.
TEST(ChildProcess, EnvironmentEntriesAreAddedOrReplaceOurs) {
    ::setenv("EVMUX_CHILD_ENV_TEST", "ours", 1);
    evmux::bench::ChildProcess child({"/usr/bin/env"}, -1, true, false,
                                     {"EVMUX_CHILD_ENV_TEST=theirs", "EVMUX_CHILD_ENV_NEW=1"});
    std::string out;
    ASSERT_TRUE(child.read_stdout(out, std::chrono::steady_clock::now() + std::chrono::seconds(10),
                                  [](const std::string&) {}));
    EXPECT_EQ(child.wait(std::chrono::steady_clock::now() + std::chrono::seconds(10)), 0);
    ::unsetenv("EVMUX_CHILD_ENV_TEST");
    EXPECT_NE(out.find("\nEVMUX_CHILD_ENV_TEST=theirs\n"), std::string::npos) << out;
    EXPECT_EQ(out.find("EVMUX_CHILD_ENV_TEST=ours"), std::string::npos) << out;
    EXPECT_NE(out.find("\nEVMUX_CHILD_ENV_NEW=1\n"), std::string::npos) << out;
    EXPECT_NE(out.find("PATH="), std::string::npos) << "the rest of ours: " << out;
}

using evmux::bench::above_median;
using evmux::bench::speed_probe_us;

// The speed probe: rounds whose fixed piece of work took more than the limit
// times the median of all rounds (a slower host) are named; a missing probe
// (NaN) is neither counted nor named.
TEST(AboveMedian, NamesTheRoundsMoreThanTheLimitAboveTheMedian) {
    const std::vector<double> probes = {10, 10.5, 10, 12, 9.8, 20, NAN, 11.7};
    // Median of the seven probes: 10.5; 12 is 1.14x (not named), 20 is 1.9x.
    EXPECT_EQ(above_median(probes, 1.15), (std::vector<std::size_t>{5}));
    EXPECT_EQ(above_median(probes, 1.10), (std::vector<std::size_t>{3, 5, 7}));
    EXPECT_TRUE(above_median({}, 1.15).empty());
    EXPECT_TRUE(above_median({NAN, NAN}, 1.15).empty());
}

using evmux::bench::min_kept_rounds;
using evmux::bench::rounds_to_leave_out;

// Disturbed rounds are left out of a point's figures only while at least
// half of its rounds, and at least 3, remain; otherwise none is (the figures
// are flagged instead).
TEST(RoundsToLeaveOut, LeavesOutTheDisturbedOnesWhileEnoughOthersRemain) {
    EXPECT_EQ(min_kept_rounds(1), 3u);
    EXPECT_EQ(min_kept_rounds(5), 3u);
    EXPECT_EQ(min_kept_rounds(7), 4u);
    EXPECT_EQ(min_kept_rounds(41), 21u);
    using V = std::vector<std::size_t>;
    EXPECT_EQ(rounds_to_leave_out({false, true, false, false}), (V{1}));
    EXPECT_EQ(rounds_to_leave_out({true, false, true, false, false}), (V{0, 2}));
    // Three of five disturbed: two clean rounds cannot stand alone.
    EXPECT_TRUE(rounds_to_leave_out({true, true, false, true, false}).empty());
    // Too few rounds to leave any out; none disturbed; none at all.
    EXPECT_TRUE(rounds_to_leave_out({false, true, false}).empty());
    EXPECT_TRUE(rounds_to_leave_out({true}).empty());
    EXPECT_TRUE(rounds_to_leave_out({false, false, false, false, false}).empty());
    EXPECT_TRUE(rounds_to_leave_out({}).empty());
    // 41 rounds: up to 20 left out.
    std::vector<bool> many(41, false);
    for (std::size_t i = 0; i < 20; ++i) many[i * 2] = true;
    EXPECT_EQ(rounds_to_leave_out(many).size(), 20u);
    many[1] = true;
    EXPECT_TRUE(rounds_to_leave_out(many).empty());
}

TEST(SpeedProbe, IsCpuTimeOfWorkDoneHere) {
    const double t = speed_probe_us(-1);
    EXPECT_TRUE(std::isfinite(t)) << t;
    EXPECT_GT(t, 0) << t;
}
