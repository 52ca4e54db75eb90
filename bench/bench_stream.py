"""Streamed ImageFolder training and evaluation: throughput against a bare loop, and memory as a folder grows.

Data: a few dozen distinct images made with PIL, as real ImageNet's files are (sides ~50-500 px, aspect 1:3 to
3:1, RGB, greyscale and CMYK JPEGs, a few PNGs), replicated by hard links into ImageFolder trees of 10 classes.

(a) Training images/s, W = context.default_workers() DataLoader workers (at least 1): genrobust's trainer on a
    FileSet (timm's RandomResizedCrop of the full image + flip in the workers, uint8 batches) against a bare loop
    of torchvision `datasets.ImageFolder` + timm's `RandomResizedCropAndInterpolation` + `RandomHorizontalFlip`
    + `MaybePILToTensor` (uint8), the same model (resnet10t at 64 px, so decoding and cropping weigh as much as
    the model on a CPU), batch size, workers, SGD and label smoothing. One epoch of the throughput tree per run,
    each run a fresh process; the runs interleave in a random order. Target: median ratio >= 0.9.
(b) Peak RSS of training (`--batches` batches, the epoch plan of the whole folder) on a 5k and a 50k folder:
    the main process and one worker, each a fresh process. Target: rise <= 10%.
(c) The same for `evaluate` on a 5k and a 50k eval folder (every image scored). Target: rise <= 10%.

Run: `.venv/bin/python bench/bench_stream.py [--repeats 5] [--small 5000] [--large 50000] [--work DIR]`.
Prints a markdown table and writes it into bench/RESULTS.md between the bench_stream markers.
"""
import argparse
import json
import os
import pathlib
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import resultsfile  # noqa: E402 - the bench folder, put on the path just above
CLASSES = [f"n{k:08d}" for k in range(10)]
MODEL, SIZE, BATCH = "resnet10t", 64, 64


# --- data --------------------------------------------------------------------------------------------------

def distinct_images(folder, n=40, seed=0):
    """`n` photo-like files: smooth colour fields with edges, the mix of sizes and kinds real ImageNet has."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        aspect = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
        long = int(rng.integers(90, 501))
        w, h = (long, max(50, int(long / aspect))) if aspect >= 1 else (max(50, int(long * aspect)), long)
        small = rng.integers(0, 256, (max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
        a = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).copy()
        a[h // 3: h // 3 + 4] = rng.integers(0, 256, 3)
        im = Image.fromarray(a)
        kind = ("rgb", "rgb", "rgb", "l", "rgb", "cmyk", "rgb", "png")[i % 8]
        if kind == "png":
            path = folder / f"{i}.png"
            im.save(path)
        else:
            path = folder / f"{i}.JPEG"
            {"rgb": im, "l": im.convert("L"), "cmyk": im.convert("CMYK")}[kind].save(path, quality=90)
        out.append(path)
    return out


def tree(root, sources, n):
    """An ImageFolder of `n` hard links to `sources`, spread over CLASSES; made once."""
    root = pathlib.Path(root)
    if (root / ".done").exists():
        return root
    for i in range(n):
        c = CLASSES[i % len(CLASSES)]
        src = sources[(i * 7 + i // len(CLASSES)) % len(sources)]
        d = root / c
        if i < len(CLASSES):
            d.mkdir(parents=True, exist_ok=True)
        os.link(src, d / f"{c}_{i}{src.suffix}")
    (root / ".done").touch()
    return root


def fileset(root):
    import torch

    from genrobust.data.mixing import FileSet

    files, labels = [], []
    for k, c in enumerate(CLASSES):
        names = sorted(os.listdir(pathlib.Path(root) / c))
        files += [str(pathlib.Path(root) / c / n) for n in names]
        labels += [k] * len(names)
    return FileSet(f"imagefolder:{root}", files, torch.tensor(labels), list(CLASSES), channels=3)


# --- children: one measurement each, in a fresh process ----------------------------------------------------

def child_genrobust(root, workers, out):
    from genrobust import train as tr

    data = fileset(root)
    config = tr.TrainConfig(model=MODEL, epochs=1, batch_size=BATCH, input_size=SIZE, workers=workers, flip=True,
                            warmup_epochs=0, seed=0)
    rows = tr.train(data, out, config, progress=False, force=True)
    return {"images": len(data), "seconds": rows[-1]["seconds"], "cpu": _cpu()}


def child_bare(root, workers):
    import timm.data
    import torch
    import torch.nn.functional as F
    import torchvision
    from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation

    from genrobust.train import TrainConfig, _optimizer, create_classifier, normalization

    torch.manual_seed(0)
    model = create_classifier(MODEL, len(CLASSES), 3).train()
    # the model's own filter, as genrobust's trainer takes it (bicubic for resnet10t)
    interpolation = timm.data.resolve_model_data_config(model)["interpolation"]
    transform = torchvision.transforms.Compose([
        RandomResizedCropAndInterpolation(SIZE, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=interpolation),
        torchvision.transforms.RandomHorizontalFlip(), MaybePILToTensor()])
    data = torchvision.datasets.ImageFolder(root, transform=transform)
    opt = _optimizer(model, TrainConfig().resolved())
    mean, std = normalization(model, 3)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    t0 = time.time()
    for x, y in loader:
        x = (x.float().div_(255) - mean) / std
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.time() - t0
    del loader  # its workers exit, so their CPU time is counted
    return {"images": len(data), "seconds": seconds, "cpu": _cpu()}


def _cpu():
    """CPU seconds of this process and its (exited) workers, start-up included: robust to neighbours' load."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child_train_rss(root, workers, batches, out):
    from genrobust import train as tr

    plan = tr.epoch_plan
    # the plan of the whole folder is drawn (its memory counts), then only its first batches are run
    tr.epoch_plan = lambda *a, **k: plan(*a, **k)[:batches]
    data = fileset(root)
    config = tr.TrainConfig(model=MODEL, epochs=1, batch_size=BATCH, input_size=SIZE, workers=workers, flip=True,
                            warmup_epochs=0, seed=0)
    tr.train(data, out, config, progress=False, force=True)
    return _rss(len(data))


def child_eval_rss(root, workers, checkpoint, out):
    from genrobust import evaluate as ev

    (row,) = ev.evaluate(checkpoint, [f"imagefolder:{root}"], pathlib.Path(out) / "r.jsonl", workers=workers,
                         force=True, batch_size=BATCH)
    return {**_rss(row["n"]), "value": row["value"]}


def _rss(images):
    # ru_maxrss is in KiB on Linux; workers have exited (and been waited for) by now
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"images": images, "main_mb": main, "worker_mb": worker}


def run_child(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the parent ----------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--throughput-images", type=int, default=640)
    p.add_argument("--small", type=int, default=5000)
    p.add_argument("--large", type=int, default=50000)
    p.add_argument("--batches", type=int, default=20, help="batches per training RSS run")
    p.add_argument("--work", default=None, help="folder for the trees (default: a temporary one)")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        fn = {"genrobust": child_genrobust, "bare": child_bare, "train-rss": child_train_rss,
              "eval-rss": child_eval_rss}[kind]
        rest = [int(r) if r.isdigit() else r for r in rest]
        print(json.dumps(fn(*rest)))
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    from genrobust import context

    workers = max(1, context.default_workers())
    started = time.time()
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="bench-stream-"))
    sources = distinct_images(work / "sources")
    thr = tree(work / "throughput", sources, args.throughput_images)
    small, large = tree(work / "small", sources, args.small), tree(work / "large", sources, args.large)
    print(f"trees ready in {time.time() - started:.0f} s under {work}", file=sys.stderr)

    # (a) throughput: a fresh process per run, in adjacent pairs in a random order, so a neighbour's load that
    # drifts over minutes reaches both halves of a pair alike; the ratio is the median of the pairs'
    rng, order = random.Random(0), []
    for _ in range(args.repeats):
        pair = ["genrobust", "bare"]
        rng.shuffle(pair)
        order += pair
    speed, cpu = {"genrobust": [], "bare": []}, {"genrobust": [], "bare": []}
    loads = []
    for i, kind in enumerate(order):
        if i % 2 == 0:
            loads.append(os.getloadavg()[0])
        extra = [work / f"ck-thr-{i}"] if kind == "genrobust" else []
        r = run_child(kind, thr, workers, *extra)
        speed[kind].append(r["images"] / r["seconds"])
        cpu[kind].append(r["cpu"])
        print(f"  {kind}: {speed[kind][-1]:.1f} images/s", file=sys.stderr)
    ratios = sorted(g / b for g, b in zip(speed["genrobust"], speed["bare"]))
    med = {k: statistics.median(v) for k, v in speed.items()}
    ratio = statistics.median(ratios)
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}

    # (b) training memory, small then large folder, in alternation
    train_rss = {}
    for n, root in (("small", small), ("large", large)):
        train_rss[n] = run_child("train-rss", root, workers, args.batches, work / f"ck-rss-{n}")
        print(f"  train rss {n}: {train_rss[n]}", file=sys.stderr)
    # (c) evaluation memory, scored with the small run's checkpoint
    eval_rss = {}
    for n, root in (("small", small), ("large", large)):
        (work / f"ev-{n}").mkdir(exist_ok=True)
        eval_rss[n] = run_child("eval-rss", root, workers, work / "ck-rss-small", work / f"ev-{n}")
        print(f"  eval rss {n}: {eval_rss[n]}", file=sys.stderr)

    def total(r):
        return r["main_mb"] + r["worker_mb"]

    rise_train = total(train_rss["large"]) / total(train_rss["small"]) - 1
    rise_eval = total(eval_rss["large"]) / total(eval_rss["small"]) - 1
    load = os.getloadavg()[0]
    command = ".venv/bin/python bench/bench_stream.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Torch threads {__import__('torch').get_num_threads()}; {time.time() - started:.0f} s in all; 1-min load "
        "average at the end "
        f"{load:.1f}. Model {MODEL} at {SIZE} px, batch {BATCH}, "
        f"W = {workers} DataLoader worker(s) (context.default_workers(), at least 1). Images: {len(sources)} "
        "distinct files (sides 50-500 px, aspect 1:3 to 3:1, RGB/L/CMYK JPEG and PNG) hard-linked into 10 "
        "classes.",
        "",
        "| measure | genrobust | reference | ratio / rise | target | met |",
        "|---|---:|---:|---:|---|---|",
        f"| (a) train images/s, {args.throughput_images} images, median of {args.repeats} (min-max) | "
        f"{med['genrobust']:.1f} ({min(speed['genrobust']):.1f}-{max(speed['genrobust']):.1f}) | "
        f"bare ImageFolder loop {med['bare']:.1f} ({min(speed['bare']):.1f}-{max(speed['bare']):.1f}) | "
        f"{ratio:.3f} (median of the pairs; {ratios[0]:.2f}-{ratios[-1]:.2f}) | >= 0.9 | "
        f"{resultsfile.ratio_verdict(ratios, 0.9)} |",
        f"| (a') CPU seconds per run (process + workers, start-up included), median | {cpu_med['genrobust']:.1f} | "
        f"{cpu_med['bare']:.1f} | {cpu_med['bare'] / cpu_med['genrobust']:.3f} (bare / genrobust) | | |",
        f"| (a'') load average (1 min) before each pair | {', '.join(f'{x:.1f}' for x in loads)} | | | | |",
        f"| (b) train peak RSS MB (main + worker), {args.batches} batches | {args.large} images: "
        f"{train_rss['large']['main_mb']:.0f} + {train_rss['large']['worker_mb']:.0f} | {args.small} images: "
        f"{train_rss['small']['main_mb']:.0f} + {train_rss['small']['worker_mb']:.0f} | {100 * rise_train:+.1f}% | "
        f"<= +10% | {'yes' if rise_train <= 0.10 else 'no'} |",
        f"| (c) evaluate peak RSS MB (main + worker), every image | {args.large} images: "
        f"{eval_rss['large']['main_mb']:.0f} + {eval_rss['large']['worker_mb']:.0f} | {args.small} images: "
        f"{eval_rss['small']['main_mb']:.0f} + {eval_rss['small']['worker_mb']:.0f} | {100 * rise_eval:+.1f}% | "
        f"<= +10% | {'yes' if rise_eval <= 0.10 else 'no'} |",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        resultsfile.write_section("bench_stream", table, command=command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
