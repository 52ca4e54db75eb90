"""Planning at ImageNet-1k scale: `genrobust study configs/imagenet1k-study.yaml --dry-run` on a 1,000-class,
1,281,167-file train folder, with a cold and a warm listing cache.

The tree is hard links to 8 real JPEGs of different sizes and modes (RGB, L, CMYK, one PNG under a .JPEG
name; a new copy of each every 60,000 links, ext4's limit being 65,000), so it fits on any disk: ImageNet's 1,000 wnids, 1,281 or 1,282 files a class, named as ImageNet names
them. It is built once under `--root` and reused. A plan must never open an image, so what the files hold does
not change the timing: what is measured is listing 1.28 M names, the cache, and the imports of the CLI.

Cold: a fresh `$GENROBUST_CACHE` each run (the OS's directory cache is warm after the first run: dropping it
needs root on the host). Warm: the cache a first, untimed run left. Peak RSS is the child's own (`os.wait4`).
`import torch` alone is timed beside them: the CLI imports it (registries, the trainer's config), and it is
most of a warm dry run.
Targets on the 2-core machine: cold <= 60 s, warm <= 5 s, RSS <= 2 GB.
Run: `.venv/bin/python bench/bench_listing.py [--root /tmp/genrobust-imagenet1k] [--repeats 3]`.
Prints a markdown table and writes it into bench/RESULTS.md between its markers.
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import resultsfile  # bench/, beside this script

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/imagenet1k-study.yaml"
TOTAL = 1_281_167  # ImageNet-1k train


def wnids():
    ref = json.loads((REPO / "src/genrobust/assets/reference/imagenet_classes.json").read_text())
    return [c["wnid"] for c in ref["classes"]]


def make_sources(folder):
    """8 small real images: JPEGs of several sizes, aspect ratios and modes, and a PNG named .JPEG."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    specs = [((500, 375), "RGB"), ((375, 500), "RGB"), ((60, 180), "RGB"), ((420, 140), "L"),
             ((256, 256), "CMYK"), ((90, 50), "RGB"), ((333, 500), "L")]
    paths = []
    for i, ((w, h), mode) in enumerate(specs):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr).convert(mode)
        paths.append(folder / f"src{i}.JPEG")
        im.save(paths[-1], format="JPEG", quality=85)
    paths.append(folder / "src7.JPEG")
    Image.fromarray(rng.integers(0, 256, (200, 300, 4), dtype=np.uint8), "RGBA").save(paths[-1], format="PNG")
    return paths


# ext4 allows 65,000 links to one inode: each source image gets a fresh copy every LINKS_PER_COPY links
LINKS_PER_COPY = 60_000


def _linkable(sources, k):
    src = sources[k % len(sources)]
    copy = (k // len(sources)) // LINKS_PER_COPY
    if copy == 0:
        return src
    path = src.with_name(f"{src.stem}-copy{copy}{src.suffix}")
    if not path.exists():
        shutil.copyfile(src, path)
    return path


def build_tree(root):
    """`root/imagenet/train/<wnid>/<wnid>_<i>.JPEG` (hard links) and what the dry run checks for."""
    done = root / "tree-complete.json"
    if done.exists() and json.loads(done.read_text()).get("files") == TOTAL:
        return 0.0
    t0 = time.perf_counter()
    sources = make_sources(root / "source-images")
    train = root / "imagenet" / "train"
    classes = wnids()
    base, extra = divmod(TOTAL, len(classes))
    k = 0
    for c, w in enumerate(classes):
        d = train / w
        d.mkdir(parents=True, exist_ok=True)
        have = set(os.listdir(d))
        for i in range(base + (c < extra)):
            name = f"{w}_{i}.JPEG"
            if name not in have:
                os.link(_linkable(sources, k), d / name)
            k += 1
        if c % 100 == 99:
            print(f"  tree: {c + 1} classes, {k:,} files, {time.perf_counter() - t0:.0f} s", flush=True)
    # the retrieval control's folder is checked for at plan time; nothing in it is read
    (root / "retrieval" / "imagenet1k").mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps({"files": k, "classes": len(classes)}))
    return time.perf_counter() - t0


def run_measured(cmd, env):
    """(wall s, peak RSS MiB, stdout, stderr, rc) of a child, its RSS from wait4 (this child alone)."""
    t0 = time.perf_counter()
    out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out_f, stderr=err_f, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    out_f.seek(0)
    err_f.seek(0)
    return wall, usage.ru_maxrss / 1024, out_f.read(), err_f.read(), p.returncode


def dry_run(root, cache, out):
    """(wall s, peak RSS MiB, stdout) of one `study --dry-run` on the tree, with `cache` as $GENROBUST_CACHE."""
    env = {**os.environ, "GENROBUST_DATA": str(root), "GENROBUST_CACHE": str(cache)}
    wall, rss, stdout, stderr, rc = run_measured(
        [sys.executable, "-m", "genrobust.cli", "study", CONFIG, "--out", str(out), "--dry-run"], env)
    if rc != 0:
        sys.exit(f"dry run failed ({rc}): {stderr.strip()[-2000:]}")
    return wall, rss, stdout


def fmt(values, spec):
    med, lo, hi = resultsfile.summary(values)
    return f"{spec.format(med)} ({spec.format(lo)}-{spec.format(hi)})"


def verdict(values, limit):
    """met when every run is within the limit, missed when none is, else the spread straddles it."""
    if max(values) <= limit:
        return "met"
    if min(values) > limit:
        return "missed"
    return "not resolved (the spread straddles it)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "genrobust-imagenet1k",
                    help="where the tree is built (reused when complete)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print the table only, leave RESULTS.md alone")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    print(f"tree under {root}", flush=True)
    built = build_tree(root)
    if built:
        print(f"built the tree in {built:.0f} s", flush=True)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-listing-"))
    load = os.getloadavg()[0]
    dry_run(root, work / "cache-warm", work / "out")  # fills the cache the warm runs read
    fresh = iter(range(10**6))
    runs = {
        "`python -c 'import torch'` (for reference)": lambda: run_measured([sys.executable, "-c", "import torch"],
                                                                           dict(os.environ))[:2],
        "dry run, cold listing cache": lambda: dry_run(root, work / f"cache-cold{next(fresh)}", work / "out")[:2],
        "dry run, warm listing cache": lambda: dry_run(root, work / "cache-warm", work / "out")[:2],
    }
    got = resultsfile.interleaved(runs, args.repeats)
    targets = {"dry run, cold listing cache": (60, 2048), "dry run, warm listing cache": (5, 2048)}
    # what the plan saw: the listing the runs cached
    sys.path.insert(0, str(REPO / "src"))
    from genrobust.data.listing import list_folder
    n = len(list_folder(root / "imagenet" / "train", cache_dir=work / "cache-warm" / "listings"))
    cache_mb = sum(f.stat().st_size for f in (work / "cache-warm" / "listings").glob("*.json")) / 2**20
    last = dry_run(root, work / "cache-warm", work / "out")[2].strip().splitlines()[-1]
    lines = [f"Tree: {n:,} listed files in 1,000 class folders (hard links to 8 JPEGs); listing cache entry "
             f"{cache_mb:.0f} MiB. Each run: `genrobust study {CONFIG} --out OUT --dry-run` with `GENROBUST_DATA` "
             f"at the tree, in a fresh process; {args.repeats} runs each, interleaved in random order, median "
             f"(min-max); load average {load:.1f} when it started (other work shares the cores). The plan's last "
             f"line: \"{last[:140]}{'...' if len(last) > 140 else ''}\"",
             "",
             "| run | wall s | peak RSS MiB | target | met |", "|---|---|---|---|---|"]
    for name, values in got.items():
        walls, rss = [v[0] for v in values], [v[1] for v in values]
        if name in targets:
            t_wall, t_rss = targets[name]
            target = f"<= {t_wall} s, <= {t_rss} MiB"
            met = f"time {verdict(walls, t_wall)}; RSS {verdict(rss, t_rss)}"
        else:
            target = met = ""
        lines.append(f"| {name} | {fmt(walls, '{:.1f}')} | {fmt(rss, '{:.0f}')} | {target} | {met} |")
    text = "\n".join(lines)
    print()
    print(text)
    print(resultsfile.stamp())
    if not args.no_write:
        resultsfile.write_section("bench_listing", text)
        print(f"\nwritten to {resultsfile.RESULTS}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
