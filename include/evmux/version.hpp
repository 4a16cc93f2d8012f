// evmux version: compile-time macros for the headers you compiled against and
// evmux::version() for the library you are running with.
//
// The numbers here must equal the `version:` in the top-level meson.build;
// configure fails if they differ (see src/meson.build), so they cannot drift.
//
// This header includes only the standard library.
#pragma once

/// Major version of the evmux headers. Changes on incompatible API changes
/// (from 1.0 on; before 1.0 a minor bump may break the API, see CHANGELOG.md).
#define EVMUX_VERSION_MAJOR 0
/// Minor version of the evmux headers.
#define EVMUX_VERSION_MINOR 1
/// Patch version of the evmux headers.
#define EVMUX_VERSION_PATCH 0
/// The header version as one comparable integer: major * 10000 + minor * 100 + patch.
/// Use it in `#if EVMUX_VERSION_NUMBER >= 100` to guard newer features.
#define EVMUX_VERSION_NUMBER \
    (EVMUX_VERSION_MAJOR * 10000 + EVMUX_VERSION_MINOR * 100 + EVMUX_VERSION_PATCH)

/// The header version as a string literal, e.g. "0.1.0".
#define EVMUX_VERSION_STRING "0.1.0"

namespace evmux {

/// The version of the evmux *library* this program runs with, e.g. "0.1.0".
/// Compare it with EVMUX_VERSION_STRING to detect a program compiled against
/// other headers than the shared library it loaded. The string is static
/// (never free it). Any thread; never throws.
const char* version() noexcept;

}  // namespace evmux
