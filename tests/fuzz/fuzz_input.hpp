// The fuzz targets' input, read a byte at a time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace evmux::fuzz {

/// The bytes libFuzzer gave, consumed from the front; zeros once they run out.
struct Input {
    const std::uint8_t* p = nullptr;
    std::size_t n = 0;
    /// True once every byte has been read.
    bool done() const { return n == 0; }
    /// The next byte, or 0 once done.
    std::uint8_t next() {
        if (n == 0) return 0;
        --n;
        return *p++;
    }
};

}  // namespace evmux::fuzz
