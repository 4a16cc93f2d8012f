// See bench_stats.hpp.
#include "bench_stats.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace evmux::bench {

Spread spread(std::vector<double> values) {
    std::erase_if(values, [](double v) { return std::isnan(v); });
    if (values.empty()) return {NAN, NAN, NAN};
    std::sort(values.begin(), values.end());
    const std::size_t n = values.size();
    const double median = n % 2 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
    return {median, values.front(), values.back()};
}

std::size_t median_interval_rank(std::size_t n) {
    // P(Bin(n, 1/2) <= j), summed term by term: C(n, j) / 2^n.
    double term = std::ldexp(1.0, -static_cast<int>(n));  // j = 0
    double below = term;
    std::size_t k = 1;
    for (std::size_t j = 1; 2 * j < n; ++j) {
        term = term * static_cast<double>(n - j + 1) / static_cast<double>(j);
        below += term;
        // [x(j+1), x(n-j)] misses the median with probability 2 * P(Bin <= j).
        if (1.0 - 2.0 * below < median_coverage) break;
        k = j + 1;
    }
    return k;
}

Spread paired_ratio(const std::vector<double>& a, const std::vector<double>& b) {
    if (a.size() != b.size()) return {NAN, NAN, NAN};
    std::vector<double> ratios;
    for (std::size_t i = 0; i < a.size(); ++i)
        if (b[i] > 0 && !std::isnan(a[i])) ratios.push_back(a[i] / b[i]);
    Spread s = spread(ratios);
    if (ratios.empty()) return s;
    std::sort(ratios.begin(), ratios.end());
    const std::size_t k = median_interval_rank(ratios.size());
    s.min = ratios[k - 1];
    s.max = ratios[ratios.size() - k];
    return s;
}

Verdict verdict(const Spread& ratio) {
    if (std::isnan(ratio.median)) return Verdict::about;
    if (ratio.max < 1.0) return Verdict::below;
    if (ratio.min > 1.0) return Verdict::above;
    return Verdict::about;
}

std::vector<std::size_t> above_median(const std::vector<double>& values, double limit) {
    const double median = spread(values).median;
    std::vector<std::size_t> above;
    for (std::size_t i = 0; i < values.size(); ++i)
        if (values[i] > median * limit) above.push_back(i);  // false for NaN
    return above;
}

std::size_t min_kept_rounds(std::size_t n) {
    return std::max<std::size_t>(3, (n + 1) / 2);
}

std::vector<std::size_t> rounds_to_leave_out(const std::vector<bool>& disturbed) {
    std::vector<std::size_t> out;
    for (std::size_t i = 0; i < disturbed.size(); ++i)
        if (disturbed[i]) out.push_back(i);
    if (disturbed.size() - out.size() < min_kept_rounds(disturbed.size())) out.clear();
    return out;
}

namespace {

std::string num(double v, int decimals) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
    return buf;
}

std::string range_text(const Spread& s, int decimals) {
    return num(s.min, decimals) + "-" + num(s.max, decimals);
}

}  // namespace

std::string median_range_text(const Spread& s, int decimals) {
    if (std::isnan(s.median)) return "-";
    if (std::isnan(s.min) || std::isnan(s.max) || s.min == s.max) return num(s.median, decimals);
    return num(s.median, decimals) + " [" + range_text(s, decimals) + "]";
}

std::string ratio_text(const Spread& ratio, int decimals) {
    if (std::isnan(ratio.median)) return "-";
    if (verdict(ratio) == Verdict::about) return "≈ [" + range_text(ratio, decimals) + "]";
    return median_range_text(ratio, decimals);
}

}  // namespace evmux::bench
