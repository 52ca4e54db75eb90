"""A study's plan: the cells (generator fine-tuning, generation, retrieval data, baseline zoo, training), each
keyed by the sha256 of its resolved inputs and stored in a folder named readably plus that key's first 8 hex
digits, with a rough cost estimate for `--dry-run`."""
import logging
import math
import pathlib

from .config import GENERATED_ONLY, _is_dataset_spec

logger = logging.getLogger(__name__)


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
            from ..finetune import is_complete as finetuned
            return finetuned(self.folder)
        from ..train import is_complete
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
                 + "(rough: see SECONDS_PER_IMAGE_EPOCH in genrobust/study/plan.py)")
    return "\n".join(lines)
