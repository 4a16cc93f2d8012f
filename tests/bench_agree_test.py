#!/usr/bin/env python3
"""tools/bench_agree.py against synthetic bench.json files: two runs whose
medians lie in each other's ranges agree (exit 0); a median outside the
other's range disagrees (exit 1, the figure named); bad input exits 2."""
import json
import os
import subprocess
import sys
import tempfile

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "bench_agree.py")


def run_entry(median, lo, hi, ratio=1.0, probe=None):
    def figs(x, r):
        return {"msgs_per_s": x, "user_us_per_msg": 0.2, "sys_us_per_msg": 5.0,
                "cpu_us_per_msg": 5.2, "ratio_to_floor": {"msgs_per_s": r}}
    e = figs(median, ratio)
    e.update({"server": "evmux/epoll", "size": 64, "conns": 100, "idle_heavy": False, "ok": True,
              "interference": {"flagged": False, "details": ""},
              "min": figs(lo, ratio * 0.95), "max": figs(hi, ratio * 1.05)})
    data = {"runs": [e]}
    if probe is not None:
        data["environment"] = {"speed_probe_us": probe}
    return data


def check(a, b, want, expect_text):
    with tempfile.TemporaryDirectory() as d:
        pa, pb = os.path.join(d, "a.json"), os.path.join(d, "b.json")
        for path, data in ((pa, a), (pb, b)):
            with open(path, "w") as f:
                f.write(data if isinstance(data, str) else json.dumps(data))
        p = subprocess.run([sys.executable, SCRIPT, pa, pb], capture_output=True, text=True)
    out = p.stdout + p.stderr
    assert p.returncode == want, (p.returncode, want, out)
    assert expect_text in out, (expect_text, out)


check(run_entry(100, 90, 110), run_entry(105, 95, 112), 0, "agree    evmux/epoll 64B x 100 msgs_per_s:")
check(run_entry(100, 90, 110), run_entry(130, 120, 140), 1, "DISAGREE evmux/epoll 64B x 100 msgs_per_s:")
check(run_entry(100, 90, 110), run_entry(100, 90, 110, ratio=1.5), 1,
      "DISAGREE evmux/epoll 64B x 100 msgs_per_s ratio:")
check("{not json", run_entry(100, 90, 110), 2, "bench_agree.py:")
# The hosts' speeds: said, and flagged when more than 15 % apart.
check(run_entry(100, 90, 110, probe="2000.0 [1990.0-2100.0]"),
      run_entry(105, 95, 112, probe="2100.0"), 0, "speed probe 2000.0 vs 2100.0 us\n")
check(run_entry(100, 90, 110, probe="2000.0 [1990.0-2100.0]"),
      run_entry(105, 95, 112, probe="3000.0 [2900.0-3100.0]"), 0,
      "speed probe 2000.0 vs 3000.0 us: the hosts ran 50% apart, figures may disagree for that alone")
check(run_entry(100, 90, 110), run_entry(105, 95, 112, probe="2100.0"), 0,
      "speed probe: not in both runs")
print("bench_agree_test: 7 cases passed")
