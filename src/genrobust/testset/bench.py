"""Benchmarking a model zoo on a test-set version and on its real counterpart: tidy result rows
(evaluate.py's format), a leaderboard (markdown, html, json) and an accuracy-on-the-line plot (real on x,
generated on y).

Models: genrobust checkpoint folders, zoo folders (checkpoints under `models/`, as `genrobust baselines train`
writes), and `timm:NAME=WEIGHTS` for a timm architecture with local weights (.safetensors, or .bin/.pth read with
`weights_only=True`); their classes are ImageNet-1k's unless `timm_classes` names others. Classes are matched by
name (and, for ImageNet models, a set's class names map to wnids through the shipped class list).
"""
import dataclasses
import functools
import json
import logging
import pathlib

from . import store

logger = logging.getLogger(__name__)
FILES = ("results.jsonl", "leaderboard.md", "leaderboard.html", "leaderboard.json", "accuracy_on_the_line.png")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "checkpoint" or "timm"
    path: str  # the checkpoint folder, or the timm weights file
    arch: str = None

    @property
    def key(self):
        """What the result rows call it (`checkpoint`): the folder, or `timm:NAME=WEIGHTS`."""
        return self.path if self.kind == "checkpoint" else f"timm:{self.arch}={self.path}"


def expand_models(items):
    """`--models` items -> ModelSpecs: a checkpoint folder, a zoo folder (its models/*/), or timm:NAME=WEIGHTS."""
    out = []
    for item in items:
        if item.startswith("timm:"):
            arch, sep, weights = item[len("timm:"):].partition("=")
            if not (sep and arch and weights):
                raise ValueError(f"--models {item}: write timm:NAME=WEIGHTS, e.g. timm:resnet50=weights/resnet50."
                                 "safetensors (a local file: nothing is downloaded)")
            out.append(ModelSpec(arch, "timm", weights, arch))
            continue
        path = pathlib.Path(item)
        if (path / "model.safetensors").is_file():
            out.append(ModelSpec(path.name, "checkpoint", str(path)))
            continue
        zoo = path / "models" if (path / "models").is_dir() else path
        found = sorted(d for d in zoo.iterdir() if (d / "model.safetensors").is_file()) if zoo.is_dir() else []
        if not found:
            raise FileNotFoundError(f"--models {item}: not a checkpoint folder (model.safetensors, config.yaml), a zoo "
                                    "folder (models/*/model.safetensors), nor timm:NAME=WEIGHTS")
        out += [ModelSpec(d.name, "checkpoint", str(d)) for d in found]
    return _unique_names(out)


def _unique_names(models):
    seen = {}
    for m in models:
        seen.setdefault(m.name, []).append(m)
    out = []
    for m in models:
        if len(seen[m.name]) > 1:
            if m.kind != "timm":
                raise ValueError(f"two models are named {m.name!r} ({', '.join(x.path for x in seen[m.name])}); "
                                 "rename one folder")
            m = dataclasses.replace(m, name=f"{m.arch}@{pathlib.Path(m.path).stem}")
        out.append(m)
    return out


# --- loading models ----------------------------------------------------------------------------------------

def load_model(m, device="cpu", timm_classes=None):
    """(model in eval mode, {"in_chans", "input_size"}, class names, row fields) of a ModelSpec."""
    if m.kind == "checkpoint":
        from ..train import load_checkpoint
        model, cfg, classes = load_checkpoint(m.path, device)
        data = pathlib.Path(m.path) / "data.json"
        info = json.loads(data.read_text()) if data.is_file() else {}
        meta = {"train_data": info.get("label", info.get("name")), "augmentation": cfg.get("augmentation"),
                "seed": cfg.get("seed")}
        return model, {"in_chans": cfg["in_chans"], "input_size": tuple(cfg["input_size"])}, classes, meta
    return _load_timm(m, device, timm_classes)


def _load_timm(m, device, classes):
    import timm
    import timm.data

    from ..train import check_model_name

    check_model_name(m.arch)
    state = read_weights(m.path)
    classes = list(classes) if classes else imagenet_wnids()
    in_chans = next((int(t.shape[1]) for t in state.values() if getattr(t, "ndim", 0) == 4), 3)
    model = timm.create_model(m.arch, pretrained=False, num_classes=len(classes), in_chans=in_chans)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        why = " ".join(str(e).split())[:300]
        raise ValueError(f"{m.path} does not fit timm {m.arch} with {len(classes)} classes and {in_chans} input "
                         f"channels (pass --timm-classes for another class list): {why}") from None
    size = tuple(timm.data.resolve_model_data_config(model)["input_size"][1:])
    meta = {"train_data": f"timm weights {pathlib.Path(m.path).name}", "augmentation": None, "seed": None}
    return model.to(device).eval(), {"in_chans": in_chans, "input_size": size}, classes, meta


def read_weights(path):
    """A state dict from a local .safetensors file, or a .bin/.pth file read with weights_only=True."""
    import torch

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"timm weights {p}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(p)
    state = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # checkpoints that wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def read_class_list(path):
    """`--timm-classes FILE`: a JSON list of class names, or one name per line."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--timm-classes {p}: no such file")
    text = p.read_text()
    if text.lstrip().startswith("["):
        return [str(c) for c in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def imagenet_wnids():
    from ..evaluate import reference
    return [c["wnid"] for c in reference("imagenet_classes.json")["classes"]]


@functools.lru_cache(maxsize=None)
def _imagenet_names():
    """{lower-case class name: wnid} from the CLIP names and WordNet lemmas (names shared by two wnids left out)."""
    from ..evaluate import reference
    found = {}
    for c in reference("imagenet_classes.json")["classes"]:
        names = {c.get("clip_name"), c.get("wordnet_first_lemma"), *(c.get("wordnet_lemmas") or [])}
        for n in filter(None, names):
            found.setdefault(n.lower(), set()).add(c["wnid"])
    return {n: next(iter(w)) for n, w in found.items() if len(w) == 1}


def targets(classes, model_classes):
    """Per set class, the model classes that count as right: the same name, or its ImageNet wnid."""
    known = set(model_classes)
    out = []
    for c in classes:
        wnid = _imagenet_names().get(c.lower()) if c not in known else None
        out.append((wnid,) if wnid in known else (c,))
    return tuple(out)


# --- scoring -----------------------------------------------------------------------------------------------

def testset_eval_set(path, card, model_classes):
    """The version as an evaluate.EvalSet: its class folders, in the card's class order."""
    from ..evaluate import EvalSet
    from ..generate.runner import class_dir

    classes = tuple(card["classes"])
    return EvalSet(f"{card['name']}/{card['version']}", "shift", card["description"], path=str(path),
                   folders=tuple(class_dir(c) for c in classes), classes=classes,
                   targets=targets(classes, model_classes), id_set=card["real"])


def score_model(m, path, card, real, device="cpu", data_root=None, batch_size=256, workers=0, timm_classes=None):
    """Two rows for a model: accuracy on the version (role shift) and on `real`, restricted to the version's
    classes (role id) — the x and y of accuracy on the line."""
    from ..evaluate import ClassPlan, Scorer, class_plan, create_eval_set, result_row, table_classes

    model, cfg, model_classes, meta = load_model(m, device, timm_classes)
    scorer = Scorer(model, cfg, data_root, device, batch_size, workers)
    base = {"model": m.name, "checkpoint": m.key, **meta}
    ts = dataclasses.replace(testset_eval_set(path, card, model_classes), id_set=real)
    plan = class_plan(ts.name, ts.classes, ts.targets, model_classes)
    rows = [result_row(base, ts, plan, *scorer.logits(ts))]
    ids = create_eval_set(real)
    classes, tgts = table_classes(ids, data_root)
    id_plan = class_plan(ids.name, classes, tgts, model_classes, restrict=plan.mask)
    id_plan = ClassPlan(id_plan.keep, id_plan.mask, id_plan.hits, plan.subset, id_plan.dropped)
    real_row = result_row(base, ids, id_plan, *scorer.logits(ids))
    rows.append({**real_row, "role": "id", "id_set": None})
    return rows


def benchmark(ref, models, out=None, real=None, root=None, device="cpu", data_root=None, batch_size=256,
              workers=0, force=False, timm_classes=None, progress=True):
    """Score models on a version and its real counterpart; write results, leaderboard and plot into `out`
    (default `<root>/<NAME>/evaluations/<VERSION>/`). Models already scored there are reused unless `force`.
    Returns (leaderboard entries, out)."""
    from tqdm.auto import tqdm

    from ..context import resolve_device
    from ..data.folder import write_jsonl
    from ..evaluate import read_results

    device = resolve_device(device)
    path = store.resolve(ref, root)
    card = store.read_card(path)
    real = real or card["real"]
    if not real:
        raise ValueError(f"{path}: its card names no real counterpart; pass --real (e.g. digits-mnist/test, "
                         "imagenet-val or imagefolder:PATH)")
    out = pathlib.Path(out) if out else path.parent / store.EVALUATIONS / path.name
    specs = expand_models(models)
    name = f"{card['name']}/{card['version']}"
    results = out / "results.jsonl"
    old = read_results(results)
    done = {r["checkpoint"] for r in old if r["eval_set"] == name}
    todo = [m for m in specs if force or m.key not in done]
    keys = {m.key for m in todo}
    rows = [r for r in old if r.get("checkpoint") not in keys or r["eval_set"] not in (name, real)]
    for m in tqdm(todo, desc=f"benchmark {name}", disable=not progress, unit="model"):
        rows += score_model(m, path, card, real, device, data_root, batch_size, workers, timm_classes)
        write_jsonl(results, rows)  # after each model: a killed run keeps what it scored
    if len(todo) < len(specs):
        logger.info("%d of %d models were already scored in %s (reused; --force rescores)", len(specs) - len(todo),
                    len(specs), results)
    wanted = {m.key for m in specs}
    entries = leaderboard([r for r in rows if r.get("checkpoint") in wanted], name, real)
    write_leaderboard(entries, card, real, out)
    return entries, out


# --- leaderboard -------------------------------------------------------------------------------------------

def _competition_ranks(values):
    """Rank 1 for the best; equal values share a rank and the next rank skips (1, 2, 2, 4)."""
    return [1 + sum(1 for w in values if w > v) for v in values]


def leaderboard(rows, testset, real):
    """Entries sorted by accuracy on the generated set (ties: real accuracy, then name), each with its rank
    there, its rank on the real set, the rank change (positive: higher on the generated set) and the drop
    (real minus generated accuracy)."""
    real_of = {(r["checkpoint"], r.get("class_subset")): r["value"] for r in rows
               if r["eval_set"] == real and r.get("metric") == "top1"}
    entries = []
    for r in rows:
        if r["eval_set"] == testset and r.get("metric") == "top1":
            x = real_of.get((r["checkpoint"], r.get("class_subset")))
            entries.append({"model": r["model"], "checkpoint": r["checkpoint"], "generated": r["value"], "real": x,
                            "n": r.get("n"), "train_data": r.get("train_data")})
    entries.sort(key=lambda e: (-e["generated"], -(e["real"] if e["real"] is not None else -1), e["model"]))
    gen_rank = _competition_ranks([e["generated"] for e in entries])
    with_real = [e for e in entries if e["real"] is not None]
    real_rank = dict(zip((e["checkpoint"] for e in with_real), _competition_ranks([e["real"] for e in with_real])))
    for e, rank in zip(entries, gen_rank):
        e["rank"] = rank
        e["real_rank"] = real_rank.get(e["checkpoint"])
        e["rank_change"] = None if e["real_rank"] is None else e["real_rank"] - rank
        e["drop"] = None if e["real"] is None else e["real"] - e["generated"]
    return entries


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f}"


def _signed(v):
    return "–" if v is None else ("0" if v == 0 else f"{v:+d}")


def leaderboard_table(entries):
    from ..report import Table

    body = [[e["rank"], e["model"], _pct(e["generated"]), _pct(e["real"]),
             "–" if e["drop"] is None else f"{100 * e['drop']:.1f}", e["real_rank"] or "–",
             _signed(e["rank_change"])] for e in entries]
    return Table(["rank", "model", "generated (%)", "real (%)", "drop (points)", "real rank", "rank change"], body,
                 numeric=2)


def fit(entries, num_classes):
    """The logit-linear fit of generated on real accuracy over the models not near chance (None: < 3)."""
    from ..robustness import fit_line, near_chance

    on = [(e["real"], e["generated"]) for e in entries
          if e["real"] is not None and not near_chance(e["real"], num_classes)]
    if len(on) < 3 or len({x for x, _ in on}) < 2:
        return None
    return fit_line([x for x, _ in on], [y for _, y in on])


def summary(entries, num_classes):
    """Mean and largest drop, Kendall's tau between the real and generated rankings, and the fitted line."""
    pairs = [e for e in entries if e["real"] is not None]
    if not pairs:
        return {}
    drops = [e["drop"] for e in pairs]
    out = {"models": len(pairs), "mean_drop": sum(drops) / len(drops), "max_drop": max(drops),
           "max_drop_model": max(pairs, key=lambda e: e["drop"])["model"]}
    if len(pairs) >= 3:
        from scipy.stats import kendalltau
        out["kendall_tau"] = float(kendalltau([e["real"] for e in pairs], [e["generated"] for e in pairs]).statistic)
    line = fit(entries, num_classes)
    if line is not None:
        out["line"] = {"slope": line.slope, "intercept": line.intercept, "n": line.n}
    return out


def _notes(card, real, s):
    notes = [f"Generated: {card['name']}/{card['version']} ({card['num_images']} images, {len(card['classes'])} "
             f"classes, content sha256 {card['content_sha256'][:16]}). Real counterpart: {real}, scored on the "
             "set's classes. Sorted by accuracy on the generated set; rank change = real rank - generated rank "
             "(positive: the model ranks higher on the generated set); drop = real - generated accuracy."]
    if s:
        tau = f"; Kendall's tau between the two rankings {s['kendall_tau']:.2f}" if "kendall_tau" in s else ""
        line = (f"; logit(generated) = {s['line']['slope']:.2f} logit(real) {s['line']['intercept']:+.2f} over "
                f"{s['line']['n']} models" if "line" in s else "")
        notes.append(f"{s['models']} models: mean drop {100 * s['mean_drop']:.1f} points, largest "
                     f"{100 * s['max_drop']:.1f} ({s['max_drop_model']}){tau}{line}.")
    return notes


def plot(entries, card, real, out=None):
    """Accuracy on the line: real accuracy on x, generated on y, a logit-linear fit over the models."""
    from ..plots import accuracy_on_the_line

    pts = [(e["model"], e["real"], e["generated"]) for e in entries if e["real"] is not None]
    if not pts:
        return None
    return accuracy_on_the_line(f"{card['name']}/{card['version']}", [], fit(entries, len(card["classes"])), pts,
                                out=out, baseline_name="these models'")


def write_leaderboard(entries, card, real, out):
    """leaderboard.md, leaderboard.html (self-contained), leaderboard.json and the plot, into `out`."""
    from ..data.folder import atomic_write_text
    from ..report import Figure, Section, markdown_table, render_html

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = summary(entries, len(card["classes"]))
    notes = _notes(card, real, s)
    png = plot(entries, card, real, out / "accuracy_on_the_line.png")
    title = f"Leaderboard: {card['name']}/{card['version']}"
    table = leaderboard_table(entries)
    md = [f"# {title}\n", *(n + "\n" for n in notes), markdown_table(table)]
    if png is not None:
        md.append("![accuracy on the line](accuracy_on_the_line.png)\n")
    atomic_write_text(out / "leaderboard.md", "\n".join(md))
    blocks = [*notes, table] + ([Figure("accuracy on the line", "accuracy_on_the_line.png", png,
                                        "real accuracy (x) against generated accuracy (y), logit axes")]
                                if png is not None else [])
    atomic_write_text(out / "leaderboard.html", render_html(title, [Section("Leaderboard", blocks)]))
    atomic_write_text(out / "leaderboard.json", json.dumps({"testset": f"{card['name']}/{card['version']}",
                                                            "real": real, "summary": s, "entries": entries}, indent=2))
    return out
