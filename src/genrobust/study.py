"""Studies: the stages chained on one output folder. `quickstart` is the fast slice on the digits world."""
import functools
import logging
import math
import pathlib
import time

import yaml

from .data.folder import atomic_write_text

logger = logging.getLogger(__name__)
QUICKSTART_STRATEGIES = ("label", "templates")


def write_config(out, config, name="config.yaml"):
    """Every command leaves its resolved config beside its outputs."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / name, yaml.safe_dump(config, sort_keys=False))
    return out / name


def _stage(i, n, text):
    logger.info("[%d/%d] %s", i, n, text)


def train_arm(out, real, generated, ratio, config, device, progress):
    """Train one model unless its checkpoint is already complete (a finished arm is never redone)."""
    from .data.mixing import build_training_set
    from .train import train

    if (pathlib.Path(out) / "model.safetensors").exists():
        logger.info("%s: already trained, reusing it", out)
        return
    data, info = build_training_set(real, generated, ratio, seed=config.seed)
    train(data, out, config, device=device, data_info=info, progress=progress)


def quickstart(out, per_class=50, ratio=0.5, epochs=15, model="resnet10t", seed=0, generator_path=None,
               steps=20, guidance=2.0, eta=1.0, eval_sets=("digits",), device="cpu", progress=True, baseline=None):
    """Generate `label` and `templates` sets with the shipped digits-ddpm, train real-only and
    real+generated classifiers, evaluate them on the digits suite, and write `results.jsonl`, `report.md` and
    `report.html`. With `baseline` (a baseline zoo's results.jsonl) the report adds effective robustness.

    Rerunning on the same folder reuses every finished stage.
    """
    from .evaluate import evaluate, read_results
    from .generate import create_generator, generate
    from .report import write_report
    from .train import TrainConfig

    out = pathlib.Path(out)
    t0 = time.time()
    write_config(out, {"command": "quickstart", "per_class": per_class, "ratio": ratio, "epochs": epochs,
                       "model": model, "seed": seed, "generator_path": generator_path, "steps": steps,
                       "guidance": guidance, "eta": eta, "eval_sets": list(eval_sets), "device": str(device),
                       "baseline": None if baseline is None else str(baseline)})
    n = 5
    _stage(1, n, "loading the shipped digits-ddpm generator")
    generator = create_generator("digits-ddpm", path=generator_path, steps=steps, guidance=guidance, eta=eta,
                                 device=device)
    classes = generator.classes()
    _stage(2, n, f"generating {per_class} images per class for strategies {', '.join(QUICKSTART_STRATEGIES)}")
    folders = {}
    for s in QUICKSTART_STRATEGIES:
        folders[s] = out / "generated" / s
        generate(generator, s, classes, folders[s], per_class, seed=seed, progress=progress)
    config = TrainConfig(model=model, epochs=epochs, seed=seed)
    arms = {"real": ()} | {f"real+{s}": (folders[s],) for s in QUICKSTART_STRATEGIES}
    _stage(3, n, f"training {len(arms)} {model} classifiers: {', '.join(arms)}")
    for name, gen in arms.items():
        train_arm(out / "models" / name, "digits-mnist/train", gen, ratio if gen else 0.0, config, device,
                  progress)
    _stage(4, n, "evaluating on " + ", ".join(eval_sets))
    results = out / "results.jsonl"
    for name in arms:
        evaluate(out / "models" / name, eval_sets, results, device=device, model_name=name)
    _stage(5, n, "writing the report")
    rows = [r for r in read_results(results) if r["model"] in arms]
    notes = [f"{per_class} generated images per class per strategy; real+generated arms add {ratio:g} x |real| "
             f"generated images; {epochs} epochs each, seed {seed}, one seed per arm (seeds move shift "
             "accuracy by several points: use `genrobust study` for several seeds).",
             f"wall time {time.time() - t0:.0f} s on device {device}"]
    paths = write_report(rows, out, baseline=baseline, reference="real", generated=list(folders.values()),
                         title="genrobust quickstart (digits world)", notes=notes)
    logger.info("done in %.0f s: %s, %s and %s", time.time() - t0, results, paths[0], paths[1])
    return rows


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
# Rough costs for `--dry-run` estimates, measured once on the 2-core CPU machine (bench/RESULTS.md, 2026-11):
# training resnet10t ran at ~773 images/s (1.3 ms per image-epoch, `standard` augmentation); randaugment and
# augmix added ~25-50 and ~15-30 ms per batch of 128 (~0.3 and ~0.2 ms per image); the shipped digits-ddpm
# generated ~13 images/s at 20 steps (0.077 s per image, proportional to steps); evaluating one model on the
# digits suite took ~3 s. Other models and machines differ: the estimate only sizes a run.
SECONDS_PER_IMAGE_EPOCH = 1.3e-3
EXTRA_SECONDS_PER_IMAGE_EPOCH = {"randaugment": 0.3e-3, "augmix": 0.2e-3}
SECONDS_PER_GENERATED_IMAGE_STEP = 0.077 / 20
SECONDS_PER_EVALUATION = 3.0
SECONDS_PER_EXPORTED_IMAGE = 2e-3
SECONDS_PER_FINETUNE_STEP = 0.3  # digits-ddpm at batch 64: ~3.6 steps/s on the idle 2-core machine


def _short(x):
    return f"{x:g}"


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
    from .train import TrainConfig
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
    from .data import load_dataset
    data = load_dataset(spec)
    return list(data.classes), len(data)


def _key(inputs):
    import hashlib
    import json
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


SUBFOLDERS = {"finetune": "generators", "generation": "generated", "retrieval": "retrieval",
              "baseline": "baselines", "training": "models"}


class Cell:
    """One unit of the study: its kind, readable name, key (hash of its inputs), folder and dependencies.

    Training cells also carry `arm` (the model name in result rows) and `meta` (what the arm varies), which the
    report's curves and bars read.
    """

    def __init__(self, kind, name, inputs, out, deps=(), estimate_s=0.0, arm=None, meta=None):
        self.kind, self.name, self.inputs, self.deps, self.estimate_s = kind, name, inputs, list(deps), estimate_s
        self.arm, self.meta = arm, dict(meta or {})
        self.key = _key(inputs)
        self.folder = pathlib.Path(out) / SUBFOLDERS[kind] / f"{name}-{self.key[:8]}"
        self.index = None

    def cached(self):
        import json
        if self.kind == "generation":
            run = self.folder / "run.json"
            if not (self.folder / "dataset_card.json").exists() or not run.exists():
                return False
            ident = json.loads(run.read_text())
            want = self.inputs
            return (ident.get("strategy"), ident.get("classes"), ident.get("per_class"), ident.get("seed"),
                    ident.get("source")) == (want["strategy"], want["classes"], want["per_class"], want["seed"],
                                             want["source"])
        if self.kind == "retrieval":
            return (self.folder / "dataset_card.json").exists()
        if self.kind == "baseline":
            return (self.folder / "zoo.json").exists()
        if self.kind == "finetune":
            from .finetune import is_complete as finetuned
            return finetuned(self.folder)
        from .train import is_complete
        return is_complete(self.folder)

    def __repr__(self):
        return f"Cell({self.index}, {self.kind}, {self.folder.name})"


def _steps(n, batch_size, epochs):
    return math.ceil(n / batch_size) * epochs


def step_matched_epochs(n_real, n_largest, batch_size, epochs):
    """Epochs of real-only training that take at least as many optimisation steps as `epochs` over the largest
    real+generated set (the real+generated arms see more images per epoch, hence more steps)."""
    return math.ceil(_steps(n_largest, batch_size, epochs) / math.ceil(n_real / batch_size))


def _generation_cells(cfg, out):
    """{generator name: fine-tune cell} and {strategy entry name: generation cell}; equal inputs share a cell."""
    tunes, gens, by_key = {}, {}, {}
    all_gens = {"default": cfg["generator"], **cfg["generators"]}
    for name, spec in all_gens.items():
        if "finetune" in spec:
            inputs = {"kind": "finetune", "generator": {k: v for k, v in spec.items() if k != "finetune"},
                      "finetune": spec["finetune"]}
            tunes[name] = Cell("finetune", f"{spec['name']}-finetuned", inputs, out,
                               estimate_s=spec["finetune"].get("steps", 600) * SECONDS_PER_FINETUNE_STEP)
    for s in cfg["strategies"]:
        spec, tune = all_gens[s["generator"]], tunes.get(s["generator"])
        gen = {k: v for k, v in spec.items() if k != "finetune"}
        if tune:
            gen["finetuned"] = tune.key  # the tuned weights are that cell's output
        inputs = {"kind": "generation", "generator": gen, "strategy": s["strategy"], "classes": cfg["classes"],
                  "per_class": s["per_class"], "seed": cfg["generation_seed"], "source": s["source"]}
        n_images = s["per_class"] * len(cfg["classes"])
        key = _key(inputs)
        if key not in by_key:
            steps = spec.get("steps", 20)
            by_key[key] = Cell("generation", s["name"], inputs, out, deps=[tune] if tune else [],
                               estimate_s=n_images * steps * SECONDS_PER_GENERATED_IMAGE_STEP)
        gens[s["name"]] = by_key[key]
    return tunes, gens, list(by_key.values())


def _retrieval_cell(cfg, out):
    r = cfg["controls"]["retrieval"]
    if r is None:
        return None
    if len(r["source"]) == 1 and not _is_dataset_spec(r["source"][0]):
        return None  # a user's folder is used as it is
    inputs = {"kind": "retrieval", "source": r["source"], "classes": cfg["classes"]}
    return Cell("retrieval", "retrieval", inputs, out, estimate_s=5000 * SECONDS_PER_EXPORTED_IMAGE)


def _is_dataset_spec(text):
    from .data import DATASETS
    return text.split("/")[0] in DATASETS.list("*") or text.startswith("imagefolder:")


def _baseline_cell(cfg, out):
    if not isinstance(cfg["baseline"], dict):
        return None
    from .baselines import SUITES
    suite = cfg["baseline"]["zoo"]
    if suite not in SUITES:
        raise ValueError(f"unknown baseline suite {suite!r}; choose from {sorted(SUITES)}")
    image_epochs = sum(m.fraction * cfg["num_real"] * m.epochs for m in SUITES[suite]["members"])
    return Cell("baseline", f"zoo-{suite}", {"kind": "baseline", "suite": suite, "seed": 0}, out,
                estimate_s=image_epochs * SECONDS_PER_IMAGE_EPOCH + len(SUITES[suite]["members"]) * SECONDS_PER_EVALUATION)


def _arms(cfg, gens, retrieval):
    """(arm name, meta, generated cell or folder or None, training inputs) for one model and seed."""
    n_real, bs = cfg["num_real"], cfg["train"].get("batch_size", 128)
    arms = [(f"real-{a}", {"group": "augmentation" if a != "standard" else "real", "augmentation": a,
                           "amount": 0}, None, {"augmentation": a, "amount": 0}) for a in cfg["augmentations"]]
    limit = round(cfg["generated_only"] * n_real)
    for s in cfg["strategies"]:
        for a in s["amounts"]:
            if a == 0:
                continue  # k = 0 is the real-only arm itself
            only = a == GENERATED_ONLY
            name = f"{s['name']}-only" if only else f"real+{s['name']}-k{_short(a)}"
            arms.append((name, {"group": "strategy", "strategy": s["name"], "amount": a}, gens[s["name"]],
                         {"augmentation": "standard", "amount": a, "limit": limit if only else None}))
    ctl = cfg["controls"]
    if ctl["step_matched"]:
        largest = max([n_real + round(a * n_real) for s in cfg["strategies"] for a in s["amounts"]
                       if a != GENERATED_ONLY] + [n_real])
        epochs = step_matched_epochs(n_real, largest, bs, cfg["epochs"])
        if epochs > cfg["epochs"]:
            arms.append(("real-step-matched", {"group": "step-matched", "amount": 0, "epochs": epochs}, None,
                         {"augmentation": "standard", "amount": 0, "epochs": epochs}))
    if ctl["retrieval"] is not None:
        for a in ctl["retrieval"]["amounts"]:
            arms.append((f"real+retrieval-k{_short(a)}", {"group": "retrieval", "strategy": "retrieval", "amount": a},
                         retrieval, {"augmentation": "standard", "amount": a}))
    return arms


def plan(cfg, out):
    """The study's cells in dependency order: generator fine-tuning, generation (one per distinct strategy
    entry), retrieval data, the baseline zoo, then training: every arm x model x seed."""
    out = pathlib.Path(out)
    tunes, gens, gen_cells = _generation_cells(cfg, out)
    retrieval = _retrieval_cell(cfg, out)
    baseline = _baseline_cell(cfg, out)
    cells = list(tunes.values()) + gen_cells + [c for c in (retrieval, baseline) if c is not None]
    r_source = retrieval or (cfg["controls"]["retrieval"] or {}).get("source", [None])[0]
    several = len(cfg["models"]) > 1
    for model in cfg["models"]:
        for seed in cfg["seeds"]:
            for arm, meta, gen, extra in _arms(cfg, gens, r_source):
                epochs = extra.pop("epochs", cfg["epochs"])
                dep = gen if isinstance(gen, Cell) else None
                inputs = {"kind": "training", "real": cfg["real"], "model": model, "epochs": epochs,
                          "train": cfg["train"], "seed": seed, **extra,
                          "generated": dep.key if dep else gen}
                n = _arm_size(cfg, extra)
                per = SECONDS_PER_IMAGE_EPOCH + EXTRA_SECONDS_PER_IMAGE_EPOCH.get(extra["augmentation"], 0.0)
                name = f"{arm}@{model}" if several else arm
                cells.append(Cell("training", f"{name.replace('@', '-')}-s{seed}", inputs, out,
                                  deps=[dep] if dep else [], arm=name, meta={**meta, "model": model, "seed": seed},
                                  estimate_s=n * epochs * per + SECONDS_PER_EVALUATION))
    for i, c in enumerate(cells):
        c.index = i
    return cells


def _arm_size(cfg, extra):
    n_real, a = cfg["num_real"], extra["amount"]
    if a == GENERATED_ONLY:
        return extra["limit"]
    return n_real + round(a * n_real)


def select_cells(cells, spec):
    """`--cells i/n`: the cells whose index % n == i (machines sharing one folder each take a slice)."""
    if spec is None:
        return list(cells)
    i, n = (spec if isinstance(spec, tuple) else _parse_cells(spec))
    return [c for c in cells if c.index % n == i]


def _parse_cells(text):
    i, _, n = str(text).partition("/")
    if not (i.isdigit() and n.isdigit()) or int(n) < 1 or int(i) >= int(n):
        raise ValueError(f"--cells takes I/N with 0 <= I < N, got {text!r}")
    return int(i), int(n)


def _duration(s):
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def describe_plan(cells, selected, jobs=1):
    """The dry-run text: one line per cell (cached or to run, its estimate), then a summary."""
    chosen = {c.index for c in selected}
    lines, todo = [], 0.0
    for c in cells:
        if c.index not in chosen:
            continue
        cached = c.cached()
        todo += 0.0 if cached else c.estimate_s
        state = "cached" if cached else f"to run (~{_duration(c.estimate_s)})"
        lines.append(f"[{c.index:3d}] {c.kind:10s} {c.folder.parent.name}/{c.folder.name:44s} {state}")
    kinds = {}
    for c in selected:
        k = kinds.setdefault(c.kind, [0, 0])
        k[0] += 1
        k[1] += c.cached()
    summary = "; ".join(f"{k}: {n} cells ({done} cached)" for k, (n, done) in kinds.items())
    lines.append(f"{len(selected)} cells: {summary}; estimated {_duration(todo)} to run on this machine "
                 + (f"in one process; jobs {jobs} share the cores " if jobs > 1 else "")
                 + "(rough: see SECONDS_PER_IMAGE_EPOCH in genrobust/study.py)")
    return "\n".join(lines)


def run_study(cfg, out, cells=None, dry_run=False, device="cpu", progress=True, echo=print, jobs=None):
    """Run the cells of a study that are not cached, then evaluate and write `report.md`/`report.html`.

    Args:
        cfg: a resolved study config (`load_study`).
        cells: `"i/n"` (or `(i, n)`) to run only cells with index % n == i; None runs all.
        dry_run: print the plan and run nothing.
        jobs: cells run at once on this machine, in as many long-lived worker processes, each scoring the
            models it trains (default: the config's `jobs`).
            With `processes` > 1 in the config, generation and training cells run under torchrun or
            accelerate launch with that many processes.
    Returns {"ran": [cell folders run], "skipped": [waiting on another slice], "failed": [...], "report": paths or None}.
    """
    out = pathlib.Path(out)
    jobs = cfg["jobs"] if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    all_cells = plan(cfg, out)
    selected = select_cells(all_cells, cells)
    if dry_run:
        echo(describe_plan(all_cells, selected, jobs))
        return {"ran": [], "skipped": [], "failed": [], "report": None}
    t0 = time.time()
    config_path = write_config(out, _recorded(cfg), name="study.yaml")
    results = out / "results.jsonl"
    if jobs > 1 or cfg["processes"] > 1:
        from .study_jobs import run_in_processes
        ran, skipped, failed = run_in_processes(selected, config_path, out, device, jobs, cfg, progress,
                                                waiting=lambda c: _waiting(c, selected))
    else:
        ran, skipped, failed = _run_in_process(selected, all_cells, cfg, device, progress, results)
    trained = [c for c in selected if c.kind == "training" and c.cached()]
    for c in trained:  # what no cell scored yet; each slice scores its own models, never another's
        evaluate_cell(c, cfg, results, device)
    report = None
    if all(c.cached() for c in all_cells):
        report = _write_study_report(cfg, out, all_cells, results, time.time() - t0, device)
    else:
        logger.info("%d cells are not done yet; the report is written when every cell is",
                    sum(not c.cached() for c in all_cells))
    if failed:
        raise ValueError(f"{len(failed)} study cell(s) failed: {'; '.join(failed)}. Finished cells are kept; "
                         "fix the cause and rerun the same command to run only what is missing")
    return {"ran": ran, "skipped": skipped, "failed": failed, "report": report}


def _recorded(cfg):
    return {k: v for k, v in cfg.items() if k != "num_real"}


def _waiting(c, selected):
    chosen = {s.index for s in selected}
    return [d for d in c.deps if not d.cached() and d.index not in chosen]


def _run_in_process(selected, all_cells, cfg, device, progress, results):
    ran, skipped = [], []
    for c in selected:
        if c.cached():
            logger.info("[%d/%d] %s: cached", c.index, len(all_cells), c.folder.name)
            continue
        waiting = _waiting(c, selected)
        if waiting:
            logger.warning("%s waits on %s (another --cells slice); rerun this slice once it is done",
                           c.folder.name, ", ".join(d.folder.name for d in waiting))
            skipped.append(c.folder.name)
            continue
        logger.info("[%d/%d] running %s", c.index, len(all_cells), c.folder.name)
        run_cell(c, cfg, device, progress)
        if c.kind == "training":
            evaluate_cell(c, cfg, results, device)
        ran.append(c.folder.name)
    return ran, skipped, []


def run_one_cell(cfg, out, index, device="cpu", progress=True):
    """Run the cell with this index (what `genrobust study --cell-index` does in a child process)."""
    cells = plan(cfg, out)
    if not 0 <= index < len(cells):
        raise ValueError(f"--cell-index {index}: the study has cells 0..{len(cells) - 1}")
    c = cells[index]
    waiting = [d.folder.name for d in c.deps if not d.cached()]
    if waiting:
        raise ValueError(f"cell {c.folder.name} needs {', '.join(waiting)} first")
    if not c.cached():
        run_cell(c, cfg, device, progress)
    return c


def run_cell(c, cfg, device, progress):
    """Run one cell in this process (under torchrun every rank calls it: generation and training shard)."""
    if c.kind == "finetune":
        _finetune_cell(c, device, progress)
    elif c.kind == "generation":
        _generate_cell(c, device, progress)
    elif c.kind == "retrieval":
        from .data import load_dataset
        from .data.folder import align_classes, export_imageset
        from .data.imageset import concat
        sets = [align_classes(load_dataset(s), cfg["classes"]) for s in c.inputs["source"]]
        export_imageset(concat(sets, "retrieval: " + " + ".join(c.inputs["source"])), c.folder)
    elif c.kind == "baseline":
        from .baselines import train_zoo
        train_zoo(c.inputs["suite"], c.folder, device=device, seed=c.inputs["seed"], progress=progress)
    else:
        _train_cell(c, cfg, device, progress)


def _finetune_cell(c, device, progress):
    """Fine-tune the generator on the real data named in its `finetune:` mapping (docs/finetune.md)."""
    from .finetune import finetune
    gen, ft = c.inputs["generator"], dict(c.inputs["finetune"])
    base = gen.get("path") or gen.get("model")
    finetune(gen["name"], ft.pop("dataset"), c.folder, model=base, device=device, progress=progress,
             command=f"genrobust study (cell {c.folder.name})", **ft)


def _generate_cell(c, device, progress):
    from .generate import create_generator, generate
    spec = dict(c.inputs["generator"])
    name = spec.pop("name")
    if spec.pop("finetuned", None):  # the fine-tune cell's output replaces the base
        spec["path" if name == "digits-ddpm" else "model"] = str(c.deps[0].folder)
    generator = create_generator(name, device=device, **spec)
    generate(generator, c.inputs["strategy"], c.inputs["classes"], c.folder, c.inputs["per_class"],
             seed=c.inputs["seed"], source=c.inputs["source"], progress=progress)


def _train_cell(c, cfg, device, progress):
    from .data.mixing import build_training_set
    from .train import TrainConfig, train
    i = c.inputs
    recipe = dict(i["train"])
    stream = {"on": True, "off": False, True: True, False: False}.get(recipe.pop("stream", "auto"), "auto")
    config = TrainConfig(model=i["model"], epochs=i["epochs"], seed=i["seed"], augmentation=i["augmentation"],
                         **recipe)
    gen = [c.deps[0].folder] if c.deps else [i["generated"]] if i["generated"] else []
    if i["amount"] == GENERATED_ONLY:
        data, info = build_training_set(i["real"], gen, seed=config.seed, mode=GENERATED_ONLY, limit=i["limit"],
                                        stream=stream)
    else:
        data, info = build_training_set(i["real"], gen, i["amount"] if gen else 0.0, seed=config.seed, stream=stream)
    info = {**info, "study_cell": c.key, "study_arm": c.arm}
    # resume: a killed cell continues from its last finished epoch (its settings are its key, hence folder)
    train(data, c.folder, config, device=device, data_info=info, progress=progress, resume=True)


def evaluate_cell(c, cfg, results, device):
    from .evaluate import evaluate, read_results, resolve_eval_sets
    scored = {r["eval_set"] for r in read_results(results) if r.get("checkpoint") == str(c.folder)}
    if set(resolve_eval_sets(cfg["eval_sets"])) <= scored:
        return
    evaluate(c.folder, cfg["eval_sets"], results, device=device, model_name=c.arm, data_root=cfg["data_root"])


def _baseline_source(cfg, cells):
    if isinstance(cfg["baseline"], dict):
        return next(c for c in cells if c.kind == "baseline").folder / "results.jsonl"
    return cfg["baseline"]


def _write_study_report(cfg, out, cells, results, seconds, device):
    from .evaluate import read_results
    from .report import write_report
    training = [c for c in cells if c.kind == "training"]
    names = {str(c.folder) for c in training}
    rows = [r for r in read_results(results) if r.get("checkpoint") in names]
    baseline = _baseline_source(cfg, cells)
    reference = next((c.arm for c in training if c.meta["group"] == "real"), None)
    notes = [f"{len(cfg['seeds'])} seed(s) per arm ({', '.join(map(str, cfg['seeds']))}): each arm's cells show "
             f"mean ± standard deviation over its seeds (n=); {', '.join(cfg['models'])}, {cfg['epochs']} epochs; "
             f"up to {cfg['per_class']} generated images per class per strategy; amounts "
             f"{', '.join(map(str, cfg['amounts']))} (k: real + k x |real| generated images; generated-only: "
             f"{cfg['generated_only']:g} x |real| generated images, no real).",
             _controls_note(cfg, training),
             f"this run's wall time {seconds:.0f} s on device {device} (cached cells excluded)"]
    gens = [c.folder for c in cells if c.kind == "generation"]
    arms = {c.arm: c.meta for c in training}
    from .study_figures import study_figures
    hook = functools.partial(study_figures, arms=arms, bar_amount_wanted=cfg["bar_amount"])
    return write_report(rows, out, baseline=None if baseline is None else str(baseline), reference=reference,
                        generated=gens, title=f"genrobust study: {cfg['name']}", notes=notes, figure_hook=hook)


def _controls_note(cfg, training):
    ctl, parts = cfg["controls"], []
    sm = next((c for c in training if c.meta["group"] == "step-matched"), None)
    if sm is not None:
        parts.append(f"`real-step-matched` trains on real data only for {sm.meta['epochs']} epochs, at least the "
                     "optimisation steps of the largest real+generated arm")
    elif ctl["step_matched"]:
        parts.append("no step-matched arm: no real+generated arm takes more steps than real-only")
    if ctl["retrieval"]:
        parts.append(f"`real+retrieval-k*` add k x |real| images drawn from the generator's own training data "
                     f"({' + '.join(ctl['retrieval']['source'])}) instead of generated ones")
    else:
        parts.append("no retrieval control: give controls.retrieval.source (the generator's training data, or "
                     "images retrieved like it) to ask whether the generator adds anything beyond that data")
    return "Controls: " + "; ".join(parts) + "."
