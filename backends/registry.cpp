// The backend registry: every backend in preference order, one row each, a
// reference to the descriptor (backend.hpp) its file defines. Nothing here
// knows any backend by name: what a backend can do, whether it works here and
// what it says about itself are in its own file. Built explicitly, not by
// static self-registration: a static library's linker leaves out an object
// file nothing refers to, and with it the backend.
#include <cerrno>
#include <cstdlib>
#include <stdexcept>
#include <string_view>
#include <system_error>

#include "backend.hpp"

namespace evmux {
namespace detail {

// Each defined in NAME_selector.cpp or, for an optional backend this build
// leaves out, in the file backends/meson.build generates from
// not_compiled_in.cpp.in (listed here as not compiled in, with what would
// bring it).
extern const Backend epoll_backend, io_uring_backend, poll_backend, select_backend,
    libevent_backend;

}  // namespace detail

namespace {

// Preference order: the first usable one is the default (README's "Default
// order" says why epoll comes before io_uring), unless the backend with
// completion I/O is usable with it on (default_backend_name()).
const detail::Backend* const registry[] = {
    &detail::epoll_backend,     // epoll_selector.cpp
    &detail::io_uring_backend,  // io_uring_selector.cpp (optional: -Dio_uring)
    &detail::poll_backend,      // poll_selector.cpp
    &detail::select_backend,    // select_selector.cpp
    &detail::libevent_backend,  // libevent_selector.cpp (optional: -Dlibevent)
};

bool compiled_in(const detail::Backend& b) {
    return b.create != nullptr;
}

// Empty when `b` can be used here.
std::string unusable_reason(const detail::Backend& b) {
    return b.unusable ? b.unusable() : std::string();
}

std::string usable_names() {
    std::string names;
    for (const auto& b : backends()) {
        if (!b.usable) continue;
        if (!names.empty()) names += ", ";
        names += b.name;
    }
    return names;
}

}  // namespace

std::vector<BackendInfo> backends() {
    std::vector<BackendInfo> out;
    for (const detail::Backend* b : registry) {
        BackendInfo info{b->name, compiled_in(*b), false, unusable_reason(*b), false};
        info.usable = info.compiled_in && info.reason.empty();
        if (info.usable && b->details) info.reason = b->details();
        info.completion = info.usable && b->completion && b->completion();
        out.push_back(std::move(info));
    }
    return out;
}

std::unique_ptr<Selector> make_selector(std::string_view name) {
    for (const detail::Backend* b : registry) {
        if (name != b->name) continue;
        std::string why = unusable_reason(*b);
        if (compiled_in(*b) && !why.empty()) {
            // The probe fails for want of fds or memory too (EMFILE, ENFILE,
            // ENOMEM): then the backend is usable and this process is short,
            // which making it says as the system_error it is, rather than
            // "not usable here" and a list that depends on the fds left.
            try {
                return b->create();
            } catch (const std::system_error& e) {
                const int err = e.code().value();
                if (e.code().category() == std::generic_category() &&
                    (err == EMFILE || err == ENFILE || err == ENOMEM))
                    throw;
            }
        }
        if (!compiled_in(*b) || !why.empty())
            throw std::invalid_argument("evmux: backend '" + std::string(name) +
                                        "' is not usable here: " + why +
                                        "; usable backends: " + usable_names());
        return b->create();
    }
    throw std::invalid_argument("evmux: unknown backend '" + std::string(name) +
                                "'; usable backends: " + usable_names());
}

std::string default_backend_name() {
    const char* env = std::getenv("EVMUX_BACKEND");
    if (env && *env) return env;
    // Completion I/O, the default I/O mode (EVMUX_IO unset, or "completion"),
    // and no backend named: the one that has it, if usable here. Unless the
    // mode was named, only with its completion I/O on: without it, its
    // readiness is no gain over the first in the order.
    const char* io = std::getenv("EVMUX_IO");
    const std::string_view mode = io ? io : "";
    if (mode != "readiness")
        for (const detail::Backend* b : registry)
            if (b->completion && compiled_in(*b) && unusable_reason(*b).empty() &&
                (mode == "completion" || b->completion()))
                return b->name;
    for (const detail::Backend* b : registry)
        if (compiled_in(*b) && unusable_reason(*b).empty()) return b->name;
    return "select";
}

std::unique_ptr<Selector> make_selector() {
    return make_selector(default_backend_name());
}

}  // namespace evmux
