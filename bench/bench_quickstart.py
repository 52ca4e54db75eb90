"""Wall time of `genrobust quickstart` with its defaults, per stage, on this machine.

Target (issue: the spine): the whole command within 5 minutes on a 2-core CPU, setup excluded.
Run: `make bench` or `.venv/bin/python bench/bench_quickstart.py [--out DIR]`. Prints a markdown table.
"""
import argparse
import collections
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="run folder (default: a fresh temporary one)")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench-quickstart-")
    if os.path.exists(out) and args.out:
        shutil.rmtree(out)  # a warm folder would reuse finished stages and time nothing
    cmd = [sys.executable, "-m", "genrobust.cli", "quickstart", "--out", out]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    marks, tail = [], collections.deque(maxlen=40)
    for line in proc.stderr:
        tail.append(line)
        m = re.search(r"\[(\d)/(\d)\] (.*)", line)
        if m:
            marks.append((time.time() - t0, m.group(3).strip()))
    if proc.wait() != 0:
        sys.stderr.write("".join(tail))
        sys.exit(f"quickstart failed with exit code {proc.returncode}")
    total = time.time() - t0
    logging.info("done")
    print(f"genrobust quickstart, defaults, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"torch threads default\n")
    print("| stage | seconds |\n|---|---:|")
    print(f"| start-up (imports, argument parsing) | {marks[0][0]:.1f} |")
    for (t, name), nxt in zip(marks, [m[0] for m in marks[1:]] + [total]):
        print(f"| {name} | {nxt - t:.1f} |")
    print(f"| **total** | **{total:.1f}** |")
    print(f"\ntarget: <= 300 s -> {'met' if total <= 300 else 'NOT met'}")


if __name__ == "__main__":
    main()
