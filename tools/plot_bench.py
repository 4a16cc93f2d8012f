#!/usr/bin/env python3
"""Plots evmux-bench's results.

Usage: plot_bench.py BENCH_JSON OUT_DIR

Writes into OUT_DIR:
  throughput.png  messages/s against concurrent sessions, one panel per
                  message size, one line per server;
  cpu_per_msg.png the server's user and system CPU per message (stacked),
                  one panel per load shape;
  dispatch.png    dispatch cost per ready event against registered fds (the
                  bench.c sweep, per evmux backend) and, beside it, CPU per
                  message without and with idle connections (the idle-heavy
                  case against the same size and active count without idle).

Needs matplotlib (Debian: python3-matplotlib). Exits 1 with a message if it is
missing or the JSON cannot be read, 2 on bad arguments.
"""
import json
import math
import os
import sys


def size_label(size):
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def shape_label(run):
    label = f"{size_label(run['size'])} x {run['active']}"
    if run["conns"] != run["active"]:
        label += f" (+{run['conns'] - run['active']} idle)"
    return label


def main(argv):
    if len(argv) != 3:
        print("usage: plot_bench.py BENCH_JSON OUT_DIR", file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_bench.py: matplotlib is missing (apt-get install python3-matplotlib)",
              file=sys.stderr)
        return 1
    try:
        with open(argv[1]) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"plot_bench.py: cannot read {argv[1]}: {e}", file=sys.stderr)
        return 1
    out = argv[2]
    os.makedirs(out, exist_ok=True)
    runs = [r for r in data.get("runs", []) if r.get("ok")]
    servers = list(dict.fromkeys(r["server"] for r in data.get("runs", [])))
    # One colour per server, the same in every figure.
    cmap = plt.get_cmap("tab10")
    colour = {s: cmap(i % 10) for i, s in enumerate(servers)}
    written = []

    # ---- throughput against sessions, per size ---------------------------------
    ping = [r for r in runs if not r["idle_heavy"]]
    sizes = sorted({r["size"] for r in ping})
    if sizes:
        fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.6), squeeze=False)
        for ax, size in zip(axes[0], sizes):
            for s in servers:
                pts = sorted((r["active"], r["msgs_per_s"]) for r in ping
                             if r["server"] == s and r["size"] == size)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            label=s, color=colour[s])
            ax.set_xscale("log")
            ax.set_title(f"{size_label(size)} ping-pong")
            ax.set_xlabel("sessions")
            ax.set_ylabel("messages/s")
            ax.grid(True, alpha=0.3)
        # One legend for all panels, under them: it would hide points inside.
        handles, labels = {}, []
        for ax in axes[0]:
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in handles:
                    handles[l] = h
                    labels.append(l)
        fig.legend([handles[l] for l in labels], labels, loc="lower center", ncol=5, fontsize=7)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        path = os.path.join(out, "throughput.png")
        fig.savefig(path, dpi=72)
        plt.close(fig)
        written.append(path)

    # ---- user and system CPU per message, per load shape -------------------------
    shapes = list(dict.fromkeys((r["size"], r["conns"], r["active"]) for r in runs))
    if shapes:
        cols = min(3, len(shapes))
        rows = math.ceil(len(shapes) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
        for i, shape in enumerate(shapes):
            ax = axes[i // cols][i % cols]
            sel = [r for r in runs if (r["size"], r["conns"], r["active"]) == shape]
            names = [r["server"] for r in sel]
            # An unsplit row (user and sys unknown, null in the JSON) is drawn
            # as its total, hatched, never as a zero.
            split = [r["user_us_per_msg"] is not None and r["sys_us_per_msg"] is not None
                     for r in sel]
            user = [r["user_us_per_msg"] if ok else 0 for r, ok in zip(sel, split)]
            sys_ = [r["sys_us_per_msg"] if ok else 0 for r, ok in zip(sel, split)]
            whole = [0 if ok else (r.get("cpu_us_per_msg") or 0) for r, ok in zip(sel, split)]
            ax.barh(names, user, color=[colour[n] for n in names], label="user")
            ax.barh(names, sys_, left=user, color=[colour[n] for n in names], alpha=0.35,
                    label="sys")
            if any(whole):
                ax.barh(names, whole, color="none", edgecolor=[colour[n] for n in names],
                        hatch="///", label="unsplit")
            ax.set_title(shape_label(sel[0]), fontsize=9)
            ax.set_xlabel("server CPU us per message (solid user, pale sys, hatched unsplit)",
                          fontsize=7)
            ax.tick_params(labelsize=7)
            ax.invert_yaxis()
        for j in range(len(shapes), rows * cols):
            axes[j // cols][j % cols].axis("off")
        fig.tight_layout()
        path = os.path.join(out, "cpu_per_msg.png")
        fig.savefig(path, dpi=72)
        plt.close(fig)
        written.append(path)

    # ---- dispatch cost against idle fds ----------------------------------------
    sweeps = data.get("dispatch", [])
    idle = [r for r in runs if r["idle_heavy"]]
    if sweeps or idle:
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), squeeze=False)
        ax = axes[0][0]
        for b in dict.fromkeys(s["backend"] for s in sweeps):
            pts = sorted((s["fds"], s["us_per_event"]) for s in sweeps if s["backend"] == b)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b,
                    color=colour.get("evmux/" + b))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("registered fds (socketpairs)")
        ax.set_ylabel("us per ready event")
        ax.set_title("bench.c dispatch sweep (in process)", fontsize=9)
        ax.grid(True, alpha=0.3)
        if sweeps:
            ax.legend(fontsize=7)
        ax = axes[0][1]
        for r in idle:
            base = [b for b in runs if not b["idle_heavy"] and b["server"] == r["server"]
                    and b["size"] == r["size"] and b["active"] == r["active"]]
            xs, ys = [], []
            if base:
                xs.append(0)
                ys.append(base[0]["cpu_us_per_msg"])
            xs.append(r["conns"] - r["active"])
            ys.append(r["cpu_us_per_msg"])
            ax.plot(xs, ys, marker="o", label=r["server"], color=colour[r["server"]])
        ax.set_xlabel("idle connections beside the active ones")
        ax.set_ylabel("server CPU us per message")
        ax.set_title("echo servers: idle connections", fontsize=9)
        ax.grid(True, alpha=0.3)
        if idle:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, "dispatch.png")
        fig.savefig(path, dpi=72)
        plt.close(fig)
        written.append(path)

    for p in written:
        print(f"plot_bench.py: wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
