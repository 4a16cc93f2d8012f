#include "dns_answer.hpp"

#include <cctype>

namespace evmux::detail {

namespace {

std::uint16_t u16(std::string_view s, std::size_t at) {
    return static_cast<std::uint16_t>(static_cast<unsigned char>(s[at]) << 8 |
                                      static_cast<unsigned char>(s[at + 1]));
}

char lower(char c) {
    return static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
}

}  // namespace

std::optional<DnsAnswerHead> read_dns_answer_head(std::string_view message) {
    constexpr std::size_t header_size = 12;
    if (message.size() < header_size) return std::nullopt;
    const std::uint16_t flags = u16(message, 2);
    if ((flags & 0x8000u) == 0 || u16(message, 4) != 1)
        return std::nullopt;  // a query; not 1 question
    DnsAnswerHead head;
    head.id = u16(message, 0);
    head.truncated = (flags & 0x0200u) != 0;
    head.rcode = flags & 0x000fu;
    std::size_t at = header_size;
    for (;;) {
        if (at >= message.size()) return std::nullopt;
        const auto length = static_cast<unsigned char>(message[at++]);
        if (length == 0) break;
        if (length > 63 || message.size() - at < length)
            return std::nullopt;  // a pointer; cut short
        if (!head.name.empty()) head.name += '.';
        for (char c : message.substr(at, length)) head.name += lower(c);
        at += length;
    }
    if (message.size() - at < 4) return std::nullopt;  // no type and class
    return head;
}

std::string dns_name_key(std::string_view name) {
    if (name.ends_with('.')) name.remove_suffix(1);
    std::string key;
    key.reserve(name.size());
    for (char c : name) key += lower(c);
    return key;
}

}  // namespace evmux::detail
