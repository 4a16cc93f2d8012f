// evmux input buffer: the bytes a connection has received and the user has not
// consumed yet.
//
// This header includes only the standard library.
#pragma once

#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace evmux {

/// What ends a line for Buffer::take_line().
enum class LineEnd {
    lf,          ///< LF (a CR before it stays in the line)
    crlf,        ///< CR LF only (a lone LF or CR is part of the line)
    lf_or_crlf,  ///< LF, and a CR right before it is dropped too (Netty's line decoder)
};

/// The length prefix of a frame (Buffer::take_frame(), frame()): the
/// payload's size as an unsigned big-endian (network order) integer.
enum class Prefix {
    u16_be,  ///< 2 bytes: payloads of up to 65 535 bytes
    u32_be,  ///< 4 bytes: payloads of up to 4 294 967 295 bytes
};

/// The peer's input breaks the framing: a line longer than take_line()'s
/// max_len, or a frame whose prefix announces more than take_frame()'s
/// max_size. Thrown as soon as the bytes received prove it (fail fast: no
/// waiting for the rest of an oversize line or frame). The Buffer is left as
/// it was. The usual answer is to close that connection (`conn->close()`).
class FrameError : public std::runtime_error {
  public:
    /// Which limit was passed.
    enum class Kind {
        line_too_long,    ///< more than max_len bytes and no line end among them
        frame_too_large,  ///< a prefix announcing more than max_size bytes
    };
    /// `what` is the message; `size` and `limit` as size() and limit().
    FrameError(Kind kind, std::size_t size, std::size_t limit, const std::string& what)
        : std::runtime_error(what), kind_(kind), size_(size), limit_(limit) {}
    /// frame_too_large for a `prefix` announcing `size` bytes over `limit`:
    /// "evmux: frame of 2097152 bytes over the limit of 1048576 (u32_be length
    /// prefix)" (take_frame()'s, and coro::Stream::read_frame()'s).
    static FrameError too_large(std::size_t size, std::size_t limit, Prefix prefix);
    /// Which limit was passed.
    Kind kind() const noexcept { return kind_; }
    /// line_too_long: the bytes held without a line end; frame_too_large: the
    /// payload size the prefix announced.
    std::size_t size() const noexcept { return size_; }
    /// The max_len or max_size given.
    std::size_t limit() const noexcept { return limit_; }

  private:
    Kind kind_;
    std::size_t size_;
    std::size_t limit_;
};

/// The unconsumed input of one connection, as on_message sees it. The bytes
/// may live in the loop's scratch buffer (fresh from the kernel) or in the
/// connection's own storage (left over from earlier calls); the user cannot
/// tell and need not care. Consume what you have handled (consume(), or
/// take(), or a line or frame at a time: take_line(), take_frame()); whatever
/// is left is kept and shown again, followed by new bytes, on the next call.
/// Valid only inside on_message: do not keep a pointer to it or its data. Loop
/// thread only. Throws only FrameError (take_line(), take_frame(): the peer
/// broke the framing) and std::bad_alloc (take(), append()).
///
/// A Buffer of your own works the same way: fill it with append() and take
/// lines or frames out of it, e.g. to test a parser without a socket, or to
/// cut a datagram's payload into frames. Do not append to a connection's
/// input in on_message: only its Connection fills that one.
class Buffer {
  public:
    Buffer() = default;
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;

    /// The unconsumed bytes.
    const char* data() const { return ext_ ? ext_ : store_.data() + start_; }
    /// Number of unconsumed bytes.
    std::size_t size() const { return ext_ ? ext_len_ : store_.size() - start_; }
    /// True when there is nothing left to consume.
    bool empty() const { return size() == 0; }
    /// The unconsumed bytes as one view (valid as long as data()).
    std::string_view view() const { return {data(), size()}; }
    /// Mark the first `n` bytes as handled (clamped to size()).
    void consume(std::size_t n) {
        if (!ext_) return consume_stored(n);
        n = n < ext_len_ ? n : ext_len_;
        ext_ += n;
        ext_len_ -= n;
        if (ext_len_ == 0) ext_ = nullptr;  // all handled: nothing left to keep
    }
    /// Consume everything.
    void consume_all() { consume(size()); }
    /// Copy out and consume the first `n` bytes (clamped to size()).
    std::string take(std::size_t n);
    /// Copy out and consume everything.
    std::string take_all() { return take(size()); }

    /// Add a copy of `len` bytes at `p` after the unconsumed ones (libevent's
    /// evbuffer_add, muduo's Buffer::append, asyncio's feed_data), for a
    /// Buffer of your own. The consumed prefix is dropped when the storage
    /// must grow, so a Buffer fed and drained forever stays as large as its
    /// largest unconsumed stretch.
    void append(const void* p, std::size_t len);
    /// As append(const void*, std::size_t).
    void append(std::string_view bytes) { append(bytes.data(), bytes.size()); }

    // ---- framing ------------------------------------------------------------------
    // The views returned point into this buffer's bytes, which consuming does
    // not move: they stay valid until on_message returns (in a Buffer of your
    // own: until the next append()). Copy what you keep.

    /// The next line, without its line end, consumed with its line end; or
    /// nullopt while the line end has not arrived (nothing consumed). A line
    /// of up to `max_len` bytes (not counting the line end) is taken; throws
    /// FrameError (line_too_long, nothing consumed) once more than `max_len`
    /// bytes are held and no line end can follow within the limit (asyncio's
    /// readline limit, Netty's LineBasedFrameDecoder with fail-fast). Scans
    /// at most max_len + 2 bytes per call.
    std::optional<std::string_view> take_line(std::size_t max_len, LineEnd end = LineEnd::lf);
    /// The next frame's payload, consumed with its length prefix; or nullopt
    /// while the prefix or payload is incomplete (nothing consumed). An empty
    /// payload is an empty view, not nullopt. Throws FrameError
    /// (frame_too_large, nothing consumed) as soon as the prefix announces
    /// more than `max_size` bytes, without waiting for them (Netty's
    /// LengthFieldBasedFrameDecoder).
    std::optional<std::string_view> take_frame(Prefix prefix, std::size_t max_size);

    /// Bytes of memory held (0 for an idle connection), for tests and stats.
    std::size_t capacity() const { return store_.capacity(); }

  private:
    // Attaching and resetting are for the owning Connection only (same layer).
    friend class Connection;

    // Show `len` bytes at `p` (the loop's scratch) without copying; only
    // valid while nothing is stored.
    void attach(const char* p, std::size_t len) {
        ext_ = p;
        ext_len_ = len;
    }
    // After on_message: copy attached bytes that were not consumed into own
    // storage, and free the storage once it is empty, so an idle connection
    // holds no input memory. Returns the bytes kept (size()). Throws std::bad_alloc.
    std::size_t keep_rest() {
        if (ext_ || store_.capacity() != 0) return keep_rest_slow();
        return 0;  // idle, nothing to do (and no size() to work out)
    }
    // Drop everything and free the storage.
    void clear();

    void consume_stored(std::size_t n);
    std::size_t keep_rest_slow();

    // The attached view first: the usual read touches only it.
    const char* ext_ = nullptr;
    std::size_t ext_len_ = 0;
    std::vector<char> store_;
    std::size_t start_ = 0;  // consumed prefix of store_
};

/// Append one frame to `out`: `payload`'s size as a `prefix`, then `payload`.
/// Build several in one string and send it once. Throws std::length_error if
/// the payload is too long for the prefix (over 65 535 bytes for u16_be).
void append_frame(std::string& out, Prefix prefix, std::string_view payload);
/// One frame, ready for `conn->send(frame(...))` (send(std::string&&) queues
/// it without a copy): the prefix and the payload in one string, one copy of
/// the payload. Throws std::length_error as append_frame().
std::string frame(Prefix prefix, std::string_view payload);

}  // namespace evmux
