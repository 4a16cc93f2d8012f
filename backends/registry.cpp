// The backend registry: every backend in preference order, one row each, a
// reference to the descriptor (backend.hpp) its file defines. Nothing here
// knows any backend by name: what a backend can do, whether it works here and
// what it says about itself are in its own file. Built explicitly, not by
// static self-registration: a static library's linker leaves out an object
// file nothing refers to, and with it the backend.
#include <cstdlib>
#include <stdexcept>
#include <string_view>

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
// order" says why epoll comes before io_uring).
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
        BackendInfo info{b->name, compiled_in(*b), false, unusable_reason(*b)};
        info.usable = info.compiled_in && info.reason.empty();
        if (info.usable && b->details) info.reason = b->details();
        out.push_back(std::move(info));
    }
    return out;
}

std::unique_ptr<Selector> make_selector(std::string_view name) {
    for (const detail::Backend* b : registry) {
        if (name != b->name) continue;
        std::string why = unusable_reason(*b);
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
    // Completion I/O asked for (EVMUX_IO) and no backend named: the one that
    // has it, if usable here.
    const char* io = std::getenv("EVMUX_IO");
    if (io && std::string_view(io) == "completion")
        for (const detail::Backend* b : registry)
            if (std::string_view(b->name) == "io_uring" && compiled_in(*b) &&
                unusable_reason(*b).empty())
                return b->name;
    for (const detail::Backend* b : registry)
        if (compiled_in(*b) && unusable_reason(*b).empty()) return b->name;
    return "select";
}

std::unique_ptr<Selector> make_selector() {
    return make_selector(default_backend_name());
}

}  // namespace evmux
