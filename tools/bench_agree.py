#!/usr/bin/env python3
"""Do two evmux-bench runs agree? For each server and load shape in both
bench.json files, and each figure asked for, the median of one run must lie
within the other's min-max over its rounds, and the other way round; the
figure's ratio to the epoll floor is compared likewise.

    tools/bench_agree.py A/bench.json B/bench.json [--server evmux/epoll] [--figure msgs_per_s ...]

Prints one line per (server, shape, figure) and exits 1 if any disagree,
2 on bad input. Runs that were flagged as disturbed are marked. First, the
two runs' speed probes (the medians of the same fixed piece of work timed
around every run), and whether the hosts ran more than 15 % apart: figures
may then disagree for that alone.
"""
import argparse
import json
import sys

FIGURES = ["msgs_per_s", "user_us_per_msg", "sys_us_per_msg", "cpu_us_per_msg"]


def shape(r):
    idle = " idle-heavy" if r["idle_heavy"] else ""
    return f'{r["size"]}B x {r["conns"]}{idle}'


def load(path):
    with open(path) as f:
        return json.load(f)


def runs_of(data):
    return {(r["server"], shape(r)): r for r in data["runs"] if r.get("ok")}


def probe_of(data):
    """The speed probe's median in microseconds ("6811.5 [6803.5-6960.6]"),
    or None (an older run, or none measured)."""
    text = data.get("environment", {}).get("speed_probe_us", "")
    try:
        return float(text.split()[0])
    except (IndexError, ValueError):
        return None


def speed_line(pa, pb):
    if pa is None or pb is None:
        return "speed probe: not in both runs"
    apart = pb / pa - 1
    note = (f": the hosts ran {abs(apart) * 100:.0f}% apart, figures may disagree for that alone"
            if abs(apart) > 0.15 else "")
    return f"speed probe {pa:.1f} vs {pb:.1f} us{note}"


def within(x, lo, hi):
    return x is not None and lo is not None and hi is not None and lo <= x <= hi


def compare(a, b, key):
    """(verdict, text) for one figure; key picks the value out of a run entry
    (the figure itself, or its ratio to the floor)."""
    ma, mb = key(a), key(b)
    la, ha = key(a["min"]), key(a["max"])
    lb, hb = key(b["min"]), key(b["max"])
    if None in (ma, mb, la, ha, lb, hb):
        return None, "unknown in one run"
    ok = within(ma, lb, hb) and within(mb, la, ha)
    return ok, f"{ma:.4g} [{la:.4g}-{ha:.4g}] vs {mb:.4g} [{lb:.4g}-{hb:.4g}]"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--server", action="append", help="server name (default evmux/epoll)")
    p.add_argument("--figure", action="append", choices=FIGURES, help="default: all")
    args = p.parse_args()
    try:
        da, db = load(args.a), load(args.b)
        ra, rb = runs_of(da), runs_of(db)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"bench_agree.py: {e}", file=sys.stderr)
        return 2
    print(speed_line(probe_of(da), probe_of(db)))
    servers = args.server or ["evmux/epoll"]
    figures = args.figure or FIGURES
    disagree = 0
    for key in sorted(k for k in ra if k in rb and k[0] in servers):
        a, b = ra[key], rb[key]
        flag = " (disturbed)" if a["interference"]["flagged"] or b["interference"]["flagged"] else ""
        for fig in figures:
            for what, pick in ((fig, lambda r, f=fig: r.get(f)),
                               (fig + " ratio", lambda r, f=fig: r.get("ratio_to_floor", {}).get(f))):
                ok, text = compare(a, b, pick)
                if ok is None:
                    continue
                disagree += not ok
                print(f'{"agree   " if ok else "DISAGREE"} {key[0]} {key[1]} {what}: {text}{flag}')
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
