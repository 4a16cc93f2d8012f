// evmux-bench's statistics over rounds: the median and range of one figure,
// the ratio of two servers' figures round by round, and the rule that a ratio
// whose range straddles 1.0 is neither a win nor a loss. Pure functions, no I/O.
//
// Internal to tools/; not installed.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace evmux::bench {

/// The median and the extremes of a figure's rounds. All NaN with no rounds.
struct Spread {
    double median;
    double min;
    double max;
};

/// The median (the mean of the middle two for an even count), min and max of
/// `values`; NaN values are left out (a round without that figure).
Spread spread(std::vector<double> values);

/// The coverage the interval of a median ratio has at least: what the
/// smallest and largest of 5 rounds give (1 - 2 / 2^5).
constexpr double median_coverage = 0.9375;

/// k (1-based) such that [x(k), x(n+1-k)] of n sorted rounds is the narrowest
/// such interval that holds their median with probability >= median_coverage
/// whatever their distribution (order statistics, the sign test): 1 (the
/// smallest and the largest) up to 8 rounds, 2 at 9-11, 3 at 12-13, 4 at 14-16.
/// Below 5 rounds no interval has that coverage; 1 still, the widest there is.
std::size_t median_interval_rank(std::size_t n);

/// The ratio of `a` to `b`, round by round: a[i] / b[i] for each round i in
/// which both have a figure and b[i] > 0; the median of those ratios, and as
/// min..max the confidence interval of that median (median_interval_rank):
/// the smallest and largest ratio up to 8 rounds, with more rounds the
/// order statistics that keep the same coverage, so that more rounds narrow
/// it rather than widen it.
///
/// Paired, not min(a)/max(b) .. max(a)/min(b): rounds i of A and B ran one
/// right after the other, so a disturbance that slowed round i (another
/// program, a frequency change) touched both, and their ratio cancels most of
/// it. The cross-pairing of extremes would combine A's best moment with B's
/// worst, which never ran side by side, and report a range wider than anything
/// measured. Both inputs must be in round order and of equal length (a missing
/// round as NaN); otherwise the result is NaN.
Spread paired_ratio(const std::vector<double>& a, const std::vector<double>& b);

/// Whether a ratio's range says A's figure is below, about (the range
/// includes 1.0, or the ratio is unknown) or above B's.
enum class Verdict { below, about, above };
Verdict verdict(const Spread& ratio);

/// The indices of `values` (e.g. each round's speed probe, in run order)
/// more than `limit` times their median (spread()); NaN ones are never named.
std::vector<std::size_t> above_median(const std::vector<double>& values, double limit);

/// The fewest rounds a point's figures stand on once disturbed rounds are
/// left out: half of its `n` rounds (rounded up), and never fewer than 3.
std::size_t min_kept_rounds(std::size_t n);

/// The rounds (indices) to leave out of a point's figures: the ones other
/// work disturbed (`disturbed[i]`), if at least min_kept_rounds() of the
/// others remain; none otherwise (too few undisturbed rounds to stand alone:
/// every round is kept, and the figures are flagged instead).
std::vector<std::size_t> rounds_to_leave_out(const std::vector<bool>& disturbed);

/// A spread for the table: "1.12 [1.08-1.15]", its median and the range; a
/// single round's range is a point ("1.12"); "-" when unknown.
std::string median_range_text(const Spread& s, int decimals = 2);

/// A ratio for the table: "1.12 [1.08-1.15]" when its range is clear of 1.0;
/// "≈ [0.96-1.05]" when it straddles 1.0 (no median: the rounds did not
/// agree on a winner); "-" when unknown. A single round's range is a point:
/// "1.12".
std::string ratio_text(const Spread& ratio, int decimals = 2);

}  // namespace evmux::bench
