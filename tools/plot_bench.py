#!/usr/bin/env python3
"""Plots evmux-bench's bench.json (placeholder: plots follow in the next commit)."""
import sys

if __name__ == "__main__":
    print("plot_bench.py: no plots yet", file=sys.stderr)
