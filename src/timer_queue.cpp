// The timers of one EventLoop: a binary min-heap of (due, seq) entries with
// lazy cancel. cancel() frees the slot and bumps its generation, which turns
// the heap entry stale; stale entries are dropped when they reach the top,
// and the heap is compacted when they outnumber the live ones.
#include "timer_queue.hpp"

#include <algorithm>
#include <climits>
#include <exception>
#include <stdexcept>
#include <utility>

namespace evmux::detail {
namespace {

// time + delay without overflowing the clock (a delay of hours::max() means "never").
TimerQueue::Clock::time_point saturating_add(TimerQueue::Clock::time_point t,
                                             TimerQueue::Duration d) {
    using tp = TimerQueue::Clock::time_point;
    if (d <= TimerQueue::Duration::zero()) return t;
    if (d > tp::max() - t) return tp::max();
    return t + d;
}

}  // namespace

// std::push_heap builds a max-heap; "later" as less-than makes it a min-heap.
bool TimerQueue::later(const HeapEntry& a, const HeapEntry& b) {
    return a.due != b.due ? a.due > b.due : a.seq > b.seq;
}

void TimerQueue::pop_top() {
    std::pop_heap(heap_.begin(), heap_.end(), later);
    heap_.pop_back();
}

void TimerQueue::push_entry(const HeapEntry& e) {
    heap_.push_back(e);
    std::push_heap(heap_.begin(), heap_.end(), later);
}

TimerQueue::TimerId TimerQueue::add(Duration delay, Duration interval, Task fn) {
    if (!fn) throw std::invalid_argument("evmux: empty timer callback");
    const Clock::time_point due = saturating_add(Clock::now(), delay);
    std::uint32_t slot;
    if (!free_slots_.empty()) {
        slot = free_slots_.back();
    } else {
        if (slots_.size() >= UINT32_MAX) throw std::length_error("evmux: too many timers");
        slots_.emplace_back();
        free_slots_.reserve(slots_.capacity());  // release_slot() then never allocates
        slot = static_cast<std::uint32_t>(slots_.size() - 1);
        free_slots_.push_back(slot);
    }
    Slot& s = slots_[slot];
    push_entry(HeapEntry{due, next_seq_, slot, s.generation});  // may throw: nothing changed
    free_slots_.pop_back();
    ++next_seq_;
    s.fn = std::move(fn);
    s.interval = interval;
    s.active = true;
    ++live_timers_;
    return static_cast<TimerId>(s.generation) << 32 | slot;
}

void TimerQueue::release_slot(std::uint32_t slot) {
    Slot& s = slots_[slot];
    s.active = false;
    s.fn = nullptr;
    if (++s.generation == 0) s.generation = 1;  // ids are never 0
    free_slots_.push_back(slot);
    --live_timers_;
    // Lazy cancel must not let cancelled entries pile up (a connection
    // that re-arms its idle timer on every read would grow the heap
    // forever): compact when they are the majority. Amortised O(1).
    if (heap_.size() >= 64 && heap_.size() > 2 * live_timers_) {
        std::erase_if(heap_, [this](const HeapEntry& e) { return !live(e); });
        std::make_heap(heap_.begin(), heap_.end(), later);
    }
}

bool TimerQueue::cancel(TimerId id) {
    const auto slot = static_cast<std::uint32_t>(id);
    const auto generation = static_cast<std::uint32_t>(id >> 32);
    if (slot >= slots_.size()) return false;
    const Slot& s = slots_[slot];
    if (!s.active || s.generation != generation) return false;
    release_slot(slot);
    return true;
}

// A repeating timer that was not cancelled in its callback runs again one
// interval after its due time (no drift). If the loop fell behind by more
// than one interval, the missed calls are skipped, keeping the phase: it
// never fires twice to catch up.
void TimerQueue::rearm(const HeapEntry& e, Duration interval, Task&& fn, Clock::time_point now) {
    Slot& s = slots_[e.slot];
    if (!s.active || s.generation != e.generation) return;  // cancelled meanwhile
    s.fn = std::move(fn);
    Clock::time_point next = saturating_add(e.due, interval);
    if (next <= now) {
        const auto missed = (now - e.due) / interval;
        next = saturating_add(e.due, interval * (missed + 1));
    }
    // The entry was just popped, so the heap has room: no allocation.
    push_entry(HeapEntry{next, next_seq_++, e.slot, e.generation});
}

std::size_t TimerQueue::run_due(Clock::time_point now, EventLoop& loop) {
    std::size_t ran = 0;
    // Timers scheduled or re-armed by these callbacks wait for the next
    // iteration, so a zero-delay timer that re-schedules itself cannot
    // starve I/O.
    const std::uint64_t seq_limit = next_seq_;
    while (!heap_.empty()) {
        const HeapEntry top = heap_.front();
        const bool is_live = live(top);
        if (is_live && (top.due > now || top.seq >= seq_limit)) break;
        pop_top();
        if (!is_live) continue;
        // Move the callback out: the slot table may grow (and move its
        // elements) while it runs, and cancel() may clear the slot.
        Slot& s = slots_[top.slot];
        Task fn = std::move(s.fn);
        const Duration interval = s.interval;
        ++ran;
        if (interval <= Duration::zero()) release_slot(top.slot);  // fired: cancel() is false
        try {
            fn();
        } catch (...) {
            loop.handle_exception(std::current_exception());
        }
        if (interval > Duration::zero()) rearm(top, interval, std::move(fn), now);
    }
    return ran;
}

std::vector<TimerQueue::Task> TimerQueue::take_callbacks() {
    std::vector<Task> callbacks;
    for (Slot& slot : slots_)
        if (slot.fn) callbacks.push_back(std::exchange(slot.fn, nullptr));
    return callbacks;
}

}  // namespace evmux::detail
