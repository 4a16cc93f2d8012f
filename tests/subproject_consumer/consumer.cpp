// A user's program: sees only the public headers, and checks that evmux works
// through them on every usable backend. Exit 0 on success.
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>

#include "evmux/evmux.hpp"

int main() {
    using namespace std::chrono_literals;
    if (std::strcmp(evmux::version(), EVMUX_VERSION_STRING) != 0) {
        std::fprintf(stderr, "library %s, headers %s\n", evmux::version(), EVMUX_VERSION_STRING);
        return 1;
    }
    int checked = 0;
    for (const evmux::BackendInfo& b : evmux::backends()) {
        if (!b.usable) continue;
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) < 0) return 1;
        auto sel = evmux::make_selector(b.name);
        sel->add(sv[0], evmux::Events::read);
        const bool idle = sel->select(0ms).empty();
        const bool sent = ::write(sv[1], "x", 1) == 1;
        auto ready = sel->select(2s);
        const bool ok = idle && sent && ready.size() == 1 && ready[0].key.fd == sv[0] &&
                        ready[0].events == evmux::Events::read;
        ::close(sv[0]);
        ::close(sv[1]);
        std::printf("%-10s %s\n", b.name.c_str(), ok ? "ok" : "FAILED");
        if (!ok) return 1;
        ++checked;
    }
    std::printf("evmux %s: %d backends ok\n", evmux::version(), checked);
    return checked > 0 ? 0 : 1;
}
