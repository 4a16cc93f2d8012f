#!/usr/bin/env python3
"""Run a program and check exactly how it ended: for meson tests that expect
a program to fail (or to skip) in one particular way, where meson's
`should_fail` would accept any non-zero exit, a crash or a missing binary.

    expect_exit.py --status N [--output REGEX]... [--absent REGEX]...
                   [--timeout S] -- PROGRAM [ARGS...]

--status    the exact exit status wanted (a death by signal never matches)
--output    a Python regex that must match somewhere in the program's
            stdout + stderr (multiline); repeatable, each must match
--absent    a regex that must match nowhere in that output; repeatable

Exit 0 if all hold, else 1 with what was seen. Never 77 (meson's skip code),
even when the program's own 77 is the expected outcome: the check ran.
"""
import argparse
import re
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--status", type=int, required=True)
    ap.add_argument("--output", action="append", default=[])
    ap.add_argument("--absent", action="append", default=[])
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        print("expect_exit: no program given", file=sys.stderr)
        return 1
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=args.timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"expect_exit: {' '.join(cmd)}: {e}", file=sys.stderr)
        return 1
    out = p.stdout.decode(errors="replace")
    problems = []
    if p.returncode != args.status:
        how = (f"killed by signal {-p.returncode}" if p.returncode < 0
               else f"exit status {p.returncode}")
        problems.append(f"{how}, expected exit status {args.status}")
    for rx in args.output:
        if not re.search(rx, out, re.MULTILINE):
            problems.append(f"no match in the output for: {rx}")
    for rx in args.absent:
        m = re.search(rx, out, re.MULTILINE)
        if m:
            problems.append(f"unexpected in the output: {m.group(0)!r} (for {rx})")
    print(f"expect_exit: ran {' '.join(cmd)}")
    print(f"expect_exit: exit status {p.returncode}; output:")
    print(out, end="" if out.endswith("\n") or not out else "\n")
    for pr in problems:
        print(f"expect_exit: FAIL: {pr}")
    if not problems:
        print(f"expect_exit: OK: exit status {args.status}, output as expected")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
