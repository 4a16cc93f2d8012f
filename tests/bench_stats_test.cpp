// evmux-bench's statistics (tools/bench_stats.cpp): medians, ranges, paired
// ratios and the "≈" rule for a ratio whose range straddles 1.0.
#include "../tools/bench_stats.hpp"

#include <gtest/gtest.h>

#include <cmath>

namespace {

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

}  // namespace
