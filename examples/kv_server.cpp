// A key-value server speaking length-prefixed frames: every request and every
// reply is a frame, a 4-byte big-endian length and that many bytes
// (evmux::Prefix::u32_be), so keys and values may hold any byte, newlines and
// NULs included. Requests are cut with Buffer::take_frame() and replies built
// with evmux::frame(); a frame over max_frame is refused at its prefix (the
// server does not wait for the bytes) and that client disconnected.
//
//   request               reply
//   "set KEY VALUE"       "ok"
//   "get KEY"             "value VALUE", or "none"
//   "del KEY"             "ok", or "none"
//   anything else         "error: ..."
//
// Usage:
//   kv_server [--port N] [--backend NAME]   serve on 127.0.0.1:N until SIGINT/SIGTERM
//   kv_server --self-test [--backend NAME]  two clients on a free port: one pipelining
//                                           2 001 requests, one sending an oversize
//                                           frame; exit 0 if every reply is right
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "evmux/evmux.hpp"
#include "example_args.hpp"

namespace {

using namespace std::chrono_literals;

/// Largest request accepted.
constexpr std::size_t max_frame = 1 << 20;

/// The store, and the server's callbacks over it.
class KvStore {
  public:
    evmux::Callbacks callbacks() {
        evmux::Callbacks cb;
        cb.on_message = [this](const evmux::ConnectionPtr& c, evmux::Buffer& in) {
            std::string replies;  // every reply to this batch, sent at once
            try {
                while (auto request = in.take_frame(evmux::Prefix::u32_be, max_frame))
                    evmux::append_frame(replies, evmux::Prefix::u32_be, handle(*request));
            } catch (const evmux::FrameError& e) {
                // The client broke the framing: say why, then hang up (after
                // the replies to its earlier requests).
                evmux::append_frame(replies, evmux::Prefix::u32_be,
                                    std::string("error: ") + e.what());
                c->send(std::move(replies));
                c->close(evmux::CloseMode::graceful);
                return;
            }
            if (!replies.empty()) c->send(std::move(replies));
        };
        return cb;
    }

  private:
    std::string handle(std::string_view request) {
        const std::size_t space = request.find(' ');
        const std::string_view verb = request.substr(0, space);
        const std::string_view rest =
            space == std::string_view::npos ? std::string_view() : request.substr(space + 1);
        if (verb == "set") {
            const std::size_t split = rest.find(' ');
            if (split == std::string_view::npos) return "error: set KEY VALUE";
            data_[std::string(rest.substr(0, split))] = rest.substr(split + 1);
            return "ok";
        }
        if (verb == "get") {
            auto it = data_.find(rest);
            return it == data_.end() ? "none" : "value " + it->second;
        }
        if (verb == "del") return data_.erase(std::string(rest)) ? "ok" : "none";
        return "error: unknown request '" + std::string(verb) + "'";
    }

    std::map<std::string, std::string, std::less<>> data_;
};

/// `pipelined` sends 1000 sets, 1000 gets and an empty request in one go and
/// checks all 2 001 replies; `oversize` announces a frame over max_frame and
/// must be refused and disconnected at once; then `pipelined` is still served.
int self_test(evmux::EventLoop& loop, const evmux::TcpServer& server) {
    constexpr int keys = 1000;
    // Values with a newline and a NUL in them: frames do not care.
    auto value = [](int i) {
        std::string v = "v";  // appended: GCC 12 warns falsely (-Wrestrict) on "v" + ... at -O3
        return v + std::to_string(i) + std::string("\n\0!", 3);
    };
    std::vector<std::string> want;
    std::string batch;
    for (int i = 0; i < keys; ++i) {
        evmux::append_frame(batch, evmux::Prefix::u32_be,
                            "set k" + std::to_string(i) + " " + value(i));
        want.push_back("ok");
    }
    for (int i = 0; i < keys; ++i) {
        evmux::append_frame(batch, evmux::Prefix::u32_be, "get k" + std::to_string(i));
        want.push_back("value " + value(i));
    }
    evmux::append_frame(batch, evmux::Prefix::u32_be, "");
    want.push_back("error: unknown request ''");

    std::vector<std::string> got, oversize_got;
    bool oversize_closed = false, after_ok = false;
    evmux::ConnectionPtr pipelined;
    auto read_frames = [](std::vector<std::string>& into) {
        return [&into](const evmux::ConnectionPtr&, evmux::Buffer& in) {
            while (auto reply = in.take_frame(evmux::Prefix::u32_be, max_frame))
                into.emplace_back(*reply);
        };
    };
    evmux::Callbacks oversize;
    oversize.on_connect = [](const evmux::ConnectionPtr& c) {
        c->send(std::string("\x00\x20\x00\x00", 4));  // announces 2 MiB, sends nothing more
    };
    oversize.on_message = read_frames(oversize_got);
    oversize.on_close = [&](const evmux::ConnectionPtr&, evmux::CloseReason why, int) {
        oversize_closed = why == evmux::CloseReason::peer_closed;
        // The other client is still served.
        pipelined->send(evmux::frame(evmux::Prefix::u32_be, "get k7"));
    };
    evmux::Callbacks client;
    client.on_connect = [&](const evmux::ConnectionPtr& c) {
        pipelined = c;
        c->send(std::move(batch));
    };
    client.on_message = [&, collect = read_frames(got)](const evmux::ConnectionPtr& c,
                                                        evmux::Buffer& in) {
        collect(c, in);
        if (got.size() == want.size()) evmux::connect(loop, server.local_address(), oversize);
        if (got.size() == want.size() + 1) {
            after_ok = got.back() == "value " + value(7);
            loop.stop();
        }
    };
    evmux::connect(loop, server.local_address(), client);
    loop.call_after(20s, [&] { loop.stop(); });  // bound the test
    loop.run();

    const std::string refusal =
        "error: evmux: frame of 2097152 bytes over the limit of 1048576 (u32_be length prefix)";
    const bool replies_ok =
        got.size() == want.size() + 1 && std::equal(want.begin(), want.end(), got.begin());
    const bool refused = oversize_closed && oversize_got == std::vector<std::string>{refusal};
    const bool ok = replies_ok && refused && after_ok;
    std::printf(
        "kv_server self-test: %zu/%zu replies %s, oversize frame %s, served after: %s: %s\n",
        got.size(), want.size() + 1, replies_ok ? "right" : "WRONG",
        refused ? "refused" : "NOT REFUSED", after_ok ? "yes" : "NO", ok ? "OK" : "FAILED");
    if (pipelined) pipelined->close();
    loop.run_once(0ms);
    return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
    example::Args args;
    const example::Spec spec{"kv_server",
                             "usage: kv_server [--port N] [--backend NAME] [--self-test] "
                             "[--version]\n"};
    if (const auto status = example::parse_args(spec, argc, argv, args)) return *status;
    try {
        evmux::EventLoop loop(example::make_selector(args));
        KvStore store;
        auto address = evmux::Address::ip(
            "127.0.0.1", args.self_test ? 0 : static_cast<std::uint16_t>(args.number));
        evmux::TcpServer server(loop, address, store.callbacks());
        std::printf("kv_server: %s, backend %s\n", server.local_address().to_string().c_str(),
                    loop.backend_name().c_str());
        if (args.self_test) return self_test(loop, server);

        loop.on_signal(SIGINT, [&](int) { loop.stop(); });
        loop.on_signal(SIGTERM, [&](int) { loop.stop(); });
        loop.run();
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "kv_server: %s\n", e.what());
        return 1;
    }
}
