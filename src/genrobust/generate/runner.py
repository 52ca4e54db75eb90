"""The resumable, shardable generation runner: requests -> images on disk -> `metadata.jsonl` + card.

Each process appends one row per finished request to `shards/rank<r>.jsonl`, after its PNG is in place, so a
killed run resumes without duplicates or holes. The plan (every request key, in order) is `shards/plan.json`;
whoever finds every key done merges the shards into `metadata.jsonl` and `dataset_card.json`.
Sharding: RANK/WORLD_SIZE (torchrun, accelerate launch) or `shard=(i, n)` (job arrays); process r takes
requests r, r+n, r+2n, ... of the plan.
Quality control: an image flagged by the generator (a safety checker's "nsfw") or blank is never kept: the
request is retried with the next derived seed, up to `max_attempts`; every attempt's reason is recorded.
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re

from .. import context
from ..data.folder import atomic_write_bytes, atomic_write_text, encode_png, read_jsonl, write_jsonl
from .strategies import Sources, create_strategy, derive_seed

logger = logging.getLogger(__name__)
UNREADABLE_SOURCE = "unreadable source"  # the quality-control reason of a request whose source won't decode

MANIFEST_FIELDS = ("file_name", "label", "class_id", "class_name", "strategy", "prompt", "negative_prompt",
                   "caption", "source_image", "seed", "generator", "revision", "scheduler", "steps",
                   "guidance_scale", "eta", "strength", "height", "width", "dtype", "flagged", "attempts",
                   "batch_id", "batch_pos", "batch_size", "scores", "sha256")


def class_dir(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def _run_identity(strategy, generator, classes, per_class, seed, per_image=None, source=None, captioner=None,
                  max_attempts=3):
    identity = {"strategy": strategy, "generator": generator.config(), "revision": generator.revision,
                "classes": list(classes), "per_class": per_class, "seed": seed}
    # keys added later only when used, so folders made before them still resume
    extra = {"per_image": per_image, "source": source, "captioner": captioner}
    identity.update({k: v for k, v in extra.items() if v is not None})
    if max_attempts != 3:
        identity["max_attempts"] = max_attempts
    return identity


def _check_identity(out, identity):
    path = out / "run.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != identity:
            changed = sorted(k for k in set(identity) | set(old) if old.get(k) != identity.get(k))
            raise ValueError(f"{out} already holds a generation run with other settings ({', '.join(changed)}); "
                             "rerun with the same settings to resume, or choose a new --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(identity, indent=2, sort_keys=True))


def _read_shard(out, shard):
    """Valid rows of one shard file whose image (if kept) is on disk, keyed by request key."""
    done = {}
    if shard.exists():
        for line in shard.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill; its request is redone
            if row.get("file_name") is None or (out / row["file_name"]).exists():
                done[row["_key"]] = row
    return done


def finished(out):
    """Every finished request of every shard (rejected ones included), keyed by request key."""
    out = pathlib.Path(out)
    done = {}
    for shard in sorted((out / "shards").glob("rank*.jsonl")):
        done.update(_read_shard(out, shard))
    return done


def _row(req, gen_info, strategy, file_name, sha, attempts, batch):
    row = dict.fromkeys(MANIFEST_FIELDS)
    row.update(gen_info)
    row.update(file_name=file_name, label=req.class_id, class_id=req.class_id, class_name=req.class_name,
               strategy=strategy, prompt=req.prompt, caption=req.caption,
               source_image=req.source_image, seed=req.seed, sha256=sha, flagged=None, scores={},
               attempts=attempts, batch_id=batch[0], batch_pos=batch[1], batch_size=batch[2])
    row["_key"] = req.key
    return row


def _write_batch(out, shard, items, gen_info, strategy):
    """Write kept images atomically, then append their rows (and rejected requests' rows) to the shard."""
    rows = []
    for req, img, attempts, batch, score in items:
        if img is None:  # every attempt failed quality control: recorded, never kept as data
            rows.append(_row(req, gen_info, strategy, None, None, attempts, batch))
            continue
        png = encode_png(img)
        file_name = f"{class_dir(req.class_name)}/{req.class_id:04d}_{req.index:06d}.png"
        atomic_write_bytes(out / file_name, png)
        rows.append(_row(req, gen_info, strategy, file_name, hashlib.sha256(png).hexdigest(), attempts, batch))
        if score is not None:
            rows[-1]["scores"] = {"clip": round(score, 4)}
    with open(shard, "a") as f:  # rows go in only once their PNGs are in place
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return sum(1 for r in rows)


def _batch_id(batch):
    return hashlib.sha256("|".join(f"{r.key}@{r.seed}" for r in batch).encode()).hexdigest()[:16]


def _shard_of(shard):
    """(rank, world): an explicit `(i, n)`, else the launcher's (torchrun, accelerate launch), else (0, 1)."""
    if shard is not None:
        i, n = shard
        if n < 1:
            raise ValueError(f"--shard {i}/{n}: the number of shards must be at least 1")
        if not 0 <= i < n:
            raise ValueError(f"--shard {i}/{n}: the shard index must be in 0..{n - 1}")
        return i, n
    return context.rank(), context.world_size()


@dataclasses.dataclass(frozen=True)
class _Job:
    """A request on its way through quality control: its attempts so far and the reasons they failed."""

    req: object
    attempts: tuple = ()


def generate(generator, strategy, classes, out, per_class=None, seed=0, progress=True, per_image=None,
             source=None, captioner=None, shard=None, max_attempts=3, clip=None, max_corrupt=0.01):
    """Generate a class-labelled dataset folder with `generator` under `strategy`.

    Args:
        classes: class names, in label order.
        per_class / per_image: images per class, or per real source image (source strategies).
        source: dataset spec of the real images (`image`, `image-label`, `captions`).
        captioner: a captioner object (`captions`), see generate.captioners.
        shard: `(i, n)` to run the i-th of n slices (job arrays); default: RANK/WORLD_SIZE or one process.
        max_attempts: tries per request before a flagged or blank image's request is given up (recorded).
        clip: optional `ClipFilter`: every kept image's CLIP score against "a photo of a {class}." is
            recorded; under `threshold` an image is retried like a blank one; `top_k` keeps the best k per
            class in the manifest (the rest stay on disk, left out and counted in the card).
        max_corrupt: largest fraction of the source images that may turn out unreadable when decoded; their
            requests are given up (reason "unreadable source") and the files named in the card.
    Resumes a killed run with the same settings. Returns the dataset card, or None when other shards have
    not finished yet (the last one to finish merges).
    """
    out = pathlib.Path(out)
    make_requests = create_strategy(strategy)  # an unknown name fails here, with suggestions
    if strategy not in generator.strategies:
        raise ValueError(f"generator {generator.name!r} cannot run strategy {strategy!r}; "
                         f"it supports {list(generator.strategies)}")
    known = generator.classes() if hasattr(generator, "classes") else None
    if known is not None and any(c not in known for c in classes):
        bad = [c for c in classes if c not in known]
        raise ValueError(f"{generator.name} knows classes {known[:10]}{'...' if len(known) > 10 else ''}, "
                         f"not {', '.join(map(repr, bad[:5]))}")
    if strategy == "captions" and captioner is None:
        raise ValueError("strategy 'captions' needs a captioner: pass --captioner blip --captioner-model PATH")
    # sources are listed, not opened: an unreadable one is skipped when its batch decodes it (max_corrupt)
    sources = Sources(source, max_corrupt) if source else None
    requests = make_requests(classes, per_class, seed, generator.prompts, sources=sources, per_image=per_image)
    rank, world = _shard_of(shard)
    cap_name = captioner.config() if hasattr(captioner, "config") else getattr(captioner, "name", None)
    identity = _run_identity(strategy, generator, classes, per_class, seed, per_image, source, cap_name,
                             max_attempts)
    if clip is not None:
        identity["clip"] = clip.config()
    _check_identity(out, identity)
    _write_plan(out, requests, sources)
    if strategy == "captions":
        requests = _with_captions(out, requests, sources, captioner, rank)
    own = out / "shards" / f"rank{rank}.jsonl"
    write_jsonl(own, _read_shard(out, own).values())  # drop a line cut by a kill before appending
    done = finished(out)
    # ranks take whole batches of the one-process plan (batch b goes to rank b % world): every batch is the one
    # a single process makes, so the images are the same to the bit whatever the number of processes
    bs = generator.batch_size
    mine = [requests[i:i + bs] for i in range(0, len(requests), bs)][rank::world]
    if done:
        logger.info("%s: resuming, %d of %d requests already done", out, len(done), len(requests))
    _run(generator, strategy, mine, set(done), out, own, sources, seed, max_attempts, progress, clip)
    if world > 1 and shard is None and _distributed_barrier():
        if rank != 0:
            return None
    card = merge(out, gen_info=generator.info(), required=False)
    if card is None:
        logger.info("%s: shard %d/%d done; the last shard to finish merges (or run `genrobust generate merge "
                    "%s`)", out, rank, world, out)
    return card


def _run(generator, strategy, mine, done, out, shard, sources, seed, max_attempts, progress, clip=None):
    """Generate this process's batches of requests; the writer thread encodes and saves meanwhile.

    Batches are fixed slices of the plan, and a batch with anything left to do is generated whole (only its
    missing images are written): a resumed run makes the same batches as an uninterrupted one, so its images
    are the same to the bit, and `regenerate` can rebuild any image's batch from the manifest. Retries of
    flagged or blank images follow in batches of their own.
    """
    from tqdm.auto import tqdm

    bs = generator.batch_size
    fixed = [[_Job(r) for r in batch] for batch in mine]
    queue = [b for b in fixed if any(j.req.key not in done for j in b)]
    total = sum(len(b) for b in mine)
    bar = tqdm(total=total, initial=total - sum(j.req.key not in done for b in queue for j in b),
               desc=f"generate {strategy}", disable=not progress, unit="img")
    retries, given_up, sourceless = [], 0, 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        while queue or retries:
            if not queue:
                queue = [retries[i:i + bs] for i in range(0, len(retries), bs)]
                retries = []
            jobs = queue.pop(0)
            items, again = _generate_batch(generator, jobs, done, sources, seed, max_attempts, clip)
            retries += again
            lost = [it for it in items if it[1] is None]
            # a request whose source would not decode is given up at once, not after max_attempts tries
            unread = sum(1 for it in lost if it[2] and it[2][-1].get("reason") == UNREADABLE_SOURCE)
            sourceless += unread
            given_up += len(lost) - unread
            if pending is not None:
                bar.update(pending.result())
            pending = pool.submit(_write_batch, out, shard, items, generator.info(), strategy)
        if pending is not None:
            bar.update(pending.result())
    bar.close()
    if given_up:
        logger.warning("%s: %d requests failed quality control %d times and were given up", out, given_up,
                       max_attempts)
    if sourceless:
        logger.warning("%s: %d requests given up because their source image would not decode (the card's "
                       "skipped_sources names the files)", out, sourceless)


def _generate_batch(generator, jobs, done, sources, seed, max_attempts, clip=None):
    """(items to write, jobs to retry) for one batch; requests already done are generated, not written."""
    from .filters import is_blank

    batch = [j.req for j in jobs]
    srcs, unreadable = None, set()
    if sources is not None:
        srcs = [sources.load_or_skip(r.source_image) for r in batch]
        unreadable = {i for i, im in enumerate(srcs) if im is None}
        # a stand-in keeps the batch's shape (and so its other images) as planned; its output is dropped
        stand_in = next((im for im in srcs if im is not None), None)
        srcs = [stand_in if im is None else im for im in srcs]
    if len(unreadable) == len(batch):
        images, flags = [None] * len(batch), [None] * len(batch)
    else:
        images, flags = generator.generate(batch, srcs)
    items, again, batch_id = [], [], _batch_id(batch)
    todo = [i for i, j in enumerate(jobs) if j.attempts or j.req.key not in done]
    scores = dict(zip(todo, clip.score([images[i] for i in todo], [batch[i].class_name for i in todo])
                      if clip is not None else [None] * len(todo)))
    for pos in todo:
        job, img, flag = jobs[pos], images[pos], flags[pos]
        if pos in unreadable:  # given up at once: another seed cannot make the source readable
            attempts = [*job.attempts, {"seed": job.req.seed, "reason": UNREADABLE_SOURCE}]
            items.append((job.req, None, attempts, (batch_id, pos, len(batch)), None))
            continue
        reason = flag or ("blank" if is_blank(img) else None)
        if reason is None and clip is not None and clip.threshold is not None and scores[pos] < clip.threshold:
            reason = f"clip<{clip.threshold:g}"
        if reason is None:
            items.append((job.req, img, list(job.attempts), (batch_id, pos, len(batch)), scores[pos]))
            continue
        attempts = job.attempts + ({"seed": job.req.seed, "reason": reason},)
        if len(attempts) < max_attempts:
            req = job.req
            again.append(_Job(dataclasses.replace(req, seed=derive_seed(seed, req.class_id, req.index,
                                                                        len(attempts))), attempts))
        else:
            items.append((job.req, None, list(attempts), (batch_id, pos, len(batch)), None))
    return items, again


def _write_plan(out, requests, sources):
    plan = {"keys": [r.key for r in requests],
            "skipped_sources": [] if sources is None else sources.skipped}
    path = out / "shards" / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(plan)
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)


def _with_captions(out, requests, sources, captioner, rank):
    """Fill each request's prompt from its source image's caption; captions are cached in `captions/`."""
    from .captioners import class_prompt

    cache_dir = out / "captions"
    cache_dir.mkdir(exist_ok=True)
    cache = {}
    for f in sorted(cache_dir.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            cache[row["source_image"]] = row["caption"]
    todo = sorted({r.source_image for r in requests} - set(cache))
    if todo:
        logger.info("captioning %d source images with %s", len(todo), captioner.name)
        own = cache_dir / f"rank{rank}.jsonl"
        bs = getattr(captioner, "batch_size", 16)
        for i in range(0, len(todo), bs):
            refs = todo[i:i + bs]
            images = [sources.load_or_skip(ref) for ref in refs]
            # an unreadable source gets no caption; its requests are given up when their batch is generated
            caps = iter(captioner.caption([im for im in images if im is not None]) if any(im is not None for im in images) else [])
            caps = ["" if im is None else next(caps) for im in images]
            with open(own, "a") as f:
                f.write("".join(json.dumps({"source_image": r, "caption": c}) + "\n" for r, c in zip(refs, caps)))
            cache.update(zip(refs, caps))
    return [dataclasses.replace(r, prompt=class_prompt(cache[r.source_image], r.class_name),
                                caption=cache[r.source_image]) for r in requests]


def _distributed_barrier():
    """Wait for every torchrun process (gloo works on CPU); False when no process group can be formed."""
    import torch.distributed as dist
    if not dist.is_available():
        return False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            return False
        dist.init_process_group("gloo")
    dist.barrier()
    return True


def merge(out, gen_info=None, required=True):
    """Write `metadata.jsonl` (plan order) and `dataset_card.json` from every shard's rows.

    Returns the card; when requests are still missing, raises (`required`) or returns None.
    """
    out = pathlib.Path(out)
    plan_path = out / "shards" / "plan.json"
    if not plan_path.exists():
        raise FileNotFoundError(f"{out} holds no generation plan (shards/plan.json); run `genrobust generate` first")
    plan = json.loads(plan_path.read_text())
    identity = json.loads((out / "run.json").read_text())
    done = finished(out)
    missing = [k for k in plan["keys"] if k not in done]
    if missing:
        if required:
            raise ValueError(f"{out}: {len(missing)} of {len(plan['keys'])} requests are not done yet (e.g. "
                             f"{missing[:3]}); finish every shard (rerun its command) before merging")
        return None
    rows, rejected, reasons = [], {}, {}
    for k in plan["keys"]:
        row = {f: v for f, v in done[k].items() if f != "_key"}
        for a in row.get("attempts") or []:
            reasons[a["reason"]] = reasons.get(a["reason"], 0) + 1
        if row["file_name"] is None:
            rejected[row["class_name"]] = rejected.get(row["class_name"], 0) + 1
        else:
            rows.append(row)
    rows, dropped = _top_k(rows, (identity.get("clip") or {}).get("top_k"))
    write_jsonl(out / "metadata.jsonl", rows)
    # every writer is done: temp files of writes cut by a kill are removed
    for tmp in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:
        tmp.unlink(missing_ok=True)
    counts = {}
    for r in rows:
        counts[r["class_name"]] = counts.get(r["class_name"], 0) + 1
    if gen_info is None:
        gen_info = {k: rows[0].get(k) for k in ("generator", "revision", "scheduler", "steps", "guidance_scale",
                                                "eta", "strength", "height", "width", "dtype")} if rows else {}
    card = {
        "name": out.name, "kind": "generated", "strategy": identity["strategy"],
        "generator": identity["generator"], "generation": dict(gen_info), "seed": identity["seed"],
        "classes": list(identity["classes"]), "num_images": len(rows), "counts": counts,
        "metadata_sha256": hashlib.sha256((out / "metadata.jsonl").read_bytes()).hexdigest(),
    }
    if rejected or reasons or dropped:
        card["quality_control"] = {"failed_attempts": reasons, "given_up": rejected}
        if dropped:
            card["quality_control"]["clip_top_k_left_out"] = dropped
    if rows:  # readers take channels from the recipe or this card, never from a first image
        card["channels"] = _channels(out / rows[0]["file_name"])
    if "clip" in identity:
        card["clip_filter"] = identity["clip"]
    for key in ("source", "per_image", "captioner"):
        if key in identity:
            card[key] = identity[key]
    # sources found unreadable while generating (older runs recorded them in the plan at start)
    skipped = list(plan.get("skipped_sources") or [])
    skipped += sorted({done[k]["source_image"] for k in plan["keys"] if done[k]["file_name"] is None
                       and (done[k].get("attempts") or [{}])[-1].get("reason") == UNREADABLE_SOURCE})
    if skipped:
        card["skipped_sources"] = skipped
    atomic_write_text(out / "dataset_card.json", json.dumps(card, indent=2))
    return card


def _channels(path):
    """1 for a grayscale PNG (the digits world), else 3: every image of a run has its generator's mode."""
    from PIL import Image
    with Image.open(path) as im:
        return 1 if im.mode in ("L", "1", "I;16") else 3


def _top_k(rows, k):
    """The k best-scoring rows of each class (plan order kept), and how many each class left out."""
    if k is None:
        return rows, {}
    from .filters import select
    by_class = {}
    for i, r in enumerate(rows):
        by_class.setdefault(r["class_name"], []).append(i)
    keep, dropped = set(), {}
    for cls, idx in by_class.items():
        kept = select({cls: [rows[i]["scores"]["clip"] for i in idx]}, top_k=k)[cls]
        keep |= {idx[j] for j in kept}
        if len(idx) > len(kept):
            dropped[cls] = len(idx) - len(kept)
    return [r for i, r in enumerate(rows) if i in keep], dropped


@dataclasses.dataclass
class ClipFilter:
    """CLIP scores of generated images against their class ("a photo of a {class}."), as a filter."""

    scorer: object  # filters.ClipScorer
    threshold: float = None
    top_k: int = None

    def score(self, images, class_names):
        import torch
        from PIL import Image
        pil = [Image.fromarray((img.expand(3, -1, -1) if img.shape[0] == 1 else img).permute(1, 2, 0)
                               .to(torch.uint8).cpu().numpy()) for img in images]
        return self.scorer.score(pil, [f"a photo of a {c}." for c in class_names])

    def config(self):
        return {"model": getattr(self.scorer, "model_name", None), "threshold": self.threshold,
                "top_k": self.top_k}


def regenerate(generator, out, file_name, source=None):
    """Regenerate one image from its manifest row alone: its request (class, prompt, source, seed) is run at
    its recorded position in a batch of its recorded size, the other places holding copies of it.

    No other image is needed: a sample's numbers depend on its own inputs and on the batch's shape (batched
    kernels round differently for other shapes, moving a pixel by one grey level now and then), not on what
    the other samples are. On the same device and software the result is the file's image, bit for bit.
    """
    from .strategies import Request

    rows = read_manifest(out)
    row = next((r for r in rows if r["file_name"] == file_name), None)
    if row is None:
        raise ValueError(f"{file_name} is not in {out}/metadata.jsonl")
    size = row.get("batch_size") or sum(1 for r in rows if r.get("batch_id") == row["batch_id"])
    index = int(row["file_name"].rsplit("_", 1)[1].split(".")[0])
    req = Request(row["class_id"], row["class_name"], index, row["seed"], row["prompt"],
                  source_image=row["source_image"], caption=row.get("caption"))
    srcs = None
    if row["source_image"] is not None:
        if source is None:
            raise ValueError(f"{file_name} was made from {row['source_image']}: pass the source spec it came from")
        srcs = [Sources(source).load(row["source_image"])] * size
    images, _ = generator.generate([req] * size, srcs)
    return images[row["batch_pos"]]


def read_manifest(out):
    return read_jsonl(pathlib.Path(out) / "metadata.jsonl")
