"""`quickstart`: the fast slice of the study on the digits world, the stages chained on one output folder."""
import logging
import pathlib
import time

from .cells import train_arm
from .config import write_config

logger = logging.getLogger(__name__)


QUICKSTART_STRATEGIES = ("label", "templates")


def _stage(i, n, text):
    logger.info("[%d/%d] %s", i, n, text)


def quickstart(out, per_class=50, ratio=0.5, epochs=15, model="resnet10t", seed=0, generator_path=None,
               steps=20, guidance=2.0, eta=1.0, eval_sets=("digits",), device="cpu", progress=True, baseline=None):
    """Generate `label` and `templates` sets with the shipped digits-ddpm, train real-only and
    real+generated classifiers, evaluate them on the digits suite, and write `results.jsonl`, `report.md` and
    `report.html`. With `baseline` (a baseline zoo's results.jsonl) the report adds effective robustness.

    Rerunning on the same folder reuses every finished stage.
    """
    from ..evaluate import evaluate, read_results
    from ..generate import create_generator, generate
    from ..report import write_report
    from ..train import TrainConfig

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
