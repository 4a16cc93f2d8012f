// The baselines' command line (see baseline_common.hpp): the one file of
// theirs that includes CLI11.
#include "baseline_common.hpp"

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>

#include "cli_number.hpp"

namespace evmux::baseline {

ServerOptions parse_options(const char* name, const char* what, int argc, char** argv) {
    ServerOptions opt;
    CLI::App app{what, name};
    app.add_option("--port", opt.port, "port to listen on (0: pick a free one)")
        ->required()
        ->check(evmux::support::number_in(0, 65535));
    app.add_option("--host", opt.host, "address to listen on (default 127.0.0.1)");
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        if (e.get_exit_code() == 0) std::exit(app.exit(e));  // --help
        std::fprintf(stderr, "%s: %s (see --help)\n", name, e.what());
        std::exit(2);
    }
    return opt;
}

}  // namespace evmux::baseline
