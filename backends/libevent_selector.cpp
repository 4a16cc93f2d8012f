// The libevent backend: an event_base does the waiting, with libevent's own
// choice of kernel interface (epoll here; poll with EVENT_NOEPOLL=1 in the
// environment). One persistent event per registered fd; a wait runs the loop
// once with a one-shot timer for the timeout and collects the fds whose
// callbacks fired.
//
// libevent tells a callback only EV_READ/EV_WRITE (it folds error and hang-up
// into both). For the exact, normalised flags the fired fds are asked once
// more with poll(timeout 0), as the select backend does: one extra call per
// wake-up with ready fds, O(ready), not O(n).
//
// libevent's select method is avoided: its FD_SET on an fd >= FD_SETSIZE
// aborts under glibc's fortify checks. Its poll and epoll methods take any fd.
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <string>
#include <system_error>
#include <vector>

#include "backend.hpp"

namespace evmux::detail {
namespace {

// libevent's epoll method warns on stderr when it is asked to delete a closed
// fd, which remove() must accept silently. The log callback is process-wide:
// warnings and debug messages are dropped, errors (logged just before libevent
// aborts) still reach stderr.
void log_errors_only(int severity, const char* msg) {
    if (severity >= EVENT_LOG_ERR) std::fprintf(stderr, "libevent: %s\n", msg);
}

// libevent ends the process (exit(1), in evsig_init_'s event_sock_err) when
// a new event_base cannot make its signal socketpair, as it cannot when fds
// run out: throw first, as the other backends do, if the fds it takes (its
// epoll or poll fd and the socketpair) are not to be had now. (Another
// thread taking the last fds meanwhile can still beat this check.)
void check_fds_for_a_base() {
    int fds[3] = {-1, -1, -1};
    int err = 0;
    for (int& fd : fds) {
        fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            err = errno;
            break;
        }
    }
    for (int fd : fds)
        if (fd >= 0) ::close(fd);
    if (err != 0) throw std::system_error(err, std::generic_category(), "libevent: event_base_new");
}

// A new event_base, configured the same way for the selector and the probe.
event_base* new_base() {
    static std::once_flag quiet;
    std::call_once(quiet, [] { event_set_log_callback(log_errors_only); });
    event_config* cfg = event_config_new();
    if (!cfg) throw std::system_error(ENOMEM, std::generic_category(), "event_config_new");
    event_config_avoid_method(cfg, "select");
    // One thread uses a selector at a time: no locks needed.
    event_config_set_flag(cfg, EVENT_BASE_FLAG_NOLOCK);
    event_base* base;
    {
        // One base at a time: a LoopGroup's threads make theirs at once, and
        // each must find the fds it checked for still there.
        static std::mutex making;
        const std::lock_guard lock(making);
        try {
            check_fds_for_a_base();
        } catch (...) {
            event_config_free(cfg);
            throw;
        }
        base = event_base_new_with_config(cfg);
    }
    event_config_free(cfg);
    if (!base)
        // Every method left was disabled, e.g. by EVENT_NOEPOLL and EVENT_NOPOLL
        // in the environment: select alone is not taken (see the top).
        throw std::system_error(ENOSYS, std::generic_category(),
                                "libevent: no method but select left (EVENT_NOEPOLL and "
                                "EVENT_NOPOLL set?); evmux does not use libevent's select, "
                                "which cannot take fds >= FD_SETSIZE");
    return base;
}

short libevent_flags(Events interest) {
    short flags = EV_PERSIST;
    if (any(interest, Events::read)) flags |= EV_READ;
    if (any(interest, Events::write)) flags |= EV_WRITE;
    return flags;
}

class LibeventSelector final : public Selector {
  public:
    LibeventSelector() : base_(new_base()) {
        timer_ = evtimer_new(base_, on_timer, this);
        if (!timer_) {
            event_base_free(base_);
            throw std::system_error(ENOMEM, std::generic_category(), "evtimer_new");
        }
    }
    ~LibeventSelector() override {
        for (Slot& s : slots_)
            if (s.ev) event_free(s.ev);
        event_free(timer_);
        event_base_free(base_);
    }
    std::string name() const override {
        return std::string("libevent (") + event_base_get_method(base_) + ")";
    }

  protected:
    void backend_add(const SelectorKey& key) override {
        if (static_cast<std::size_t>(key.fd) >= slots_.size()) slots_.resize(key.fd * 2 + 64);
        event* ev = event_new(base_, key.fd, libevent_flags(key.interest), on_io, this);
        if (!ev) throw std::system_error(ENOMEM, std::generic_category(), "event_new");
        if (event_add(ev, nullptr) < 0) {
            int err = errno;
            event_free(ev);
            throw std::system_error(err, std::generic_category(),
                                    "event_add fd " + std::to_string(key.fd));
        }
        slots_[key.fd] = Slot{ev, false, false};
    }

    void backend_modify(const SelectorKey& old_key, const SelectorKey& key) override {
        Slot& s = slots_[key.fd];
        // event_assign() must not be used on a pending event: take it out first.
        if (!s.set_aside) event_del(s.ev);
        event_assign(s.ev, base_, key.fd, libevent_flags(key.interest), on_io, this);
        if (event_add(s.ev, nullptr) < 0) {
            int err = errno;
            // Keep the old registration, as the contract asks.
            event_assign(s.ev, base_, key.fd, libevent_flags(old_key.interest), on_io, this);
            s.set_aside = event_add(s.ev, nullptr) < 0;
            throw std::system_error(err, std::generic_category(),
                                    "event_add fd " + std::to_string(key.fd));
        }
        s.set_aside = false;  // a modify re-enables an fd set aside as closed
    }

    void backend_remove(const SelectorKey& key) override {
        Slot& s = slots_[key.fd];
        // On a closed fd, epoll_ctl(DEL) fails with EBADF; libevent accepts
        // that (and its warning goes nowhere, see log_errors_only).
        if (s.ev) event_free(s.ev);  // event_free deletes a pending event first
        s = Slot{};
    }

    // One round of the base. libevent's coarse clock may fire the timer a
    // little early, and a fired fd may have nothing left: ready_ is then
    // empty and Selector::select() waits again for the rest of the timeout.
    bool backend_wait(Timeout timeout) override {
        // EVLOOP_NONBLOCK alone keeps looping while a persistent event stays
        // active (a writable socket): EVLOOP_ONCE makes it one round.
        int flags = EVLOOP_ONCE | EVLOOP_NONBLOCK;
        const bool no_wait = timeout && timeout->count() <= 0;
        if (!no_wait) {
            // EVLOOP_ONCE returns at once when no event is pending, so an
            // endless wait also gets a timer (an hour, then wait again).
            long long us = 3600LL * 1'000'000;
            if (timeout) us = (timeout->count() + 999) / 1000;  // round up: never spin
            timeval tv{};
            tv.tv_sec = static_cast<time_t>(us / 1'000'000);
            tv.tv_usec = static_cast<suseconds_t>(us % 1'000'000);
            evtimer_add(timer_, &tv);
            flags = EVLOOP_ONCE;
        }
        // libevent retries its own EINTR, so the loop runs until an fd
        // fires or the timer does.
        int ret = event_base_loop(base_, flags);
        if (!no_wait) evtimer_del(timer_);
        if (ret < 0) throw std::system_error(errno, std::generic_category(), "event_base_loop");
        return refine();  // false: EINTR in poll(), the base resumes
    }

  private:
    struct Slot {
        event* ev = nullptr;
        bool fired = false;      // in fired_ for this wait
        bool set_aside = false;  // closed while registered: event deleted until modify
    };

    static void on_io(evutil_socket_t fd, short, void* arg) {
        auto* self = static_cast<LibeventSelector*>(arg);
        Slot& s = self->slots_[fd];
        if (s.fired) return;
        s.fired = true;
        self->fired_.push_back(fd);
    }
    static void on_timer(evutil_socket_t, short, void*) {}

    // Asks the fds libevent reported for their exact events and reports them.
    // Returns false if poll() was interrupted (EINTR).
    bool refine() {
        pollfds_.clear();
        for (int fd : fired_) {
            slots_[fd].fired = false;
            if (const SelectorKey* key = get_key(fd))
                pollfds_.push_back(pollfd{fd, poll_mask(key->interest), 0});
        }
        fired_.clear();
        if (pollfds_.empty()) return true;
        if (::poll(pollfds_.data(), pollfds_.size(), 0) < 0) {
            if (errno == EINTR) return false;
            throw std::system_error(errno, std::generic_category(), "poll");
        }
        for (const pollfd& p : pollfds_) {
            if (p.revents & POLLNVAL) {
                // Closed without remove(). libevent's poll method would call
                // back for it at every wait (a spin): stop watching it, report
                // nothing, as the poll backend does.
                Slot& s = slots_[p.fd];
                if (!s.set_aside) event_del(s.ev);
                s.set_aside = true;
            } else if (p.revents) {
                report(p.fd, from_poll(p.revents));
            }
        }
        return true;
    }

    event_base* base_;
    event* timer_ = nullptr;
    std::vector<Slot> slots_;  // indexed by fd
    std::vector<int> fired_;
    std::vector<pollfd> pollfds_;
};

std::unique_ptr<Selector> create() {
    return std::make_unique<LibeventSelector>();
}

// Not cached: EVENT_NOEPOLL and EVENT_NOPOLL are read at each event_base_new.
std::string unusable() {
    try {
        event_base_free(new_base());
        return {};
    } catch (const std::system_error& e) {
        return e.what();
    }
}

// backends() says which method libevent picks here: "method epoll" (or poll,
// with EVENT_NOEPOLL). A selector's name() says it too: "libevent (epoll)".
std::string method_details() {
    event_base* base = new_base();
    std::string details = std::string("method ") + event_base_get_method(base);
    event_base_free(base);
    return details;
}

}  // namespace

extern const Backend libevent_backend{
    .name = "libevent", .create = create, .unusable = unusable, .details = method_details};

}  // namespace evmux::detail
