// A small DNS server for the tests, on 127.0.0.1, built on evmux's own UDP
// endpoint and running its own EventLoop on its own thread (so a test may
// block on a lookup, e.g. a server resolving its name, while it answers).
// It answers A and AAAA questions from a table, NXDOMAIN for names not in
// it, and can be told to answer nothing at all.
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
};

/// The reply to one DNS question (RFC 1035 section 4) from `table`: the
/// question echoed, the records of its type (A or AAAA) in table order;
/// NXDOMAIN for a name not in the table, NOERROR and no answer for a name
/// without records of the type, NOTIMP for any other class or opcode.
/// nullopt for a datagram that is not a question (too short, a response,
/// a malformed name) and for a name that is never answered: a server drops
/// those. Names compare case-insensitively.
std::optional<std::string> dns_reply(std::string_view question,
                                     const std::map<std::string, DnsRecords>& table);

/// The name and type ("A one.test", "AAAA one.test", or "TYPE 15 x") of a
/// question, for the tests' log of what was asked; "" if malformed.
std::string dns_question_text(std::string_view question);

/// The responder: binds 127.0.0.1:0 on construction, answers until destroyed.
/// Members may be called from any thread.
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
    /// Questions received so far (answered or not).
    std::size_t questions() const { return questions_.load(); }
    /// What was asked, in order ("A one.test").
    std::vector<std::string> asked() const;

  private:
    void serve(std::shared_ptr<std::promise<Address>> bound);

    mutable std::mutex mutex_;  // table_, asked_
    std::map<std::string, DnsRecords> table_;
    std::vector<std::string> asked_;
    std::atomic<bool> silent_{false};
    std::atomic<std::size_t> questions_{0};
    EventLoop* loop_ = nullptr;  // the thread's, while it runs
    Address address_;
    std::thread thread_;
};

}  // namespace evmux::test
