// The backend registry: every backend in preference order, with a probe that
// says whether it works here. Built explicitly (no static self-registration,
// which a static library's linker may drop).
#include <sys/epoll.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "backend.hpp"

namespace evmux {
namespace {

struct Entry {
    const char* name;
    bool compiled_in;
    std::string (*unusable)();  // empty string: usable
    std::unique_ptr<Selector> (*create)();
};

std::string always_usable() { return {}; }

std::string epoll_unusable() {
    int fd = ::epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0) return std::string("epoll_create1: ") + std::strerror(errno);
    ::close(fd);
    return {};
}

// Unused when every optional backend is compiled in.
[[maybe_unused]] std::string not_compiled(const char* option, const char* package) {
    return std::string("not compiled in (needs ") + package + "; meson -D" + option + "=enabled)";
}

// Preference order: the first usable one is the default.
const Entry registry[] = {
    {"epoll", true, epoll_unusable, detail::make_epoll_selector},
#ifdef EVMUX_HAVE_IO_URING
    {"io_uring", true, detail::io_uring_unusable_reason, detail::make_io_uring_selector},
#else
    {"io_uring", false, [] { return not_compiled("io_uring", "liburing-dev"); }, nullptr},
#endif
    {"poll", true, always_usable, detail::make_poll_selector},
    {"select", true, always_usable, detail::make_select_selector},
#ifdef EVMUX_HAVE_LIBEVENT
    {"libevent", true, detail::libevent_unusable_reason, detail::make_libevent_selector},
#else
    {"libevent", false, [] { return not_compiled("libevent", "libevent-dev"); }, nullptr},
#endif
};

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
    for (const Entry& e : registry) {
        BackendInfo info{e.name, e.compiled_in, false, e.unusable()};
        info.usable = e.compiled_in && info.reason.empty();
#ifdef EVMUX_HAVE_LIBEVENT
        if (info.usable && info.name == "libevent") info.reason = "method " + detail::libevent_method();
#endif
        out.push_back(std::move(info));
    }
    return out;
}

std::unique_ptr<Selector> make_selector(std::string_view name) {
    for (const Entry& e : registry) {
        if (name != e.name) continue;
        std::string why = e.unusable();
        if (!e.compiled_in || !why.empty())
            throw std::invalid_argument("evmux: backend '" + std::string(name) +
                                        "' is not usable here: " + why +
                                        "; usable backends: " + usable_names());
        return e.create();
    }
    throw std::invalid_argument("evmux: unknown backend '" + std::string(name) +
                                "'; usable backends: " + usable_names());
}

std::string default_backend_name() {
    const char* env = std::getenv("EVMUX_BACKEND");
    if (env && *env) return env;
    for (const Entry& e : registry)
        if (e.compiled_in && e.unusable().empty()) return e.name;
    return "select";
}

std::unique_ptr<Selector> make_selector() { return make_selector(default_backend_name()); }

}  // namespace evmux
