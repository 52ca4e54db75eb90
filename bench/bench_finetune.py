"""Base vs fine-tuned digits-ddpm: fidelity up, diversity down? Measured, not asserted.

Fine-tunes the shipped digits-ddpm on digits-mnist/train (the classifier's own real data, handwritten style)
with the library defaults, generates `--per-class` images per class with each generator (`label` strategy,
seed 0), and scores both folders with `genrobust generate stats` against digits-mnist/test: fidelity (a
real-data classifier's accuracy on the images), diversity (mean pairwise cosine distance of its penultimate
embeddings within a class) and the Fréchet distance of those embeddings to the test set. digits-mnist/train
itself is scored too: the real data's own diversity and distance to the test set are the reference.

Every stage is reused when rerun on the same --out. Run:
`.venv/bin/python bench/bench_finetune.py [--out runs/bench-finetune] [--classifier runs/zoo/models/...]`.
"""
import argparse
import json
import pathlib
import sys
import time


def _strongest_resnet(zoo):
    """The resnet checkpoint of a baseline zoo with the best digits-mnist/test accuracy."""
    results = pathlib.Path(zoo) / "results.jsonl"
    if not results.is_file():
        raise FileNotFoundError(f"no {results}; train the zoo with `genrobust baselines train --suite digits --out "
                                f"{zoo}` or pass --classifier")
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    best = max((r for r in rows if r["eval_set"] == "digits-mnist/test" and r["metric"] == "top1"
                and r["model"].startswith("resnet")), key=lambda r: r["value"])
    return best["checkpoint"], best["value"]


def _generate(path, out, per_class, seed):
    from genrobust.generate import create_generator, generate

    gen = create_generator("digits-ddpm", path=path)
    t0 = time.time()
    generate(gen, "label", gen.classes(), out, per_class, seed=seed, progress=False)
    return time.time() - t0


def main():
    from genrobust.finetune import DIGITS, finetune_digits
    from genrobust.generate.stats import folder_stats

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-finetune")
    ap.add_argument("--classifier", default=None, help="checkpoint (default: the strongest resnet of --zoo)")
    ap.add_argument("--zoo", default="runs/zoo")
    ap.add_argument("--real", default="digits-mnist/test")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=DIGITS["steps"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    classifier, acc = (args.classifier, None) if args.classifier else _strongest_resnet(args.zoo)

    t0 = time.time()
    tuned = finetune_digits(out / "digits-ddpm-finetuned", steps=args.steps, seed=args.seed, progress=False,
                            command=f"bench/bench_finetune.py --steps {args.steps} --seed {args.seed}")
    wall = time.time() - t0
    card = json.loads((tuned / "card.json").read_text())
    train_s = card["training"]["log"][-1]["seconds"]
    rows = {}
    for name, path in (("base (shipped)", None), ("fine-tuned", tuned)):
        folder = out / f"generated-{'base' if path is None else 'finetuned'}"
        gen_s = _generate(path, folder, args.per_class, args.seed)
        rows[name] = folder_stats(folder, real=args.real, classifier=classifier), gen_s
    rows["digits-mnist/train (real)"] = folder_stats("digits-mnist/train", real=args.real, classifier=classifier,
                                                     out=out / "stats-real-train.json"), None

    note = "" if acc is None else f" ({100 * acc:.1f}% on digits-mnist/test)"
    print(f"classifier and embedder: {classifier}{note}")
    print(f"fine-tune: {card['training']['steps']} steps, batch {card['training']['batch_size']}, lr "
          f"{card['training']['lr']}, seed {args.seed}: {train_s:.0f} s training ({wall:.0f} s this call; a reused "
          f"folder takes ~0)\n")
    print(f"| images | n | fidelity (%) | worst class (%) | diversity (cosine) | Fréchet to {args.real} |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (r, _) in rows.items():
        g = r["generated"]
        worst = min(g["fidelity"]["per_class"].items(), key=lambda kv: kv[1])
        print(f"| {name} | {g['num_images']} | {100 * g['fidelity']['accuracy']:.1f} | {worst[0]}: "
              f"{100 * worst[1]:.0f} | {g['diversity']['mean']:.4f} | {r['frechet']:.2f} |")
    real = rows["base (shipped)"][0]["real_set"]
    print(f"| {args.real} (reference) | {real['num_images']} | {100 * real['fidelity']['accuracy']:.1f} | | "
          f"{real['diversity']['mean']:.4f} | 0 |")
    print("\nper-class diversity:")
    for name, (r, _) in rows.items():
        per = r["generated"]["diversity"]["per_class"]
        print(f"  {name:28s} " + " ".join(f"{c}:{v:.3f}" for c, v in per.items()))
    summary = {name: {"stats": r, "generate_seconds": s} for name, (r, s) in rows.items()}
    summary["finetune"] = {"folder": str(tuned), "train_seconds": train_s, "call_seconds": wall}
    (out / "bench.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
