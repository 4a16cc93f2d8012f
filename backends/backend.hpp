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
    // The usual results first: one comparison each instead of four tests.
    if (revents == POLLIN) return Events::read;
    if (revents == POLLOUT) return Events::write;
    Events e = Events::none;
    if (revents & (POLLIN | POLLPRI)) e |= Events::read;
    if (revents & POLLOUT) e |= Events::write;
    if (revents & POLLERR) e |= Events::error;
    if (revents & (POLLHUP | POLLRDHUP)) e |= Events::hangup;
    return e;
}

/// One selector backend as the registry sees it. Each backend's file defines
/// one, `extern const Backend NAME_backend{...}`, and registry.cpp lists them
/// in preference order. For an optional backend a build leaves out,
/// backends/meson.build generates the descriptor from not_compiled_in.cpp.in.
struct Backend {
    /// What make_selector(), EVMUX_BACKEND and --backend take: "epoll", ...
    const char* name;
    /// Creates the selector. Null: not compiled in.
    std::unique_ptr<Selector> (*create)();
    /// Empty when the backend works here, else why not (e.g. "io_uring_setup:
    /// Operation not permitted"). Asked by every backends() and make_selector().
    /// Null: usable wherever it is compiled in.
    std::string (*unusable)() = nullptr;
    /// For a usable backend, what BackendInfo::reason says about it (libevent:
    /// "method epoll"). Null: nothing.
    std::string (*details)() = nullptr;
    /// For a usable backend: whether its completion I/O is on here (every
    /// piece its probe looks for). Null: the backend has none.
    bool (*completion)() = nullptr;
};

}  // namespace evmux::detail
