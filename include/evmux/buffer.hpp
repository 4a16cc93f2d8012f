// evmux input buffer: the bytes a connection has received and the user has not
// consumed yet.
//
// This header includes only the standard library.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace evmux {

/// The unconsumed input of one connection, as on_message sees it. The bytes
/// may live in the loop's scratch buffer (fresh from the kernel) or in the
/// connection's own storage (left over from earlier calls); the user cannot
/// tell and need not care. Consume what you have handled (consume(), or
/// take()); whatever is left is kept and shown again, followed by new bytes,
/// on the next call. Valid only inside on_message: do not keep a pointer to it
/// or its data. Loop thread only. Never throws except take() on allocation
/// failure. Only the Connection that owns it adds bytes to it.
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

    /// Bytes of memory held (0 for an idle connection), for tests and stats.
    std::size_t capacity() const { return store_.capacity(); }

  private:
    // Filling and emptying are for the owning Connection only (same layer):
    // on_message sees a Buffer& and can only read and consume.
    friend class Connection;

    // Show `len` bytes at `p` (the loop's scratch) without copying; only
    // valid while nothing is stored.
    void attach(const char* p, std::size_t len) {
        ext_ = p;
        ext_len_ = len;
    }
    // Append bytes to the own storage (after moving attached bytes there).
    // Throws std::bad_alloc.
    void append(const char* p, std::size_t len);
    // After on_message: copy attached bytes that were not consumed into own
    // storage, and free the storage once it is empty, so an idle connection
    // holds no input memory. Throws std::bad_alloc.
    void keep_rest() {
        if (ext_ || store_.capacity() != 0) keep_rest_slow();  // else: idle, nothing to do
    }
    // Drop everything and free the storage.
    void clear();

    void consume_stored(std::size_t n);
    void keep_rest_slow();

    // The attached view first: the usual read touches only it.
    const char* ext_ = nullptr;
    std::size_t ext_len_ = 0;
    std::vector<char> store_;
    std::size_t start_ = 0;  // consumed prefix of store_
};

}  // namespace evmux
