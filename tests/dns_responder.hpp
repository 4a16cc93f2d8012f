// A small DNS server for the tests, on 127.0.0.1, built on evmux's own UDP
// endpoint (and a TcpServer on the same port, for DNS over TCP) and running
// its own EventLoop on its own thread (so a test may block on a lookup, e.g.
// a server resolving its name, while it answers). It answers A and AAAA
// questions from a table, NXDOMAIN for names not in it, a failure code
// (SERVFAIL, REFUSED...) for names told so, and can be told to answer
// nothing at all.
#pragma once

#include <atomic>
#include <cstddef>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "evmux/address.hpp"
#include "evmux/event_loop.hpp"

namespace evmux::test {

/// The addresses a name has.
struct DnsRecords {
    std::vector<std::string> a;     ///< IPv4 addresses, "127.0.0.1"
    std::vector<std::string> aaaa;  ///< IPv6 addresses, "::1"
    bool never_answer = false;      ///< questions for it are read and dropped
    /// Nonzero: every question for it is answered with this RCODE and no
    /// records (2 SERVFAIL, 4 NOTIMP, 5 REFUSED).
    unsigned rcode = 0;
    /// Over UDP, the answer is only "truncated" (TC set, no records, NOERROR),
    /// so the client asks again over TCP, where it gets the whole answer.
    bool truncated_over_udp = false;
};

/// The reply to one DNS question (RFC 1035 section 4) from `table`: the
/// question echoed, the records of its type (A or AAAA) in table order;
/// NXDOMAIN for a name not in the table, NOERROR and no answer for a name
/// without records of the type, the name's `rcode` if it has one, NOTIMP for
/// any other class or opcode; over UDP (`over_udp`), a name's
/// `truncated_over_udp` gives TC and no records. nullopt for a message that
/// is not a question (too short, a response, a malformed name) and for a
/// name that is never answered: a server drops those. Names compare
/// case-insensitively.
std::optional<std::string> dns_reply(std::string_view question,
                                     const std::map<std::string, DnsRecords>& table,
                                     bool over_udp = true);

/// The name and type ("A one.test", "AAAA one.test", or "TYPE 15 x") of a
/// question, for the tests' log of what was asked; "" if malformed.
std::string dns_question_text(std::string_view question);

/// The responder: binds 127.0.0.1:0 on construction (UDP, and TCP on the
/// same port: each message after its 2-byte length, RFC 1035 4.2.2), answers
/// until destroyed. Members may be called from any thread.
class DnsResponder {
  public:
    /// Starts the thread and binds; throws what the bind throws.
    explicit DnsResponder(std::map<std::string, DnsRecords> table = {});
    ~DnsResponder();
    DnsResponder(const DnsResponder&) = delete;
    DnsResponder& operator=(const DnsResponder&) = delete;

    /// "127.0.0.1:PORT", for ResolverOptions::servers.
    std::string server() const { return address_.to_string(); }
    /// Adds or replaces a name.
    void set(const std::string& name, DnsRecords records);
    /// True: every question is read and counted, none answered.
    void set_silent(bool silent) { silent_.store(silent); }
    /// Questions received so far (answered or not), over UDP and TCP.
    std::size_t questions() const { return questions_.load(); }
    /// Of those, the ones received over TCP.
    std::size_t tcp_questions() const { return tcp_questions_.load(); }
    /// What was asked, in order ("A one.test").
    std::vector<std::string> asked() const;

  private:
    void serve(std::shared_ptr<std::promise<Address>> bound);
    // One question, over UDP or TCP: counted, logged, and its reply (if any).
    std::optional<std::string> answer(std::string_view question, bool over_udp);

    mutable std::mutex mutex_;  // table_, asked_
    std::map<std::string, DnsRecords> table_;
    std::vector<std::string> asked_;
    std::atomic<bool> silent_{false};
    std::atomic<std::size_t> questions_{0};
    std::atomic<std::size_t> tcp_questions_{0};
    EventLoop* loop_ = nullptr;  // the thread's, while it runs
    Address address_;
    std::thread thread_;
};

}  // namespace evmux::test
