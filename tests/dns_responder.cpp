#include "dns_responder.hpp"

#include <arpa/inet.h>

#include <cctype>
#include <cstdint>
#include <future>
#include <stdexcept>
#include <system_error>
#include <utility>

#include "evmux/buffer.hpp"
#include "evmux/connection.hpp"
#include "evmux/datagram.hpp"
#include "evmux/server.hpp"

namespace evmux::test {

namespace {

constexpr std::uint16_t type_a = 1;
constexpr std::uint16_t type_aaaa = 28;
constexpr std::uint16_t class_in = 1;

struct Question {
    std::uint16_t id = 0;
    std::uint16_t flags = 0;
    std::string name;  // lower case, dotted, no trailing dot
    std::uint16_t type = 0;
    std::uint16_t klass = 0;
    std::size_t end = 0;  // where the question section ends
};

std::uint16_t u16(std::string_view s, std::size_t at) {
    return static_cast<std::uint16_t>(static_cast<unsigned char>(s[at]) << 8 |
                                      static_cast<unsigned char>(s[at + 1]));
}

void put16(std::string& out, unsigned v) {
    out += static_cast<char>(v >> 8 & 0xff);
    out += static_cast<char>(v & 0xff);
}

// A query with one question whose name is plain labels (no compression:
// a question's name is the first in the message).
std::optional<Question> parse(std::string_view msg) {
    if (msg.size() < 12) return std::nullopt;
    Question q;
    q.id = u16(msg, 0);
    q.flags = u16(msg, 2);
    if ((q.flags & 0x8000) != 0 || u16(msg, 4) != 1)
        return std::nullopt;  // a response; not 1 question
    std::size_t p = 12;
    for (;;) {
        if (p >= msg.size()) return std::nullopt;
        const auto len = static_cast<unsigned char>(msg[p++]);
        if (len == 0) break;
        if (len > 63 || p + len > msg.size()) return std::nullopt;
        if (!q.name.empty()) q.name += '.';
        for (std::size_t i = 0; i < len; ++i)
            q.name += static_cast<char>(std::tolower(static_cast<unsigned char>(msg[p + i])));
        p += len;
    }
    if (p + 4 > msg.size()) return std::nullopt;
    q.type = u16(msg, p);
    q.klass = u16(msg, p + 2);
    q.end = p + 4;
    return q;
}

std::string lower(std::string s) {
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
}

}  // namespace

std::optional<std::string> dns_reply(std::string_view question,
                                     const std::map<std::string, DnsRecords>& table,
                                     bool over_udp) {
    const std::optional<Question> q = parse(question);
    if (!q) return std::nullopt;
    const unsigned opcode = q->flags >> 11 & 0xf;
    unsigned rcode = 0;
    bool truncated = false;
    std::vector<std::string> answers;  // RDATA of each record
    auto found = table.find(q->name);
    if (found != table.end() && found->second.never_answer) return std::nullopt;
    if (opcode != 0 || q->klass != class_in) {
        rcode = 4;  // NOTIMP
    } else if (found == table.end()) {
        rcode = 3;  // NXDOMAIN
    } else if (over_udp && found->second.truncated_over_udp) {
        truncated = true;  // no records: ask again over TCP
    } else if (found->second.rcode != 0) {
        rcode = found->second.rcode & 0xf;
    } else if (q->type == type_a || q->type == type_aaaa) {
        const bool v4 = q->type == type_a;
        for (const std::string& text : v4 ? found->second.a : found->second.aaaa) {
            unsigned char raw[16];
            if (::inet_pton(v4 ? AF_INET : AF_INET6, text.c_str(), raw) != 1)
                throw std::invalid_argument("DnsResponder: bad address " + text);
            answers.emplace_back(reinterpret_cast<const char*>(raw), v4 ? 4 : 16);
        }
    }
    std::string out;
    put16(out, q->id);
    // QR, the opcode, AA, TC, RD as asked, RA, the rcode.
    put16(out, 0x8000u | opcode << 11 | 0x0400u | (truncated ? 0x0200u : 0u) |
                   (q->flags & 0x0100u) | 0x0080u | rcode);
    put16(out, 1);
    put16(out, static_cast<unsigned>(answers.size()));
    put16(out, 0);
    put16(out, 0);
    out.append(question.substr(12, q->end - 12));
    for (const std::string& rdata : answers) {
        put16(out, 0xc00c);  // the name: a pointer to the question's
        put16(out, q->type);
        put16(out, class_in);
        put16(out, 0);
        put16(out, 60);  // TTL
        put16(out, static_cast<unsigned>(rdata.size()));
        out += rdata;
    }
    return out;
}

std::string dns_question_text(std::string_view question) {
    const std::optional<Question> q = parse(question);
    if (!q) return {};
    if (q->type == type_a) return "A " + q->name;
    if (q->type == type_aaaa) return "AAAA " + q->name;
    return "TYPE " + std::to_string(q->type) + " " + q->name;
}

DnsResponder::DnsResponder(std::map<std::string, DnsRecords> table) {
    for (auto& [name, records] : table) table_.emplace(lower(name), std::move(records));
    auto bound = std::make_shared<std::promise<Address>>();
    std::future<Address> address = bound->get_future();
    thread_ = std::thread([this, bound] { serve(bound); });
    try {
        address_ = address.get();
    } catch (...) {
        thread_.join();
        throw;
    }
}

DnsResponder::~DnsResponder() {
    loop_->stop();
    thread_.join();
}

void DnsResponder::set(const std::string& name, DnsRecords records) {
    std::lock_guard lock(mutex_);
    table_[lower(name)] = std::move(records);
}

std::vector<std::string> DnsResponder::asked() const {
    std::lock_guard lock(mutex_);
    return asked_;
}

std::optional<std::string> DnsResponder::answer(std::string_view question, bool over_udp) {
    ++questions_;
    if (!over_udp) ++tcp_questions_;
    std::lock_guard lock(mutex_);
    asked_.push_back(dns_question_text(question));
    if (silent_.load()) return std::nullopt;
    return dns_reply(question, table_, over_udp);
}

void DnsResponder::serve(std::shared_ptr<std::promise<Address>> bound) {
    UdpEndpointPtr endpoint;
    std::unique_ptr<TcpServer> tcp;
    std::unique_ptr<EventLoop> loop;
    try {
        loop = std::make_unique<EventLoop>();
        UdpCallbacks udp;
        udp.on_datagram = [this](UdpEndpoint& ep, std::string_view data, const Address& from) {
            if (std::optional<std::string> reply = answer(data, true)) ep.send_to(from, *reply);
        };
        Callbacks stream;
        stream.on_message = [this](const ConnectionPtr& c, Buffer& in) {
            while (std::optional<std::string_view> question = in.take_frame(Prefix::u16_be, 65535))
                if (std::optional<std::string> reply = answer(*question, false)) {
                    std::string framed;
                    put16(framed, static_cast<unsigned>(reply->size()));
                    c->send(framed + *reply);
                }
        };
        // UDP on a free port, then TCP on the same one (taken by someone
        // else now and then: then another port).
        for (int attempt = 1;; ++attempt) {
            endpoint = UdpEndpoint::bind(*loop, Address::parse("127.0.0.1:0"), udp);
            try {
                tcp = std::make_unique<TcpServer>(*loop, endpoint->local_address(), stream);
                break;
            } catch (const std::system_error&) {
                endpoint->close();
                if (attempt == 20) throw;
            }
        }
        loop_ = loop.get();
        bound->set_value(endpoint->local_address());
    } catch (...) {
        bound->set_exception(std::current_exception());
        return;
    }
    loop->run();
    tcp.reset();
    endpoint->close();
}

}  // namespace evmux::test
