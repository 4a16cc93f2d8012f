// The selector conformance suite: run once per backend (EVMUX_BACKEND).
#include <gtest/gtest.h>

#include "test_support.hpp"

using namespace evmux;
using namespace evmux::test;
using namespace std::chrono_literals;

TEST(Selector, ReadReadiness) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    auto [a, b] = socket_pair();
    int tag = 7;
    sel->add(a.get(), Events::read, &tag);
    EXPECT_TRUE(sel->select(0ns).empty());
    write_byte(b.get());
    auto ready = sel->select(1s);
    ASSERT_EQ(ready.size(), 1u);
    EXPECT_EQ(ready[0].key.fd, a.get());
    EXPECT_EQ(ready[0].key.data, &tag);
    EXPECT_EQ(ready[0].events, Events::read);
}
