// Internal (not installed): the head of a DNS answer (RFC 1035 section 4.1),
// read without c-ares, and DNS over TCP cut into messages. The Resolver
// reads what c-ares receives with them to learn what c-ares before 1.20 does
// not say: that a server answered SERVFAIL, NOTIMP or REFUSED
// (src/resolver.cpp, ResolverState::heard()).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "evmux/buffer.hpp"

namespace evmux::detail {

/// RFC 1035's RCODEs that c-ares takes as "try the next server".
inline constexpr unsigned dns_rcode_servfail = 2;
inline constexpr unsigned dns_rcode_notimp = 4;
inline constexpr unsigned dns_rcode_refused = 5;

/// What a DNS answer says of its question.
struct DnsAnswerHead {
    std::uint16_t id = 0;
    unsigned rcode = 0;      ///< the header's RCODE (0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN...)
    bool truncated = false;  ///< TC: a UDP answer cut short (the client asks again over TCP)
    std::string name;        ///< the question's name: lower case, dotted, no final dot
};

/// The head of `message` if it is a response (QR set) to one question whose
/// name is plain labels (a question's name is never compressed: nothing
/// comes before it); nullopt for anything else (too short, a query, no or
/// several questions, a malformed name).
std::optional<DnsAnswerHead> read_dns_answer_head(std::string_view message);

/// `name` as read_dns_answer_head() gives names (lower case, no final dot),
/// to compare with them.
std::string dns_name_key(std::string_view name);

/// DNS over TCP (RFC 1035 section 4.2.2) cut into messages: each comes after
/// its length in 2 bytes, big-endian. Given the bytes as they arrive, in any
/// pieces (Buffer::take_frame() with a u16_be prefix). Keeps only the bytes of
/// the message not yet whole.
class DnsStreamCutter {
  public:
    /// Appends `bytes` and calls `each(std::string_view message)` for every
    /// message they complete, in order.
    template <class F>
    void feed(std::string_view bytes, F&& each) {
        pending_.append(bytes);
        while (auto message = pending_.take_frame(Prefix::u16_be, 65535)) each(*message);
    }

  private:
    Buffer pending_;  // the bytes of a message not yet whole
};

}  // namespace evmux::detail
