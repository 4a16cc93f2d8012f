// The library's own version, compiled in from the meson project version so a
// program can compare it with the headers it was built against.
#include "evmux/version.hpp"

#include "evmux_config.h"

namespace evmux {

// EVMUX_VERSION comes from meson.project_version(); src/meson.build checks at
// configure time that version.hpp says the same.
const char* version() noexcept {
    return EVMUX_VERSION;
}

}  // namespace evmux
