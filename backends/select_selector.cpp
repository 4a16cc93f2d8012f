// The select(2) backend, without select's two classic traps:
//  - FD_SET on an fd >= FD_SETSIZE (1024) writes past a fixed fd_set and glibc's
//    fortify build aborts. Here the bit sets are sized to the highest fd, and
//    the kernel (which takes any nfds up to the fd limit) gets them as they are.
//  - A closed fd makes the whole call fail with EBADF. Here such an fd is set
//    aside (as epoll drops it) and the wait goes on for the others.
// select() cannot tell readable from hung-up or failed, so the fds it returns
// are asked once more with poll(timeout 0) for the exact, normalised events;
// that costs one extra call per wake-up with ready fds, O(ready), not O(n).
#include <fcntl.h>
#include <sys/select.h>

#include <cerrno>
#include <climits>
#include <system_error>
#include <vector>

#include "backend.hpp"

namespace evmux::detail {
namespace {

using Word = unsigned long;
constexpr int word_bits = sizeof(Word) * CHAR_BIT;

class SelectSelector final : public Selector {
  public:
    std::string name() const override { return "select"; }

  protected:
    void backend_add(const SelectorKey& key) override { set_bad(key.fd, false); }
    void backend_modify(const SelectorKey&, const SelectorKey& key) override {
        set_bad(key.fd, false);
    }
    void backend_remove(const SelectorKey& key) override { set_bad(key.fd, false); }

    bool backend_wait(Timeout timeout) override {
        const int nfds = max_fd() + 1;
        const std::size_t words = nfds / word_bits + 1;
        read_.assign(words, 0);
        write_.assign(words, 0);
        for (const SelectorKey& key : keys_by_fd()) {
            if (key.fd < 0 || is_bad(key.fd)) continue;
            if (any(key.interest, Events::read)) set(read_, key.fd);
            if (any(key.interest, Events::write)) set(write_, key.fd);
        }
        timeval tv{};
        timeval* tvp = nullptr;
        if (timeout) {
            auto us = (timeout->count() + 999) / 1000;  // round up: never spin
            constexpr long long max_s = INT_MAX;
            tv.tv_sec = us / 1'000'000 > max_s ? max_s : us / 1'000'000;
            tv.tv_usec = tv.tv_sec == max_s ? 0 : us % 1'000'000;
            tvp = &tv;
        }
        int n = ::select(nfds, as_set(read_), as_set(write_), nullptr, tvp);
        if (n < 0) {
            if (errno == EINTR) return false;
            if (errno == EBADF) return set_aside_closed_fds();
            throw std::system_error(errno, std::generic_category(), "select");
        }
        if (n == 0) return true;
        ready_.clear();
        for (std::size_t w = 0; w < words; ++w) {
            Word bits = read_[w] | write_[w];
            while (bits) {
                int fd = static_cast<int>(w * word_bits + __builtin_ctzl(bits));
                bits &= bits - 1;
                ready_.push_back(pollfd{fd, poll_mask(get_key(fd)->interest), 0});
            }
        }
        if (::poll(ready_.data(), ready_.size(), 0) < 0) {
            if (errno == EINTR) return false;
            throw std::system_error(errno, std::generic_category(), "poll");
        }
        for (const pollfd& p : ready_) {
            if (p.revents & POLLNVAL)
                set_bad(p.fd, true);
            else if (p.revents)
                report(p.fd, from_poll(p.revents));
        }
        return true;
    }

  private:
    static void set(std::vector<Word>& s, int fd) {
        s[fd / word_bits] |= Word{1} << (fd % word_bits);
    }
    // The kernel reads and writes nfds bits as an array of longs: the same
    // layout as glibc's fd_set, without its fixed size.
    static fd_set* as_set(std::vector<Word>& s) { return reinterpret_cast<fd_set*>(s.data()); }

    bool is_bad(int fd) const { return static_cast<std::size_t>(fd) < bad_.size() && bad_[fd]; }
    void set_bad(int fd, bool bad) {
        if (static_cast<std::size_t>(fd) >= bad_.size()) {
            if (!bad) return;
            bad_.resize(fd * 2 + 64, 0);
        }
        bad_[fd] = bad;
    }
    // EBADF: some registered fd was closed without remove(). Find and skip it.
    bool set_aside_closed_fds() {
        bool found = false;
        for (const SelectorKey& key : keys_by_fd()) {
            if (key.fd < 0 || is_bad(key.fd) || ::fcntl(key.fd, F_GETFD) >= 0) continue;
            set_bad(key.fd, true);
            found = true;
        }
        if (!found) throw std::system_error(EBADF, std::generic_category(), "select");
        return false;  // wait again (the base treats it like EINTR)
    }

    std::vector<Word> read_, write_;
    std::vector<pollfd> ready_;
    std::vector<char> bad_;  // fd -> closed while registered
};

std::unique_ptr<Selector> create() {
    return std::make_unique<SelectSelector>();
}

}  // namespace

extern const Backend select_backend{.name = "select", .create = create};

}  // namespace evmux::detail
