// evmux connection: one connected stream socket (TCP over IPv4/IPv6, or Unix)
// with its outgoing message queue, input buffer, backpressure and close /
// half-close handling, driven by an EventLoop; plain, or TLS (tls.hpp).
//
// This header includes only evmux's public headers and the standard library.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "evmux/address.hpp"
#include "evmux/buffer.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/tls.hpp"

namespace evmux {

namespace detail {
class TlsSession;        // src/tls_session.hpp, not installed
struct CompletionOp;     // backends/completion_io.hpp, not installed
struct CompletionState;  // src/connection_completion.hpp, not installed
/// A lock of one byte (std::mutex takes 40): Connection's guard for calls
/// from other threads, held only to check a flag and post, rarely contended.
class ByteLock {
  public:
    void lock() noexcept {
        while (held_.test_and_set(std::memory_order_acquire)) std::this_thread::yield();
    }
    void unlock() noexcept { held_.clear(std::memory_order_release); }

  private:
    std::atomic_flag held_;
};
}  // namespace detail

class Connection;
/// Connections are shared: the loop keeps an open connection alive, and a
/// callback's `conn` argument stays valid for the whole call even if the
/// callback closes it.
using ConnectionPtr = std::shared_ptr<Connection>;

/// Why a connection closed (the `reason` of on_close).
enum class CloseReason {
    peer_closed,  ///< orderly: the peer shut down and our side finished too
    reset,        ///< ECONNRESET or EPIPE: the peer is gone
    error,        ///< any other socket error (err says which)
    overflow,     ///< the outgoing queue or unconsumed input passed the hard cap
    timeout,      ///< idle for one of the server's idle timeouts (read, write or both)
    local,        ///< close() was called, or the owning server or loop went away
    exception,    ///< one of this connection's callbacks threw (the loop's exception
                  ///< handler received the exception)
    tls,          ///< a TLS error: a failed handshake (bad certificate, wrong name, not
                  ///< TLS at all; a connect() reports its own as on_error instead),
                  ///< a bad record, or an EOF without close_notify;
                  ///< Connection::close_message() has OpenSSL's reason
};

/// "peer_closed", "reset", ...
const char* to_string(CloseReason reason);

/// What a connection tells its user. Every member may be left empty. All run
/// on the loop thread; each receives the connection, valid for the call.
///
/// Any of them may throw. The exception closes only this connection (reason
/// `exception`; no byte of its input is handed to anyone afterwards), its
/// on_close still runs exactly once, its server forgets it (counters, the
/// max_connections slot), and the exception goes to the loop's exception
/// handler (EventLoop::set_exception_handler(); by default run() rethrows it
/// after the iteration). Other connections are not touched. An exception from
/// on_close itself goes to the handler too.
struct Callbacks {
    /// The connection is established (accepted, or connect() completed);
    /// over TLS, once the handshake has completed. A failed handshake (or
    /// one that ran out of time) never reaches on_connect: an accepted (or
    /// adopted) connection then ends in on_close (reason `tls`, `timeout`,
    /// ...), one made by connect() in on_error and no on_close.
    std::function<void(const ConnectionPtr&)> on_connect;
    /// New bytes arrived. Consume what you handle; the rest is kept and shown
    /// again with the next bytes. Unset: input is discarded.
    std::function<void(const ConnectionPtr&, Buffer& input)> on_message;
    /// Write complete (muduo's writeCompleteCallback): everything sent so far
    /// has gone to the kernel. Runs when the queue, once non-empty, has been
    /// fully written; and after a send() whose bytes all went to the kernel
    /// at once, from the loop (never inside send()), at most once per
    /// iteration however many such sends there were. Sending the next chunk
    /// from here never stalls.
    std::function<void(const ConnectionPtr&)> on_drain;
    /// The connection closed; called exactly once for every connection that
    /// was started, whatever ends it: the peer, an error, close(), a throwing
    /// callback, or the destruction of its server, LoopGroup or loop (then
    /// before that destructor returns, reason `local`). Started means: any
    /// accepted or adopted connection (over TLS, also one whose handshake
    /// failed: without on_connect); for connect(), one whose on_connect ran
    /// (a connect() that fails, over TLS also in its handshake, has on_error
    /// and never on_close, as asyncio's connection_lost follows only a
    /// connection_made). Sends are no-ops by now; peer_address() and
    /// local_address() still answer, and the socket is closed when this
    /// returns. `err` is the errno for reset/error, else 0.
    std::function<void(const ConnectionPtr&, CloseReason reason, int err)> on_close;
    /// The queue passed the high-water mark (reading from this peer is now
    /// paused until it falls under the low-water mark). Once per crossing.
    std::function<void(const ConnectionPtr&, std::size_t queued)> on_high_water;
    /// The queue, after passing the high-water mark, has drained to the
    /// low-water mark (reading resumes): asyncio's resume_writing(), the pair
    /// of on_high_water. Once per crossing, from the loop's write handling
    /// (never inside send()). Unlike on_drain it costs nothing per send().
    std::function<void(const ConnectionPtr&, std::size_t queued)> on_low_water;
    /// The peer shut down its sending side (over TLS: sent close_notify); all
    /// data it sent before has been delivered. Unset: the queue is sent, then
    /// our side is shut down too, and the connection closes with peer_closed.
    std::function<void(const ConnectionPtr&)> on_peer_shutdown;
    /// connect() only: the connection could not be made (refused, timed out,
    /// cancelled; over TLS also a failed handshake, EPROTO with OpenSSL's
    /// reason, or a reset or timeout during it). Runs once, instead of
    /// on_connect, and no on_close follows. `message` reads like "connect
    /// 127.0.0.1:1: Connection refused", "connect 127.0.0.1:443: TLS
    /// handshake: certificate verify failed (hostname mismatch)", "connect
    /// 127.0.0.1:443: timed out during the TLS handshake".
    /// Unset, a failure is not lost: it goes to the loop's exception handler
    /// as a std::system_error (code `ec`, what() `message`), as an exception
    /// escaping a callback does (EventLoop::set_exception_handler(); by
    /// default run() rethrows it). A cancel (cancel(), the loop destroyed
    /// first) is no failure and goes nowhere.
    std::function<void(std::error_code ec, const std::string& message)> on_error;
};

/// Byte totals that an owner collects over many connections
/// (Connection::count_bytes_into): written by the connections' loop thread
/// only, read from any thread.
struct ByteCounters {
    std::atomic<std::uint64_t> in{0};   ///< bytes read (over TLS: plaintext)
    std::atomic<std::uint64_t> out{0};  ///< bytes written to the kernel (over TLS: plaintext)
};

/// TCP keepalive probes (SO_KEEPALIVE; libuv's uv_tcp_keepalive, muduo's
/// setKeepAlive): a peer that vanished without a FIN or a reset (its host
/// down, its network gone) is found while the connection is idle, which
/// reading alone never does. After `idle` without traffic the kernel sends a
/// probe every `interval`; `probes` unanswered in a row close the
/// connection with reason `error`, ETIMEDOUT. Values are clamped to what
/// Linux takes (1 to 32 767 s, 1 to 127 probes).
struct TcpKeepalive {
    /// Idle time before the first probe; zero: keepalive off (the default).
    std::chrono::seconds idle{0};
    /// Time between probes.
    std::chrono::seconds interval{15};
    /// Unanswered probes that end the connection.
    int probes = 4;
};

/// Per-connection limits. The defaults are asyncio's water marks.
struct ConnectionOptions {
    /// Queue size at which reading from the peer pauses (and on_high_water fires).
    std::size_t high_water = 64 * 1024;
    /// Queue size at or under which reading resumes.
    std::size_t low_water = 16 * 1024;
    /// Queued output, or unconsumed input, beyond this closes with `overflow`.
    std::size_t max_buffered = 16 * 1024 * 1024;
    /// At most this many bytes read per wake-up, so one busy peer cannot
    /// starve the others on the loop.
    std::size_t read_budget = 256 * 1024;
    /// TCP_NODELAY on TCP sockets (ignored for Unix sockets).
    bool tcp_nodelay = true;
    /// TCP keepalive on TCP sockets (ignored for Unix sockets); off by default.
    TcpKeepalive keepalive;
    /// How long a graceful close (close(CloseMode::graceful), a server's
    /// stop) may linger, as nginx's lingering close: closing a TCP socket
    /// with input unread makes the kernel reset the connection and drop what
    /// our send buffer still holds, the reply the close promised. So once
    /// the queue is written (and on_close has run), FIN goes out and input is
    /// read and dropped until the peer has acknowledged all we sent, or ends
    /// its stream, or this limit passes; then the socket closes. Most closes
    /// find that done at once and close there. Zero: close at once.
    std::chrono::milliseconds linger{5000};
    /// Speak TLS with this context: a server context for accepted (and
    /// adopted) connections, a client context for connect(). Null: plain.
    /// Water marks, max_buffered, queued_bytes() and the byte counts are
    /// plaintext bytes either way.
    std::shared_ptr<TlsContext> tls;
};

/// How close() treats the outgoing queue.
enum class CloseMode {
    immediate,  ///< drop the queue and close now
    graceful,   ///< stop reading, send the queue, then close (see ConnectionOptions::linger)
    /// drop the queue and reset the connection (libuv's uv_tcp_close_reset):
    /// TCP sends RST instead of FIN (SO_LINGER 0), so the peer's reads fail
    /// with ECONNRESET, as a relay passes on a reset; no TLS close_notify. A
    /// Unix socket closes as with `immediate`.
    reset,
};

/// One connected, non-blocking stream socket on one EventLoop; owns the fd.
/// Create with Connection::adopt(), TcpServer or connect(). The loop keeps a
/// connection alive (EventLoop::tie) from its start until its on_close has
/// run, so a user needs to hold a ConnectionPtr only to talk to it later; a
/// loop destroyed first closes it (on_close, reason `local`). Non-copyable.
///
/// Threads (muduo's rule): send() (every overload), shutdown_write(),
/// close(), pause_reading() and resume_reading() may be called from any
/// thread. On the thread running the loop they act at once, as documented;
/// from another thread the call is posted to the loop (EventLoop::post()),
/// holding the connection and a copy of the bytes (send(std::string&&):
/// the string, moved), and acts there, in post order: one thread's sends
/// arrive in the order it made them, each whole. A call that arrives after
/// the connection has closed is a no-op, as on the loop thread; once it has
/// closed, calls from anywhere are no-ops that touch nothing of the loop's,
/// so they are safe after the loop is gone. Every other member (the state
/// queries is_open(), queued_bytes(), bytes_in(), ..., emplace_state() and
/// state(), the owner's calls) is loop thread only: a query from another
/// thread reads state the loop is changing, and a posted call may not have
/// acted yet.
class alignas(64) Connection : public std::enable_shared_from_this<Connection> {
    struct Private {};

  public:
    /// Take ownership of `fd`, a connected stream socket: make it
    /// non-blocking, set TCP_NODELAY (per options), watch it for reading and
    /// call on_connect before returning. If anything fails the fd is closed
    /// and std::system_error is thrown naming the call.
    static ConnectionPtr adopt(EventLoop& loop, int fd, Callbacks callbacks,
                               ConnectionOptions options = {});

    /// Use adopt(). (Public only for std::make_shared.)
    Connection(Private, EventLoop& loop, int fd, Callbacks callbacks, ConnectionOptions options);
    ~Connection();
    Connection(const Connection&) = delete;
    Connection& operator=(const Connection&) = delete;

    // ---- sending ----------------------------------------------------------------
    /// Send bytes: written at once if nothing is queued, the rest copied to
    /// the queue and written when the socket is writable. A no-op once closed
    /// or after shutdown_write(). A write error closes the connection
    /// (on_close runs from the loop, never inside send()). May close with
    /// `overflow` if the queue would pass max_buffered. On completion I/O
    /// the bytes are queued for the send request made before the next wait
    /// (written at once only when they take the queue past high_water).
    /// Any thread: from another, a copy is posted (see the class comment).
    void send(const void* data, std::size_t len);
    /// As send(const void*, std::size_t).
    void send(std::string_view bytes) { send(bytes.data(), bytes.size()); }
    /// A NUL-terminated text (without the NUL); as send(std::string_view).
    void send(const char* text) { send(std::string_view(text)); }
    /// As send(), but a queued remainder keeps `bytes`' storage: no copy
    /// (from another thread the string is moved into the posted call).
    void send(std::string&& bytes);

    /// Send FIN (over TLS: close_notify, then FIN) once the queue has
    /// drained; later sends are no-ops. If the peer has already shut down
    /// too, the connection then closes (peer_closed). Any thread (posted).
    void shutdown_write();
    /// Close (see CloseMode); reason `local`. Idempotent. on_close runs after
    /// close() has returned, never inside it. Over TLS, close_notify is sent
    /// first if the queue is empty by then (the peer can tell a complete
    /// stream from a cut one). Any thread (posted): then on_close runs on
    /// the loop, and is_open() there turns false when the call arrives.
    void close(CloseMode mode = CloseMode::immediate);

    /// Stop / restart reading from the peer (user-level flow control; independent
    /// of the automatic pause at the high-water mark). Any thread (posted).
    void pause_reading();
    /// Undo pause_reading(); reading stays paused while the queue is above the
    /// high-water mark. Input left unconsumed comes to on_message again
    /// (posted) when reading resumes, though the peer sends nothing more.
    /// Any thread (posted).
    void resume_reading();

    // ---- state (loop thread only) -------------------------------------------------
    /// False once closing has started (close(), error, peer gone).
    bool is_open() const { return state_ == State::open; }
    /// Bytes waiting in the outgoing queue.
    std::size_t queued_bytes() const { return queued_; }
    /// True while reading is paused by the high-water mark.
    bool above_high_water() const { return above_high_; }
    /// Bytes held for input not yet consumed (0 when idle).
    std::size_t input_bytes() const { return input_.size(); }
    /// Total bytes received from the kernel (over TLS: plaintext received).
    std::uint64_t bytes_in() const { return bytes_in_; }
    /// Total bytes sent to the kernel (over TLS: plaintext sent).
    std::uint64_t bytes_out() const { return bytes_out_; }
    /// True if this connection speaks TLS.
    bool is_tls() const { return tls_ != nullptr; }
    /// The ALPN protocol agreed in the TLS handshake ("" if none, or plain).
    std::string tls_alpn() const;
    /// The TLS peer certificate's subject, RFC 2253 ("CN=client,O=evmux"),
    /// "" if the peer sent none (or plain).
    std::string tls_peer_subject() const;
    /// The TLS version in use ("TLSv1.3"; "" if plain).
    std::string tls_version() const;
    /// How this connection's bytes move: IoMode::completion on a completion
    /// loop (a TLS connection once its handshake is done, with evmux's
    /// record layer), readiness otherwise.
    IoMode io_mode() const { return cio_ ? IoMode::completion : IoMode::readiness; }
    /// Who protects the records after the handshake: TlsRecords::evmux once
    /// evmux's record layer has taken over (TLS 1.3), TlsRecords::openssl
    /// otherwise (TLS 1.2, asked for, before the handshake is done, or plain).
    TlsRecords tls_records() const;
    /// Why it closed, in words, for on_close and after: OpenSSL's reason for
    /// `tls` ("TLS handshake: certificate verify failed (certificate has
    /// expired)"), "TLS handshake timed out after 10000 ms", the errno's
    /// text for `reset` and `error`; "" otherwise.
    std::string close_message() const;
    /// The socket, or -1 once closing has started.
    int fd() const { return state_ == State::open ? fd_ : -1; }
    /// The loop this connection runs on.
    EventLoop& loop() const { return loop_; }
    /// The socket's local address (getsockname); also inside on_close,
    /// Address() after it.
    Address local_address() const;
    /// The peer's address, as accept() or connect() had it (getpeername for
    /// an adopted fd, once, at adoption); unchanged by closing, so also
    /// inside and after on_close.
    const Address& peer_address() const { return peer_; }
    /// When the last byte was read (only tracked when an idle timeout is in
    /// use; the loop's EventLoop::iteration_time(), no clock read per byte).
    EventLoop::Clock::time_point last_read() const { return last_read_; }
    /// When the last byte was written to the kernel (as last_read()).
    EventLoop::Clock::time_point last_write() const { return last_write_; }
    /// The later of last_read() and last_write().
    EventLoop::Clock::time_point last_activity() const { return std::max(last_read_, last_write_); }

    // ---- per-connection state (libuv's handle->data, typed) ----
    /// Give this connection a state of the user's: destroys the previous one
    /// (if any) and constructs a `T` from `args` in its place. Set it in
    /// on_connect (or after connect()), read it with state<T>() in every
    /// callback. It lives until on_close has returned (so on_close can read
    /// it, and a state holding a ConnectionPtr makes no cycle), or until the
    /// connection is destroyed if it never opened. Throws what `T`'s
    /// constructor throws (the previous state is gone then). A state that
    /// the previous one's destructor, or `T`'s constructor, puts in place is
    /// destroyed as well.
    template <class T, class... Args>
    T& emplace_state(Args&&... args) {
        reset_state();
        T* made = new T(std::forward<Args>(args)...);
        reset_state();  // one that T's constructor put in place: `made` wins
        user_state_.object = made;
        user_state_.type = &state_type_tag<T>;
        user_state_.destroy = [](void* p) noexcept { delete static_cast<T*>(p); };
        return *made;
    }
    /// The state emplace_state<T>() made; nullptr if there is none or it is
    /// of another type.
    template <class T>
    T* state() noexcept {
        return user_state_.type == &state_type_tag<T> ? static_cast<T*>(user_state_.object)
                                                      : nullptr;
    }
    /// Destroy the state now (none: nothing happens).
    void reset_state() noexcept;

    // ---- for owners (a server, connect()): muduo's connectEstablished and
    // setCloseCallback. The owner sets its hooks between create() and start().
    /// As adopt() without start(): takes ownership of `fd` (non-blocking,
    /// TCP_NODELAY per options) and returns the connection unstarted, for an
    /// owner to set its hooks first. `peer`: the address accept() or connect()
    /// had (family 0: getpeername() here, once). `host_name`: the name a
    /// client connected to (connect() by name); with a client TLS context
    /// that names no server, it is sent as SNI and checked instead of the
    /// peer's IP address. On failure the fd is closed and std::system_error
    /// is thrown naming the call.
    static ConnectionPtr create(EventLoop& loop, int fd, Callbacks callbacks,
                                const ConnectionOptions& options, const Address& peer = {},
                                const std::string& host_name = {});
    /// Watch the socket and run on_connect; call once, after create(). Throws
    /// what EventLoop::watch() throws (then the connection was never open to
    /// its user: no on_close; destroying it closes the fd).
    void start();
    /// Run `hook` right after on_close, for the owner's bookkeeping (forget
    /// the connection, free its slot). Empty: none.
    void set_close_hook(std::function<void(Connection&)> hook) { close_hook_ = std::move(hook); }
    /// For connect() over TLS, whose handshake is part of connecting (as
    /// asyncio's open_connection(ssl=...)): `hook` is told how the handshake
    /// ended, once. An empty error code: it completed, and on_connect runs
    /// right after. Otherwise the connection closed first (before
    /// on_connect), and the hook runs instead of on_close, which never runs
    /// for it: EPROTO for a TLS error (close_message() has OpenSSL's
    /// reason), ETIMEDOUT for handshake_timeout, the socket's errno, or
    /// ECANCELED when it was closed (close_now(), the loop destroyed). Set
    /// between create() and start(); empty (a server's connections): a
    /// failed handshake ends in on_close (reason `tls`, `timeout`, ...).
    void set_handshake_hook(std::function<void(const ConnectionPtr&, std::error_code)> hook) {
        handshake_hook_ = std::move(hook);
    }
    /// Keep last_read() and last_write() (for idle timeouts); off by default.
    void track_activity(bool on) { tracking_ = on; }
    /// Also add every byte read and written to `counters` (an owner's totals
    /// over many connections, readable from any thread); nullptr: stop. They
    /// must outlive the connection or be unset first.
    void count_bytes_into(ByteCounters* counters) { counters_ = counters; }
    /// Close with a given reason (e.g. `timeout` from a server's idle sweep);
    /// otherwise as close(CloseMode::immediate).
    void close_with(CloseReason reason, int err = 0);
    /// For an owner going away (a server, the loop): close now (if still open)
    /// and run on_close before returning, or, if one of this connection's own
    /// callbacks is on the stack, as soon as it returns. Also delivers an
    /// on_close that close() had posted and the loop has not run yet.
    void close_now(CloseReason reason);

  private:
    // open -> closing (on_close owed; the fd still open, unwatched) -> closed.
    enum class State : std::uint8_t { open, closing, closed };
    struct alignas(64) Chunk {  // one cache line each (the ring is touched per message)
        std::string bytes;
        std::size_t offset = 0;  // written prefix
        // Completion I/O: the bytes are lent by a provided receive buffer
        // (sent from where they arrived, no copy) instead of `bytes`; the
        // buffer goes back to the kernel with the chunk.
        const char* lent = nullptr;
        std::size_t lent_len = 0;
        std::uint32_t lent_buffer = 0;  // the receive completion's flags naming it
        const char* rest() const { return (lent ? lent : bytes.data()) + offset; }
        std::size_t rest_size() const { return (lent ? lent_len : bytes.size()) - offset; }
    };
    // The outgoing queue: a ring of chunks. Empty, it holds no memory (a
    // std::deque allocates a map and a node up front); chunks coming and
    // going one at a time, as on completion I/O, allocate nothing (a deque
    // allocates a node every dozen).
    class ChunkQueue {
      public:
        bool empty() const { return size_ == 0; }
        std::size_t size() const { return size_; }
        Chunk& operator[](std::size_t i) { return slots_[(head_ + i) & (slots_.size() - 1)]; }
        Chunk& front() { return slots_[head_]; }
        Chunk& back() { return (*this)[size_ - 1]; }
        void push_back(Chunk&& chunk) {
            if (size_ == slots_.size()) grow();
            (*this)[size_++] = std::move(chunk);
        }
        // A lent chunk (Chunk::lent): its slot's string stays empty, as
        // pop_front() and clear() leave every slot's, so nothing is moved.
        void push_lent(const char* p, std::size_t len, std::uint32_t buffer) {
            if (size_ == slots_.size()) grow();
            Chunk& c = (*this)[size_++];
            c.offset = 0;
            c.lent = p;
            c.lent_len = len;
            c.lent_buffer = buffer;
        }
        // The front chunk, dropped (a lent one: no string to keep).
        void drop_front() {
            slots_[head_].lent = nullptr;
            head_ = (head_ + 1) & (slots_.size() - 1);
            if (--size_ == 0) head_ = 0;
        }
        // The front chunk's string, moved out (its bytes keep their storage).
        std::string pop_front() {
            std::string bytes = std::move(slots_[head_].bytes);
            head_ = (head_ + 1) & (slots_.size() - 1);
            if (--size_ == 0) head_ = 0;
            return bytes;
        }
        void clear() {
            slots_ = {};
            head_ = size_ = 0;
        }

      private:
        [[gnu::noinline]] void grow() {
            std::vector<Chunk> bigger(slots_.empty() ? 2 : slots_.size() * 2);
            for (std::size_t i = 0; i < size_; ++i) bigger[i] = std::move((*this)[i]);
            slots_ = std::move(bigger);
            head_ = 0;
        }
        std::vector<Chunk> slots_;  // a power of two long
        std::size_t head_ = 0, size_ = 0;
    };

    // The loop's watcher: handle(self_, events) for the Connection at `ctx`.
    static void on_ready(void* ctx, Events events);
    // Inlined into on_ready() (defined in connection.cpp, used only there):
    // one call per ready event instead of three.
    [[gnu::always_inline]] inline void handle(const ConnectionPtr& guard, Events events);
    // `self` is handle()'s guard, passed down to save reference-count traffic.
    [[gnu::always_inline]] inline void handle_read(const ConnectionPtr& self, Events events);
    void handle_write(const ConnectionPtr& self);
    // TLS's own writes: a read waiting for the socket, unsent records, and
    // the FIN or close waiting for close_notify to go out.
    void tls_write_ready(const ConnectionPtr& self);
    void tls_flushed();
    [[gnu::cold]] void handle_peer_eof(const ConnectionPtr& self);
    bool flush();  // false if the connection closed
    void after_queue_grew();
    void update_interest();
    void maybe_finish_shutdown();
    [[gnu::cold]] void fail(int err);                 // cold: keeps it out of the read/send paths
    bool close_quietly(CloseReason reason, int err);  // false if already closing
    [[gnu::cold]] void notify_closed() noexcept;
    [[gnu::cold]] void callback_threw(std::exception_ptr error) noexcept;
    [[gnu::cold]] void drain_soon();
    void deliver_drain();
    void touch_read() {
        if (tracking_) last_read_ = loop_.iteration_time();
    }
    void touch_write() {
        if (tracking_) last_write_ = loop_.iteration_time();
    }
    void send_rest(const char* p, std::size_t len);
    [[gnu::always_inline]] inline void send_lent(const char* p, std::size_t len);
    [[gnu::noinline]] void queue_copy(const char* p, std::size_t len);
    void clear_queue();  // completion I/O: gives lent receive buffers back
    // The byte transport: the socket itself, or TLS over it.
    std::ptrdiff_t write_some(const char* p, std::size_t len);
    void send_fin();
    void written_all(const ConnectionPtr& self);  // the queue drained: on_drain, FIN, close
    void consume_sent(std::size_t n);             // drops n written bytes from the queue
    bool after_sent();                            // low water; false if the connection closed
    // Completion I/O (src/connection_completion.cpp): requests instead of a watch.
    void completion_interest(Events want);
    void request_send();
    void submit_send();
    void deliver(const ConnectionPtr& self, const char* p, std::size_t n);
    // TLS over completion I/O (evmux's record layer, after the handshake).
    void start_completion();
    void deliver_tls(const ConnectionPtr& self, const char* p, std::size_t n);
    void submit_tls_send();
    bool seal_tls_out();
    bool write_tls_now();
    void tls_sent(const ConnectionPtr& self, std::size_t n);
    void deliver_held();
    void completion_closed();
    void op_finished();
    void close_socket(int fd);
    static void recv_done(detail::CompletionOp* op, std::int32_t res, std::uint32_t flags);
    static void send_done(detail::CompletionOp* op, std::int32_t res, std::uint32_t flags);
    static void prepare_send(detail::CompletionOp* op);
    bool write_queue();  // the queue to the kernel now (sendmsg); false if the connection closed
    // TLS only.
    void start_tls();
    [[gnu::cold]] void continue_handshake(const ConnectionPtr& self);
    void read_pending_soon();
    void deliver_unconsumed_soon();
    // A call made off the thread running our loop: true if it is done (posted
    // to the loop, or a no-op once closed); false on the loop's thread outside
    // run()/run_once(), where the caller goes on as usual.
    [[gnu::cold]] bool send_elsewhere(const char* p, std::size_t len);
    [[gnu::cold]] bool send_elsewhere(std::string& bytes);
    [[gnu::cold]] bool call_elsewhere(void (*call)(Connection&, int), int arg);

    // Members in the order of use: what every read and send touches comes
    // first, within the object's first five cache lines (the class is
    // cache-line aligned; readiness and completion I/O alike), not spread
    // over thirteen: at 1 000 connections each line is a cache miss per
    // message, and per phase of it (a receive's, the send request's, its
    // completion's). The first line (after enable_shared_from_this's 16
    // bytes) holds what every phase tests: the completion state, the flags,
    // the in-handler count; the second what a send counts and the queue (all
    // that a send request's preparation and completion touch besides the
    // first), the third and fourth what a read counts, the input, self_.
    std::unique_ptr<detail::TlsSession> tls_;       // null: plain
    std::unique_ptr<detail::CompletionState> cio_;  // completion I/O; null: readiness
    int fd_;
    Events interest_ = Events::none;
    State state_ = State::open;
    bool watching_ = false;
    bool above_high_ = false;        // queue passed high water; reading paused
    bool user_paused_ = false;       // pause_reading()
    bool peer_eof_ = false;          // the peer shut down its side
    bool shut_requested_ = false;    // shutdown_write() called (FIN after drain)
    bool shut_done_ = false;         // FIN sent
    bool fin_after_notify_ = false;  // TLS: FIN once close_notify is on the socket
    bool close_after_drain_ = false;
    bool graceful_ = false;   // close(graceful) called: the socket's close lingers
    bool resetting_ = false;  // close(reset) called: no close_notify, RST on close
    bool tracking_ = false;
    bool notify_pending_ = false;     // on_close due when the handler unwinds
    bool wants_drain_ = false;        // cb_.on_drain is set: a complete send() schedules it
    bool drain_posted_ = false;       // deliver_drain() is posted and owed
    bool handshaking_ = false;        // TLS: on_connect still to come
    bool pump_posted_ = false;        // TLS: a read of OpenSSL's buffered bytes is posted
    bool unconsumed_posted_ = false;  // reading resumed: on_message for input_ is posted
    int in_handler_ = 0;              // depth of our own callbacks on the stack
    std::size_t queued_ = 0;          // bytes in queue_; 0 exactly when it is empty
    std::uint64_t bytes_out_ = 0;
    ByteCounters* counters_ = nullptr;
    ChunkQueue queue_;
    std::uint64_t bytes_in_ = 0;
    std::function<void(const ConnectionPtr&, Buffer&)> on_message_;  // cb_.on_message, moved here
    Buffer input_;
    EventLoop& loop_;
    EventLoop::Clock::time_point last_read_{};
    // Our own reference over the same span: what on_ready() passes to
    // handle() and the callbacks (no reference-count traffic per event).
    ConnectionPtr self_;
    EventLoop::Clock::time_point last_write_{};
    ConnectionOptions opt_;
    // Less often: callbacks other than on_message, closing, the peer.
    Callbacks cb_;
    CloseReason reason_ = CloseReason::local;
    int err_ = 0;
    EventLoop::TieId tie_ = 0;                     // the loop's reference, from start() to on_close
    std::function<void(Connection&)> close_hook_;  // owner's bookkeeping, after on_close
    // connect() over TLS: told how the handshake ended (instead of on_close if it failed).
    std::function<void(const ConnectionPtr&, std::error_code)> handshake_hook_;
    template <class T>
    static constexpr char state_type_tag = 0;  // one address per type: state()'s check
    struct UserState {
        void* object = nullptr;
        const char* type = nullptr;
        void (*destroy)(void*) noexcept = nullptr;
    } user_state_;  // emplace_state()
    Address peer_;
    EventLoop::TimerId handshake_timer_ = 0;
    std::string close_message_;  // set for `tls` and the handshake timeout
    // Calls from other threads (send(), close(), ...): posted under this lock
    // while the connection is open, so never to a loop that has gone (the
    // loop closes its connections before it frees anything); closing sets
    // `remote_closed_` under it, and later calls from anywhere are no-ops.
    detail::ByteLock remote_lock_;
    bool remote_closed_ = false;
};

}  // namespace evmux
