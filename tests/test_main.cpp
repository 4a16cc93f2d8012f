// The main of every backend suite (tests/meson.build): GoogleTest's, plus two
// rules that keep a suite from passing without testing anything.
//
// - The backend under test (EVMUX_BACKEND) is not usable here (io_uring under
//   a seccomp filter, libevent left only its select method, a backend not
//   compiled in): print why and exit 77 before running any test. 77 is
//   meson's skip code, so the suite shows as SKIP with the reason in its log,
//   not as OK with every test skipped one by one.
// - EVMUX_IO=completion and the loop cannot do completion I/O here: the same.
// - Tests ran but none passed and none failed (all skipped, e.g. by a filter
//   that only matches tests of another backend): exit 77 too, never 0.
//
// `--gtest_list_tests` and `--help` behave as with GoogleTest's own main.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "evmux/event_loop.hpp"

#include "test_support.hpp"

namespace {
constexpr int exit_skipped = 77;  // meson's (and automake's) "test skipped"

// The suites run once more on io_uring with EVMUX_IO=completion: a loop that
// fell back to readiness would test nothing new, so say why and skip.
std::string completion_unusable_reason() {
    const char* io = std::getenv("EVMUX_IO");
    if (!io || std::string(io) != "completion") return {};
    evmux::EventLoop loop;
    if (loop.io_mode() == evmux::IoMode::completion) return {};
    return "completion I/O unusable here: " + loop.io_note();
}
}  // namespace

int main(int argc, char** argv) {
    ::testing::InitGoogleTest(&argc, argv);
    if (GTEST_FLAG_GET(list_tests)) return RUN_ALL_TESTS();

    std::string why = evmux::test::backend_unusable_reason();
    if (why.empty()) why = completion_unusable_reason();
    if (!why.empty()) {
        std::fprintf(stderr, "evmux tests: %s; skipping the whole suite (exit %d)\n", why.c_str(),
                     exit_skipped);
        return exit_skipped;
    }

    const int status = RUN_ALL_TESTS();
    const ::testing::UnitTest& all = *::testing::UnitTest::GetInstance();
    if (status == 0 && all.successful_test_count() == 0) {
        std::fflush(stdout);  // after GoogleTest's summary
        std::fprintf(stderr,
                     "evmux tests: no test passed (%d ran, %d skipped) on backend %s: reported "
                     "as skipped (exit %d), not as passed\n",
                     all.test_to_run_count(), all.skipped_test_count(),
                     evmux::test::backend_name().c_str(), exit_skipped);
        return exit_skipped;
    }
    return status;
}
