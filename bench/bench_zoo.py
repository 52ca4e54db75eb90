"""The digits baseline zoo: wall time, and the spread of its models' accuracies (the points of the ER line).

Target (issue: training): at least 8 real-only models spreading in-distribution accuracy from about 60% to
98%. Run: `.venv/bin/python bench/bench_zoo.py [--out DIR]` (a fresh folder each time: a warm one would reuse
finished models and time nothing). Prints a markdown table.
"""
import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="zoo folder (default: a fresh temporary one)")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench-zoo-")
    if args.out:
        shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "genrobust.cli", "baselines", "train", "--suite", "digits",
                    "--out", out, "--quiet"], check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    rows = [json.loads(line) for line in open(f"{out}/results.jsonl")]
    acc = {(r["model"], r["eval_set"]): 100 * r["value"] for r in rows if r["class_subset"] == "all"}
    sets = ["digits-mnist/test", "digits-uci", "digits-fonts/unseen"]
    print(f"digits baseline zoo, {platform.machine()}, {wall:.0f} s wall time, folder {out}\n")
    print("| model | " + " | ".join(sets) + " | on the line |")
    print("|---|" + "---:|" * len(sets) + "---|")
    for m in json.load(open(f"{out}/zoo.json")):
        cells = " | ".join(f"{acc.get((m['name'], s), float('nan')):.1f}" for s in sets)
        print(f"| {m['name']} | {cells} | {'yes' if m['on_line'] else 'no: ' + m['note']} |")


if __name__ == "__main__":
    main()
