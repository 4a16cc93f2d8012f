// The backend-independent half of every selector: the fd -> key table, the
// argument checks, and the EINTR/timeout handling around the backend's wait.
#include "evmux/selector.hpp"

#include <sys/epoll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <stdexcept>
#include <string>
#include <system_error>

namespace evmux {
namespace {

// The two refusals add() makes alike on every backend.
[[noreturn]] void throw_not_open(int fd) {
    throw std::system_error(
        EBADF, std::generic_category(),
        "evmux: add fd " + std::to_string(fd) + ": not an open file descriptor");
}
[[noreturn]] void throw_not_pollable(int fd) {
    throw std::system_error(
        EPERM, std::generic_category(),
        "evmux: add fd " + std::to_string(fd) +
            ": the file cannot be polled (a regular file, a directory or a device without "
            "poll is always ready; epoll refuses it too)");
}

// 0 if `fd` can be watched, else EBADF (not open) or EPERM (cannot be polled).
int pollable(int fd) {
    struct stat st {};
    if (::fstat(fd, &st) < 0) return errno;
    // The common case, answered by the fstat alone.
    if (S_ISSOCK(st.st_mode) || S_ISFIFO(st.st_mode)) return 0;
    // Anything else may or may not have a poll operation: a regular file on
    // disk has none, /proc/self/mounts and sysfs attributes have one; an
    // eventfd or timerfd (no file type at all) has one, /dev/null has none.
    // Only the kernel knows, and epoll_ctl says: EPERM for a file without poll
    // (EBADF for an O_PATH fd). A throwaway epoll set asks it, so the rule is
    // the epoll backend's exactly.
    const int probe = ::epoll_create1(EPOLL_CLOEXEC);
    if (probe < 0) {
        // Cannot ask (EMFILE, say): decide by type, as epoll does for files on disk.
        return S_ISREG(st.st_mode) || S_ISDIR(st.st_mode) || S_ISBLK(st.st_mode) ? EPERM : 0;
    }
    epoll_event ev{};
    const int err = ::epoll_ctl(probe, EPOLL_CTL_ADD, fd, &ev) < 0 ? errno : 0;
    ::close(probe);
    return err == EBADF || err == EPERM ? err : 0;  // others (ENOMEM...): the backend's to say
}

}  // namespace

namespace {
// Longer timeouts wait forever (a deadline that far ahead could overflow the clock).
constexpr std::chrono::nanoseconds max_finite_timeout = std::chrono::hours(24 * 365 * 100);
}  // namespace

std::string to_string(Events events) {
    static constexpr struct {
        Events flag;
        const char* name;
    } names[] = {{Events::read, "read"},
                 {Events::write, "write"},
                 {Events::error, "error"},
                 {Events::hangup, "hangup"}};
    std::string text;
    for (const auto& n : names) {
        if (!any(events, n.flag)) continue;
        if (!text.empty()) text += '|';
        text += n.name;
    }
    return text.empty() ? "none" : text;
}

Selector::Selector() = default;
Selector::Selector(bool kernel_checks_fds) : kernel_checks_fds_(kernel_checks_fds) {}
Selector::~Selector() = default;

void Selector::check_interest(Events interest) {
    if (interest == Events::none)
        throw std::invalid_argument("evmux: interest must include read or write");
    // Checked on the raw bits: operator~ keeps only the four known flags, so
    // it would let unknown high bits through as a valid interest.
    constexpr auto known = static_cast<std::uint32_t>(Events::read | Events::write);
    if ((static_cast<std::uint32_t>(interest) & ~known) != 0)
        throw std::invalid_argument("evmux: interest may only be read and/or write, not " +
                                    to_string(interest));
}

const SelectorKey& Selector::add(int fd, Events interest, void* data) {
    if (fd < 0) throw std::invalid_argument("evmux: negative fd " + std::to_string(fd));
    check_interest(interest);
    if (static_cast<std::size_t>(fd) < keys_.size() && keys_[fd].fd >= 0)
        throw std::logic_error("evmux: fd " + std::to_string(fd) + " is already registered");
    SelectorKey key{fd, interest, data, next_generation_};
    if (kernel_checks_fds_) {
        try {
            backend_add(key);  // throws: nothing registered
        } catch (const std::system_error& e) {
            if (e.code() == std::errc::bad_file_descriptor) throw_not_open(fd);
            if (e.code() == std::errc::operation_not_permitted) throw_not_pollable(fd);
            throw;
        }
    } else {
        if (int err = pollable(fd); err == EBADF)
            throw_not_open(fd);
        else if (err == EPERM)
            throw_not_pollable(fd);
        backend_add(key);  // throws: nothing registered
    }
    if (++next_generation_ == 0) next_generation_ = 1;
    if (static_cast<std::size_t>(fd) >= keys_.size()) {
        std::size_t n = keys_.size() ? keys_.size() : 64;
        while (n <= static_cast<std::size_t>(fd)) n *= 2;
        keys_.resize(n);
    }
    keys_[fd] = key;
    ++count_;
    if (fd > max_fd_hint_) max_fd_hint_ = fd;
    return keys_[fd];
}

const SelectorKey& Selector::modify(int fd, Events interest, void* data) {
    const SelectorKey* old = get_key(fd);
    if (!old) throw std::out_of_range("evmux: fd " + std::to_string(fd) + " is not registered");
    check_interest(interest);
    SelectorKey key{fd, interest, data, old->generation};
    if (key.interest != old->interest) backend_modify(*old, key);  // throws: old kept
    keys_[fd] = key;
    return keys_[fd];
}

const SelectorKey& Selector::modify(int fd, Events interest) {
    const SelectorKey* old = get_key(fd);
    if (!old) throw std::out_of_range("evmux: fd " + std::to_string(fd) + " is not registered");
    return modify(fd, interest, old->data);
}

SelectorKey Selector::remove(int fd) {
    const SelectorKey* old = get_key(fd);
    if (!old) throw std::out_of_range("evmux: fd " + std::to_string(fd) + " is not registered");
    SelectorKey key = *old;
    backend_remove(key);
    keys_[fd] = SelectorKey{};
    --count_;
    return key;
}

int Selector::max_fd() const {
    while (max_fd_hint_ >= 0 && keys_[max_fd_hint_].fd < 0) --max_fd_hint_;
    return max_fd_hint_;
}

std::span<const ReadyEvent> Selector::select(Timeout timeout) {
    const bool finite = timeout && timeout->count() > 0 && *timeout <= max_finite_timeout;
    return select(timeout, finite ? std::chrono::steady_clock::now()
                                  : std::chrono::steady_clock::time_point{});
}

std::span<const ReadyEvent> Selector::select(Timeout timeout,
                                             std::chrono::steady_clock::time_point start) {
    using clock = std::chrono::steady_clock;
    ready_.clear();
    if (timeout && timeout->count() < 0) timeout = std::chrono::nanoseconds::zero();
    // A deadline far in the future would overflow the clock: treat it as forever.
    if (timeout && *timeout > max_finite_timeout) timeout.reset();
    const bool finite = timeout && timeout->count() > 0;
    const auto deadline = finite ? start + *timeout : clock::time_point{};
    for (;;) {
        const bool completed = backend_wait(timeout);
        if (completed && (!ready_.empty() || other_work_)) break;
        if (completed && timeout && timeout->count() == 0) break;
        // Interrupted by a signal (EINTR), or woken with nothing to report
        // (poll's POLLNVAL, epoll's orphaned registration, a closed fd set
        // aside by select): wait again for what is left of the timeout, so an
        // empty result always means the timeout expired.
        ready_.clear();
        if (finite) {
            auto left = deadline - clock::now();
            if (left <= clock::duration::zero()) break;
            timeout = std::chrono::duration_cast<std::chrono::nanoseconds>(left);
        }
    }
    return ready_;
}

int Selector::timeout_ms(Timeout timeout) {
    if (!timeout) return -1;
    auto ns = timeout->count();
    if (ns <= 0) return 0;
    constexpr long long per_ms = 1'000'000;
    long long ms = ns / per_ms + (ns % per_ms != 0);  // round up: never spin
    return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

}  // namespace evmux
