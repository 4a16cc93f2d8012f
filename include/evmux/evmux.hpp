// evmux: the whole public API in one include.
//
//     #include <evmux/evmux.hpp>
//
// Includes every public header (tests/install_test.sh checks that none is
// missing) and thus only evmux's public headers and the standard library.
// Including the individual headers instead compiles faster.
#pragma once

#include "evmux/address.hpp"
#include "evmux/buffer.hpp"
#include "evmux/connection.hpp"
#include "evmux/coro.hpp"
#include "evmux/datagram.hpp"
#include "evmux/event_loop.hpp"
#include "evmux/loop_group.hpp"
#include "evmux/resolver.hpp"
#include "evmux/selector.hpp"
#include "evmux/server.hpp"
#include "evmux/tls.hpp"
#include "evmux/version.hpp"

/// Everything evmux offers. The layers, each using only the one below:
/// Selector (which fds are ready, on a backend chosen at run time),
/// EventLoop (callbacks per fd, timers, signals, cross-thread post),
/// Connection (buffered I/O with a bounded message queue, plain or over TLS),
/// TcpServer, and coroutines over them (evmux::coro); beside them UdpEndpoint
/// (datagrams).
namespace evmux {}
