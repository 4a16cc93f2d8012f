#!/usr/bin/env bash
# Use evmux the way a user would, from outside the build tree:
#   install   meson install --destdir into a temp dir; the headers, libevmux.so
#             (with its soname), libevmux.a and evmux.pc are there.
#   headers   each installed header compiles alone with only -I<prefix>/include,
#             pulls in no libevent/liburing/build-tree header, and evmux.hpp
#             includes every one of them.
#   pkgconfig examples/select_server.cpp built with `pkg-config --cflags --libs
#             evmux` (shared) and `--static` (libevmux.a + Libs.private), and
#             the examples built with examples/Makefile and examples/
#             CMakeLists.txt (the README's recipes); each runs its --self-test.
#             tests/cmake_consumer built with find_package(evmux) (the installed
#             evmuxConfig.cmake), shared and static, and run.
#   subproject tests/subproject_consumer built with subprojects/evmux -> the
#             source tree (meson's wrap-less subproject), and run; evmux adds
#             only its library to that build and installs nothing of its own,
#             unless the parent sets evmux's 'install' option.
#   docs      the doxygen API reference builds without a single warning.
#
# usage: install_test.sh SOURCE_ROOT BUILD_ROOT CXX B_SANITIZE [install|subproject|docs]
# Exit 77 (meson: skipped) in a sanitizer build: the installed library would
# need the sanitizer runtime, which evmux.pc rightly does not carry.
set -euo pipefail

src=$1 build=$2 cxx=$3 sanitize=$4 part=${5:-install}
if [ "$sanitize" != none ]; then
    echo "skipped: b_sanitize=$sanitize (an installed sanitizer build is not for users)"
    exit 77
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/evmux-install-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
fail() {
    echo "FAIL: $*" >&2
    exit 1
}
step() { echo "== $*"; }

# Backends come and go with the configure options; the self-tests run on the
# default one (EVMUX_BACKEND from the environment is honoured, if any).
cxxflags=(-std=c++20 -Wall -Wextra -Werror -O1)
header_flags=(-Wpedantic -Wshadow -Wconversion -Wsign-conversion -Wold-style-cast)

install_part() {
    step "meson install --destdir $tmp"
    # --no-rebuild: meson test has just built everything; a ninja run here
    # could race another ninja on the same build dir.
    meson install -C "$build" --destdir "$tmp/root" --no-rebuild --quiet >"$tmp/install.log" 2>&1 ||
        {
            cat "$tmp/install.log"
            fail "meson install"
        }

    local pc
    pc=$(find "$tmp/root" -name evmux.pc -print -quit)
    [ -n "$pc" ] || fail "no evmux.pc installed"
    # evmux.pc names the final prefix; a copy naming the staged one makes the
    # temp dir look like a real install there (make and cmake see it too).
    # (PKG_CONFIG_SYSROOT_DIR would also move liburing's and libevent's paths.)
    local final_prefix prefix libdir incdir
    final_prefix=$(sed -n 's/^prefix=//p' "$pc")
    prefix=$tmp/root$final_prefix
    mkdir "$tmp/pkgconfig"
    sed "s|^prefix=.*|prefix=$prefix|" "$pc" >"$tmp/pkgconfig/evmux.pc"
    export PKG_CONFIG_PATH=$tmp/pkgconfig
    libdir=$(pkg-config --variable=libdir evmux)
    incdir=$(pkg-config --variable=includedir evmux)
    [ -d "$incdir" ] && [ -d "$libdir" ] || fail "pkg-config paths $incdir $libdir are not in $tmp/root"
    echo "prefix $final_prefix staged in $prefix, evmux $(pkg-config --modversion evmux)"

    step "installed files"
    [ -f "$incdir/evmux/evmux.hpp" ] || fail "headers not under include/evmux"
    [ -f "$libdir/libevmux.a" ] || fail "no static libevmux.a"
    local soname
    soname=$(readelf -d "$libdir/libevmux.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
    [ -n "$soname" ] || fail "libevmux.so has no soname"
    [ -e "$libdir/$soname" ] || fail "no $soname symlink installed"
    echo "soname $soname"
    [ "$(pkg-config --modversion evmux)" = "$(sed -n 's/^#define EVMUX_VERSION_STRING "\(.*\)"/\1/p' "$incdir/evmux/version.hpp")" ] ||
        fail "evmux.pc and version.hpp disagree on the version"
    # Everything meson plans to install is there (the tools included).
    meson introspect "$build" --installed |
        python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin).values()))' |
        while read -r path; do
            [ -e "$tmp/root$path" ] || fail "not installed: $path"
        done
    # The installed tools start: they find libevmux.so.
    local tool
    for tool in "$prefix"/bin/*; do
        [ -x "$tool" ] || continue
        LD_LIBRARY_PATH=$libdir "$tool" --help >/dev/null || fail "${tool##*/} --help"
        echo "tool ${tool##*/} ok"
    done
    # The baseline servers are evmux-bench's helpers, in <libexecdir>/evmux.
    local baseline_epoll
    baseline_epoll=$(find "$tmp/root" -name evmux-baseline-epoll -print -quit)
    if [ -x "$prefix/bin/evmux-bench" ]; then
        [ -n "$baseline_epoll" ] || fail "evmux-bench installed without evmux-baseline-epoll"
        case $baseline_epoll in
            "$prefix"/libexec/evmux/*) ;;
            *) fail "evmux-baseline-epoll installed as $baseline_epoll, not in libexec/evmux" ;;
        esac
        for tool in "${baseline_epoll%/*}"/*; do
            "$tool" --help >/dev/null || fail "${tool##*/} --help"
            echo "baseline ${tool##*/} ok"
        done
    fi
    if ls "$prefix"/bin | grep baseline; then fail "baseline servers installed in bin/"; fi
    # No build-tree or private header may be installed.
    if find "$incdir" -type f ! -name '*.hpp' | grep .; then fail "non-header files installed"; fi

    if [ -x "$prefix/bin/evmux-bench" ]; then
        step "the installed evmux-bench runs the installed epoll floor"
        # One 0.05 s point on the floor alone: a failed lookup would print
        # "skipping epoll-floor: ... not found" and exit 1 (no server to run).
        LD_LIBRARY_PATH=$libdir timeout 60 "$prefix/bin/evmux-bench" --servers epoll-floor \
            --sizes 64 --sessions 1 --duration 0.05 --no-idle --no-plots \
            --json "$tmp/bench.json" >"$tmp/bench.out" 2>"$tmp/bench.err" || {
            cat "$tmp/bench.out" "$tmp/bench.err"
            fail "installed evmux-bench --servers epoll-floor"
        }
        cat "$tmp/bench.err"
        if grep "not found" "$tmp/bench.err"; then fail "installed evmux-bench misses a program"; fi
        # It says which baseline it took when not the one beside it: the staged one.
        grep -F "epoll-floor: $baseline_epoll" "$tmp/bench.err" >/dev/null ||
            fail "installed evmux-bench did not use $baseline_epoll"
        python3 -c 'import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
assert [(r["server"], r["ok"]) for r in runs] == [("epoll-floor", True)], runs' "$tmp/bench.json" ||
            fail "the epoll floor did not run (bench.json above)"
    fi

    step "each installed header alone, with only -I$incdir"
    local h name headers=()
    for h in "$incdir"/evmux/*.hpp; do headers+=("${h##*/}"); done
    for name in "${headers[@]}"; do
        # -H lists every header the compiler opens: a libevent, liburing,
        # c-ares or evmux_config.h there is a leak, whether it happens to
        # compile or not.
        # The warnings users' projects turn on, too: a header of ours must
        # not be what breaks their -Werror build.
        echo "#include <evmux/$name>" >"$tmp/only_$name.cpp"
        "$cxx" "${cxxflags[@]}" "${header_flags[@]}" -fsyntax-only -H -I"$incdir" \
            "$tmp/only_$name.cpp" 2>"$tmp/only_$name.log" ||
            {
                cat "$tmp/only_$name.log"
                fail "$name does not compile on its own"
            }
        if grep -E 'event2/|/event\.h|liburing|linux/io_uring|/ares\.h|evmux_config|gtest|CLI/' "$tmp/only_$name.log"; then
            fail "$name leaks a private header (above)"
        fi
        if grep -E '^\.+ .*/evmux/' "$tmp/only_$name.log" | grep -v -F "$incdir/evmux/"; then
            fail "$name picked up evmux headers outside the install (above)"
        fi
        [ "$name" = evmux.hpp ] && continue
        grep -q "#include \"evmux/$name\"" "$incdir/evmux/evmux.hpp" || fail "evmux.hpp does not include $name"
    done
    echo "${#headers[@]} headers ok: ${headers[*]}"

    step "select_server built with pkg-config"
    # shellcheck disable=SC2046  # pkg-config output is meant to be split
    "$cxx" "${cxxflags[@]}" -c "$src/examples/select_server.cpp" -o "$tmp/select_server.o" \
        $(pkg-config --cflags evmux)
    # shellcheck disable=SC2046
    "$cxx" "$tmp/select_server.o" -o "$tmp/select_server_shared" $(pkg-config --libs evmux) -pthread
    # -l:libevmux.a picks the static library although the .so sits beside it;
    # everything else it needs must come from Libs.private/Requires.private.
    # shellcheck disable=SC2046
    "$cxx" "$tmp/select_server.o" -o "$tmp/select_server_static" \
        $(pkg-config --static --libs evmux | sed 's/-levmux\b/-l:libevmux.a/')
    echo "static link: $(pkg-config --static --libs evmux)"
    if ldd "$tmp/select_server_static" | grep libevmux; then fail "static build links libevmux.so"; fi

    LD_LIBRARY_PATH=$libdir ldd "$tmp/select_server_shared" | grep -F "$libdir/$soname" >/dev/null ||
        fail "shared build does not load $libdir/$soname"
    local version
    version=$(LD_LIBRARY_PATH=$libdir "$tmp/select_server_shared" --version)
    echo "$version"
    [ "$version" = "select_server, evmux headers $(pkg-config --modversion evmux), library $(pkg-config --modversion evmux)" ] ||
        fail "header and library versions differ"
    LD_LIBRARY_PATH=$libdir timeout 60 "$tmp/select_server_shared" --self-test
    timeout 60 "$tmp/select_server_static" --self-test

    # The two recipes README.md shows, exactly as shipped in examples/.
    step "examples/Makefile (plain make + pkg-config)"
    mkdir "$tmp/make"
    make -s -C "$tmp/make" -f "$src/examples/Makefile" VPATH="$src/examples" CXX="$cxx" \
        CXXFLAGS="-O1 -Werror -Wall -Wextra" chat_server contracts resolve
    LD_LIBRARY_PATH=$libdir timeout 60 "$tmp/make/chat_server" --self-test
    # Names (README "Names"): a server on localhost:0, a connect to it by name.
    LD_LIBRARY_PATH=$libdir timeout 60 "$tmp/make/resolve" --self-test
    # The contracts (README "Connections and servers": exceptions, on_close at
    # shutdown, addresses in on_close, write-complete) against the installed library.
    LD_LIBRARY_PATH=$libdir timeout 60 "$tmp/make/contracts" --self-test

    # CMake is a requirement of this test (./run setup installs it): a recipe
    # that is not checked is not known to work.
    command -v cmake >/dev/null || fail "cmake not installed (./run setup installs it)"
    step "examples/CMakeLists.txt (pkg_check_modules)"
    cmake -S "$src/examples" -B "$tmp/cmake" -DCMAKE_CXX_COMPILER="$cxx" \
        -DCMAKE_CXX_FLAGS="-O1 -Werror -Wall -Wextra" >"$tmp/cmake.log" 2>&1 ||
        {
            cat "$tmp/cmake.log"
            fail "cmake configure"
        }
    cmake --build "$tmp/cmake" --target uppercase_server >>"$tmp/cmake.log" 2>&1 ||
        {
            cat "$tmp/cmake.log"
            fail "cmake build"
        }
    # CMake's build tree RPATH points at the staged libdir: no LD_LIBRARY_PATH.
    timeout 60 "$tmp/cmake/uppercase_server" --self-test

    step "tests/cmake_consumer (find_package(evmux), evmux::evmux and evmux::evmux_static)"
    local config version_wanted
    config=$libdir/cmake/evmux/evmuxConfig.cmake
    [ -f "$config" ] && [ -f "$libdir/cmake/evmux/evmuxConfigVersion.cmake" ] ||
        fail "no evmuxConfig.cmake and evmuxConfigVersion.cmake in $libdir/cmake/evmux"
    version_wanted=$(pkg-config --modversion evmux)
    # Only CMAKE_PREFIX_PATH: the config finds everything else from where it is.
    cmake -S "$src/tests/cmake_consumer" -B "$tmp/cmake-find" -DCMAKE_PREFIX_PATH="$prefix" \
        -DEVMUX_WANT_VERSION="$version_wanted" -DCMAKE_CXX_COMPILER="$cxx" \
        -DCMAKE_CXX_FLAGS="-O1 -Werror -Wall -Wextra" >"$tmp/cmake-find.log" 2>&1 &&
        cmake --build "$tmp/cmake-find" >>"$tmp/cmake-find.log" 2>&1 ||
        {
            cat "$tmp/cmake-find.log"
            fail "the find_package consumer"
        }
    grep -F "$config" "$tmp/cmake-find/CMakeCache.txt" >/dev/null ||
        grep -F "evmux_DIR:PATH=$libdir/cmake/evmux" "$tmp/cmake-find/CMakeCache.txt" >/dev/null ||
        fail "find_package(evmux) did not use $config"
    ldd "$tmp/cmake-find/consumer_shared" | grep -F "$libdir/$soname" >/dev/null ||
        fail "consumer_shared does not load $libdir/$soname"
    if ldd "$tmp/cmake-find/consumer_static" | grep libevmux; then
        fail "consumer_static links libevmux.so"
    fi
    timeout 60 "$tmp/cmake-find/consumer_shared"
    timeout 60 "$tmp/cmake-find/consumer_static"
    # The version file refuses what this evmux does not satisfy.
    local too_new
    too_new=$(echo "$version_wanted" | awk -F. '{ print $1 "." $2 + 1 }')
    if cmake -S "$src/tests/cmake_consumer" -B "$tmp/cmake-find-$too_new" \
        -DCMAKE_PREFIX_PATH="$prefix" -DEVMUX_WANT_VERSION="$too_new" >"$tmp/cmake-too-new.log" 2>&1; then
        fail "find_package(evmux $too_new) accepted evmux $version_wanted"
    fi
    grep -q "requested version \"$too_new\"" "$tmp/cmake-too-new.log" || {
        cat "$tmp/cmake-too-new.log"
        fail "find_package(evmux $too_new) failed, but not on the version"
    }
    echo "find_package(evmux $too_new) refused, as it should be"
}

subproject_part() {
    step "tests/subproject_consumer with subprojects/evmux -> $src"
    cp -r "$src/tests/subproject_consumer" "$tmp/consumer"
    mkdir "$tmp/consumer/subprojects"
    ln -s "$src" "$tmp/consumer/subprojects/evmux"
    # buildtype=debug: this checks the build files, not the optimiser; -O0
    # keeps it quick on two cores.
    meson setup "$tmp/consumer/build" "$tmp/consumer" --force-fallback-for=evmux \
        -Dbuildtype=debug >"$tmp/setup.log" 2>&1 || {
        cat "$tmp/setup.log"
        fail "meson setup of the consumer"
    }

    step "evmux builds only its library in the consumer"
    # Every target evmux adds to the parent's build, as "name type".
    local evmux_targets
    evmux_targets=$(meson introspect "$tmp/consumer/build" --targets | python3 -c '
import json, sys
for t in json.load(sys.stdin):
    if t["subproject"] == "evmux":
        print(t["name"], t["type"])' | sort)
    echo "$evmux_targets"
    [ "$evmux_targets" = "evmux shared library
evmux static library" ] || fail "evmux adds more than its library to the consumer (above)"
    # The whole build, not just the consumer's target: nothing else is there.
    ninja -C "$tmp/consumer/build" >"$tmp/ninja.log" 2>&1 || {
        cat "$tmp/ninja.log"
        fail "building the consumer"
    }
    timeout 60 "$tmp/consumer/build/consumer"

    step "meson install of the consumer installs nothing of evmux"
    local installed
    meson install -C "$tmp/consumer/build" --destdir "$tmp/sub-root" --no-rebuild --quiet ||
        fail "meson install of the consumer"
    installed=$(cd "$tmp/sub-root" && find . ! -type d | sort)
    echo "$installed"
    [ "$(echo "$installed" | sed 's|.*/||')" = consumer ] ||
        fail "the consumer's install has more than its own program (above)"

    step "a parent that asks (-Devmux:install=enabled) gets the library installed"
    meson configure "$tmp/consumer/build" -Devmux:install=enabled >/dev/null
    # Without --no-rebuild: the option takes effect when ninja reconfigures.
    meson install -C "$tmp/consumer/build" --destdir "$tmp/sub-root-asked" --quiet \
        >"$tmp/install-asked.log" 2>&1 || {
        cat "$tmp/install-asked.log"
        fail "meson install of the consumer with evmux:install=enabled"
    }
    installed=$(cd "$tmp/sub-root-asked" && find . ! -type d | sort)
    local want
    for want in /include/evmux/evmux.hpp /libevmux.so /libevmux.a /pkgconfig/evmux.pc \
        /cmake/evmux/evmuxConfig.cmake /bin/consumer; do
        # A here-string, not echo | grep -q: grep -q stops at the first match and
        # echo's further writes then fail (SIGPIPE), which pipefail turns into a
        # false "not installed" (CI saw it once).
        grep -q -- "$want\$" <<<"$installed" || {
            echo "$installed"
            fail "$want not installed with evmux:install=enabled"
        }
    done
    # The tools are a separate choice (evmux:tools): still not built or installed.
    if echo "$installed" | grep -E '/(bin|libexec)/.*evmux'; then fail "evmux tools installed (above)"; fi
    echo "$(echo "$installed" | grep -c evmux) evmux files installed when asked"
}

# The API reference as `./run docs` makes it, into the temp dir: any doxygen
# warning (e.g. a public declaration without a doc comment) fails.
docs_part() {
    if ! command -v doxygen >/dev/null; then
        echo "skipped: doxygen not installed (./run setup installs it)"
        exit 77
    fi
    step "doxygen (Doxyfile, FAIL_ON_WARNINGS)"
    local version
    version=$(sed -n "s/^ *version: '\([^']*\)',$/\1/p;T;q" "$src/meson.build")
    (cd "$src" && { cat Doxyfile; echo "PROJECT_NUMBER = $version"; echo "OUTPUT_DIRECTORY = $tmp"; } |
        doxygen -) || fail "doxygen warnings (above)"
    [ -f "$tmp/html/index.html" ] || fail "no html/index.html"
    grep -q "$version" "$tmp/html/index.html" || fail "version $version not in the docs"
}

case "$part" in
    install) install_part ;;
    subproject) subproject_part ;;
    docs) docs_part ;;
    *) fail "unknown part $part" ;;
esac
echo "PASS"
