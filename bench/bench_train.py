"""Training throughput of `genrobust.train` on the digits world against a bare training loop.

The trainer (digits-mnist/train, 1,000 images in memory as uint8; resnet10t, batch 128, `standard`
augmentation, SGD, a checkpoint saved every epoch) against the same model and optimizer stepping on random
tensors already in float: forward, cross-entropy, backward, step, nothing else. The ratio is what the input
path, augmentation, bookkeeping and checkpoints cost. Target: ratio >= 0.9.

The first epoch (and the bare loop's first steps) is warm-up and not timed. Runs alternate, `--repeats`
times, and the best of each is kept: on shared CPUs the slowest runs measure the neighbours.
Run: `.venv/bin/python bench/bench_train.py [--epochs 6] [--repeats 3] [--device cpu]`. Prints a markdown table.
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def trainer_throughput(data, epochs, batch_size, device):
    from genrobust.train import TrainConfig, train

    config = TrainConfig(model="resnet10t", epochs=epochs, batch_size=batch_size, augmentation="standard", seed=0)
    with tempfile.TemporaryDirectory() as out:
        rows = train(data, f"{out}/ck", config, device=device, progress=False)
    # epoch 1 is warm-up; the seconds column is cumulative, each epoch's checkpoint save falls in the next
    return len(data) * (epochs - 1) / (rows[-1]["seconds"] - rows[0]["seconds"])


def bare_throughput(steps, batch_size, channels, size, num_classes, device):
    from genrobust.train import TrainConfig, _optimizer, create_classifier

    torch.manual_seed(0)
    model = create_classifier("resnet10t", num_classes, channels).to(device).train()
    opt = _optimizer(model, TrainConfig().resolved())
    x = torch.randn(batch_size, channels, size, size, device=device)
    y = torch.randint(num_classes, (batch_size,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from genrobust.data import load_dataset

    data = load_dataset("digits-mnist/train")
    _, channels, size, _ = data.images.shape
    steps = (args.epochs - 1) * -(-len(data) // args.batch_size)
    bare, trainer = [], []
    for _ in range(args.repeats):
        bare.append(bare_throughput(steps, args.batch_size, channels, size, len(data.classes), args.device))
        trainer.append(trainer_throughput(data, args.epochs, args.batch_size, args.device))
        print(f"bare {bare[-1]:.0f} img/s, trainer {trainer[-1]:.0f} img/s", file=sys.stderr)
    b, t = max(bare), max(trainer)
    print(f"resnet10t, batch {args.batch_size}, digits-mnist/train ({len(data)} images, {size}x{size}), "
          f"{args.epochs - 1} timed epochs, best of {args.repeats}; device {args.device}, {os.cpu_count()} CPUs "
          f"({platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| loop | img/s |\n|---|---:|")
    print(f"| bare forward/backward/step on random tensors | {b:.0f} |")
    print(f"| `genrobust.train` (uint8 batches, `standard` augmentation, checkpoint each epoch) | {t:.0f} |")
    print(f"| **ratio** | **{t / b:.2f}** |")
    print(f"\ntarget: ratio >= 0.9 -> {'met' if t / b >= 0.9 else 'NOT met'}")


if __name__ == "__main__":
    main()
