// Internal (not installed): the timers of one EventLoop (muduo's TimerQueue).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "evmux/event_loop.hpp"

namespace evmux::detail {

/// The timers of one loop: a binary min-heap of (due, seq) entries over a
/// slot table, with lazy cancel. EventLoop::call_after/call_every/cancel are
/// thin calls into it; the loop asks it how long it may wait (next_due()) and
/// runs the due ones (run_due()) against the iteration's one clock read. It
/// reads the clock only to schedule (add()). Owned by the loop's Impl; loop
/// thread only. Non-copyable, non-movable.
class TimerQueue {
  public:
    using Clock = EventLoop::Clock;
    using Duration = EventLoop::Duration;
    using Task = EventLoop::Task;
    using TimerId = EventLoop::TimerId;

    TimerQueue() = default;
    TimerQueue(const TimerQueue&) = delete;
    TimerQueue& operator=(const TimerQueue&) = delete;

    /// Schedule `fn` `delay` from now (Clock::now()), then every `interval`
    /// if that is > 0. Throws std::invalid_argument for an empty `fn`,
    /// std::length_error past 2^32 timers, std::bad_alloc; nothing changed then.
    TimerId add(Duration delay, Duration interval, Task fn);
    /// True if `id` was pending (see EventLoop::cancel()). O(1) amortised, no
    /// allocation.
    bool cancel(TimerId id);

    /// The due time of the nearest pending timer, or nullopt if none is
    /// pending. Drops cancelled entries from the top of the heap on the way.
    /// Inline: the loop asks once per iteration.
    std::optional<Clock::time_point> next_due() {
        while (!heap_.empty() && !live(heap_.front())) pop_top();
        if (heap_.empty()) return std::nullopt;
        return heap_.front().due;
    }
    /// True if the heap holds no entry at all, pending or cancelled (a
    /// cancelled one is dropped only when it reaches the top, or compacted).
    bool empty() const { return heap_.empty(); }
    /// Run the timers due at `now` that were scheduled before this call
    /// began; returns how many ran. An exception from a callback ends that
    /// call only and goes to loop.handle_exception() (a repeating timer stays
    /// armed).
    std::size_t run_due(Clock::time_point now, EventLoop& loop);

    /// Move every callback out, for the loop's destructor to destroy without
    /// calling them. The timers stay pending, without a callback; a
    /// callback's destructor may still cancel() or add().
    std::vector<Task> take_callbacks();

  private:
    // TimerId = generation << 32 | slot.
    struct Slot {
        Task fn;
        Duration interval{0};  // > 0: repeating
        std::uint32_t generation = 1;
        bool active = false;
    };
    struct HeapEntry {
        Clock::time_point due;
        std::uint64_t seq;  // ties: first scheduled runs first
        std::uint32_t slot;
        std::uint32_t generation;
    };

    static bool later(const HeapEntry& a, const HeapEntry& b);
    bool live(const HeapEntry& e) const {
        const Slot& s = slots_[e.slot];
        return s.active && s.generation == e.generation;
    }
    void pop_top();
    void push_entry(const HeapEntry& e);
    void release_slot(std::uint32_t slot);
    void rearm(const HeapEntry& e, Duration interval, Task&& fn, Clock::time_point now);

    std::vector<HeapEntry> heap_;
    std::vector<Slot> slots_;
    std::vector<std::uint32_t> free_slots_;
    std::size_t live_timers_ = 0;  // active slots
    std::uint64_t next_seq_ = 0;
};

}  // namespace evmux::detail
