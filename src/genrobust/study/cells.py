"""Running one cell of a study in this process (under torchrun every rank calls it), and scoring the model a
training cell made."""
import logging

from .config import GENERATED_ONLY
from .plan import plan

logger = logging.getLogger(__name__)


def train_arm(out, real, generated, ratio, config, device, progress):
    """Train one model unless its checkpoint is already complete (a finished arm is never redone)."""
    from ..data.mixing import build_training_set
    from ..train import is_complete, train

    # weights alone are not a finished arm: a kill between the weights and the completion marker leaves them
    if is_complete(out):
        logger.info("%s: already trained, reusing it", out)
        return
    data, info = build_training_set(real, generated, ratio, seed=config.seed)
    train(data, out, config, device=device, data_info=info, progress=progress)


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
        from ..data import load_dataset
        from ..data.folder import align_classes, export_imageset
        from ..data.imageset import concat
        sets = [align_classes(load_dataset(s), cfg["classes"]) for s in c.inputs["source"]]
        export_imageset(concat(sets, "retrieval: " + " + ".join(c.inputs["source"])), c.folder)
    elif c.kind == "baseline":
        from .baselines import train_zoo
        train_zoo(c.inputs["suite"], c.folder, device=device, seed=c.inputs["seed"], progress=progress)
    else:
        _train_cell(c, cfg, device, progress)


def _finetune_cell(c, device, progress):
    """Fine-tune the generator on the real data named in its `finetune:` mapping (docs/finetune.md)."""
    from ..finetune import finetune
    gen, ft = c.inputs["generator"], dict(c.inputs["finetune"])
    base = gen.get("path") or gen.get("model")
    finetune(gen["name"], ft.pop("dataset"), c.folder, model=base, device=device, progress=progress,
             command=f"genrobust study (cell {c.folder.name})", **ft)


def _generate_cell(c, device, progress):
    from ..generate import create_generator, generate
    spec = dict(c.inputs["generator"])
    name = spec.pop("name")
    if spec.pop("finetuned", None):  # the fine-tune cell's output replaces the base
        spec["path" if name == "digits-ddpm" else "model"] = str(c.deps[0].folder)
    generator = create_generator(name, device=device, **spec)
    generate(generator, c.inputs["strategy"], c.inputs["classes"], c.folder, c.inputs["per_class"],
             seed=c.inputs["seed"], source=c.inputs["source"], progress=progress)


def _train_cell(c, cfg, device, progress):
    from ..data.mixing import build_training_set
    from ..train import TrainConfig, train
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
    from ..evaluate import evaluate, read_results, resolve_eval_sets
    scored = {r["eval_set"] for r in read_results(results) if r.get("checkpoint") == str(c.folder)}
    if set(resolve_eval_sets(cfg["eval_sets"])) <= scored:
        return
    evaluate(c.folder, cfg["eval_sets"], results, device=device, model_name=c.arm, data_root=cfg["data_root"])
