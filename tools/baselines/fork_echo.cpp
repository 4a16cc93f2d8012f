// evmux-baseline-fork: one process per connection, blocking I/O: the oldest
// Unix server design (inetd), for comparison.
//
// The parent reaps every child as soon as it exits (SIGCHLD), so the
// children's CPU time accumulates in the parent's cutime/cstime
// (/proc/PID/stat fields 16 and 17) where a measuring tool reads it. On
// SIGINT/SIGTERM the parent terminates and reaps all children before it exits.
#include <poll.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/wait.h>

#include <chrono>
#include <unordered_set>

#include "baseline_common.hpp"

namespace {

constexpr const char* name = "evmux-baseline-fork";

/// The child: echo until EOF or error, then exit without running the parent's
/// atexit handlers or flushing its stdio (it owns neither).
[[noreturn]] void serve(int fd) {
    static char buf[64 * 1024];
    while (true) {
        const ssize_t r = ::read(fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        for (ssize_t off = 0; off < r;) {
            const ssize_t w = ::write(fd, buf + off, static_cast<std::size_t>(r - off));
            if (w < 0 && errno == EINTR) continue;
            if (w < 0) ::_exit(0);  // the peer went away: a normal end
            off += w;
        }
    }
    ::_exit(0);
}

/// Reaps every child that has exited; forgets its pid.
void reap(std::unordered_set<pid_t>& children) {
    while (true) {
        const pid_t pid = ::waitpid(-1, nullptr, WNOHANG);
        if (pid <= 0) return;
        children.erase(pid);
    }
}

}  // namespace

int main(int argc, char** argv) {
    using namespace evmux::baseline;
    const ServerOptions opt =
        start(name, "Process-per-connection blocking echo server.", argc, argv);
    sigset_t old_mask;
    const int sigfd = stop_signal_fd(name, {SIGINT, SIGTERM, SIGCHLD}, SFD_NONBLOCK, &old_mask);

    const int listen_fd = listen_on(name, opt, SOCK_NONBLOCK);
    announce(name, opt, listen_fd);

    std::unordered_set<pid_t> children;
    bool stop = false;
    pollfd fds[2] = {{listen_fd, POLLIN, 0}, {sigfd, POLLIN, 0}};
    while (!stop) {
        if (::poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            die_errno(name, "poll");
        }
        if (fds[1].revents) {
            signalfd_siginfo si;
            while (::read(sigfd, &si, sizeof si) == static_cast<ssize_t>(sizeof si))
                if (si.ssi_signo != SIGCHLD) stop = true;
            reap(children);  // SIGCHLDs coalesce: reap whatever has exited
        }
        if (stop || !fds[0].revents) continue;
        const int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);  // blocking socket
        if (c < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOMEM) ::usleep(10000);
            continue;
        }
        set_nodelay(c);
        const pid_t pid = ::fork();
        if (pid == 0) {
            ::close(listen_fd);
            ::close(sigfd);
            // Default dispositions and an open mask: SIGTERM from the parent
            // ends the child at once.
            ::signal(SIGCHLD, SIG_DFL);
            ::sigprocmask(SIG_SETMASK, &old_mask, nullptr);
            serve(c);
        }
        if (pid > 0) children.insert(pid);
        ::close(c);  // the child has its own copy (or the fork failed: drop it)
    }

    // Terminate and reap every child, so that none outlives us and all their
    // CPU time is accounted to us; SIGKILL whatever ignores SIGTERM for 5 s.
    ::close(listen_fd);
    for (pid_t pid : children) ::kill(pid, SIGTERM);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (!children.empty()) {
        reap(children);
        if (children.empty()) break;
        if (std::chrono::steady_clock::now() >= deadline) {
            for (pid_t pid : children) ::kill(pid, SIGKILL);
            while (::waitpid(-1, nullptr, 0) > 0) {
            }
            children.clear();
            break;
        }
        pollfd sig{sigfd, POLLIN, 0};
        ::poll(&sig, 1, 50);
        signalfd_siginfo si;
        while (::read(sigfd, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
        }
    }
    ::close(sigfd);
    return 0;
}
