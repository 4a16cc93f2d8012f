// evmux-baseline-libevent: the textbook libevent echo server, the best-known
// peer evmux is compared with. evconnlistener accepts, each connection is a
// bufferevent whose read callback moves its whole input buffer to its output
// buffer (evbuffer_add_buffer: no copy of the bytes). Nothing tuned beyond
// what the documentation shows, plus TCP_NODELAY, which every server in the
// comparison sets.
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <signal.h>

#include <unordered_set>

#include "baseline_common.hpp"

namespace {

constexpr const char* name = "evmux-baseline-libevent";

/// Everything the callbacks share. Owned by main; single-threaded.
struct Server {
    event_base* base = nullptr;
    /// Open connections, freed at exit so that a leak checker sees none.
    std::unordered_set<bufferevent*> conns;
};

void on_read(bufferevent* bev, void*) {
    evbuffer_add_buffer(bufferevent_get_output(bev), bufferevent_get_input(bev));
}

void on_event(bufferevent* bev, short what, void* arg) {
    if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)) {
        static_cast<Server*>(arg)->conns.erase(bev);
        bufferevent_free(bev);  // BEV_OPT_CLOSE_ON_FREE: closes the socket too
    }
}

void on_accept(evconnlistener*, evutil_socket_t fd, sockaddr*, int, void* arg) {
    auto* server = static_cast<Server*>(arg);
    evmux::baseline::set_nodelay(fd);
    bufferevent* bev = bufferevent_socket_new(server->base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (!bev) {
        evutil_closesocket(fd);
        return;
    }
    server->conns.insert(bev);
    bufferevent_setcb(bev, on_read, nullptr, on_event, server);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
}

void on_signal(evutil_socket_t, short, void* arg) {
    event_base_loopbreak(static_cast<event_base*>(arg));
}

}  // namespace

int main(int argc, char** argv) {
    using namespace evmux::baseline;
    const ServerOptions opt = start(name, "Textbook libevent bufferevent echo server.", argc, argv);

    Server server;
    server.base = event_base_new();
    if (!server.base) {
        std::fprintf(stderr, "%s: event_base_new failed\n", name);
        return 1;
    }
    // The socket is made here (same options and backlog as the other
    // baselines; backlog 0: it already listens); the listener takes it over
    // and closes it when freed.
    const int listen_fd = listen_on(name, opt, SOCK_NONBLOCK);
    evconnlistener* listener = evconnlistener_new(
        server.base, on_accept, &server, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE, 0, listen_fd);
    if (!listener) die_errno(name, "evconnlistener_new");
    event* sigint = evsignal_new(server.base, SIGINT, on_signal, server.base);
    event* sigterm = evsignal_new(server.base, SIGTERM, on_signal, server.base);
    if (!sigint || !sigterm || event_add(sigint, nullptr) < 0 || event_add(sigterm, nullptr) < 0) {
        std::fprintf(stderr, "%s: cannot install signal events\n", name);
        return 1;
    }
    announce(name, opt, listen_fd);

    const int rc = event_base_dispatch(server.base);

    for (bufferevent* bev : server.conns) bufferevent_free(bev);
    server.conns.clear();
    evconnlistener_free(listener);
    event_free(sigint);
    event_free(sigterm);
    event_base_free(server.base);
    return rc < 0 ? 1 : 0;
}
