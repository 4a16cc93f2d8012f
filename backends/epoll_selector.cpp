// The epoll(7) backend, level-triggered only. Not EPOLLET, by design:
// Connection is level-triggered. It reads at most its read budget per wake-up
// and skips the read that would return EAGAIN after a short one, counting on
// the next wait to report whatever is left; edge-triggered, those bytes would
// wait for the peer's next send. The same holds for every backend (tested in
// tests/selector_test.cpp and tests/backend_edges_test.cpp).
//
// Each kernel registration carries fd and generation in its 64-bit token, so an
// event queued for an earlier registration of a reused fd number is dropped.
#include <sys/epoll.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <system_error>
#include <vector>

#include "backend.hpp"

namespace evmux::detail {
namespace {

class EpollSelector final : public Selector {
  public:
    // epoll_ctl(ADD) refuses a closed fd (EBADF) and a file without poll
    // (EPERM) by itself: the base class need not check first.
    EpollSelector() : Selector(true) {
        epfd_ = ::epoll_create1(EPOLL_CLOEXEC);
        if (epfd_ < 0) throw std::system_error(errno, std::generic_category(), "epoll_create1");
        events_.resize(64);
    }
    ~EpollSelector() override { ::close(epfd_); }
    std::string name() const override { return "epoll"; }

  protected:
    void backend_add(const SelectorKey& key) override { ctl(EPOLL_CTL_ADD, key, "epoll_ctl(ADD)"); }
    void backend_modify(const SelectorKey&, const SelectorKey& key) override {
        ctl(EPOLL_CTL_MOD, key, "epoll_ctl(MOD)");
    }
    void backend_remove(const SelectorKey& key) override {
        // Fails with EBADF (closed) or ENOENT (closed, number reused): the
        // kernel dropped the registration with the file. Not an error.
        epoll_event unused{};
        ::epoll_ctl(epfd_, EPOLL_CTL_DEL, key.fd, &unused);
    }
    bool backend_wait(Timeout timeout) override {
        int n = ::epoll_wait(epfd_, events_.data(), static_cast<int>(events_.size()),
                             timeout_ms(timeout));
        if (n < 0) {
            if (errno == EINTR) return false;
            throw std::system_error(errno, std::generic_category(), "epoll_wait");
        }
        bool orphan = false;
        for (int i = 0; i < n; ++i) {
            std::uint64_t token = events_[i].data.u64;
            orphan |= !report(static_cast<int>(token & 0xffffffffu), from_poll(events_[i].events),
                              static_cast<std::uint32_t>(token >> 32));
        }
        if (orphan) rebuild();
        // A full batch: there may be more ready fds; take more next time.
        if (static_cast<std::size_t>(n) == events_.size() && events_.size() < 4096)
            events_.resize(events_.size() * 2);
        return true;
    }

  private:
    // An event for no current registration means the kernel still holds one we
    // removed: the fd was closed before remove() while a dup() kept the file
    // open, so EPOLL_CTL_DEL could not name it. Level-triggered, it would wake
    // every wait forever. The only cure is a fresh epoll set.
    void rebuild() {
        int fresh = ::epoll_create1(EPOLL_CLOEXEC);
        if (fresh < 0) throw std::system_error(errno, std::generic_category(), "epoll_create1");
        ::close(epfd_);
        epfd_ = fresh;
        for (const SelectorKey& key : keys_by_fd()) {
            if (key.fd < 0) continue;
            try {
                ctl(EPOLL_CTL_ADD, key, "epoll_ctl(ADD)");
            } catch (const std::system_error&) {
                // Closed but not yet removed: nothing to watch, as before.
            }
        }
    }

    void ctl(int op, const SelectorKey& key, const char* what) {
        epoll_event ev{};
        ev.events = static_cast<std::uint32_t>(poll_mask(key.interest));
        // 32 bits of generation are plenty to tell registrations of one fd apart.
        std::uint64_t gen = key.generation & 0xffffffffu;
        ev.data.u64 = (gen << 32) | static_cast<std::uint32_t>(key.fd);
        if (::epoll_ctl(epfd_, op, key.fd, &ev) < 0)
            throw std::system_error(errno, std::generic_category(),
                                    std::string(what) + " fd " + std::to_string(key.fd));
    }

    int epfd_ = -1;
    std::vector<epoll_event> events_;
};

std::unique_ptr<Selector> create() {
    return std::make_unique<EpollSelector>();
}

std::string unusable() {
    int fd = ::epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0) return std::string("epoll_create1: ") + std::strerror(errno);
    ::close(fd);
    return {};
}

}  // namespace

extern const Backend epoll_backend{.name = "epoll", .create = create, .unusable = unusable};

}  // namespace evmux::detail
