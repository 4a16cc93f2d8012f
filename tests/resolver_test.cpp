// Resolver (c-ares on the loop), connect() and servers by name, run once per
// backend (EVMUX_BACKEND). The names come from a DNS responder on 127.0.0.1
// built on evmux's UDP endpoint (dns_responder.hpp), which c-ares is pointed
// at, and from /etc/hosts ("localhost").
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include <ares.h>

#include "../src/dns_answer.hpp"  // internal: what the resolver reads of answers
#include "dns_responder.hpp"
#include "evmux/address.hpp"
#include "evmux/connection.hpp"
#include "evmux/coro.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/loop_group.hpp"
#include "evmux/resolver.hpp"
#include "evmux/server.hpp"
#include "test_support.hpp"

namespace evmux {
namespace {

using namespace std::chrono_literals;
using test::ConnectResult;
using test::DnsRecords;
using test::DnsResponder;
using test::echo_callbacks;
using test::Fd;
using test::pump_for;
using test::run_until;

/// The table most tests use.
std::map<std::string, DnsRecords> names() {
    return {
        {"one.test", {{"127.0.0.11"}, {}}},
        {"two.test", {{"127.0.0.21", "127.0.0.22"}, {}}},
        {"six.test", {{}, {"::1"}}},
        {"both.test", {{"127.0.0.31"}, {"::1"}}},
    };
}

/// Options that ask only `dns`, quickly.
ResolverOptions asking(const DnsResponder& dns, std::chrono::milliseconds timeout = 1000ms,
                       int tries = 2) {
    ResolverOptions o;
    o.servers = dns.server();
    o.timeout = timeout;
    o.tries = tries;
    return o;
}

/// One lookup's outcome.
struct Outcome {
    int calls = 0;
    std::error_code error;
    std::vector<Address> addresses;

    ResolveCallback callback() {
        return [this](std::error_code e, std::vector<Address> a) {
            ++calls;
            error = e;
            addresses = std::move(a);
        };
    }
    std::vector<std::string> texts() const {
        std::vector<std::string> out;
        for (const Address& a : addresses) out.push_back(a.to_string());
        return out;
    }
};

ResolverOptions of_family(ResolverOptions o, int family) {
    o.family = family;
    return o;
}

/// Looks each (host, service) up at once, with a Resolver on `loop`; their
/// outcomes, in that order, once all have come.
std::vector<Outcome> lookups(EventLoop& loop, const ResolverOptions& options,
                             const std::vector<std::pair<std::string, std::string>>& asks) {
    Resolver resolver(loop, options);
    std::vector<Outcome> out(asks.size());
    for (std::size_t i = 0; i < asks.size(); ++i)
        resolver.resolve(asks[i].first, asks[i].second, out[i].callback());
    EXPECT_TRUE(run_until(
        loop, [&] { return resolver.pending() == 0; }, 20s));
    return out;  // (were one still pending, the resolver's destruction cancels it first)
}

std::vector<std::string> sorted(std::vector<std::string> v) {
    std::sort(v.begin(), v.end());
    return v;
}

// ---- the resolver ---------------------------------------------------------------------

TEST(Resolver, NumericHostsAreAnsweredWithoutAQuestion) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    Resolver resolver(loop, asking(dns));
    Outcome v4, v6, bracketed;
    resolver.resolve("127.0.0.1", "80", v4.callback());
    resolver.resolve("::1", "443", v6.callback());
    resolver.resolve("[::1]", "", bracketed.callback());
    EXPECT_EQ(v4.calls + v6.calls + bracketed.calls, 0) << "never inside resolve()";
    EXPECT_EQ(resolver.pending(), 3u);
    ASSERT_TRUE(run_until(loop, [&] { return resolver.pending() == 0; }));
    EXPECT_EQ(v4.texts(), std::vector<std::string>{"127.0.0.1:80"});
    EXPECT_EQ(v6.texts(), std::vector<std::string>{"[::1]:443"});
    EXPECT_EQ(bracketed.texts(), std::vector<std::string>{"[::1]:0"});
    EXPECT_EQ(dns.questions(), 0u);
    EXPECT_EQ(resolve_now("127.0.0.1", "7").at(0).to_string(), "127.0.0.1:7");
}

TEST(Resolver, ARecordsInTheServersOrderWithThePort) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    auto r =
        lookups(loop, of_family(asking(dns), AF_INET), {{"one.test", "80"}, {"TWO.test", "8080"}});
    EXPECT_FALSE(r[0].error) << r[0].error.message();
    EXPECT_EQ(r[0].texts(), std::vector<std::string>{"127.0.0.11:80"});
    EXPECT_EQ(r[1].texts(), (std::vector<std::string>{"127.0.0.21:8080", "127.0.0.22:8080"}));
    EXPECT_EQ(sorted(dns.asked()), (std::vector<std::string>{"A one.test", "A two.test"}));
}

TEST(Resolver, AaaaRecords) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    auto r =
        lookups(loop, of_family(asking(dns), AF_INET6), {{"six.test", "53"}, {"one.test", "53"}});
    EXPECT_FALSE(r[0].error) << r[0].error.message();
    EXPECT_EQ(r[0].texts(), std::vector<std::string>{"[::1]:53"});
    // one.test exists, without an IPv6 address.
    EXPECT_EQ(r[1].error, ResolveErrc::no_data) << r[1].error.message();
    EXPECT_TRUE(r[1].addresses.empty());
}

TEST(Resolver, BothFamiliesByDefault) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    auto r = lookups(loop, asking(dns), {{"both.test", "9"}});
    EXPECT_FALSE(r[0].error) << r[0].error.message();
    EXPECT_EQ(sorted(r[0].texts()), (std::vector<std::string>{"127.0.0.31:9", "[::1]:9"}));
    EXPECT_EQ(sorted(dns.asked()), (std::vector<std::string>{"A both.test", "AAAA both.test"}));
}

TEST(Resolver, UnknownNameIsAClearError) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    Resolver resolver(loop, asking(dns));
    Outcome r;
    resolver.resolve("nosuch.invalid", "80", r.callback());
    ASSERT_TRUE(run_until(loop, [&] { return r.calls > 0; }));
    EXPECT_EQ(r.calls, 1);
    EXPECT_EQ(r.error, ResolveErrc::not_found);
    EXPECT_EQ(r.error.category().name(), std::string("evmux.resolve"));
    EXPECT_TRUE(r.addresses.empty());
    EXPECT_EQ(resolve_message("nosuch.invalid", r.error),
              "cannot resolve 'nosuch.invalid': Domain name not found");
    EXPECT_NE(dns.questions(), 0u);
    // The blocking form throws it.
    try {
        resolve_now("nosuch.invalid", "80", asking(dns));
        ADD_FAILURE() << "resolve_now did not throw";
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code(), ResolveErrc::not_found);
        EXPECT_STREQ(e.what(), "evmux: cannot resolve 'nosuch.invalid': Domain name not found");
    }
}

TEST(Resolver, ServerThatNeverAnswersTimesOut) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    dns.set_silent(true);
    Resolver resolver(loop, asking(dns, 200ms, 2));
    const std::size_t watched_before = loop.selector().size();
    Outcome r;
    const auto start = std::chrono::steady_clock::now();
    resolver.resolve("one.test", "80", r.callback());
    ASSERT_TRUE(run_until(
        loop, [&] { return r.calls > 0; }, 10s));
    const auto took = std::chrono::steady_clock::now() - start;
    EXPECT_EQ(r.error, ResolveErrc::timeout) << r.error.message();
    EXPECT_EQ(r.error, std::errc::timed_out);
    EXPECT_EQ(r.error.message(), "Timeout while contacting DNS servers");
    // 200 ms, then 400 ms on the second try (c-ares doubles it).
    EXPECT_GE(took, 600ms);
    EXPECT_LT(took, 5s);
    EXPECT_GE(dns.questions(), 4u) << "A and AAAA, each tried twice";
    // c-ares closed its socket and the loop watches nothing of it.
    EXPECT_EQ(loop.selector().size(), watched_before) << "the resolver's socket is still watched";
}

// ---- servers that answer with a failure, or cannot be reached ----------------------------
//
// c-ares 1.18 (Debian 12's) takes an answer SERVFAIL, NOTIMP or REFUSED as
// "try the next server", and a lookup whose every try ended so as
// ARES_ECONNREFUSED, "Could not contact DNS servers": the status it starts
// each query with, which only a timeout replaces. Users read that as the
// host refusing, when a server answered. (c-ares 1.20 reports the answer.)

/// A question for `name`'s A record, id 0x1234, as a client sends it.
std::string a_question(const std::string& name) {
    std::string q = {'\x12', '\x34', '\x01', '\x00', 0, 1, 0, 0, 0, 0, 0, 0};
    std::size_t start = 0;
    while (start <= name.size()) {
        const std::size_t dot = std::min(name.find('.', start), name.size());
        q += static_cast<char>(dot - start);
        q += name.substr(start, dot - start);
        start = dot + 1;
    }
    return q + std::string{0, 0, 1, 0, 1};
}

// What the resolver reads of the answers c-ares receives (src/dns_answer.hpp).
TEST(DnsAnswer, TheHeadOfAnAnswerAndTcpMessagesInAnyPieces) {
    const std::map<std::string, DnsRecords> table = {
        {"fail.test", {{}, {}, false, 5}}, {"big.test", {{"127.0.0.1"}, {}, false, 0, true}}};
    const std::string question = a_question("Fail.TEST");
    const std::string refused = *test::dns_reply(question, table);
    auto head = detail::read_dns_answer_head(refused);
    ASSERT_TRUE(head);
    EXPECT_EQ(head->id, 0x1234);
    EXPECT_EQ(head->rcode, detail::dns_rcode_refused);
    EXPECT_FALSE(head->truncated);
    EXPECT_EQ(head->name, "fail.test");
    head = detail::read_dns_answer_head(*test::dns_reply(a_question("big.test"), table));
    ASSERT_TRUE(head);
    EXPECT_TRUE(head->truncated);
    EXPECT_EQ(head->rcode, 0u);
    EXPECT_FALSE(detail::read_dns_answer_head(question)) << "a query, not an answer";
    for (std::size_t n = 0; n < refused.size(); ++n)
        EXPECT_FALSE(detail::read_dns_answer_head(refused.substr(0, n)))
            << "cut at " << n << " of " << refused.size();
    EXPECT_EQ(detail::dns_name_key("One.Test."), "one.test");

    // Two messages, each after its length: whole, and a byte at a time.
    const std::string ok = *test::dns_reply(a_question("big.test"), table, false);
    std::string stream;
    for (const std::string* m : {&refused, &ok}) {
        stream += static_cast<char>(m->size() >> 8);
        stream += static_cast<char>(m->size() & 0xff);
        stream += *m;
    }
    for (const std::size_t piece : {stream.size(), std::size_t{1}, std::size_t{3}}) {
        detail::DnsStreamCutter cutter;
        std::vector<std::string> messages;
        for (std::size_t at = 0; at < stream.size(); at += piece)
            cutter.feed(std::string_view(stream).substr(at, piece),
                        [&](std::string_view m) { messages.emplace_back(m); });
        EXPECT_EQ(messages, (std::vector<std::string>{refused, ok})) << "pieces of " << piece;
    }
}

/// A table of names answered with a failure code: SERVFAIL, REFUSED, NOTIMP.
std::map<std::string, DnsRecords> failing_names() {
    std::map<std::string, DnsRecords> table = names();
    table["servfail.test"] = {{}, {}, false, 2};
    table["refused.test"] = {{}, {}, false, 5};
    table["notimp.test"] = {{}, {}, false, 4};
    return table;
}

/// "127.0.0.1:PORT" where no UDP socket is bound (one was, a moment ago): a
/// question sent there is answered by ICMP port unreachable.
std::string closed_udp_server() {
    const Address any = Address::parse("127.0.0.1:0");
    Fd fd(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    if (!fd ||
        ::bind(fd.get(), static_cast<const sockaddr*>(any.sockaddr_ptr()), any.sockaddr_len()) != 0)
        throw std::system_error(errno, std::generic_category(), "bind 127.0.0.1:0");
    return Address::local_of(fd.get()).to_string();  // closed on return
}

TEST(Resolver, AServfailAnswerIsServerFailureNotCouldNotContact) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(failing_names());
    // Both families (A and AAAA), each tried twice: every answer SERVFAIL.
    auto r = lookups(loop, asking(dns), {{"servfail.test", "80"}});
    EXPECT_EQ(r[0].calls, 1);
    EXPECT_EQ(r[0].error, ResolveErrc::server_failure) << r[0].error.message();
    EXPECT_TRUE(r[0].addresses.empty());
    EXPECT_EQ(resolve_message("servfail.test", r[0].error),
              "cannot resolve 'servfail.test': DNS server returned general failure");
    EXPECT_GE(dns.questions(), 2u);
    try {
        resolve_now("servfail.test", "80", asking(dns));
        ADD_FAILURE() << "resolve_now did not throw";
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code(), ResolveErrc::server_failure);
        EXPECT_STREQ(e.what(),
                     "evmux: cannot resolve 'servfail.test': DNS server returned general failure");
    }
}

TEST(Resolver, ARefusedAnswerIsRefusedNotCouldNotContact) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(failing_names());
    auto r = lookups(loop, of_family(asking(dns), AF_INET), {{"refused.test", "80"}});
    EXPECT_EQ(r[0].calls, 1);
    EXPECT_EQ(r[0].error, ResolveErrc::refused) << r[0].error.message();
    EXPECT_EQ(resolve_message("refused.test", r[0].error),
              "cannot resolve 'refused.test': DNS server refused query");
    // connect() by name says it in its text.
    Resolver resolver(loop, asking(dns));
    ConnectOptions co;
    co.resolver = &resolver;
    ConnectResult c;
    connect(loop, "refused.test:80", c.callbacks(), co);
    ASSERT_TRUE(run_until(loop, [&] { return c.errors > 0 || c.connects > 0; }));
    EXPECT_EQ(c.ec, ResolveErrc::refused);
    EXPECT_EQ(c.message,
              "connect refused.test:80: cannot resolve 'refused.test': DNS server refused query");
}

TEST(Resolver, ANotimpAnswerIsSaidAsSuch) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(failing_names());
    auto r = lookups(loop, asking(dns), {{"notimp.test", "80"}});
    // c-ares's ARES_ENOTIMP: no ResolveErrc of its own, in the category by number.
    EXPECT_EQ(r[0].error.category(), resolve_category());
    EXPECT_EQ(r[0].error.value(), 5) << r[0].error.message();
    EXPECT_EQ(r[0].error.message(), "DNS server does not implement requested operation");
}

// The answer comes over TCP (the UDP one was truncated): heard there too.
TEST(Resolver, AFailureAnswerOverTcpIsSaidAsSuch) {
    EVMUX_LOOP_OR_SKIP(loop);
    std::map<std::string, DnsRecords> table = names();
    table["big.test"] = {{}, {}, false, 2, true};
    table["bigok.test"] = {{"127.0.0.41"}, {}, false, 0, true};
    DnsResponder dns(table);
    auto r =
        lookups(loop, of_family(asking(dns), AF_INET), {{"big.test", "80"}, {"bigok.test", "80"}});
    EXPECT_EQ(r[0].error, ResolveErrc::server_failure) << r[0].error.message();
    EXPECT_EQ(r[1].texts(), std::vector<std::string>{"127.0.0.41:80"}) << r[1].error.message();
    EXPECT_GE(dns.tcp_questions(), 2u) << "c-ares did not ask again over TCP";
}

// Servers that disagree: the last answer heard decides, as c-ares 1.20 and
// later decide (the servers are asked in order, each once per round).
TEST(Resolver, ServersThatAnswerDifferentlyReportTheLastAnswer) {
    EVMUX_LOOP_OR_SKIP(loop);
    std::map<std::string, DnsRecords> servfail = names(), refused = names();
    servfail["x.test"] = {{}, {}, false, 2};
    refused["x.test"] = {{}, {}, false, 5};
    DnsResponder failing(servfail), refusing(refused);
    for (const bool refused_last : {true, false}) {
        SCOPED_TRACE(refused_last ? "SERVFAIL, then REFUSED" : "REFUSED, then SERVFAIL");
        ResolverOptions o = of_family(asking(failing), AF_INET);
        o.servers = refused_last ? failing.server() + "," + refusing.server()
                                 : refusing.server() + "," + failing.server();
        auto r = lookups(loop, o, {{"x.test", "80"}});
        EXPECT_EQ(r[0].error, refused_last ? ResolveErrc::refused : ResolveErrc::server_failure)
            << r[0].error.message();
    }
    EXPECT_GE(failing.questions(), 2u);
    EXPECT_GE(refusing.questions(), 2u);
}

// A closed port (ICMP port unreachable) is "Could not contact DNS servers",
// as it was; beside a server that answers REFUSED, the answer is reported.
// Asked last, the closed port is what c-ares 1.20 and later report (the last
// try's outcome); evmux on an older c-ares reports the answer. (One question
// at a time: a second one sent on the socket would take the ICMP error in its
// send(), and the first would wait for its timeout: c-ares reports a timeout
// then.)
TEST(Resolver, AClosedPortIsConnectionRefusedUnlessAnotherServerAnswered) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(failing_names());
    ResolverOptions closed = asking(dns);
    closed.servers = closed_udp_server();
    auto r = lookups(loop, closed, {{"one.test", "80"}});
    EXPECT_EQ(r[0].error, ResolveErrc::connection_refused) << r[0].error.message();
    EXPECT_EQ(resolve_message("one.test", r[0].error),
              "cannot resolve 'one.test': Could not contact DNS servers");
    int cares_version = 0;
    ::ares_version(&cares_version);
    for (const bool closed_first : {true, false}) {
        SCOPED_TRACE(closed_first ? "closed port first" : "closed port last");
        ResolverOptions both = of_family(asking(dns), AF_INET);
        both.servers = closed_first ? closed_udp_server() + "," + dns.server()
                                    : dns.server() + "," + closed_udp_server();
        auto b = lookups(loop, both, {{"refused.test", "80"}});
        EXPECT_EQ(b[0].error, closed_first || cares_version < 0x011400
                                  ? ResolveErrc::refused
                                  : ResolveErrc::connection_refused)
            << b[0].error.message();
        b = lookups(loop, both, {{"one.test", "80"}});
        EXPECT_EQ(b[0].texts(), std::vector<std::string>{"127.0.0.11:80"}) << b[0].error.message();
    }
}

/// Sets an environment variable for its lifetime (c-ares reads some when a
/// channel is made).
class ScopedEnv {
  public:
    ScopedEnv(const char* name, const char* value) : name_(name) {
        if (const char* old = std::getenv(name)) old_ = old;
        ::setenv(name, value, 1);
    }
    ~ScopedEnv() {
        if (old_)
            ::setenv(name_, old_->c_str(), 1);
        else
            ::unsetenv(name_);
    }
    ScopedEnv(const ScopedEnv&) = delete;
    ScopedEnv& operator=(const ScopedEnv&) = delete;

  private:
    const char* name_;
    std::optional<std::string> old_;
};

// A name with fewer dots than ndots is asked in the search domains first
// (LOCALDOMAIN and RES_OPTIONS, as resolv.conf's "search" and "options"):
// that question's answer counts. (Two labels: c-ares 1.34 goes on to the
// next name after a single-label name's failure, for systemd-resolved.)
TEST(Resolver, AFailureAnswerToASearchDomainsQuestionIsSaidAsSuch) {
    EVMUX_LOOP_OR_SKIP(loop);
    std::map<std::string, DnsRecords> table = names();
    table["a.short.search.test"] = {{}, {}, false, 5};
    DnsResponder dns(table);
    ScopedEnv search("LOCALDOMAIN", "search.test");
    ScopedEnv ndots("RES_OPTIONS", "ndots:2");
    auto r = lookups(loop, of_family(asking(dns), AF_INET), {{"a.short", "80"}});
    EXPECT_EQ(r[0].error, ResolveErrc::refused) << r[0].error.message();
    EXPECT_EQ(dns.asked().at(0), "A a.short.search.test");
}

TEST(Resolver, CancelWhilePendingCallsBackOnceWithCanceled) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    dns.set_silent(true);
    Resolver resolver(loop, asking(dns, 150ms, 1));
    Outcome cancelled, other;
    auto query = resolver.resolve("one.test", "80", cancelled.callback());
    resolver.resolve("two.test", "80", other.callback());
    ASSERT_TRUE(run_until(loop, [&] { return dns.questions() >= 2; }));
    EXPECT_TRUE(query->pending());
    query->cancel();
    EXPECT_EQ(cancelled.calls, 0) << "never inside cancel()";
    query->cancel();  // twice is once
    ASSERT_TRUE(run_until(loop, [&] { return cancelled.calls > 0; }));
    EXPECT_EQ(cancelled.error, std::errc::operation_canceled);
    EXPECT_FALSE(query->pending());
    // The other one goes on to its timeout; the cancelled one is not heard of again.
    ASSERT_TRUE(run_until(loop, [&] { return other.calls > 0; }));
    EXPECT_EQ(other.error, ResolveErrc::timeout);
    pump_for(loop, 300ms);
    EXPECT_EQ(cancelled.calls, 1);
    EXPECT_EQ(resolver.pending(), 0u);
    query->cancel();  // after the callback: a no-op
    pump_for(loop, 20ms);
    EXPECT_EQ(cancelled.calls, 1);
}

TEST(Resolver, CancelDropsAnAnswerNotYetDelivered) {
    EVMUX_LOOP_OR_SKIP(loop);
    Resolver resolver(loop);
    Outcome r;
    auto query = resolver.resolve("127.0.0.1", "80", r.callback());  // known at once
    query->cancel();
    ASSERT_TRUE(run_until(loop, [&] { return r.calls > 0; }));
    pump_for(loop, 20ms);
    EXPECT_EQ(r.calls, 1);
    EXPECT_EQ(r.error, std::errc::operation_canceled);
    EXPECT_TRUE(r.addresses.empty());
}

TEST(Resolver, DestroyedWhilePendingCancelsEveryLookupInOrder) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    dns.set_silent(true);
    std::vector<std::string> order;
    auto resolver = std::make_unique<Resolver>(loop, asking(dns, 2000ms, 3));
    const std::size_t watched_before = loop.selector().size();
    auto lookup = [&](const char* name) {
        resolver->resolve(name, "1", [&order, name](std::error_code e, std::vector<Address> a) {
            order.push_back(std::string(name) + " " + e.message() + " " + std::to_string(a.size()));
        });
    };
    for (const char* name : {"one.test", "two.test", "both.test"}) lookup(name);
    ASSERT_TRUE(run_until(loop, [&] { return dns.questions() >= 6; }));
    EXPECT_GT(loop.selector().size(), watched_before) << "c-ares's socket is watched";
    lookup("127.0.0.1");  // answered, the answer not delivered yet
    resolver.reset();     // every callback runs in here
    const std::string canceled = std::make_error_code(std::errc::operation_canceled).message();
    EXPECT_EQ(order, (std::vector<std::string>{
                         "one.test " + canceled + " 0", "two.test " + canceled + " 0",
                         "both.test " + canceled + " 0", "127.0.0.1 " + canceled + " 0"}));
    EXPECT_EQ(loop.selector().size(), watched_before);
    pump_for(loop, 100ms);
    EXPECT_EQ(order.size(), 4u) << "nothing after the destruction";
}

TEST(Resolver, DestroyedFromItsOwnCallback) {
    EVMUX_LOOP_OR_SKIP(loop);
    std::map<std::string, DnsRecords> table = names();
    table["slow.test"] = {{"127.0.0.1"}, {}, true};  // never answered
    DnsResponder dns(table);
    auto resolver = std::make_unique<Resolver>(loop, asking(dns));
    Outcome other;
    int first_calls = 0;
    resolver->resolve("one.test", "1", [&](std::error_code e, std::vector<Address>) {
        ++first_calls;
        EXPECT_FALSE(e) << e.message();
        resolver.reset();  // the other lookup is cancelled in here
        EXPECT_EQ(other.calls, 1);
    });
    resolver->resolve("slow.test", "1", other.callback());
    ASSERT_TRUE(run_until(loop, [&] { return first_calls > 0; }));
    pump_for(loop, 50ms);
    EXPECT_EQ(first_calls, 1);
    EXPECT_EQ(other.calls, 1);
    EXPECT_EQ(other.error, std::errc::operation_canceled);
}

TEST(Resolver, ACallbackThatThrowsGoesToTheLoopsHandler) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    Resolver resolver(loop, asking(dns));
    std::vector<std::string> caught;
    test::collect_exceptions(loop, caught);
    Outcome after;
    resolver.resolve("one.test", "1", [](std::error_code, std::vector<Address>) {
        throw std::runtime_error("boom");
    });
    resolver.resolve("two.test", "1", after.callback());
    ASSERT_TRUE(run_until(loop, [&] { return resolver.pending() == 0; }));
    EXPECT_EQ(caught, std::vector<std::string>{"boom"});
    EXPECT_EQ(after.texts().size(), 2u);
}

TEST(Resolver, ManyLookupsAtOnce) {
    EVMUX_LOOP_OR_SKIP(loop);
    constexpr int n = 200;
    std::map<std::string, DnsRecords> table;
    std::vector<std::pair<std::string, std::string>> asks;
    for (int i = 0; i < n; ++i) {
        table["host" + std::to_string(i) + ".test"] = {{"127.0.1." + std::to_string(i + 1)}, {}};
        asks.emplace_back("host" + std::to_string(i) + ".test", std::to_string(1000 + i));
    }
    DnsResponder dns(table);
    auto r = lookups(loop, of_family(asking(dns, 2000ms, 3), AF_INET), asks);
    for (int i = 0; i < n; ++i) {
        ASSERT_FALSE(r[i].error) << i << ": " << r[i].error.message();
        EXPECT_EQ(r[i].texts(), std::vector<std::string>{"127.0.1." + std::to_string(i + 1) + ":" +
                                                         std::to_string(1000 + i)});
    }
    EXPECT_EQ(dns.questions(), static_cast<std::size_t>(n));
}

TEST(Resolver, LocalhostComesFromEtcHosts) {
    EVMUX_LOOP_OR_SKIP(loop);
    // The server has another answer: /etc/hosts comes first, the server is not asked.
    DnsResponder dns({{"localhost", {{"127.0.0.77"}, {"::1"}}}});
    Resolver resolver(loop, of_family(asking(dns), AF_INET));
    Outcome r;
    resolver.resolve("localhost", "80", r.callback());
    EXPECT_EQ(r.calls, 0) << "never inside resolve()";
    ASSERT_TRUE(run_until(loop, [&] { return r.calls > 0; }));
    EXPECT_FALSE(r.error) << r.error.message();
    EXPECT_EQ(r.texts(), std::vector<std::string>{"127.0.0.1:80"});
    EXPECT_EQ(dns.questions(), 0u);
}

TEST(Resolver, BadArgumentsAreClearErrors) {
    EVMUX_LOOP_OR_SKIP(loop);
    ResolverOptions bad;
    bad.servers = "not a server";
    EXPECT_THROW(Resolver(loop, bad), std::invalid_argument);
    bad = {};
    bad.family = 12345;
    EXPECT_THROW(Resolver(loop, bad), std::invalid_argument);
    bad = {};
    bad.tries = 0;
    EXPECT_THROW(Resolver(loop, bad), std::invalid_argument);
    Resolver resolver(loop);
    EXPECT_THROW(resolver.resolve("", "80", {}), std::invalid_argument);
    EXPECT_THROW(resolver.resolve("localhost", "65536", {}), std::invalid_argument);
    EXPECT_EQ(resolver.pending(), 0u);
    // Address::parse refuses names, and says where they are taken.
    try {
        Address::parse("localhost:80");
        ADD_FAILURE() << "parsed a name";
    } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("evmux::Resolver"), std::string::npos) << e.what();
    }
    EXPECT_EQ(split_host_port("localhost:80"),
              std::make_pair(std::string("localhost"), std::string("80")));
    EXPECT_EQ(split_host_port("[::1]:http"),
              std::make_pair(std::string("[::1]"), std::string("http")));
    EXPECT_THROW(split_host_port("localhost"), std::invalid_argument);
    EXPECT_THROW(split_host_port("::1:80"), std::invalid_argument);
    EXPECT_THROW(split_host_port(":80"), std::invalid_argument);
    EXPECT_THROW(split_host_port("localhost:"), std::invalid_argument);
    EXPECT_EQ(resolver_unavailable_reason(), "");
}

TEST(Resolver, ServiceTextIsAPortNumberOrAServiceNameNothingElse) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    // c-ares reads a service that is no name in /etc/services with strtoul,
    // base 0, no end check, cast to 16 bits: "80x" was port 80, "-5" 65531.
    const std::vector<std::pair<std::string, std::string>> asks = {
        {"one.test", "80x"},     {"one.test", "-5"},  {"one.test", "0x50"}, {"localhost", " 80"},
        {"127.0.0.1", "70000x"}, {"one.test", "+80"}, {"one.test", "http"}, {"127.0.0.1", "http"},
    };
    auto r = lookups(loop, of_family(asking(dns), AF_INET), asks);
    for (std::size_t i = 0; i + 2 < asks.size(); ++i) {
        EXPECT_EQ(r[i].error, ResolveErrc::unknown_service)
            << "'" << asks[i].second << "': " << r[i].error.message();
        EXPECT_TRUE(r[i].addresses.empty())
            << "'" << asks[i].second << "' gave " << r[i].texts().at(0);
    }
    EXPECT_EQ(r[6].texts(), std::vector<std::string>{"127.0.0.11:80"});
    EXPECT_EQ(r[7].texts(), std::vector<std::string>{"127.0.0.1:80"});
    // "host:port" text: the port is not cut at its first non-digit either.
    try {
        resolve_address_now("[::1]:80x", asking(dns));
        ADD_FAILURE() << "[::1]:80x resolved";
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code(), ResolveErrc::unknown_service) << e.what();
    }
}

TEST(Resolver, TextWithANulByteIsRefusedNotCutShortAtIt) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    Resolver resolver(loop, asking(dns));
    using std::string_literals::operator""s;
    // c-ares and inet_pton read C strings: these were "localhost", port 80
    // and 127.0.0.1, the bytes after the NUL ignored.
    const std::string host = "localhost\0.example.com"s;
    Outcome r;
    EXPECT_THROW(resolver.resolve(host, "80", r.callback()), std::invalid_argument);
    EXPECT_THROW(resolver.resolve("one.test", "http\0x"s, r.callback()), std::invalid_argument);
    EXPECT_THROW(resolver.resolve("127.0.0.1\0x"s, "80", r.callback()), std::invalid_argument);
    EXPECT_EQ(resolver.pending(), 0u);
    EXPECT_THROW(Address::ip("127.0.0.1\0.5"s, 80), std::invalid_argument);
    EXPECT_THROW(Address::parse("127.0.0.1\0x:80"s), std::invalid_argument);
    EXPECT_THROW(resolve_now(host, "80", asking(dns)), std::invalid_argument);
    EXPECT_THROW(resolve_address_now(host + ":80", asking(dns)), std::invalid_argument);
    EXPECT_THROW(connect(loop, host + ":80", {}, {}), std::invalid_argument);
    pump_for(loop, 20ms);
    EXPECT_EQ(r.calls, 0);
    EXPECT_EQ(dns.questions(), 0u);
}

/// What `parse(text)` throws as std::invalid_argument, or "no error".
std::string message(void (*parse)(const std::string&), const std::string& text) {
    try {
        parse(text);
    } catch (const std::invalid_argument& e) {
        return e.what();
    }
    return "no error";
}
void by_parse(const std::string& text) {
    Address::parse(text);
}
void by_split(const std::string& text) {
    split_host_port(text);
}

TEST(Resolver, ABracketedHostWithoutItsPortOrClosingBracketIsSaidSo) {
    // Both read the last ':' as the port's, inside the brackets: "[::1]" was
    // told "IPv6 hosts are written in brackets", which it is.
    for (auto parse : {by_parse, by_split}) {
        EXPECT_EQ(message(parse, "[::1]"), "bad address \"[::1]\": no port: [HOST]:PORT");
        EXPECT_EQ(message(parse, "[::1"), "bad address \"[::1\": no closing bracket: [HOST]:PORT");
        EXPECT_EQ(message(parse, "[::1]80"),
                  "bad address \"[::1]80\": no ':' after the bracket: [HOST]:PORT");
        EXPECT_EQ(message(parse, "[::1:80"),
                  "bad address \"[::1:80\": no closing bracket: [HOST]:PORT");
    }
    EXPECT_EQ(Address::parse("[::1]:80").to_string(), "[::1]:80");
}

TEST(Resolver, AServiceNameGivenToParseIsSaidToBeTakenByTheTextCalls) {
    // "127.0.0.1:http" was told "port must be 0..65535", as if http were a
    // number out of range; connect() and TcpServer take it as it is.
    EXPECT_EQ(message(by_parse, "127.0.0.1:http"),
              "bad address \"127.0.0.1:http\": the port is not a number (a service name such "
              "as 'http' is looked up by evmux::Resolver; connect(), TcpServer and "
              "LoopGroup::listen() take \"host:port\" text)");
    EXPECT_EQ(message(by_parse, "127.0.0.1:70000"),
              "bad address \"127.0.0.1:70000\": port must be 0..65535");
    EXPECT_EQ(message(by_parse, "127.0.0.1:-1"),
              "bad address \"127.0.0.1:-1\": port must be 0..65535");
    EXPECT_EQ(message(by_parse, "127.0.0.1:80x"),
              "bad address \"127.0.0.1:80x\": port must be 0..65535");
    EXPECT_EQ(message(by_parse, "127.0.0.1:"), "bad address \"127.0.0.1:\": port must be 0..65535");
}

TEST(Resolver, BracketsAreForIpv6AddressesOnly) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    // RFC 3986: "[...]" is an IPv6 literal. "[localhost]:80" was split into
    // "[localhost]" and looked up as localhost; Address::ip() took
    // "[127.0.0.1]" as 127.0.0.1.
    for (auto parse : {by_parse, by_split})
        for (const char* text : {"[localhost]:80", "[127.0.0.1]:80", "[one.test]:80", "[]:80"})
            EXPECT_EQ(message(parse, text), std::string("bad address \"") + text +
                                                "\": brackets hold an IPv6 address only, as in "
                                                "[::1]:80");
    EXPECT_EQ(message([](const std::string& t) { Address::ip(t, 80); }, "[127.0.0.1]"),
              "bad address \"[127.0.0.1]\": brackets hold an IPv6 address only, as in [::1]:80");
    EXPECT_THROW(resolve_address_now("[localhost]:80", asking(dns)), std::invalid_argument);
    EXPECT_THROW(resolve_now("[localhost]", "80", asking(dns)), std::invalid_argument);
    EXPECT_THROW(connect(loop, "[one.test]:80", {}, {}), std::invalid_argument);
    EXPECT_THROW(TcpServer(loop, "[localhost]:0", {}), std::invalid_argument);
    Resolver resolver(loop, asking(dns));
    Outcome r;
    EXPECT_THROW(resolver.resolve("[localhost]", "80", r.callback()), std::invalid_argument);
    EXPECT_THROW(resolver.resolve("[one.test]", "80", r.callback()), std::invalid_argument);
    EXPECT_EQ(resolver.pending(), 0u);
    // IPv6 inside brackets, with or without a zone, is what they are for.
    EXPECT_EQ(split_host_port("[::1]:80"), std::make_pair(std::string("[::1]"), std::string("80")));
    EXPECT_EQ(split_host_port("[fe80::1%lo]:80").first, "[fe80::1%lo]");
    EXPECT_EQ(Address::parse("[::ffff:127.0.0.1]:80").port(), 80);
    EXPECT_EQ(resolve_address_now("[::1]:80", asking(dns)).at(0).to_string(), "[::1]:80");
    resolver.resolve("[::1]", "80", r.callback());
    ASSERT_TRUE(run_until(loop, [&] { return r.calls > 0; }));
    EXPECT_EQ(r.texts(), std::vector<std::string>{"[::1]:80"});
    pump_for(loop, 20ms);
    EXPECT_EQ(dns.questions(), 0u);
}

TEST(Resolver, TheLoopsDestructionCancelsPendingLookups) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    DnsResponder dns(names());
    dns.set_silent(true);
    auto loop = std::make_unique<EventLoop>(std::move(sel));
    auto resolver = std::make_unique<Resolver>(*loop, asking(dns, 2000ms, 3));
    Outcome r;
    resolver->resolve("one.test", "1", r.callback());
    ASSERT_TRUE(run_until(*loop, [&] { return dns.questions() > 0; }));
    loop.reset();
    EXPECT_EQ(r.calls, 1);
    EXPECT_EQ(r.error, std::errc::operation_canceled);
    EXPECT_THROW(resolver->resolve("two.test", "1", {}), std::logic_error);
    resolver.reset();  // after its loop: touches nothing of it
    EXPECT_EQ(r.calls, 1);
}

// ---- connect() and servers by name -------------------------------------------------------

/// A TCP socket bound to `host`:`port`, not listening: connects to it are refused.
Fd bound_not_listening(const char* host, std::uint16_t port) {
    Address a = Address::ip(host, port);
    Fd fd(::socket(a.family(), SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd ||
        ::bind(fd.get(), static_cast<const sockaddr*>(a.sockaddr_ptr()), a.sockaddr_len()) != 0)
        throw std::system_error(errno, std::generic_category(), "bind " + a.to_string());
    return fd;
}

TEST(ConnectByName, TriesEachAddressInOrderUntilOneConnects) {
    EVMUX_LOOP_OR_SKIP(loop);
    TcpServer server(loop, Address::parse("127.0.0.1:0"), echo_callbacks());
    const std::uint16_t port = server.local_address().port();
    Fd refuses = bound_not_listening("127.0.0.2", port);
    DnsResponder dns({{"multi.test", {{"127.0.0.2", "127.0.0.1"}, {}}}});
    ResolverOptions o = asking(dns);
    o.family = AF_INET;
    Resolver resolver(loop, o);
    ConnectOptions co;
    co.resolver = &resolver;
    co.timeout = 5s;
    ConnectResult r;
    auto handle = connect(loop, "multi.test:" + std::to_string(port), r.callbacks("hello"), co);
    EXPECT_EQ(handle->target(), "multi.test:" + std::to_string(port));
    EXPECT_TRUE(handle->connecting());
    ASSERT_TRUE(run_until(loop, [&] { return r.echoed == "hello" || r.errors > 0; }));
    EXPECT_EQ(r.errors, 0) << r.message;
    EXPECT_EQ(r.peer, Address::ip("127.0.0.1", port));
    EXPECT_FALSE(handle->connecting());
    EXPECT_EQ(handle->address(), Address::ip("127.0.0.1", port));
    r.conn->close();
    pump_for(loop, 20ms);
}

TEST(ConnectByName, NoAddressConnectsReportsEachOneTried) {
    EVMUX_LOOP_OR_SKIP(loop);
    Fd a = bound_not_listening("127.0.0.2", 0);
    const std::uint16_t port = Address::local_of(a.get()).port();
    Fd b = bound_not_listening("127.0.0.3", port);
    DnsResponder dns({{"dead.test", {{"127.0.0.2", "127.0.0.3"}, {}}}});
    ResolverOptions o = asking(dns);
    o.family = AF_INET;
    Resolver resolver(loop, o);
    ConnectOptions co;
    co.resolver = &resolver;
    ConnectResult r;
    const std::string p = std::to_string(port);
    connect(loop, "dead.test:" + p, r.callbacks(), co);
    ASSERT_TRUE(run_until(loop, [&] { return r.errors > 0 || r.connects > 0; }));
    pump_for(loop, 20ms);
    EXPECT_EQ(r.connects, 0);
    EXPECT_EQ(r.errors, 1);
    EXPECT_EQ(r.ec, std::errc::connection_refused);
    EXPECT_EQ(r.message, "connect dead.test:" + p + ": 127.0.0.2:" + p +
                             ": Connection refused; 127.0.0.3:" + p + ": Connection refused");
}

TEST(ConnectByName, UnknownNameIsAClearError) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    Resolver resolver(loop, asking(dns));
    ConnectOptions co;
    co.resolver = &resolver;
    ConnectResult r;
    connect(loop, "nosuch.invalid:80", r.callbacks(), co);
    ASSERT_TRUE(run_until(loop, [&] { return r.errors > 0 || r.connects > 0; }));
    pump_for(loop, 20ms);
    EXPECT_EQ(r.errors, 1);
    EXPECT_EQ(r.ec, ResolveErrc::not_found);
    EXPECT_EQ(r.message,
              "connect nosuch.invalid:80: cannot resolve 'nosuch.invalid': Domain name not found");
}

TEST(ConnectByName, CancelWhileResolving) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    dns.set_silent(true);
    Resolver resolver(loop, asking(dns, 2000ms, 3));
    ConnectOptions co;
    co.resolver = &resolver;
    ConnectResult r;
    auto handle = connect(loop, "one.test:80", r.callbacks(), co);
    ASSERT_TRUE(run_until(loop, [&] { return dns.questions() > 0; }));
    handle->cancel();
    EXPECT_EQ(r.errors, 0) << "never inside cancel()";
    ASSERT_TRUE(run_until(loop, [&] { return r.errors > 0; }));
    pump_for(loop, 50ms);
    EXPECT_EQ(r.errors, 1);
    EXPECT_EQ(r.ec, std::errc::operation_canceled);
    EXPECT_EQ(r.message, "connect one.test:80: Operation canceled");
    EXPECT_EQ(resolver.pending(), 0u) << "the lookup was cancelled too";
}

TEST(ConnectByName, TheTimeoutCoversTheLookup) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    dns.set_silent(true);
    Resolver resolver(loop, asking(dns, 2000ms, 3));
    ConnectOptions co;
    co.resolver = &resolver;
    co.timeout = 150ms;
    ConnectResult r;
    const auto start = std::chrono::steady_clock::now();
    connect(loop, "one.test:80", r.callbacks(), co);
    ASSERT_TRUE(run_until(loop, [&] { return r.errors > 0; }));
    EXPECT_GE(std::chrono::steady_clock::now() - start, 150ms);
    EXPECT_EQ(r.ec, std::errc::timed_out);
    EXPECT_EQ(r.message, "connect one.test:80: Connection timed out");
}

TEST(ConnectByName, LocalhostWithAResolverOfItsOwn) {
    EVMUX_LOOP_OR_SKIP(loop);
    TcpServer server(loop, Address::parse("127.0.0.1:0"), echo_callbacks());
    ConnectResult r;
    const std::string where = "localhost:" + std::to_string(server.local_address().port());
    connect(loop, where, r.callbacks("hi"));
    ASSERT_TRUE(run_until(loop, [&] { return r.echoed == "hi" || r.errors > 0; }));
    EXPECT_EQ(r.errors, 0) << r.message;
    EXPECT_EQ(r.peer, server.local_address());
    r.conn->close();
    pump_for(loop, 20ms);
    // Numeric text needs no resolver at all.
    ConnectResult n;
    connect(loop, server.local_address().to_string(), n.callbacks("ok"));
    ASSERT_TRUE(run_until(loop, [&] { return n.echoed == "ok" || n.errors > 0; }));
    EXPECT_EQ(n.errors, 0) << n.message;
    n.conn->close();
    pump_for(loop, 20ms);
    EXPECT_THROW(connect(loop, "localhost", r.callbacks()), std::invalid_argument);
}

// The loop destroyed while a connect() by name looks its name up: the
// connect ends as cancel() ends it (on_error once, operation_canceled and
// cancel()'s text), and nothing of it is left: the Connector, and the
// Resolver it made for itself, are freed with their sockets. With a resolver
// of the options' (a question the silent server never answers) and with one
// of its own ("localhost", from /etc/hosts, not delivered yet).
TEST(ConnectByName, LoopDestroyedDuringTheLookupEndsItAsCancel) {
    DnsResponder dns(names());
    dns.set_silent(true);
    for (const bool own : {false, true}) {
        SCOPED_TRACE(own ? "a resolver of its own" : "the options' resolver");
        const std::size_t fds_before = test::open_fds();
        const std::string target = own ? "localhost:80" : "one.test:80";
        ConnectResult r;
        std::weak_ptr<Connector> weak;
        {
            EVMUX_SELECTOR_OR_SKIP(sel);
            auto loop = std::make_unique<EventLoop>(std::move(sel));
            std::unique_ptr<Resolver> resolver;
            ConnectOptions co;
            co.timeout = 10s;
            if (!own) {
                resolver = std::make_unique<Resolver>(*loop, asking(dns, 2000ms, 3));
                co.resolver = resolver.get();
            }
            weak = connect(*loop, target, r.callbacks(), co);
            if (!own) {
                ASSERT_TRUE(run_until(*loop, [&] { return dns.questions() > 0; }));
            }
            ASSERT_FALSE(weak.expired());
            EXPECT_TRUE(weak.lock()->connecting());
            EXPECT_EQ(r.errors + r.connects, 0);
            loop.reset();
            EXPECT_EQ(r.errors, 1) << "on_error runs while the loop is destroyed";
        }
        EXPECT_EQ(r.connects, 0);
        EXPECT_EQ(r.errors, 1);
        EXPECT_EQ(r.ec, std::errc::operation_canceled);
        EXPECT_EQ(r.message, "connect " + target + ": Operation canceled");
        EXPECT_TRUE(weak.expired()) << "the Connector outlived its loop (leaked)";
        EXPECT_EQ(test::open_fds(), fds_before) << "a socket of the connect leaked";
    }
}

// ---- coro::connect() by name ----------------------------------------------------

// What a connecting coroutine ended with: the echo of what it wrote and the
// peer, or the exception's code and text.
struct CoroConnected {
    bool done = false;
    std::string echoed;
    Address peer;
    std::error_code ec;
    std::string what;
};

/// The exception being handled, recorded: a std::system_error's code and
/// text, any other's text after "other: ".
template <class Out>
void record_exception(Out* out) {
    try {
        throw;
    } catch (const std::system_error& e) {
        out->ec = e.code();
        out->what = e.what();
    } catch (const std::exception& e) {
        out->what = std::string("other: ") + e.what();
    }
}

coro::Task<void> connect_and_echo(EventLoop& loop, std::string target, ConnectOptions options,
                                  CoroConnected* out) {
    try {
        coro::Stream s = co_await coro::connect(loop, target, options);
        out->peer = s.connection()->peer_address();
        co_await s.write("ping\n");
        out->echoed = co_await s.read_line();
    } catch (...) {
        record_exception(out);
    }
    out->done = true;
}

TEST(CoroConnectByName, TriesEachAddressInOrderUntilOneConnects) {
    EVMUX_LOOP_OR_SKIP(loop);
    TcpServer server(loop, Address::parse("127.0.0.1:0"), echo_callbacks());
    const std::uint16_t port = server.local_address().port();
    Fd refuses = bound_not_listening("127.0.0.2", port);
    DnsResponder dns({{"multi.test", {{"127.0.0.2", "127.0.0.1"}, {}}}});
    ResolverOptions o = asking(dns);
    o.family = AF_INET;
    Resolver resolver(loop, o);
    ConnectOptions co;
    co.resolver = &resolver;
    CoroConnected out;
    coro::spawn(loop, connect_and_echo(loop, "multi.test:" + std::to_string(port), co, &out));
    ASSERT_TRUE(run_until(loop, [&] { return out.done; }));
    EXPECT_EQ(out.what, "");
    EXPECT_EQ(out.echoed, "ping\n");
    EXPECT_EQ(out.peer, Address::ip("127.0.0.1", port));
    EXPECT_EQ(dns.questions(), 1u);
}

TEST(CoroConnectByName, LocalhostAndNumericTextWithoutAResolver) {
    EVMUX_LOOP_OR_SKIP(loop);
    TcpServer server(loop, Address::parse("127.0.0.1:0"), echo_callbacks());
    const std::string port = std::to_string(server.local_address().port());
    for (const std::string& target : {"localhost:" + port, "127.0.0.1:" + port}) {
        CoroConnected out;
        coro::spawn(loop, connect_and_echo(loop, target, {}, &out));
        ASSERT_TRUE(run_until(loop, [&] { return out.done; })) << target;
        EXPECT_EQ(out.what, "") << target;
        EXPECT_EQ(out.echoed, "ping\n") << target;
        EXPECT_EQ(out.peer, server.local_address()) << target;
    }
}

TEST(CoroConnectByName, FailuresThrowTheConnectorsText) {
    EVMUX_LOOP_OR_SKIP(loop);
    Fd a = bound_not_listening("127.0.0.2", 0);
    const std::uint16_t port = Address::local_of(a.get()).port();
    Fd b = bound_not_listening("127.0.0.3", port);
    DnsResponder dns({{"dead.test", {{"127.0.0.2", "127.0.0.3"}, {}}}});
    ResolverOptions o = asking(dns);
    o.family = AF_INET;
    Resolver resolver(loop, o);
    ConnectOptions co;
    co.resolver = &resolver;
    const std::string p = std::to_string(port);

    CoroConnected refused;
    coro::spawn(loop, connect_and_echo(loop, "dead.test:" + p, co, &refused));
    CoroConnected unknown;
    coro::spawn(loop, connect_and_echo(loop, "nosuch.invalid:80", co, &unknown));
    CoroConnected numeric;
    coro::spawn(loop, connect_and_echo(loop, "127.0.0.2:" + p, co, &numeric));
    CoroConnected bad;
    coro::spawn(loop, connect_and_echo(loop, "no-port-here", co, &bad));
    ASSERT_TRUE(
        run_until(loop, [&] { return refused.done && unknown.done && numeric.done && bad.done; }));
    EXPECT_EQ(refused.ec, std::errc::connection_refused);
    EXPECT_EQ(refused.what, "connect dead.test:" + p + ": 127.0.0.2:" + p +
                                ": Connection refused; 127.0.0.3:" + p + ": Connection refused");
    EXPECT_EQ(unknown.ec, ResolveErrc::not_found);
    EXPECT_EQ(unknown.what,
              "connect nosuch.invalid:80: cannot resolve 'nosuch.invalid': Domain name not found");
    EXPECT_EQ(numeric.ec, std::errc::connection_refused);
    EXPECT_EQ(numeric.what, "connect 127.0.0.2:" + p + ": Connection refused");
    EXPECT_EQ(bad.what.rfind("other: ", 0), 0u) << bad.what;  // std::invalid_argument
    EXPECT_NE(bad.what.find("no-port-here"), std::string::npos) << bad.what;
}

TEST(CoroConnectByName, TheTimeoutCoversTheLookupAndDestroyingTheTaskCancelsIt) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    dns.set_silent(true);
    Resolver resolver(loop, asking(dns, 2000ms, 3));
    ConnectOptions co;
    co.resolver = &resolver;
    co.timeout = 150ms;
    CoroConnected out;
    const auto start = std::chrono::steady_clock::now();
    coro::spawn(loop, connect_and_echo(loop, "one.test:80", co, &out));
    ASSERT_TRUE(run_until(loop, [&] { return out.done; }));
    EXPECT_GE(std::chrono::steady_clock::now() - start, 150ms);
    EXPECT_EQ(out.ec, std::errc::timed_out);
    EXPECT_EQ(out.what, "connect one.test:80: Connection timed out");
    EXPECT_EQ(resolver.pending(), 0u);

    // A task destroyed while its lookup is out: the lookup goes with it.
    co.timeout = 0ms;  // none
    bool resumed = false;
    {
        auto body = [](EventLoop& l, ConnectOptions o, bool* r) -> coro::Task<void> {
            coro::Stream s = co_await coro::connect(l, "two.test:80", o);
            *r = true;
        };
        coro::Task<void> t = body(loop, co, &resumed);
        auto awaiter = std::move(t).operator co_await();  // started as a co_await would
        awaiter.await_suspend(std::noop_coroutine()).resume();
        ASSERT_TRUE(run_until(loop, [&] { return resolver.pending() == 1; }));
    }
    pump_for(loop, 20ms);
    EXPECT_FALSE(resumed);
    EXPECT_EQ(resolver.pending(), 0u) << "the lookup was cancelled with the task";
}

// ---- coro::resolve() -------------------------------------------------------------

// What a resolving coroutine ended with: the addresses as text, or the
// exception's code and text.
struct CoroResolved {
    bool done = false;
    std::vector<std::string> addresses;
    std::error_code ec;
    std::string what;
};

template <class Lookup>
coro::Task<void> resolve_into(Lookup lookup, CoroResolved* out) {
    try {
        for (const Address& a : co_await lookup()) out->addresses.push_back(a.to_string());
    } catch (...) {
        record_exception(out);
    }
    out->done = true;
}

TEST(CoroResolve, AddressesInTheResolversOrderAndClearErrors) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    ResolverOptions o = asking(dns);
    o.family = AF_INET;
    Resolver resolver(loop, o);
    CoroResolved two, unknown, service, empty, numeric;
    coro::spawn(loop,
                resolve_into([&] { return coro::resolve(resolver, "two.test", "443"); }, &two));
    coro::spawn(loop, resolve_into([&] { return coro::resolve(resolver, "nosuch.invalid", "80"); },
                                   &unknown));
    coro::spawn(loop,
                resolve_into([&] { return coro::resolve(resolver, "one.test", "80x"); }, &service));
    coro::spawn(loop, resolve_into([&] { return coro::resolve(resolver, "", "80"); }, &empty));
    coro::spawn(
        loop, resolve_into([&] { return coro::resolve(resolver, "127.0.0.1", "http"); }, &numeric));
    ASSERT_TRUE(run_until(loop, [&] {
        return two.done && unknown.done && service.done && empty.done && numeric.done;
    }));
    EXPECT_EQ(two.what, "");
    EXPECT_EQ(two.addresses, (std::vector<std::string>{"127.0.0.21:443", "127.0.0.22:443"}));
    EXPECT_EQ(unknown.ec, ResolveErrc::not_found);
    EXPECT_EQ(unknown.what, "cannot resolve 'nosuch.invalid': Domain name not found");
    EXPECT_TRUE(unknown.addresses.empty());
    EXPECT_EQ(service.ec, ResolveErrc::unknown_service);
    EXPECT_EQ(service.what,
              resolve_message("one.test", make_error_code(ResolveErrc::unknown_service)));
    EXPECT_EQ(empty.what.rfind("other: ", 0), 0u) << empty.what;  // std::invalid_argument
    EXPECT_EQ(numeric.addresses, std::vector<std::string>{"127.0.0.1:80"});
    EXPECT_EQ(resolver.pending(), 0u);
}

TEST(CoroResolve, LocalhostWithAResolverOfItsOwn) {
    EVMUX_LOOP_OR_SKIP(loop);
    CoroResolved local, asked;
    coro::spawn(loop,
                resolve_into([&] { return coro::resolve(loop, "localhost", "8080"); }, &local));
    DnsResponder dns(names());
    coro::spawn(
        loop,
        resolve_into([&] { return coro::resolve(loop, "both.test", "1", asking(dns)); }, &asked));
    ASSERT_TRUE(run_until(loop, [&] { return local.done && asked.done; }));
    EXPECT_EQ(local.what, "");
    EXPECT_NE(std::find(local.addresses.begin(), local.addresses.end(), "127.0.0.1:8080"),
              local.addresses.end())
        << "localhost (/etc/hosts) did not give 127.0.0.1";
    EXPECT_EQ(asked.what, "");
    std::vector<std::string> sorted = asked.addresses;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(sorted, (std::vector<std::string>{"127.0.0.31:1", "[::1]:1"}));
}

TEST(CoroResolve, ATimeoutOrTheTasksEndCancelsTheLookup) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    dns.set_silent(true);
    Resolver resolver(loop, asking(dns, 2000ms, 3));
    CoroResolved timed;
    const auto start = std::chrono::steady_clock::now();
    // with_timeout() of an awaitable in the co_await's own statement (it
    // holds the awaitable by reference).
    coro::spawn(loop, [](EventLoop& l, Resolver& r, CoroResolved* out) -> coro::Task<void> {
        try {
            co_await coro::with_timeout(l, 100ms, coro::resolve(r, "one.test", "80"));
        } catch (...) {
            record_exception(out);
        }
        out->done = true;
    }(loop, resolver, &timed));
    ASSERT_TRUE(run_until(loop, [&] { return timed.done; }));
    EXPECT_GE(std::chrono::steady_clock::now() - start, 100ms);
    EXPECT_EQ(timed.ec, std::errc::timed_out);
    EXPECT_EQ(timed.what, "timed out after 100 ms: Connection timed out");
    pump_for(loop, 10ms);
    EXPECT_EQ(resolver.pending(), 0u) << "the lookup outlived its timeout";

    // A task destroyed while its lookup (on a resolver of its own) is out.
    const std::size_t asked_before = dns.questions();
    bool resumed = false;
    {
        auto body = [](EventLoop& l, ResolverOptions o, bool* r) -> coro::Task<void> {
            co_await coro::resolve(l, "two.test", "80", o);
            *r = true;
        };
        coro::Task<void> t = body(loop, asking(dns, 2000ms, 3), &resumed);
        auto awaiter = std::move(t).operator co_await();  // started as a co_await would
        awaiter.await_suspend(std::noop_coroutine()).resume();
        ASSERT_TRUE(run_until(loop, [&] { return dns.questions() > asked_before; }));
    }
    pump_for(loop, 20ms);
    EXPECT_FALSE(resumed);
}

TEST(ServerByName, ListensOnLocalhost) {
    EVMUX_LOOP_OR_SKIP(loop);
    TcpServer server(loop, "localhost:0", echo_callbacks());
    EXPECT_EQ(server.local_address().to_string().rfind("127.0.0.1:", 0), 0u)
        << server.local_address().to_string();
    EXPECT_NE(server.local_address().port(), 0);
    ConnectResult r;
    connect(loop, "localhost:" + std::to_string(server.local_address().port()),
            r.callbacks("name"));
    ASSERT_TRUE(run_until(loop, [&] { return r.echoed == "name" || r.errors > 0; }));
    EXPECT_EQ(r.errors, 0) << r.message;
    r.conn->close();
    pump_for(loop, 20ms);
}

// A server's ":8080" listens on every IPv4 interface, as Go's net.Listen
// reads it; "8080" alone is refused, told what to write. Both were refused
// with "no host" or "expected HOST:PORT". connect() takes neither.
TEST(ServerByName, AnEmptyHostListensOnEveryInterface) {
    EVMUX_LOOP_OR_SKIP(loop);
    EXPECT_EQ(resolve_address_now(":8080").at(0), Address::parse("0.0.0.0:8080"));
    TcpServer server(loop, ":0", echo_callbacks());
    EXPECT_EQ(server.local_address().host(), "0.0.0.0");
    ASSERT_NE(server.local_address().port(), 0);
    ConnectResult r;
    connect(loop, Address::ip("127.0.0.1", server.local_address().port()), r.callbacks("any"));
    ASSERT_TRUE(run_until(loop, [&] { return r.echoed == "any" || r.errors > 0; }));
    EXPECT_EQ(r.errors, 0) << r.message;
    r.conn->close();
    pump_for(loop, 20ms);
    LoopGroup group(1);
    EXPECT_EQ(group.listen(":0", echo_callbacks()).local_address().host(), "0.0.0.0");
    group.stop();

    auto what = [](auto make) {
        try {
            make();
        } catch (const std::invalid_argument& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    EXPECT_EQ(what([&] { TcpServer(loop, "8080", {}); }),
              "bad address \"8080\": no host (every interface: 0.0.0.0:8080 or :8080)");
    EXPECT_EQ(what([&] { connect(loop, ":8080", {}); }), "bad address \":8080\": no host");
}

TEST(ServerByName, BindsTheFirstAddressThatBinds) {
    EVMUX_LOOP_OR_SKIP(loop);
    TcpServer taken(loop, Address::parse("127.0.0.1:0"), {});
    const std::uint16_t port = taken.local_address().port();
    const std::string p = std::to_string(port);
    DnsResponder dns(
        {{"busy.test", {{"127.0.0.1", "127.0.0.2"}, {}}}, {"full.test", {{"127.0.0.1"}, {}}}});
    ServerOptions so;
    so.resolver = asking(dns);
    so.resolver.family = AF_INET;
    TcpServer server(loop, "busy.test:" + p, echo_callbacks(), so);
    EXPECT_EQ(server.local_address(), Address::ip("127.0.0.2", port));
    // Both taken now: each one's error.
    try {
        dns.set("full.test", {{"127.0.0.1", "127.0.0.2"}, {}});
        TcpServer(loop, "full.test:" + p, {}, so);
        ADD_FAILURE() << "bound a taken address";
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code(), std::errc::address_in_use);
        EXPECT_STREQ(e.what(),
                     ("bind full.test:" + p + ": tried 127.0.0.1:" + p +
                      " (Address already in use), 127.0.0.2:" + p + ": Address already in use")
                         .c_str());
    }
}

TEST(ServerByName, UnknownNameThrowsAClearError) {
    EVMUX_LOOP_OR_SKIP(loop);
    DnsResponder dns(names());
    ServerOptions so;
    so.resolver = asking(dns);
    try {
        TcpServer(loop, "nosuch.invalid:0", {}, so);
        ADD_FAILURE() << "no throw";
    } catch (const std::system_error& e) {
        EXPECT_EQ(e.code(), ResolveErrc::not_found);
        EXPECT_STREQ(e.what(), "evmux: cannot resolve 'nosuch.invalid': Domain name not found");
    }
    EXPECT_THROW(TcpServer(loop, "localhost", {}), std::invalid_argument);
}

TEST(ServerByName, LoopGroupListensOnAName) {
    EVMUX_SELECTOR_OR_SKIP(sel);
    sel.reset();
    LoopGroup group(2);
    TcpServer& server = group.listen("localhost:0", echo_callbacks());
    EXPECT_EQ(server.local_address().family(), AF_INET);
    EventLoop loop;
    ConnectResult r;
    connect(loop, server.local_address(), r.callbacks("grp"));
    ASSERT_TRUE(run_until(loop, [&] { return r.echoed == "grp" || r.errors > 0; }));
    EXPECT_EQ(r.errors, 0) << r.message;
    r.conn->close();
    pump_for(loop, 20ms);
}

}  // namespace
}  // namespace evmux
