"""A study config: reading it (YAML as data), checking every key, filling in defaults. The result is what
`study.yaml` records, and resolving it again gives the same plan. Nothing here opens an image: the real data's
classes and size come from its listing."""
import logging
import pathlib

import yaml

from ..data.folder import atomic_write_text

logger = logging.getLogger(__name__)


def write_config(out, config, name="config.yaml"):
    """Every command leaves its resolved config beside its outputs."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / name, yaml.safe_dump(config, sort_keys=False))
    return out / name


# --- the study grid: `genrobust study CONFIG.yaml` ---------------------------------------------------------
#
# A study config names the grid; `plan` turns it into cells (generator fine-tuning, generation, retrieval data,
# baseline zoo, training), each keyed by the sha256 of its resolved inputs and stored in a folder named readably
# plus that key's first 8 hex digits. A cell is cached when its output is complete, so a rerun runs only what is
# missing or new, and a killed run resumes (every stage is atomic and resumable underneath).
#
# Training cells are *arms* x seeds: an arm is one way of training (real-only with an augmentation, real + k x
# |real| images of a strategy, generated-only, and the two controls). Result rows carry the arm's name as their
# model, so the report shows each arm as mean ± std over its seeds.

STUDY_KEYS = {"name", "real", "classes", "generator", "generators", "strategies", "source", "amounts",
              "generated_only", "augmentations", "controls", "model", "models", "epochs", "train", "seeds",
              "eval_sets", "data_root", "baseline", "per_class", "generation_seed", "processes", "launcher",
              "jobs", "bar_amount"}
STRATEGY_KEYS = {"name", "strategy", "generator", "amounts", "source", "per_class"}
SOURCE_STRATEGIES = ("image", "image-label", "captions")
GENERATED_ONLY = "generated-only"
LAUNCHERS = ("torchrun", "accelerate")
FINETUNE_KEYS = {"dataset", "steps", "lr", "batch_size", "seed", "mode", "lora_rank", "grad_accum",
                 "grad_checkpointing", "mixed_precision", "ema", "ema_decay", "warmup", "prompt", "resolution",
                 "save_every", "workers"}
# The data each embedded generator was trained on: the retrieval control draws from it by default.
GENERATOR_TRAINING_DATA = {"digits-ddpm": ["digits-mnist/pool", "digits-fonts/seen"]}


def load_study(path):
    """Read a study config (YAML, read as data) and resolve its defaults; an unknown key is an error."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study config {path}: no such file")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"study config {path}: not valid YAML ({' '.join(str(e).split())})") from e
    return resolve_study(cfg, where=f"study config {path}")


def _expand(value):
    """`$GENROBUST_DATA` and other variables in a path or dataset spec; an unset variable is an error."""
    import os
    import re
    if not isinstance(value, str):
        return value
    missing = [v for v in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", value) if v not in os.environ]
    if missing:
        raise ValueError(f"{value!r} uses ${missing[0]}, which is not set: export {missing[0]}=FOLDER")
    return os.path.expandvars(value)


def _check_amounts(amounts, where):
    for a in amounts:
        if a != GENERATED_ONLY and (isinstance(a, bool) or not isinstance(a, (int, float)) or a < 0):
            raise ValueError(f"{where}: amounts are numbers k >= 0 (real + k x |real|; 0 is the real-only arm) "
                             f"or {GENERATED_ONLY!r}, got {a!r}")
    return list(amounts)


def _generator_spec(spec, where):
    spec = {"name": spec} if isinstance(spec, str) else dict(spec or {})
    if "name" not in spec:
        raise ValueError(f"{where}: a generator needs a 'name' (e.g. digits-ddpm, text2img)")
    ft = spec.get("finetune")
    if ft is not None:
        if not isinstance(ft, dict) or "dataset" not in ft:
            raise ValueError(f"{where}: finetune takes a mapping with a 'dataset' (e.g. digits-mnist/train)")
        bad = sorted(set(ft) - FINETUNE_KEYS)
        if bad:
            raise ValueError(f"{where}: unknown finetune key {bad[0]!r}; choose from {', '.join(sorted(FINETUNE_KEYS))}")
        spec["finetune"] = {**ft, "dataset": _expand(ft["dataset"])}
    for k in ("path", "model"):
        if k in spec:
            spec[k] = _expand(spec[k])
    return spec


def _strategies(cfg, generators, amounts, where):
    out, names = [], set()
    for s in cfg["strategies"]:
        s = {"strategy": s} if isinstance(s, str) else dict(s)
        bad = sorted(set(s) - STRATEGY_KEYS)
        if bad or "strategy" not in s:
            raise ValueError(f"{where}: a strategy entry is a name or a mapping with 'strategy' and optional "
                             f"{', '.join(sorted(STRATEGY_KEYS - {'strategy'}))}; got {s!r}")
        gen = s.get("generator", "default")
        if gen not in generators:
            raise ValueError(f"{where}: strategy {s['strategy']!r} names generator {gen!r}; the study's "
                             f"generators are {', '.join(sorted(generators))}")
        entry = {"name": s.get("name", s["strategy"]), "strategy": s["strategy"], "generator": gen,
                 "per_class": s.get("per_class"),
                 "amounts": _check_amounts(s.get("amounts", amounts), where),
                 "source": _expand(s.get("source", cfg.get("source") or cfg["real"]))
                 if s["strategy"] in SOURCE_STRATEGIES else None}
        if entry["name"] in names or entry["name"] in ("real", "retrieval"):
            raise ValueError(f"{where}: two arms would be called {entry['name']!r}; give each entry a 'name'")
        names.add(entry["name"])
        out.append(entry)
    return out


def _controls(cfg, generators, amounts, where):
    ctl = cfg.get("controls", {}) or {}
    if not isinstance(ctl, dict) or set(ctl) - {"step_matched", "retrieval"}:
        raise ValueError(f"{where}: controls takes step_matched (true/false) and retrieval ({{source, amounts}} "
                         f"or null), got {ctl!r}")
    retrieval = ctl.get("retrieval", "default")
    if retrieval == "default":
        known = GENERATOR_TRAINING_DATA.get(generators["default"]["name"])
        retrieval = {"source": known} if known and "finetune" not in generators["default"] else None
    if retrieval is not None:
        if not isinstance(retrieval, dict) or not retrieval.get("source"):
            raise ValueError(f"{where}: controls.retrieval needs a 'source': dataset specs or a folder of the "
                             "generator's training data (e.g. images retrieved from LAION); or null to omit it")
        source = retrieval["source"]
        for x in (source if isinstance(source, list) else [source]):
            if not _is_dataset_spec(_expand(x)) and not pathlib.Path(_expand(x)).is_dir():
                raise ValueError(f"{where}: controls.retrieval.source {x!r} is not a dataset or folder; put the "
                                 "retrieved images there as <class>/<image> (same class folders as the real data), "
                                 "or set controls.retrieval: null to run without the retrieval control")
        numeric = [a for a in amounts if a not in (0, GENERATED_ONLY)]
        retrieval = {"source": [_expand(x) for x in (source if isinstance(source, list) else [source])],
                     "amounts": _check_amounts(retrieval.get("amounts", numeric), where)}
    return {"step_matched": bool(ctl.get("step_matched", True)), "retrieval": retrieval}


def resolve_study(cfg, where="study config"):
    """Check a study mapping and fill in its defaults (the result is what `study.yaml` records, and resolving
    it again gives the same plan)."""
    import math

    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - STUDY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; keys are {', '.join(sorted(STUDY_KEYS))}")
    for key in ("name", "real", "generator", "strategies", "amounts"):
        if cfg.get(key) in (None, [], ""):
            raise ValueError(f"{where}: {key!r} is required")
    generators = {"default": _generator_spec(cfg["generator"], where)}
    for name, spec in (cfg.get("generators") or {}).items():
        generators[name] = _generator_spec(spec, f"{where}: generators.{name}")
    amounts = _check_amounts(cfg["amounts"], where)
    train_extra = dict(cfg.get("train") or {})
    from ..train import TrainConfig
    fields = set(TrainConfig.__dataclass_fields__) - {"model", "epochs", "seed", "augmentation"} | {"stream"}
    bad = sorted(set(train_extra) - fields)
    if bad:
        raise ValueError(f"{where}: unknown train key {bad[0]!r}; choose from {', '.join(sorted(fields))}")
    baseline = cfg.get("baseline")
    if isinstance(baseline, dict) and set(baseline) != {"zoo"}:
        raise ValueError(f"{where}: baseline is 'testbed', a results.jsonl path or {{zoo: SUITE}}, got {baseline!r}")
    real = _expand(cfg["real"])
    real_classes, n_real = _real_info(real)
    classes = list(cfg.get("classes") or real_classes)
    if classes != list(real_classes):
        # the trainer takes the real set's classes as they are; subsets need a class-filtered dataset spec
        raise ValueError(f"{where}: classes {classes} differ from {real}'s {list(real_classes)}; class subsets "
                         "are not supported yet")
    strategies = _strategies({**cfg, "real": real}, generators, amounts, where)
    generated_only = float(cfg.get("generated_only", 1.0))
    for s in strategies:  # each strategy generates what its largest amount draws, unless per_class is given
        need = max([a for a in s["amounts"] if a != GENERATED_ONLY]
                   + [generated_only if GENERATED_ONLY in s["amounts"] else 0])
        computed = max(1, math.ceil(need * n_real / len(classes)))
        s["per_class"] = int(s["per_class"] or cfg.get("per_class") or computed)
    per_class = max(s["per_class"] for s in strategies)
    models = cfg.get("models") or [cfg.get("model", "resnet10t")]
    processes, jobs = int(cfg.get("processes", 1)), int(cfg.get("jobs", 1))
    launcher = cfg.get("launcher", "torchrun")
    if processes < 1 or jobs < 1 or launcher not in LAUNCHERS:
        raise ValueError(f"{where}: processes and jobs are >= 1 and launcher is one of {', '.join(LAUNCHERS)}")
    return {"name": cfg["name"], "real": real, "classes": classes, "generator": generators["default"],
            "generators": {k: v for k, v in generators.items() if k != "default"}, "strategies": strategies,
            "amounts": amounts, "generated_only": generated_only,
            "augmentations": list(cfg.get("augmentations") or ["standard"]),
            "controls": _controls(cfg, generators, amounts, where), "models": list(models),
            "epochs": int(cfg.get("epochs", 15)), "train": train_extra, "seeds": [int(s) for s in cfg.get("seeds", [0])],
            "eval_sets": list(cfg.get("eval_sets", ["digits"])), "data_root": _expand(cfg.get("data_root")),
            "baseline": baseline, "per_class": int(per_class), "generation_seed": int(cfg.get("generation_seed", 0)),
            "processes": processes, "launcher": launcher, "jobs": jobs, "bar_amount": cfg.get("bar_amount"),
            "num_real": n_real}


def _real_info(spec):
    """(classes, number of images) of the real data. An ImageFolder is listed, never decoded (ImageNet's
    1.28 M files; the listing is cached for every later rank and cell); a registered dataset is small and
    loaded."""
    if spec.startswith("imagefolder:"):
        from ..data.listing import list_folder
        listing = list_folder(spec[len("imagefolder:"):])
        return list(listing.classes), len(listing)
    from ..data import load_dataset
    data = load_dataset(spec)
    return list(data.classes), len(data)


def _is_dataset_spec(text):
    from ..data import DATASETS
    return text.split("/")[0] in DATASETS.list("*") or text.startswith("imagefolder:")
