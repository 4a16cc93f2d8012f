// Buffer: a connection's unconsumed input, either a view of the loop's scratch
// buffer (attached, no copy) or its own storage (what earlier calls left).
#include "evmux/buffer.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace evmux {

namespace {

std::size_t add_saturated(std::size_t a, std::size_t b) {
    return a > SIZE_MAX - b ? SIZE_MAX : a + b;
}

const char* name(LineEnd end) {
    switch (end) {
        case LineEnd::lf:
            return "LF";
        case LineEnd::crlf:
            return "CRLF";
        case LineEnd::lf_or_crlf:
            break;
    }
    return "LF or CRLF";
}

const char* name(Prefix prefix) {
    return prefix == Prefix::u16_be ? "u16_be" : "u32_be";
}

std::size_t prefix_bytes(Prefix prefix) {
    return prefix == Prefix::u16_be ? 2 : 4;
}

}  // namespace

void Buffer::consume_stored(std::size_t n) {
    // Only the start moves, so views handed out by take_line() and
    // take_frame() stay valid until on_message returns; keep_rest() then
    // frees the storage if all of it was consumed.
    start_ += std::min(n, size());
}

std::string Buffer::take(std::size_t n) {
    n = std::min(n, size());
    std::string out(data(), n);
    consume(n);
    return out;
}

std::optional<std::string_view> Buffer::take_line(std::size_t max_len, LineEnd end) {
    const std::string_view in = view();
    const bool cr = end != LineEnd::lf;  // a CR may come before the LF
    // The LF of a line of max_len bytes is at max_len, or at max_len + 1 after its CR.
    const std::size_t reach = std::min(in.size(), add_saturated(max_len, cr ? 2 : 1));
    for (std::size_t from = 0; from < reach;) {
        const auto* hit =
            static_cast<const char*>(std::memchr(in.data() + from, '\n', reach - from));
        if (hit == nullptr) break;
        const auto lf = static_cast<std::size_t>(hit - in.data());
        const bool after_cr = lf > 0 && in[lf - 1] == '\r';
        from = lf + 1;
        if (end == LineEnd::crlf && !after_cr) continue;  // a lone LF is part of the line
        const std::size_t len = cr && after_cr ? lf - 1 : lf;
        if (len > max_len) break;  // lf_or_crlf: an LF without CR just past the limit
        consume(lf + 1);
        return in.substr(0, len);
    }
    // No line end within reach. Incomplete, unless the line is already too
    // long: only a CR right at max_len may still be followed by its LF.
    if (in.size() > max_len && !(cr && in.size() == max_len + 1 && in[max_len] == '\r')) {
        throw FrameError(FrameError::Kind::line_too_long, in.size(), max_len,
                         "evmux: line longer than the limit of " + std::to_string(max_len) +
                             " bytes (" + std::to_string(in.size()) + " bytes received, no " +
                             name(end) + " within the limit)");
    }
    return std::nullopt;
}

std::optional<std::string_view> Buffer::take_frame(Prefix prefix, std::size_t max_size) {
    const std::string_view in = view();
    const std::size_t head = prefix_bytes(prefix);
    if (in.size() < head) return std::nullopt;
    std::size_t len = 0;
    for (std::size_t i = 0; i < head; ++i) len = len << 8 | static_cast<unsigned char>(in[i]);
    if (len > max_size) throw FrameError::too_large(len, max_size, prefix);
    if (in.size() - head < len) return std::nullopt;
    consume(head + len);
    return in.substr(head, len);
}

FrameError FrameError::too_large(std::size_t size, std::size_t limit, Prefix prefix) {
    return FrameError(Kind::frame_too_large, size, limit,
                      "evmux: frame of " + std::to_string(size) + " bytes over the limit of " +
                          std::to_string(limit) + " (" + name(prefix) + " length prefix)");
}

void append_frame(std::string& out, Prefix prefix, std::string_view payload) {
    const std::size_t head = prefix_bytes(prefix);
    const std::uint64_t most = prefix == Prefix::u16_be ? 0xffff : 0xffffffff;
    if (payload.size() > most) {
        throw std::length_error("evmux::frame: a payload of " + std::to_string(payload.size()) +
                                " bytes does not fit a " + name(prefix) +
                                " length prefix (at most " + std::to_string(most) + ")");
    }
    char bytes[4];
    for (std::size_t i = 0; i < head; ++i)
        bytes[i] = static_cast<char>(payload.size() >> (8 * (head - 1 - i)) & 0xff);
    out.append(bytes, head);
    out.append(payload);
}

std::string frame(Prefix prefix, std::string_view payload) {
    std::string out;
    out.reserve(prefix_bytes(prefix) + payload.size());
    append_frame(out, prefix, payload);
    return out;
}

void Buffer::append(const void* bytes, std::size_t len) {
    const char* p = static_cast<const char*>(bytes);
    if (ext_) keep_rest();
    // Drop the consumed prefix when all of it was consumed (nothing moves) or
    // before growing, so a framing user that keeps a partial message does not
    // make the storage creep forward forever.
    if (start_ > 0 && (start_ == store_.size() || store_.size() + len > store_.capacity())) {
        store_.erase(store_.begin(), store_.begin() + static_cast<std::ptrdiff_t>(start_));
        start_ = 0;
    }
    store_.insert(store_.end(), p, p + len);
}

std::size_t Buffer::keep_rest_slow() {
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
    return store_.size() - start_;
}

void Buffer::clear() {
    ext_ = nullptr;
    ext_len_ = 0;
    std::vector<char>().swap(store_);
    start_ = 0;
}

}  // namespace evmux
