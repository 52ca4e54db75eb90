"""Fidelity and speed of a digits-ddpm generator (default: the shipped one).

Fidelity: a resnet10t trained on digits-mnist/train only (real data, 30 epochs, seed 0) labels the generator's
samples; the target for the shipped generator is >= 90% on `label` samples. Speed: sampling images/s.
Run: `.venv/bin/python bench/bench_generator.py [--generator-path DIR] [--per-class N]`. Prints a table.
"""
import argparse
import pathlib
import sys
import time

import torch


def main():
    from genrobust.data import load_dataset
    from genrobust.generate import create_generator, create_strategy
    from genrobust.study import train_arm
    from genrobust.train import TrainConfig, load_checkpoint, predict

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--generator-path", default=None)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--work", default="runs/bench-generator", help="where the probe classifier is kept")
    args = ap.parse_args()

    probe = pathlib.Path(args.work) / "probe-resnet10t-real"
    train_arm(probe, "digits-mnist/train", (), 0.0, TrainConfig(epochs=30, seed=0), "cpu", progress=False)
    model, _, _ = load_checkpoint(probe)
    test = load_dataset("digits-mnist/test")
    test_acc = (predict(model, test.images).argmax(1) == test.labels).float().mean().item()

    gen = create_generator("digits-ddpm", path=args.generator_path, steps=args.steps, guidance=args.guidance)
    classes = gen.classes()
    print(f"generator {gen.path} (revision {gen.revision}), DDIM {args.steps} steps, guidance {args.guidance}")
    print(f"probe classifier: resnet10t on digits-mnist/train, {100 * test_acc:.1f}% on digits-mnist/test\n")
    print("| samples | style | n | probe accuracy (%) | images/s |\n|---|---|---:|---:|---:|")
    for strategy in ("label", "templates"):
        reqs = create_strategy(strategy)(classes, args.per_class, 0, gen.prompts)
        t0 = time.time()
        images = torch.cat([gen.generate(reqs[i:i + gen.batch_size])[0] for i in range(0, len(reqs), gen.batch_size)])
        rate = len(reqs) / (time.time() - t0)
        pred = predict(model, images).argmax(1)
        labels = torch.tensor([r.class_id for r in reqs])
        styles = [gen.style_of(r.prompt) for r in reqs]
        for style in sorted(set(styles)):
            keep = torch.tensor([s == style for s in styles])
            acc = (pred[keep] == labels[keep]).float().mean().item()
            print(f"| {strategy} | {style} | {int(keep.sum())} | {100 * acc:.1f} | {rate:.1f} |")
        if strategy == "label":
            per_class = [(pred[labels == c] == c).float().mean().item() for c in range(len(classes))]
    print("\nper-class probe accuracy on label samples (%): " +
          ", ".join(f"{c}: {100 * a:.0f}" for c, a in zip(classes, per_class)))


if __name__ == "__main__":
    sys.exit(main())
