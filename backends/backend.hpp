// Internal to evmux: what the backends share with the registry. Not installed.
#pragma once

#include <poll.h>

#include <memory>
#include <string>

#include "evmux/selector.hpp"
#include "evmux_config.h"

namespace evmux::detail {

/// poll(2)-family request mask for an interest. POLLRDHUP is asked for only
/// with read interest, so a write-only watcher is not woken again and again
/// by a peer that half-closed (it would spin on a level-triggered backend).
constexpr short poll_mask(Events interest) {
    short mask = 0;
    if (any(interest, Events::read)) mask |= POLLIN | POLLRDHUP;
    if (any(interest, Events::write)) mask |= POLLOUT;
    return mask;
}

/// The normalised events for a poll(2)-family result mask. poll, epoll and
/// io_uring's poll requests share these bit values.
constexpr Events from_poll(unsigned revents) {
    Events e = Events::none;
    if (revents & (POLLIN | POLLPRI)) e |= Events::read;
    if (revents & POLLOUT) e |= Events::write;
    if (revents & POLLERR) e |= Events::error;
    if (revents & (POLLHUP | POLLRDHUP)) e |= Events::hangup;
    return e;
}

// One factory per backend. The registry (registry.cpp) lists them in
// preference order; adding a backend is one file and one line there.
std::unique_ptr<Selector> make_select_selector();
std::unique_ptr<Selector> make_poll_selector();
std::unique_ptr<Selector> make_epoll_selector();
#ifdef EVMUX_HAVE_IO_URING
std::unique_ptr<Selector> make_io_uring_selector();
/// Empty when io_uring works here, else why not (e.g. "io_uring_setup: Operation not permitted").
std::string io_uring_unusable_reason();
#endif
#ifdef EVMUX_HAVE_LIBEVENT
std::unique_ptr<Selector> make_libevent_selector();
/// Empty when libevent has a method evmux takes here, else why not.
std::string libevent_unusable_reason();
/// The method libevent picks here, e.g. "epoll".
std::string libevent_method();
#endif

}  // namespace evmux::detail
