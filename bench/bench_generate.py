"""Generation runner overhead: `genrobust.generate` against a bare loop calling the same generator.

The bare loop calls `generator.generate` on the same requests in the same batches and keeps nothing; the
runner also checks quality (blank images), encodes PNGs and writes them atomically on its writer thread,
and appends manifest rows. Target (issue: paper-scale generation): runner wall time within 5% of the bare
loop. Generators: the shipped digits-ddpm (20 steps) and a tiny random-weight Stable Diffusion pipeline
built from configs (tests/tiny_models.py; 64 px, 10 steps). Every round runs both loops once, in random order;
the overhead is paired per round and reported as median and min-max over at least 5 rounds.
Run: `.venv/bin/python bench/bench_generate.py [--per-class 20] [--repeats 5]`. Prints a markdown table and
writes it into bench/RESULTS.md (section `bench_generate`).
"""
import argparse
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


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


def measure(name, generator, classes, per_class, repeats, seed):
    """One row: the runner against the bare loop, `repeats` rounds in random order, paired per round."""
    from genrobust.generate.strategies import create_strategy
    from resultsfile import interleaved, ratio_verdict, summary
    requests = create_strategy("label")(classes, per_class, 0, generator.prompts)
    generator.generate(requests[:generator.batch_size])  # warm-up
    times = interleaved({"bare": lambda: bare(generator, requests),
                         "runner": lambda: with_runner(generator, "label", classes, per_class)}, repeats, seed)
    n = len(requests)
    b, r = summary(times["bare"]), summary(times["runner"])
    overheads = [rr / bb - 1 for bb, rr in zip(times["bare"], times["runner"])]
    o = summary(overheads)
    verdict = ratio_verdict([1 + x for x in overheads], 1.05, higher_is_better=False)
    return (f"| {name} | {n} | {n / b[0]:.1f} ({n / b[2]:.1f}-{n / b[1]:.1f}) | {n / r[0]:.1f} "
            f"({n / r[2]:.1f}-{n / r[1]:.1f}) | {100 * o[0]:+.1f}% ({100 * o[1]:+.1f}% to {100 * o[2]:+.1f}%) | "
            f"{verdict} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each runs both loops once, in random order")
    ap.add_argument("--seed", type=int, default=0, help="seed of the run order")
    ap.add_argument("--no-write", action="store_true", help="print the table only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    if args.repeats < 5:
        ap.error("--repeats must be >= 5: fewer cannot resolve a 5% target on a shared machine")
    from genrobust.generate import create_generator
    from resultsfile import write_section
    rows = ["| generator | images | bare loop img/s, median (min-max) | runner img/s, median (min-max) | "
            "overhead per round, median (min to max) | 5% target |", "|---|---:|---:|---:|---:|---|"]
    digits = create_generator("digits-ddpm", steps=20, batch_size=64)
    rows.append(measure("digits-ddpm (shipped, 20 steps, batch 64)", digits, digits.classes(), args.per_class,
                        args.repeats, args.seed))
    from tiny_models import tiny_sd
    with tempfile.TemporaryDirectory() as d:
        sd = create_generator("text2img", model=str(tiny_sd(pathlib.Path(d) / "sd")), steps=10, batch_size=8,
                              height=64, width=64)
        rows.append(measure("tiny Stable Diffusion (64 px, 10 steps, batch 8)", sd, ["cat", "dog", "car", "tree"],
                            args.per_class, args.repeats, args.seed))
    body = "\n".join([f"{args.repeats} rounds, each running the bare loop and the runner once in random order; "
                      f"torch {torch.__version__}, {torch.get_num_threads()} threads. A target is met or missed only "
                      "where every round's overhead falls on the same side of it.", "", *rows])
    print(body)
    if not args.no_write:
        write_section("bench_generate", body, title="Runner overhead, interleaved")


if __name__ == "__main__":
    main()
