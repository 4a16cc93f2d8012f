// The poll(2) backend: one pollfd array kept in step with the key table
// (swap-remove keeps it dense), so a wait rebuilds nothing.
#include <cerrno>
#include <system_error>
#include <vector>

#include "backend.hpp"

namespace evmux::detail {
namespace {

class PollSelector final : public Selector {
  public:
    std::string name() const override { return "poll"; }

  protected:
    void backend_add(const SelectorKey& key) override {
        if (static_cast<std::size_t>(key.fd) >= index_.size()) index_.resize(key.fd * 2 + 64, -1);
        index_[key.fd] = static_cast<int>(fds_.size());
        fds_.push_back(pollfd{key.fd, poll_mask(key.interest), 0});
    }
    void backend_modify(const SelectorKey&, const SelectorKey& key) override {
        // A modify also re-enables an fd that was set aside after POLLNVAL.
        fds_[index_[key.fd]] = pollfd{key.fd, poll_mask(key.interest), 0};
    }
    void backend_remove(const SelectorKey& key) override {
        int i = index_[key.fd];
        fds_[i] = fds_.back();
        index_[fds_[i].fd < 0 ? ~fds_[i].fd : fds_[i].fd] = i;
        fds_.pop_back();
        index_[key.fd] = -1;
    }
    bool backend_wait(Timeout timeout) override {
        int n = ::poll(fds_.data(), fds_.size(), timeout_ms(timeout));
        if (n < 0) {
            if (errno == EINTR) return false;
            throw std::system_error(errno, std::generic_category(), "poll");
        }
        for (auto& p : fds_) {
            if (n == 0) break;
            if (p.revents == 0) continue;
            --n;
            if (p.revents & POLLNVAL) {
                // The fd was closed without being removed. epoll drops such an
                // fd silently; do the same, and stop asking about it so the
                // next wait does not return at once forever (a spin).
                p.fd = ~p.fd;
                continue;
            }
            report(p.fd, from_poll(p.revents));
        }
        return true;
    }

  private:
    std::vector<pollfd> fds_;
    std::vector<int> index_;  // fd -> position in fds_
};

std::unique_ptr<Selector> create() {
    return std::make_unique<PollSelector>();
}

}  // namespace

extern const Backend poll_backend{.name = "poll", .create = create};

}  // namespace evmux::detail
