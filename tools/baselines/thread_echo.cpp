// evmux-baseline-threads: one thread per connection, blocking reads and
// writes. The classic alternative to an event loop, here to show where it wins
// (few busy connections) and where it loses (many, or many idle ones).
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/signalfd.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <unordered_set>

#include "baseline_common.hpp"

namespace {

constexpr const char* name = "evmux-baseline-threads";
/// Enough for the 64 KiB buffer and the calls below; small, so that thousands
/// of connection threads do not reserve gigabytes of address space.
constexpr std::size_t stack_size = 256 * 1024;

/// The open connections, so that shutdown can wake their blocked threads.
/// Shared by all threads; every member under `mutex`.
struct Registry {
    std::mutex mutex;
    std::condition_variable all_gone;
    std::unordered_set<int> fds;
};
Registry registry;

/// Writes all of buf; false if the connection failed.
bool write_all(int fd, const char* buf, std::size_t n) {
    while (n > 0) {
        const ssize_t w = ::write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return false;
        }
        buf += w;
        n -= static_cast<std::size_t>(w);
    }
    return true;
}

/// The connection thread: echo until EOF or error, then close and deregister.
void* serve(void* arg) {
    const int fd = static_cast<int>(reinterpret_cast<std::intptr_t>(arg));
    char buf[64 * 1024];
    while (true) {
        const ssize_t r = ::read(fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0 || !write_all(fd, buf, static_cast<std::size_t>(r))) break;
    }
    std::lock_guard lock(registry.mutex);
    registry.fds.erase(fd);
    ::close(fd);  // under the lock: shutdown() below never sees a reused fd
    if (registry.fds.empty()) registry.all_gone.notify_all();
    return nullptr;
}

}  // namespace

int main(int argc, char** argv) {
    using namespace evmux::baseline;
    const ServerOptions opt =
        start(name, "Thread-per-connection blocking echo server.", argc, argv);
    // Before any thread exists, so the signals are only ever read here.
    const int sigfd = stop_signal_fd(name, {SIGINT, SIGTERM}, 0);

    const int listen_fd = listen_on(name, opt, SOCK_NONBLOCK);
    pthread_attr_t attr;
    ::pthread_attr_init(&attr);
    ::pthread_attr_setstacksize(&attr, stack_size);
    ::pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    announce(name, opt, listen_fd);

    pollfd fds[2] = {{listen_fd, POLLIN, 0}, {sigfd, POLLIN, 0}};
    while (true) {
        if (::poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            die_errno(name, "poll");
        }
        if (fds[1].revents) break;
        if (!fds[0].revents) continue;
        // The connection socket is blocking (accept4 without SOCK_NONBLOCK).
        const int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
        if (c < 0) {
            // EMFILE and the like: back off instead of spinning on poll.
            if (errno == EMFILE || errno == ENFILE || errno == ENOMEM) ::usleep(10000);
            continue;
        }
        set_nodelay(c);
        std::lock_guard lock(registry.mutex);
        registry.fds.insert(c);
        pthread_t tid;
        if (::pthread_create(&tid, &attr, serve,
                             reinterpret_cast<void*>(static_cast<std::intptr_t>(c))) != 0) {
            registry.fds.erase(c);
            ::close(c);
        }
    }

    // Wake every connection thread (a blocked read returns 0) and wait for
    // them, so that the exit is clean; bounded in case one is stuck.
    ::close(listen_fd);
    std::unique_lock lock(registry.mutex);
    for (int fd : registry.fds) ::shutdown(fd, SHUT_RDWR);
    registry.all_gone.wait_for(lock, std::chrono::seconds(5), [] { return registry.fds.empty(); });
    ::pthread_attr_destroy(&attr);
    ::close(sigfd);
    return 0;
}
