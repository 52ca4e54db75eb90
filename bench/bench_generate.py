"""Generation runner overhead: `genrobust.generate` against a bare loop calling the same generator.

The bare loop calls `generator.generate` on the same requests in the same batches and keeps nothing; the
runner also checks quality (blank images), encodes PNGs and writes them atomically on its writer thread,
and appends manifest rows. Target (issue: paper-scale generation): runner wall time within 5% of the bare
loop. Generators: the shipped digits-ddpm (20 steps) and a tiny random-weight Stable Diffusion pipeline
built from configs (tests/tiny_models.py; 64 px, 10 steps). Runs alternate, `--repeats` pairs.
Run: `.venv/bin/python bench/bench_generate.py [--per-class 20] [--repeats 3]`. Prints a markdown table.
"""
import argparse
import pathlib
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))


def bare(generator, requests):
    t0 = time.perf_counter()
    for i in range(0, len(requests), generator.batch_size):
        generator.generate(requests[i:i + generator.batch_size])
    return time.perf_counter() - t0


def with_runner(generator, strategy, classes, per_class):
    from genrobust.generate import generate
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        generate(generator, strategy, classes, f"{out}/g", per_class=per_class, seed=0, progress=False)
        return time.perf_counter() - t0


def measure(name, generator, classes, per_class, repeats):
    from genrobust.generate.strategies import create_strategy
    requests = create_strategy("label")(classes, per_class, 0, generator.prompts)
    generator.generate(requests[:generator.batch_size])  # warm-up
    # interleaved, so that a neighbour's load hits both loops alike; best of each, and the median of the
    # pairwise ratios as a second reading
    pairs = [(bare(generator, requests), with_runner(generator, "label", classes, per_class))
             for _ in range(repeats)]
    b, r = min(p[0] for p in pairs), min(p[1] for p in pairs)
    ratios = sorted(rr / bb for bb, rr in pairs)
    n = len(requests)
    print(f"| {name} | {n} | {n / b:.1f} | {n / r:.1f} | {100 * (r / b - 1):+.1f}% | "
          f"{100 * (ratios[len(ratios) // 2] - 1):+.1f}% |")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from genrobust.generate import create_generator
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, best of "
          f"{args.repeats}\n")
    print("| generator | images | bare loop img/s | runner img/s | overhead (best of each) | overhead (median "
          "pair) |")
    print("|---|---:|---:|---:|---:|---:|")
    digits = create_generator("digits-ddpm", steps=20, batch_size=64)
    measure("digits-ddpm (shipped, 20 steps)", digits, digits.classes(), args.per_class, args.repeats)
    from tiny_models import tiny_sd
    with tempfile.TemporaryDirectory() as d:
        sd = create_generator("text2img", model=str(tiny_sd(pathlib.Path(d) / "sd")), steps=10, batch_size=8,
                              height=64, width=64)
        measure("tiny Stable Diffusion (64 px, 10 steps)", sd, ["cat", "dog", "car", "tree"],
                args.per_class, args.repeats)


if __name__ == "__main__":
    main()
