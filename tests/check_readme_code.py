#!/usr/bin/env python3
"""Checks that README's C++ examples compile against the public headers, so
that what a new user copies is the API as it is.

Every top-level ```cpp block is compiled (-fsyntax-only) as it stands: a
whole program, or declarations. A block of statements (a fragment shown
inside some function: "server.stop();") is compiled inside a function that
provides what such fragments use by name: `loop` (an EventLoop), `cb` and
`client_cb` (Callbacks). Indented blocks (inside a list: placeholders such as
NAME) are not code to copy and are left out.

usage: check_readme_code.py SOURCE_ROOT CXX [CXX ARGS...]   (exit 0: all compile; 1: each failure said)
"""
import pathlib
import re
import subprocess
import sys
import tempfile

FRAGMENT_HEAD = """#include <csignal>
#include "evmux/evmux.hpp"
"""
FRAGMENT_OPEN = "void readme_fragment(evmux::EventLoop& loop, evmux::Callbacks cb,\n" \
                "                      evmux::Callbacks client_cb) {\n" \
                "    (void)loop; (void)cb; (void)client_cb;\n"


def blocks(readme: str):
    """(line number, code) of each top-level ```cpp block."""
    for m in re.finditer(r"^```cpp\n(.*?)^```", readme, re.S | re.M):
        yield readme.count("\n", 0, m.start()) + 1, m.group(1)


def as_fragment(code: str) -> str:
    """The block's #include lines at file scope, the rest in a function."""
    includes = [l for l in code.splitlines() if l.startswith("#include")]
    body = [l for l in code.splitlines() if not l.startswith("#include")]
    # Parameters of the wrapper may be declared again by the fragment.
    body = [re.sub(r"^(\s*)evmux::Callbacks (cb|client_cb);", r"\1\2 = {};", l) for l in body]
    return FRAGMENT_HEAD + "\n".join(includes) + "\n" + FRAGMENT_OPEN + "\n".join(body) + "\n}\n"


def compiles(cxx: list, include: pathlib.Path, source: str, tmp: pathlib.Path) -> str:
    """'' if `source` compiles, else the compiler's first lines."""
    path = tmp / "readme_block.cpp"
    path.write_text(source)
    r = subprocess.run(cxx + ["-std=c++20", "-fsyntax-only", f"-I{include}", str(path)],
                       capture_output=True, text=True)
    if r.returncode == 0:
        return ""
    return "\n".join(r.stderr.splitlines()[:8])


def main() -> int:
    root = pathlib.Path(sys.argv[1])
    cxx = sys.argv[2:]  # the compiler as meson runs it (e.g. ccache c++)
    readme = (root / "README.md").read_text()
    failures = 0
    count = 0
    with tempfile.TemporaryDirectory() as t:
        tmp = pathlib.Path(t)
        for line, code in blocks(readme):
            count += 1
            error = compiles(cxx, root / "include", code, tmp)
            if error and "int main" not in code:
                fragment_error = compiles(cxx, root / "include", as_fragment(code), tmp)
                # Statements at file scope "do not name a type": a fragment,
                # whose own errors are the ones to show.
                if not fragment_error or "does not name a type" in error:
                    error = fragment_error
            if not error:
                continue
            failures += 1
            print(f"README.md:{line}: this C++ block does not compile:\n{error}\n")
    print(f"check_readme_code: {count} blocks, {failures} that do not compile")
    if count == 0:
        print("no ```cpp block found: has README's markup changed?")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
