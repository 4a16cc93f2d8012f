#!/usr/bin/env python3
"""Checks README's Architecture section against the code: each source file of
the library belongs to one layer and includes evmux headers only of its own
layer or a lower one; the tools and examples include only public headers.

usage: check_layers.py SOURCE_ROOT     (exit 0: clean; 1: each violation on a line)
"""
import pathlib
import re
import sys

# Lowest first, as in README's table. A file not listed here is an error: a
# new file must be placed in a layer.
LAYERS = [
    ("selector", ["include/evmux/selector.hpp", "src/selector.cpp", "backends/*.cpp",
                  "backends/*.hpp", "backends/*.cpp.in"]),
    ("event loop", ["include/evmux/event_loop.hpp", "src/event_loop.cpp",
                    "src/timer_queue.hpp", "src/timer_queue.cpp"]),
    ("byte transport", ["include/evmux/tls.hpp", "src/tls.cpp", "src/tls_session.hpp",
                        "src/tls_records.hpp", "src/tls_records.cpp"]),
    ("connection", ["include/evmux/connection.hpp", "include/evmux/buffer.hpp",
                    "include/evmux/address.hpp", "src/connection.cpp", "src/connection_completion.hpp",
                    "src/connection_completion.cpp", "src/buffer.cpp",
                    "src/address.cpp"]),
    # Names sit below the servers and clients, which take "host:port" text.
    ("names", ["include/evmux/resolver.hpp", "src/resolver.cpp", "src/dns_answer.hpp",
               "src/dns_answer.cpp"]),
    ("server / client", ["include/evmux/server.hpp", "include/evmux/loop_group.hpp",
                         "src/server.cpp", "src/listener.hpp", "src/listener.cpp",
                         "src/loop_group.cpp"]),
    ("coroutines", ["include/evmux/coro.hpp", "src/coro.cpp"]),
    ("datagrams", ["include/evmux/datagram.hpp", "src/datagram.cpp"]),
]
# Below every layer (usable by all): the version, the generated config.
ANY_LAYER = ["include/evmux/version.hpp", "src/version.cpp"]
# Above every layer: the header that includes them all.
TOP = ["include/evmux/evmux.hpp"]

INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)


def main(root: pathlib.Path) -> int:
    layer_of = {}
    for rank, (name, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            for path in root.glob(pattern):
                layer_of[path.relative_to(root).as_posix()] = (rank, name)
    for path in ANY_LAYER:
        layer_of[path] = (-1, "any layer")
    for path in TOP:
        layer_of[path] = (len(LAYERS), "top")

    # How an include names a file: "evmux/x.hpp" is include/evmux/x.hpp; a
    # bare "x.hpp" is beside the including file.
    def resolve(including: str, name: str):
        if name.startswith("evmux/"):
            return "include/" + name
        beside = (pathlib.PurePosixPath(including).parent / name).as_posix()
        return beside if (root / beside).exists() else None

    errors = []
    library = [p for p in root.glob("src/*") if p.suffix in (".cpp", ".hpp")]
    library += list(root.glob("include/evmux/*.hpp")) + list(root.glob("backends/*.[ch]pp"))
    for path in sorted(library):
        rel = path.relative_to(root).as_posix()
        if rel not in layer_of:
            errors.append(f"{rel}: in no layer (add it to tests/check_layers.py and README)")
            continue
        rank, name = layer_of[rel]
        for inc in INCLUDE.findall(path.read_text()):
            target = resolve(rel, inc)
            if target is None or target == "evmux_config.h":
                continue  # the standard library, a system header, the config
            if target not in layer_of:
                errors.append(f"{rel}: includes {inc}, which is in no layer")
                continue
            trank, tname = layer_of[target]
            if trank > rank:
                errors.append(f"{rel} ({name}) includes {inc} ({tname}): a lower layer names a higher one")

    internal = {p for p in layer_of if not p.startswith("include/")}
    for directory in ("tools", "examples"):
        for path in sorted(root.glob(directory + "/**/*.[ch]pp")):
            rel = path.relative_to(root).as_posix()
            for inc in INCLUDE.findall(path.read_text()):
                named = resolve(rel, inc) or inc
                if named in internal or inc.startswith("../src") or inc.startswith("../backends"):
                    errors.append(f"{rel}: includes {inc}, an internal header (public headers only)")

    for e in errors:
        print(e)
    print(f"check_layers: {len(library)} library files, {len(errors)} violations")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1]).resolve()))
