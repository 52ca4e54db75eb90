"""Studies: the stages chained on one output folder. `quickstart` is the fast slice on the digits world."""
import logging
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
# A study config names the grid; `plan` turns it into cells (generation, baseline zoo, training), each keyed by
# the sha256 of its resolved inputs and stored in a folder named readably plus that key's first 8 hex digits.
# A cell is cached when its output is complete, so a rerun runs only what is missing or new, and a killed run
# resumes (generation and training are atomic and resumable underneath).

STUDY_KEYS = {"name", "real", "classes", "generator", "strategies", "source", "amounts", "augmentations",
              "model", "epochs", "train", "seeds", "eval_sets", "baseline", "per_class", "generation_seed"}
SOURCE_STRATEGIES = ("image", "image-label", "captions")
GENERATED_ONLY = "generated-only"
# Rough costs for `--dry-run` estimates, measured once on the 2-core CPU machine (bench/RESULTS.md, 2026-11):
# training resnet10t ran at ~773 images/s (1.3 ms per image-epoch, `standard` augmentation); randaugment and
# augmix added ~25-50 and ~15-30 ms per batch of 128 (~0.3 and ~0.2 ms per image); the shipped digits-ddpm
# generated ~13 images/s at 20 steps (0.077 s per image, proportional to steps); evaluating one model on the
# digits suite took ~3 s. Other models and machines differ: the estimate only sizes a run.
SECONDS_PER_IMAGE_EPOCH = 1.3e-3
EXTRA_SECONDS_PER_IMAGE_EPOCH = {"randaugment": 0.3e-3, "augmix": 0.2e-3}
SECONDS_PER_GENERATED_IMAGE_STEP = 0.077 / 20
SECONDS_PER_EVALUATION = 3.0


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


def resolve_study(cfg, where="study config"):
    """Check a study mapping and fill in its defaults (the result is what `study.yaml` records)."""
    import math

    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - STUDY_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; keys are {', '.join(sorted(STUDY_KEYS))}")
    for key in ("name", "real", "generator", "strategies", "amounts"):
        if cfg.get(key) in (None, [], ""):
            raise ValueError(f"{where}: {key!r} is required")
    gen = cfg["generator"]
    gen = {"name": gen} if isinstance(gen, str) else dict(gen)
    if "name" not in gen:
        raise ValueError(f"{where}: generator needs a 'name' (e.g. digits-ddpm)")
    amounts = []
    for a in cfg["amounts"]:
        if a != GENERATED_ONLY and (isinstance(a, bool) or not isinstance(a, (int, float)) or a < 0):
            raise ValueError(f"{where}: amounts are numbers k >= 0 (real + k x |real|) or {GENERATED_ONLY!r}, "
                             f"got {a!r}")
        amounts.append(a)
    train_extra = dict(cfg.get("train") or {})
    from .train import TrainConfig
    fields = set(TrainConfig.__dataclass_fields__) - {"model", "epochs", "seed", "augmentation"}
    bad = sorted(set(train_extra) - fields)
    if bad:
        raise ValueError(f"{where}: unknown train key {bad[0]!r}; choose from {', '.join(sorted(fields))}")
    baseline = cfg.get("baseline")
    if isinstance(baseline, dict) and set(baseline) != {"zoo"}:
        raise ValueError(f"{where}: baseline is a results.jsonl path or {{zoo: SUITE}}, got {baseline!r}")
    real = cfg["real"]
    real_classes, n_real = _real_info(real)
    classes = list(cfg.get("classes") or real_classes)
    if classes != list(real_classes):
        # the trainer takes the real set's classes as they are; subsets need a class-filtered dataset spec
        raise ValueError(f"{where}: classes {classes} differ from {real}'s {list(real_classes)}; class subsets "
                         "are not supported yet")
    max_k = max([a for a in amounts if a != GENERATED_ONLY], default=1)
    per_class = cfg.get("per_class") or max(1, math.ceil(max_k * n_real / len(classes)))
    strategies = list(cfg["strategies"])
    source = cfg.get("source")
    if source is None and any(s in SOURCE_STRATEGIES for s in strategies):
        source = real
    return {"name": cfg["name"], "real": real, "classes": classes, "generator": gen, "strategies": strategies,
            "source": source, "amounts": amounts, "augmentations": list(cfg.get("augmentations") or ["standard"]),
            "model": cfg.get("model", "resnet10t"), "epochs": int(cfg.get("epochs", 15)), "train": train_extra,
            "seeds": [int(s) for s in cfg.get("seeds", [0])], "eval_sets": list(cfg.get("eval_sets", ["digits"])),
            "baseline": baseline, "per_class": int(per_class), "generation_seed": int(cfg.get("generation_seed", 0)),
            "num_real": n_real}


def _real_info(spec):
    from .data import load_dataset
    data = load_dataset(spec)
    return list(data.classes), len(data)


def _key(inputs):
    import hashlib
    import json
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


class Cell:
    """One unit of the study: its kind, readable name, key (hash of its inputs), folder and dependencies."""

    def __init__(self, kind, name, inputs, out, deps=(), estimate_s=0.0):
        self.kind, self.name, self.inputs, self.deps, self.estimate_s = kind, name, inputs, list(deps), estimate_s
        self.key = _key(inputs)
        sub = {"generation": "generated", "baseline": "baselines", "training": "models"}[kind]
        self.folder = pathlib.Path(out) / sub / f"{name}-{self.key[:8]}"
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
        if self.kind == "baseline":
            return (self.folder / "zoo.json").exists()
        from .train import is_complete
        return is_complete(self.folder)

    def __repr__(self):
        return f"Cell({self.index}, {self.kind}, {self.folder.name})"


def plan(cfg, out):
    """The study's cells in dependency order: generation (one per strategy), the baseline zoo (when the config
    asks for one), then training: real-only per augmentation x seed, and strategy x amount x seed (`standard`)."""
    out = pathlib.Path(out)
    gen_cfg, steps = cfg["generator"], cfg["generator"].get("steps", 20)
    n_images = cfg["per_class"] * len(cfg["classes"])
    gens = {}
    for s in cfg["strategies"]:
        inputs = {"kind": "generation", "generator": gen_cfg, "strategy": s, "classes": cfg["classes"],
                  "per_class": cfg["per_class"], "seed": cfg["generation_seed"],
                  "source": cfg["source"] if s in SOURCE_STRATEGIES else None}
        gens[s] = Cell("generation", s, inputs, out, estimate_s=n_images * steps * SECONDS_PER_GENERATED_IMAGE_STEP)
    cells = list(gens.values())
    if isinstance(cfg["baseline"], dict):
        from .baselines import SUITES
        suite = cfg["baseline"]["zoo"]
        if suite not in SUITES:
            raise ValueError(f"unknown baseline suite {suite!r}; choose from {sorted(SUITES)}")
        image_epochs = sum(m.fraction * cfg["num_real"] * m.epochs for m in SUITES[suite]["members"])
        cells.append(Cell("baseline", f"zoo-{suite}", {"kind": "baseline", "suite": suite, "seed": 0}, out,
                          estimate_s=image_epochs * SECONDS_PER_IMAGE_EPOCH
                          + len(SUITES[suite]["members"]) * SECONDS_PER_EVALUATION))
    common = {"kind": "training", "real": cfg["real"], "model": cfg["model"], "epochs": cfg["epochs"],
              "train": cfg["train"]}

    def training(name, aug, seed, gen=None, amount=0, n_images=cfg["num_real"]):
        inputs = {**common, "augmentation": aug, "seed": seed, "amount": amount,
                  "generated": gen.key if gen else None}
        per = SECONDS_PER_IMAGE_EPOCH + EXTRA_SECONDS_PER_IMAGE_EPOCH.get(aug, 0.0)
        return Cell("training", name, inputs, out, deps=[gen] if gen else [],
                    estimate_s=n_images * cfg["epochs"] * per + SECONDS_PER_EVALUATION)

    for seed in cfg["seeds"]:
        for aug in cfg["augmentations"]:
            cells.append(training(f"real-{aug}-s{seed}", aug, seed))
        for s, gen in gens.items():
            for a in cfg["amounts"]:
                if a == GENERATED_ONLY:
                    cells.append(training(f"{s}-only-s{seed}", "standard", seed, gen, a, n_images))
                else:
                    n = cfg["num_real"] + round(a * cfg["num_real"])
                    cells.append(training(f"real+{s}-k{_short(a)}-s{seed}", "standard", seed, gen, a, n))
    for i, c in enumerate(cells):
        c.index = i
    return cells


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


def describe_plan(cells, selected):
    """The dry-run text: one line per cell (cached or to run, its estimate), then a summary."""
    chosen = {c.index for c in selected}
    lines, todo = [], 0.0
    for c in cells:
        if c.index not in chosen:
            continue
        cached = c.cached()
        todo += 0.0 if cached else c.estimate_s
        state = "cached" if cached else f"to run (~{_duration(c.estimate_s)})"
        lines.append(f"[{c.index:3d}] {c.kind:10s} {c.folder.parent.name}/{c.folder.name:40s} {state}")
    kinds = {}
    for c in selected:
        k = kinds.setdefault(c.kind, [0, 0])
        k[0] += 1
        k[1] += c.cached()
    summary = "; ".join(f"{k}: {n} cells ({done} cached)" for k, (n, done) in kinds.items())
    lines.append(f"{len(selected)} cells: {summary}; estimated {_duration(todo)} to run on this machine "
                 "(rough: see SECONDS_PER_IMAGE_EPOCH in genrobust/study.py)")
    return "\n".join(lines)


def _model_name(cell):
    return cell.folder.name[:-9]  # the readable part, without the key


def run_study(cfg, out, cells=None, dry_run=False, device="cpu", progress=True, echo=print):
    """Run the cells of a study that are not cached, then evaluate and write `report.md`/`report.html`.

    Args:
        cfg: a resolved study config (`load_study`).
        cells: `"i/n"` (or `(i, n)`) to run only cells with index % n == i; None runs all.
        dry_run: print the plan and run nothing.
    Returns {"ran": [cell names run], "skipped": [cells waiting on another slice], "report": paths or None}.
    """
    out = pathlib.Path(out)
    all_cells = plan(cfg, out)
    selected = select_cells(all_cells, cells)
    if dry_run:
        echo(describe_plan(all_cells, selected))
        return {"ran": [], "skipped": [], "report": None}
    t0 = time.time()
    write_config(out, {k: v for k, v in cfg.items() if k != "num_real"}, name="study.yaml")
    ran, skipped = [], []
    for c in selected:
        if c.cached():
            logger.info("[%d/%d] %s: cached", c.index, len(all_cells), c.folder.name)
            continue
        waiting = [d for d in c.deps if not d.cached() and d.index not in {s.index for s in selected}]
        if waiting:
            logger.warning("%s waits on %s (another --cells slice); rerun this slice once it is done",
                           c.folder.name, ", ".join(d.folder.name for d in waiting))
            skipped.append(c.folder.name)
            continue
        logger.info("[%d/%d] running %s", c.index, len(all_cells), c.folder.name)
        _run_cell(c, cfg, device, progress)
        ran.append(c.folder.name)
    results = out / "results.jsonl"
    trained = [c for c in selected if c.kind == "training" and c.cached()]
    for c in trained:  # each slice scores its own models, so two machines never score the same one
        _evaluate_cell(c, cfg, results, device)
    report = None
    if all(c.cached() for c in all_cells):
        report = _write_study_report(cfg, out, all_cells, results, time.time() - t0, device)
    else:
        logger.info("%d cells are not done yet; the report is written when every cell is",
                    sum(not c.cached() for c in all_cells))
    return {"ran": ran, "skipped": skipped, "report": report}


def _run_cell(c, cfg, device, progress):
    if c.kind == "generation":
        from .generate import create_generator, generate
        params = {k: v for k, v in cfg["generator"].items() if k != "name"}
        generator = create_generator(cfg["generator"]["name"], device=device, **params)
        generate(generator, c.inputs["strategy"], cfg["classes"], c.folder, cfg["per_class"],
                 seed=cfg["generation_seed"], source=c.inputs["source"], progress=progress)
    elif c.kind == "baseline":
        from .baselines import train_zoo
        train_zoo(c.inputs["suite"], c.folder, device=device, seed=c.inputs["seed"], progress=progress)
    else:
        from .data.mixing import build_training_set
        from .train import TrainConfig, train
        config = TrainConfig(model=cfg["model"], epochs=cfg["epochs"], seed=c.inputs["seed"],
                             augmentation=c.inputs["augmentation"], **cfg["train"])
        gen = [c.deps[0].folder] if c.deps else []
        amount = c.inputs["amount"]
        if amount == GENERATED_ONLY:
            data, info = build_training_set(cfg["real"], gen, seed=config.seed, mode=GENERATED_ONLY)
        else:
            data, info = build_training_set(cfg["real"], gen, amount if gen else 0.0, seed=config.seed)
        info = {**info, "study_cell": c.key}
        # resume: a killed cell continues from its last finished epoch (its settings are its key, hence folder)
        train(data, c.folder, config, device=device, data_info=info, progress=progress, resume=True)


def _evaluate_cell(c, cfg, results, device):
    from .evaluate import evaluate, read_results, resolve_eval_sets
    scored = {r["eval_set"] for r in read_results(results) if r.get("checkpoint") == str(c.folder)}
    if set(resolve_eval_sets(cfg["eval_sets"])) <= scored:
        return
    evaluate(c.folder, cfg["eval_sets"], results, device=device, model_name=_model_name(c))


def _write_study_report(cfg, out, cells, results, seconds, device):
    from .evaluate import read_results
    from .report import write_report
    names = {str(c.folder) for c in cells if c.kind == "training"}
    rows = [r for r in read_results(results) if r.get("checkpoint") in names]
    baseline = cfg["baseline"]
    if isinstance(baseline, dict):
        baseline = next(c for c in cells if c.kind == "baseline").folder / "results.jsonl"
    first = cfg["seeds"][0]
    reference = next(_model_name(c) for c in cells if c.kind == "training"
                     and c.inputs["generated"] is None and c.inputs["augmentation"] == "standard"
                     and c.inputs["seed"] == first) if "standard" in cfg["augmentations"] else None
    notes = [f"{len(cfg['seeds'])} seed(s) per arm ({', '.join(map(str, cfg['seeds']))}); {cfg['model']}, "
             f"{cfg['epochs']} epochs; {cfg['per_class']} generated images per class per strategy; amounts "
             f"{', '.join(map(str, cfg['amounts']))} (k: real + k x |real| generated images).",
             f"this run's wall time {seconds:.0f} s on device {device} (cached cells excluded)"]
    gens = [c.folder for c in cells if c.kind == "generation"]
    return write_report(rows, out, baseline=None if baseline is None else str(baseline), reference=reference,
                        generated=gens, title=f"genrobust study: {cfg['name']}", notes=notes)
