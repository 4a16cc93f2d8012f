// Buffer: a connection's unconsumed input, either a view of the loop's scratch
// buffer (attached, no copy) or its own storage (what earlier calls left).
#include "evmux/buffer.hpp"

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

namespace evmux {

void Buffer::consume_stored(std::size_t n) {
    // Only the start moves, so what was consumed stays where it is until
    // on_message returns; keep_rest() then frees the storage if all of it
    // was consumed.
    start_ += std::min(n, size());
}

std::string Buffer::take(std::size_t n) {
    n = std::min(n, size());
    std::string out(data(), n);
    consume(n);
    return out;
}

void Buffer::append(const char* p, std::size_t len) {
    if (ext_) keep_rest();
    // Drop the consumed prefix before growing, so a framing user that keeps a
    // partial message does not make the storage creep forward forever.
    if (start_ > 0 && store_.size() + len > store_.capacity()) {
        store_.erase(store_.begin(), store_.begin() + static_cast<std::ptrdiff_t>(start_));
        start_ = 0;
    }
    store_.insert(store_.end(), p, p + len);
}

void Buffer::keep_rest_slow() {
    if (ext_) {
        const char* p = ext_;
        std::size_t len = ext_len_;
        ext_ = nullptr;
        ext_len_ = 0;
        store_.insert(store_.end(), p, p + len);
    }
    if (start_ == store_.size()) {
        std::vector<char>().swap(store_);  // idle: hold no memory
        start_ = 0;
    }
}

void Buffer::clear() {
    ext_ = nullptr;
    ext_len_ = 0;
    std::vector<char>().swap(store_);
    start_ = 0;
}

}  // namespace evmux
