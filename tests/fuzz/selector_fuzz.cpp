// Fuzz target: random add / modify / remove / close / dup / write / read /
// peer-close sequences on real socketpairs, run on every usable backend and
// checked against a model of the key table after each step.
//
// The model is what the Selector contract promises:
//  - size() and get_key() agree with the fds registered and not yet removed;
//  - select(0) reports only registered fds, each once, with events that are
//    non-empty and within interest | error | hangup, and the key it carries is
//    the current one (same interest, data, generation);
//  - the only exceptions are the documented ones, when the model says so:
//    invalid_argument (bad interest), logic_error (already registered),
//    out_of_range (not registered), system_error (the kernel refused, which
//    may only happen for an fd that was closed behind the selector's back).
//
// Built as a libFuzzer target with -Dfuzz=enabled (clang), and otherwise as a
// replay program that runs the stored corpus as a regression test.
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <stdexcept>
#include <system_error>
#include <vector>

#include "evmux/selector.hpp"
#include "fuzz_input.hpp"

using namespace evmux;
using namespace std::chrono_literals;

namespace {

using fuzz::Input;

[[noreturn]] void fail(const char* what, int fd = -1) {
    std::fprintf(stderr, "selector_fuzz: %s (fd %d)\n", what, fd);
    std::abort();
}

// Reads the input one byte at a time; zeros once it is used up.
constexpr int slots = 6;

// One socketpair: `mine` is what the selector watches, `peer` the other end.
// An fd of -1 is closed. `dups` are extra descriptors for `mine`'s file.
struct Slot {
    int mine = -1;
    int peer = -1;
    std::vector<int> dups;
};

struct ModelKey {
    Events interest;
    void* data;
    bool closed;  // closed (or dup-closed) behind the selector's back
};

class Run {
  public:
    explicit Run(Selector& sel) : sel_(sel) {}
    ~Run() {
        for (Slot& s : slots_) close_slot(s);
    }

    void step(Input& in) {
        std::uint8_t op = in.next();
        Slot& s = slots_[in.next() % slots];
        std::uint8_t arg = in.next();
        switch (op % 10) {
            case 0:
                open(s);
                break;
            case 1:
                add(s.mine, arg);
                break;
            case 2:
                modify(s.mine, arg);
                break;
            case 3:
                remove(s.mine);
                break;
            case 4:
                close_mine(s);
                break;
            case 5:
                dup_mine(s, arg);
                break;
            case 6:
                if (s.peer >= 0) (void)!::send(s.peer, "xx", 1 + arg % 2, MSG_NOSIGNAL);
                break;
            case 7:
                if (s.mine >= 0) drain(s.mine);
                break;
            case 8:
                if (s.peer >= 0) {
                    if (arg & 1) {
                        ::close(s.peer);
                        s.peer = -1;
                    } else {
                        ::shutdown(s.peer, SHUT_WR);
                    }
                }
                break;
            case 9:
                // Fill the socket so write interest stops firing, or make room.
                if (s.mine >= 0 && (arg & 1)) {
                    char buf[4096] = {};
                    for (int i = 0; i < 64 && ::send(s.mine, buf, sizeof buf, MSG_NOSIGNAL) > 0;
                         ++i) {
                    }
                } else if (s.peer >= 0) {
                    drain(s.peer);
                }
                break;
        }
        check();
    }

  private:
    static void drain(int fd) {
        char buf[4096];
        for (int i = 0; i < 64 && ::read(fd, buf, sizeof buf) > 0; ++i) {
        }
    }

    static Events interest_of(std::uint8_t arg) {
        // Mostly valid interests; sometimes none or stray bits (must throw).
        switch (arg % 8) {
            case 0:
                return Events::none;
            case 1:
                return Events::read | Events::error;
            default:
                return static_cast<Events>(1 + arg % 3);
        }
    }
    static bool valid(Events e) {
        return e != Events::none && !any(e, Events::error | Events::hangup);
    }

    void open(Slot& s) {
        close_slot(s);
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) return;
        s.mine = sv[0];
        s.peer = sv[1];
        // A new file may have taken the number of a closed, still-registered fd.
    }

    void close_slot(Slot& s) {
        if (s.mine >= 0) close_mine(s);
        for (int d : s.dups) close_fd(d);
        s.dups.clear();
        if (s.peer >= 0) ::close(s.peer);
        s.peer = -1;
    }

    void close_mine(Slot& s) {
        if (s.mine < 0) return;
        close_fd(s.mine);
        s.mine = -1;
    }

    // Close without telling the selector; a registration stays in its table.
    void close_fd(int fd) {
        if (auto it = model_.find(fd); it != model_.end()) it->second.closed = true;
        ::close(fd);
    }

    void dup_mine(Slot& s, std::uint8_t arg) {
        if (s.mine < 0 || s.dups.size() >= 2) return;
        int d = ::dup(s.mine);
        if (d < 0) return;
        s.dups.push_back(d);
        // Sometimes register the duplicate too: two keys, one file.
        if (arg & 1) add(d, arg >> 1);
    }

    void add(int fd, std::uint8_t arg) {
        if (fd < 0) return;
        Events interest = interest_of(arg);
        void* data = reinterpret_cast<void*>(static_cast<std::uintptr_t>(arg) + 1);
        auto it = model_.find(fd);
        try {
            const SelectorKey& key = sel_.add(fd, interest, data);
            if (!valid(interest) || it != model_.end())
                fail("add accepted what it must refuse", fd);
            if (key.fd != fd || key.interest != interest || key.data != data)
                fail("add returned a wrong key", fd);
            model_[fd] = ModelKey{interest, data, false};
        } catch (const std::invalid_argument&) {
            if (valid(interest)) fail("add: invalid_argument for a valid interest", fd);
        } catch (const std::out_of_range&) {
            fail("add: out_of_range", fd);
        } catch (const std::logic_error&) {
            if (!valid(interest) || it == model_.end()) fail("add: unexpected logic_error", fd);
        }
    }

    void modify(int fd, std::uint8_t arg) {
        if (fd < 0) return;
        Events interest = interest_of(arg);
        auto it = model_.find(fd);
        try {
            const SelectorKey& key = sel_.modify(fd, interest);
            if (it == model_.end() || !valid(interest)) fail("modify accepted a bad call", fd);
            if (key.interest != interest || key.data != it->second.data)
                fail("modify returned a wrong key", fd);
            it->second.interest = interest;
        } catch (const std::out_of_range&) {
            if (it != model_.end()) fail("modify: out_of_range for a registered fd", fd);
        } catch (const std::invalid_argument&) {
            if (it == model_.end() || valid(interest))
                fail("modify: unexpected invalid_argument", fd);
        } catch (const std::system_error&) {
            // epoll refuses MOD for a closed fd or a new file with its number.
            if (it == model_.end() || !it->second.closed) fail("modify: kernel refused", fd);
        }
    }

    void remove(int fd) {
        if (fd < 0) return;
        auto it = model_.find(fd);
        try {
            SelectorKey key = sel_.remove(fd);
            if (it == model_.end()) fail("remove of an unregistered fd succeeded", fd);
            if (key.fd != fd || key.interest != it->second.interest) fail("remove: wrong key", fd);
            model_.erase(it);
        } catch (const std::out_of_range&) {
            if (it != model_.end()) fail("remove: out_of_range for a registered fd", fd);
        }
    }

    void check() {
        if (sel_.size() != model_.size()) fail("size() differs from the model");
        for (const auto& [fd, m] : model_) {
            const SelectorKey* key = sel_.get_key(fd);
            if (!key || key->fd != fd || key->interest != m.interest || key->data != m.data)
                fail("get_key differs from the model", fd);
        }
        // Also probe a few fds that must not be registered.
        for (int fd = 0; fd < 64; ++fd)
            if (!model_.count(fd) && sel_.get_key(fd)) fail("get_key for an unregistered fd", fd);

        std::set<int> seen;
        for (const ReadyEvent& ev : sel_.select(0ns)) {
            int fd = ev.key.fd;
            auto it = model_.find(fd);
            if (it == model_.end()) fail("select reported an unregistered fd", fd);
            if (!seen.insert(fd).second) fail("select reported an fd twice", fd);
            if (ev.events == Events::none) fail("select reported no events", fd);
            if (any(ev.events, ~(it->second.interest | Events::error | Events::hangup)))
                fail("select reported events outside interest|error|hangup", fd);
            const SelectorKey* key = sel_.get_key(fd);
            if (ev.key.interest != key->interest || ev.key.data != key->data ||
                ev.key.generation != key->generation)
                fail("select reported a stale key", fd);
        }
    }

    Selector& sel_;
    std::array<Slot, slots> slots_;
    std::map<int, ModelKey> model_;
};

std::vector<std::string> usable_backends() {
    std::vector<std::string> names;
    for (const BackendInfo& b : backends())
        if (b.usable) names.push_back(b.name);
    return names;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static const std::vector<std::string> names = usable_backends();
    for (const std::string& name : names) {
        auto sel = make_selector(name);
        Input in{data, size};
        Run run(*sel);
        // Bounded: at most 200 steps of three bytes each.
        for (int i = 0; i < 200 && !in.done(); ++i) run.step(in);
    }
    return 0;
}
