"""The resumable generation runner: requests -> images on disk -> `metadata.jsonl` + `dataset_card.json`.

Progress lives in `shards/rank<r>.jsonl` (one row per finished image, appended after its PNG is in place),
so a killed run resumes without duplicates or holes; the merge at the end writes the manifest.
"""
import concurrent.futures
import hashlib
import json
import logging
import pathlib
import re

from ..data.folder import atomic_write_bytes, atomic_write_text, encode_png, read_jsonl, write_jsonl
from .strategies import create_strategy

logger = logging.getLogger(__name__)

MANIFEST_FIELDS = ("file_name", "label", "class_id", "class_name", "strategy", "prompt", "negative_prompt",
                   "source_image", "seed", "generator", "revision", "scheduler", "steps", "guidance_scale",
                   "eta", "strength", "height", "width", "dtype", "flagged", "scores", "sha256")


def class_dir(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def _run_identity(strategy, generator, classes, per_class, seed):
    return {"strategy": strategy, "generator": generator.config(), "revision": generator.revision,
            "classes": list(classes), "per_class": per_class, "seed": seed}


def _check_identity(out, identity):
    path = out / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != identity:
            changed = sorted(k for k in identity if old.get(k) != identity[k])
            raise ValueError(f"{out} already holds a generation run with other settings ({', '.join(changed)}); "
                             "rerun with the same settings to resume, or choose a new --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(identity, indent=2, sort_keys=True))


def _finished(out, shard):
    """Rows already finished (and whose image is on disk), keyed by request key."""
    done = {}
    if shard.exists():
        for line in shard.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill; its image is regenerated
            if (out / row["file_name"]).exists():
                done[row["_key"]] = row
    return done


def _row(req, gen_info, strategy, file_name, sha):
    row = dict.fromkeys(MANIFEST_FIELDS)
    row.update(gen_info)
    row.update(file_name=file_name, label=req.class_id, class_id=req.class_id, class_name=req.class_name,
               strategy=strategy, prompt=req.prompt, source_image=req.source_image, seed=req.seed, sha256=sha,
               flagged=None, scores={})
    row["_key"] = req.key
    return row


def _write_batch(out, shard, reqs, images, gen_info, strategy):
    rows = []
    for req, img in zip(reqs, images):
        png = encode_png(img)
        file_name = f"{class_dir(req.class_name)}/{req.class_id:04d}_{req.index:06d}.png"
        atomic_write_bytes(out / file_name, png)
        rows.append(_row(req, gen_info, strategy, file_name, hashlib.sha256(png).hexdigest()))
    with open(shard, "a") as f:  # rows go in only once their PNGs are in place
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return len(rows)


def generate(generator, strategy, classes, out, per_class, seed=0, progress=True):
    """Generate `per_class` images per class with `generator` under `strategy` into the folder `out`.

    Resumes a killed run with the same settings. Returns the dataset card (a dict).
    """
    from tqdm.auto import tqdm

    out = pathlib.Path(out)
    make_requests = create_strategy(strategy)  # an unknown name fails here, with suggestions
    if strategy not in generator.strategies:
        raise ValueError(f"generator {generator.name!r} cannot run strategy {strategy!r}; "
                         f"it supports {list(generator.strategies)}")
    if per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {per_class}")
    requests = make_requests(classes, per_class, seed, generator.prompts)
    _check_identity(out, _run_identity(strategy, generator, classes, per_class, seed))
    shard = out / "shards" / "rank0.jsonl"
    shard.parent.mkdir(exist_ok=True)
    done = _finished(out, shard)
    # Rewrite the shard from its valid rows: a line cut by a kill must not swallow the next append.
    write_jsonl(shard, done.values())
    todo = [r for r in requests if r.key not in done]
    if done:
        logger.info("%s: resuming, %d of %d images already done", out, len(done), len(requests))
    gen_info = generator.info()
    bs = generator.batch_size
    bar = tqdm(total=len(requests), initial=len(requests) - len(todo), desc=f"generate {strategy}",
               disable=not progress, unit="img")
    # Encoding and writing run on a worker thread so the model never waits on disk.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for start in range(0, len(todo), bs):
            batch = todo[start:start + bs]
            images = generator.generate(batch)
            if pending is not None:
                bar.update(pending.result())
            pending = pool.submit(_write_batch, out, shard, batch, images, gen_info, strategy)
        if pending is not None:
            bar.update(pending.result())
    bar.close()
    return merge(out, requests, strategy, gen_info, generator.config(), seed)


def merge(out, requests, strategy, gen_info, generator_config, seed):
    """Write `metadata.jsonl` (request order) and `dataset_card.json` from the shard rows."""
    out = pathlib.Path(out)
    done = _finished(out, out / "shards" / "rank0.jsonl")
    missing = [r.key for r in requests if r.key not in done]
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} images are missing after generation (e.g. {missing[:3]})")
    rows = []
    for r in requests:
        row = dict(done[r.key])
        row.pop("_key")
        rows.append(row)
    write_jsonl(out / "metadata.jsonl", rows)
    classes = sorted({(r.class_id, r.class_name) for r in requests})
    counts = {}
    for r in rows:
        counts[r["class_name"]] = counts.get(r["class_name"], 0) + 1
    card = {
        "name": out.name, "kind": "generated", "strategy": strategy, "generator": generator_config,
        "generation": {k: gen_info[k] for k in gen_info}, "seed": seed,
        "classes": [name for _, name in classes], "num_images": len(rows), "counts": counts,
        "metadata_sha256": hashlib.sha256((out / "metadata.jsonl").read_bytes()).hexdigest(),
    }
    atomic_write_text(out / "dataset_card.json", json.dumps(card, indent=2))
    return card


def read_manifest(out):
    return read_jsonl(pathlib.Path(out) / "metadata.jsonl")
