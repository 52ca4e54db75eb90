"""genrobust: train classifiers on generated data and measure them under natural distribution shifts.

Data flows one way: generate -> manifest -> train -> checkpoint -> evaluate -> results.jsonl -> report.
"""
import argparse
import logging
import os
import pathlib
import shlex
import sys

from . import cli_finetune, cli_testset, context

logger = logging.getLogger("genrobust")


def _registries():
    from .augment import AUGMENTATIONS
    from .data import DATASETS
    from .evaluate import EVAL_SETS
    from .generate import GENERATORS, STRATEGIES
    from .generate.captioners import CAPTIONERS
    return {"datasets": DATASETS, "generators": GENERATORS, "strategies": STRATEGIES, "captioners": CAPTIONERS,
            "augmentations": AUGMENTATIONS, "eval-sets": EVAL_SETS}


def cmd_list(args):
    reg = _registries()[args.kind]
    for name in reg.list(args.pattern):
        info = reg.info(name)
        extra = f" (splits: {', '.join(info['splits'])})" if "splits" in info else ""
        print(f"{name:24s} {info.get('description', '')}{extra}")


def cmd_datasets_list(args):
    args.kind, args.pattern = "datasets", "*"
    cmd_list(args)


def cmd_datasets_export(args):
    from .data import load_dataset
    from .data.folder import export_imageset
    spec = f"{args.name}/{args.split}" if args.split else args.name
    data = load_dataset(spec)
    export_imageset(data, args.out)
    print(f"wrote {len(data)} images of {spec} to {args.out}")


def cmd_generator_train(args):
    from .generate import digits_ddpm
    command = "genrobust " + " ".join(shlex.quote(a) for a in args.argv)
    out = digits_ddpm.train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            seed=args.seed, save_every=args.save_every, command=command,
                            device=context.resolve_device(args.device))
    print(f"digits-ddpm written to {out}")


def _generator_kwargs(args):
    """Factory arguments for the chosen generator: digits-ddpm takes a folder, diffusers ones a model id."""
    from .generate import GENERATORS
    GENERATORS.get(args.generator)  # a misspelt name fails first, with suggestions
    # None: the generator's own default (digits-ddpm: 20 steps, guidance 2; Stable Diffusion: 50, 7.5)
    common = {k: v for k, v in {"steps": args.steps, "guidance": args.guidance}.items() if v is not None}
    common.update(device=context.resolve_device(args.device), batch_size=args.batch_size)
    if args.generator in ("digits-ddpm", "img2img"):
        common["strength"] = args.strength
    if args.generator == "digits-ddpm":
        return {**common, "path": args.generator_path, "eta": args.eta}
    if not args.model:
        raise ValueError(f"generator {args.generator!r} needs --model (a local diffusers folder, or a hub id "
                         "whose weights are in the local cache)")
    extra = {"model": args.model, "scheduler": args.scheduler, "height": args.height, "width": args.width,
             "negative_prompt": args.negative_prompt, "dtype": args.dtype, "compile": args.compile}
    return {**common, **{k: v for k, v in extra.items() if v is not None and v is not False}}


def _captioner(args):
    if args.strategy != "captions":
        return None
    from .generate.captioners import create_captioner
    if not args.captioner_model:
        raise ValueError("strategy 'captions' needs --captioner-model (a local BLIP folder or cached hub id)")
    return create_captioner(args.captioner, model=args.captioner_model,
                            device=context.resolve_device(args.device))


def _clip_filter(args):
    if args.clip_model is None:
        if args.clip_threshold is not None or args.clip_top_k is not None:
            raise ValueError("--clip-threshold and --clip-top-k need --clip-model (a local CLIP folder or cached "
                             "hub id)")
        return None
    from .generate.filters import ClipScorer
    from .generate.runner import ClipFilter
    return ClipFilter(ClipScorer(args.clip_model, device=context.resolve_device(args.device)), args.clip_threshold,
                      args.clip_top_k)


def _source_classes(spec):
    """The class list of a source dataset spec (for source strategies without --classes)."""
    if not spec:
        return None
    if spec.startswith("imagefolder:"):
        from .data.folder import folder_classes
        return folder_classes(spec.split(":", 1)[1])
    from .data import load_dataset
    return list(load_dataset(spec).classes)


def _shard(text):
    if text is None:
        return None
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit()):
        raise ValueError(f"--shard takes I/N (this process's slice and the number of slices), got {text!r}")
    return int(i), int(n)


def cmd_generate(args):
    from .generate import create_generator, generate
    from .study import write_config
    if args.per_class is None and args.per_image is None:
        args.per_class = 100
    # everything that needs no model is checked before loading one (a Stable Diffusion load takes minutes)
    from .generate import GENERATORS, create_strategy
    create_strategy(args.strategy)
    supported = getattr(GENERATORS.get(args.generator), "strategies", None)
    if supported is not None and args.strategy not in supported:
        raise ValueError(f"generator {args.generator!r} cannot run strategy {args.strategy!r}; it supports "
                         f"{list(supported)}")
    shard = _shard(args.shard)
    generator = create_generator(args.generator, **_generator_kwargs(args))
    classes = args.classes.split(",") if args.classes else _source_classes(args.source) or generator.classes()
    if classes is None:
        raise ValueError(f"{args.generator} takes any class names: pass --classes a,b,c")
    card = generate(generator, args.strategy, classes, args.out, args.per_class, seed=args.seed,
                    per_image=args.per_image, source=args.source, captioner=_captioner(args),
                    shard=shard, max_attempts=args.max_attempts, clip=_clip_filter(args))
    # written after the run is accepted: a refused rerun must not overwrite the folder's config
    write_config(args.out, {"command": "generate", **{k: v for k, v in vars(args).items()
                                                      if k not in ("func", "argv")}})
    if card is not None:
        print(f"{card['num_images']} images ({args.strategy}) in {args.out}")
    else:
        print(f"shard done; {args.out} is merged when the last shard finishes (or `genrobust generate merge`)")


def cmd_generate_merge(args):
    from .generate.runner import merge
    card = merge(args.out)
    print(f"{card['num_images']} images merged into {pathlib.Path(args.out) / 'metadata.jsonl'}")


def read_config(path, parser):
    """A YAML recipe -> {dest: value} for `parser.set_defaults`. Keys are the parser's flag names with
    underscores (`batch_size: 256`, `generated: [DIR]`); an unknown key, a value of the wrong kind and a choice
    the flag does not offer are errors. Read with yaml.safe_load: a recipe is data, never code."""
    import difflib

    import yaml

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({' '.join(str(e).split())})") from e
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(cfg).__name__}")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    values = {}
    for key, value in cfg.items():
        action = actions.get(key)
        if action is None:
            dest = str(key).replace("-", "_")
            close = [dest] if dest in actions else difflib.get_close_matches(dest, actions, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "keys are flag names with underscores"
            raise ValueError(f"--config {path}: unknown key {key!r}; {hint}")
        values[key] = _config_value(path, key, value, action)
    return values


def _config_value(path, key, value, action):
    """A recipe's value checked and converted as the flag's own parsing would."""
    what = f"--config {path}: {key}"
    if value is None:
        if action.default is not None:
            raise ValueError(f"{what} is empty; give a value or leave the key out (default {action.default!r})")
        return None
    if action.nargs == 0:  # --flip, --resume, ...
        if not isinstance(value, bool):
            raise ValueError(f"{what} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):
        if not isinstance(value, list) or not value:
            raise ValueError(f"{what} must be a non-empty list ({key}: [...]), got {value!r}")
        return [_config_item(what, v, action) for v in value]
    return _config_item(what, value, action)


def _config_item(what, value, action):
    if isinstance(value, (bool, list, dict)) or (action.type is None and not isinstance(value, str)):
        hint = " (YAML reads a bare on/off/yes/no as true/false: quote it)" if isinstance(value, bool) else ""
        raise ValueError(f"{what} must be {'a string' if action.type is None else 'a number'}, got {value!r}{hint}")
    if action.type is not None:
        try:  # YAML reads 1e-4 as a string and 5 as an int: the flag's own type decides
            value = action.type(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"{what} {value!r} is not a valid {getattr(action.type, '__name__', 'value')} ({e})")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _expand_env(what, value):
    """$VAR and ${VAR} in a recipe's strings from the environment; an unset one is an error."""
    import re

    if isinstance(value, list):
        return [_expand_env(what, v) for v in value]
    if not isinstance(value, str) or "$" not in value:
        return value
    expanded = os.path.expandvars(value)
    unset = re.search(r"\$\{?(\w+)", expanded)
    if unset:
        raise ValueError(f"{what} {value!r} uses ${unset.group(1)}, which is not set in the environment")
    return expanded


def apply_config(args):
    """`train --config FILE.yaml`, timm's pattern: the file's values become the defaults of the train flags and
    the same command line is parsed again, so a flag given on it wins (a --generated there replaces the file's
    list). Paths in the file are relative to the current directory; $VARS in its strings are expanded."""
    if not getattr(args, "config", None):
        return args
    root, parser = args.parsers
    cfg = read_config(args.config, parser)
    lists = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)} & set(cfg)
    # an append flag adds to its default, so the file's list stays out of the defaults
    parser.set_defaults(**{k: [] if k in lists else v for k, v in cfg.items()})
    new = root.parse_args(args.argv)
    new.argv = args.argv
    for key, value in cfg.items():
        if key in lists and not getattr(new, key):
            setattr(new, key, value)
        if getattr(new, key) == value:  # from the file, not replaced by a flag
            setattr(new, key, _expand_env(f"--config {args.config}: {key}", value))
    return new


def cmd_train(args):
    from .augment import AUGMENTATIONS
    from .data.mixing import build_training_set
    from .train import TrainConfig, check_model_name, pretrained_file, train
    args = apply_config(args)
    if not args.out:
        raise ValueError("train needs --out FOLDER (or `out:` in the --config file)")
    if args.ratio < 0:
        raise ValueError(f"--ratio must be >= 0 (k x |real| generated images are added), got {args.ratio}")
    if not 0 <= args.max_corrupt < 1:
        raise ValueError(f"--max-corrupt must be a fraction in [0, 1), got {args.max_corrupt}")
    config = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                         lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                         warmup_epochs=args.warmup_epochs, milestones=tuple(args.milestones), gamma=args.gamma,
                         label_smoothing=args.label_smoothing, augmentation=args.augmentation, flip=args.flip,
                         amp=args.amp, channels_last=not args.no_channels_last, input_size=args.input_size,
                         workers=args.workers, seed=args.seed, pretrained=args.pretrained, config_file=args.config,
                         crop_scale=tuple(args.crop_scale), crop_ratio=tuple(args.crop_ratio),
                         interpolation=args.interpolation)
    # names, recipe and weights checked before any image is read (an ImageNet folder scan takes minutes)
    config.resolved()
    check_model_name(args.model)
    AUGMENTATIONS.get(args.augmentation)
    if args.pretrained:
        pretrained_file(args.pretrained)
    real = None if args.real == "none" else args.real
    stream = {"auto": "auto", "on": True, "off": False}[args.stream]
    data, info = build_training_set(real, args.generated, args.ratio, seed=args.seed, mode=args.mode,
                                    fraction=args.fraction, limit=args.limit, max_corrupt=args.max_corrupt,
                                    stream=stream)
    rows = train(data, args.out, config, device=context.resolve_device(args.device), data_info=info,
                 resume=args.resume, force=args.force)
    if context.is_main():  # under torchrun, one line from rank 0
        print(f"trained {args.model} on {info['label']} ({len(data)} images): final train acc "
              f"{rows[-1]['train_acc']:.3f}; checkpoint in {args.out}")


def cmd_evaluate(args):
    from .evaluate import evaluate
    from .study import write_config
    results = pathlib.Path(args.results)
    write_config(results.parent, {"command": "evaluate", **{k: v for k, v in vars(args).items()
                                                            if k not in ("func", "argv")}},
                 name=f"{results.stem}.evaluate.yaml")
    for ck in args.checkpoints:
        rows = evaluate(ck, args.eval_sets, results, device=context.resolve_device(args.device), force=args.force,
                        data_root=args.data_root, batch_size=args.batch_size, workers=args.workers,
                        folder_id_set=args.id_set, max_corrupt=args.max_corrupt)
        for r in rows:
            subset = "" if r["class_subset"] == "all" else f" on {r['class_subset']} classes"
            print(f"{r['model']:20s} {r['eval_set']:24s} {100 * r['value']:6.2f}%  (n={r['n']}{subset})")
        if not rows:
            print(f"{ck}: already scored on every set in {results} (use --force to redo)")


def _read_results_files(paths):
    """Every row of the results files, each checked before any is read: one clear error, nothing half done."""
    from .evaluate import read_results
    for path in paths:
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(f"no results file {path}; `genrobust evaluate` writes one")
    return [r for path in paths for r in read_results(path)]


def cmd_robustness(args):
    from .data.folder import write_jsonl
    from .evaluate import check_rows, read_results
    from .robustness import er_rows, load_baseline
    rows, warnings = check_rows(_read_results_files(args.results))
    baseline = load_baseline(args.baseline)
    er, _, more = er_rows(rows, baseline, n_boot=args.bootstrap, seed=args.seed, reference=args.reference)
    for w in warnings + more:
        logger.warning(w)
    if not er:
        # the reasons go in the error itself: warnings may be filtered out, or scrolled away
        why = (warnings + more)[:3] or [
            "no top-1 shift row has an in-distribution row on the same classes (metrics in the file: "
            f"{', '.join(sorted({str(r.get('metric')) for r in rows})) or 'none'}); score models with `genrobust "
            "evaluate`, which writes top1 rows for the ID set and each shift"]
        raise ValueError("no effective robustness could be computed: " + "; ".join(why))
    out = pathlib.Path(args.out or args.results[0])
    # ER rows of the same (checkpoint, eval set, metric, baseline) replace older ones: a rerun is no new seed
    new = {(r["checkpoint"], r["eval_set"], r["metric"], r["baseline"]) for r in er}
    kept = [r for r in read_results(out)
            if (r.get("checkpoint"), r["eval_set"], r["metric"], r.get("baseline")) not in new]
    write_jsonl(out, kept + er)
    for r in er:
        ci = "" if r["ci_low"] is None else f" [{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"
        print(f"{r['model']:20s} {r['eval_set']:24s} {r['metric']:22s} {100 * r['value']:+6.1f}{ci}")
    print(f"{len(er)} rows against {baseline.name} written to {out}")


def cmd_report(args):
    from .report import generated_from_checkpoints, write_report
    rows = _read_results_files(args.results)
    # The checkpoints' own generated folders get sample grids too; relative paths may be relative to the
    # folder a results file sits in rather than to the current one.
    found = generated_from_checkpoints(rows, search=[pathlib.Path(p).parent for p in args.results])
    given = [pathlib.Path(g) for g in args.generated]
    generated = given + [g for g in found if g.resolve() not in {x.resolve() for x in given}]
    paths = write_report(rows, args.out, baseline=args.baseline, generated=generated, reference=args.reference,
                         title=args.title)
    for path in paths:
        print(f"wrote {path}")


def cmd_quickstart(args):
    from .study import quickstart
    quickstart(args.out, per_class=args.per_class, ratio=args.ratio, epochs=args.epochs, model=args.model,
               seed=args.seed, generator_path=args.generator_path, steps=args.steps, guidance=args.guidance,
               eta=args.eta, device=context.resolve_device(args.device), baseline=args.baseline)
    out = pathlib.Path(args.out)
    print(f"results: {out / 'results.jsonl'}\nreport:  {out / 'report.md'} and {out / 'report.html'}")


def cmd_study(args):
    from .study import load_study, run_one_cell, run_study
    cfg = load_study(args.config)
    if args.worker:  # a long-lived worker of a study run: the cells named on stdin
        from .study.workers import serve
        serve(cfg, args.out, device=context.resolve_device(args.device), progress=not args.quiet)
        return
    if args.cell_index is not None:  # a child process of a study run: one cell, nothing else
        run_one_cell(cfg, args.out, args.cell_index, device=context.resolve_device(args.device),
                     progress=not args.quiet)
        return
    done = run_study(cfg, args.out, cells=args.cells, dry_run=args.dry_run,
                     device=context.resolve_device(args.device), progress=not args.quiet, jobs=args.jobs)
    if args.dry_run:
        return
    print(f"{len(done['ran'])} cells run" + (f", {len(done['skipped'])} waiting on another --cells slice"
                                             if done["skipped"] else ""))
    if done["report"]:
        out = pathlib.Path(args.out)
        print(f"results: {out / 'results.jsonl'}\nreport:  {out / 'report.md'} and {out / 'report.html'}")


def cmd_baselines_train(args):
    from .study.baselines import train_zoo
    summary = train_zoo(args.suite, args.out, device=context.resolve_device(args.device), seed=args.seed,
                        progress=not args.quiet)
    for m in summary:
        acc = "–" if m["id_accuracy"] is None else f"{100 * m['id_accuracy']:.1f}%"
        print(f"{m['name']:34s} ID {acc:>6s}  {m['note']}")
    on = sum(m["on_line"] for m in summary)
    print(f"{on} of {len(summary)} models define the line; rows in {pathlib.Path(args.out) / 'results.jsonl'} "
          f"(use it as `genrobust robustness ... --baseline` or `genrobust report ... --baseline`)")


def cmd_baselines_list(args):
    from .study.baselines import SUITES
    for name, spec in SUITES.items():
        print(f"{name}: {len(spec['members'])} models on {spec['real']}")
        for m in spec["members"]:
            print(f"  {m.name:34s} {m.model:24s} {m.epochs:3d} epochs  {m.fraction:5.0%} of the data")


def _nonneg_float(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_device(p):
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ...; auto = cuda if available; under torchrun or accelerate launch, "
                        "auto and cuda mean cuda:LOCAL_RANK")


def _add_sampling(p, steps=20, guidance=2.0):
    p.add_argument("--generator-path", default=None, help="local generator folder; None = the shipped one")
    p.add_argument("--steps", type=int, default=steps,
                   help="sampling steps" + ("" if steps else " (default: the generator's; digits-ddpm 20)"))
    p.add_argument("--guidance", type=float, default=guidance,
                   help="classifier-free guidance scale" + ("" if guidance else " (default: the generator's)"))
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta: 1 = stochastic, 0 = deterministic")


_FMT = argparse.ArgumentDefaultsHelpFormatter


def build_parser():
    p = argparse.ArgumentParser(prog="genrobust", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    p.add_argument("--version", action="version", version=f"genrobust {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (genrobust's own, not other "
                   "libraries')")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ls = sub.add_parser("list", formatter_class=_FMT,
                        help="list registered datasets, generators, strategies, augmentations, eval-sets")
    ls.add_argument("kind", choices=list(_registries()))
    ls.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'digits-*'")
    ls.set_defaults(func=cmd_list)

    ds = sub.add_parser("datasets", formatter_class=_FMT, help="list or export datasets")
    dsub = ds.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    dsub.add_parser("list", formatter_class=_FMT,
                    help="registered datasets and their splits").set_defaults(func=cmd_datasets_list)
    ex = dsub.add_parser("export", formatter_class=_FMT,
                         help="write a dataset split as an ImageFolder with metadata.jsonl")
    ex.add_argument("name", help="registered dataset name, e.g. digits-mnist")
    ex.add_argument("--split", default=None, help="split, e.g. train, pool, test, seen, unseen")
    ex.add_argument("--out", required=True)
    ex.set_defaults(func=cmd_datasets_export)

    gen = sub.add_parser("generator", formatter_class=_FMT, help="train the embedded digits-ddpm generator")
    gsub = gen.add_subparsers(dest="generator_command", required=True, metavar="ACTION")
    gt = gsub.add_parser("train", formatter_class=_FMT,
                         help="train digits-ddpm on digits-mnist/pool + digits-fonts/seen")
    gt.add_argument("--out", required=True, help="output folder (resumes if it holds a partial run)")
    gt.add_argument("--steps", type=int, default=6000)
    gt.add_argument("--batch-size", type=int, default=128)
    gt.add_argument("--lr", type=float, default=1e-3)
    gt.add_argument("--seed", type=int, default=0)
    gt.add_argument("--save-every", type=int, default=500)
    _add_device(gt)
    gt.set_defaults(func=cmd_generator_train)
    cli_finetune.add_finetune_parser(gsub, _FMT, _add_device)

    g = sub.add_parser("generate", formatter_class=_FMT,
                       help="generate a class-labelled dataset folder with a generator")
    g.add_argument("--generator", default="digits-ddpm", help="registered generator (genrobust list generators)")
    g.add_argument("--strategy", default="label", help="conditioning strategy (genrobust list strategies)")
    g.add_argument("--per-class", type=int, default=None, help="images per class (default 100)")
    g.add_argument("--per-image", type=int, default=None,
                   help="K images per real source image (image, image-label, captions)")
    g.add_argument("--source", default=None,
                   help="real source images: a dataset spec (digits-mnist/train, imagefolder:PATH)")
    g.add_argument("--classes", default=None, help="comma-separated class names (default: all)")
    g.add_argument("--seed", type=int, default=0, help="run seed; per-image seeds derive from it")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--out", required=True, help="output folder (a rerun with the same settings resumes)")
    g.add_argument("--shard", default=None, metavar="I/N",
                   help="run slice I of N (job arrays); under torchrun RANK/WORLD_SIZE are used instead")
    g.add_argument("--max-attempts", type=int, default=3,
                   help="tries per image before a flagged (nsfw) or blank image's request is given up")
    _add_sampling(g, steps=None, guidance=None)
    g.add_argument("--strength", type=float, default=0.8, help="img2img / SDEdit strength for source strategies")
    g.add_argument("--model", default=None, help="diffusers generators: a local folder or a cached hub id")
    g.add_argument("--scheduler", default=None, help="diffusers scheduler by name: ddim, dpm-solver++, euler, ...")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--dtype", default=None, help="auto (float16 on CUDA), float16, bfloat16, float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the denoiser (CUDA)")
    g.add_argument("--clip-model", default=None,
                   help="score every image with this CLIP model (local folder or cached hub id); recorded")
    g.add_argument("--clip-threshold", type=float, default=None,
                   help="retry images whose CLIP score is below this (like blank ones)")
    g.add_argument("--clip-top-k", type=cli_finetune.positive_int, default=None,
                   help="keep the k best-scoring images per class in the manifest (k >= 1; omit it to keep all)")
    g.add_argument("--captioner", default="blip", help="captioner for the captions strategy")
    g.add_argument("--captioner-model", default=None, help="local BLIP folder or cached hub id")
    _add_device(g)
    g.set_defaults(func=cmd_generate)

    gm = sub.add_parser("generate-merge", formatter_class=_FMT,
                        help="merge a sharded generation's shards (also: `genrobust generate merge OUT`)")
    gm.add_argument("out", help="the generation folder")
    gm.set_defaults(func=cmd_generate_merge)
    cli_finetune.add_stats_parser(sub, _FMT, _add_device)

    t = sub.add_parser("train", formatter_class=_FMT,
                       help="train a timm classifier on real, generated, or real+generated data",
                       description="Train a timm classifier. Under `torchrun --nproc_per_node N` the same command "
                                   "trains with DDP (gloo on CPU, nccl on CUDA); --batch-size is the global batch. "
                                   "--config FILE.yaml sets the defaults of these flags (recipes in configs/); "
                                   "flags given on the command line override it.")
    t.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML recipe: keys are these flags' names with underscores (batch_size: 256, generated: "
                        "[DIR]); paths in it are relative to the current directory, $VARS are expanded")
    t.add_argument("--real", default="digits-mnist/train",
                   help="real dataset spec (NAME[/SPLIT] or imagefolder:PATH), or 'none' for generated-only")
    t.add_argument("--generated", action="append", default=[], metavar="DIR",
                   help="generated folder (repeatable: folders are pooled)")
    t.add_argument("--mode", choices=["add", "replace", "generated-only"], default=None,
                   help="add: real + k x |real| generated; replace: |real| images, a fraction generated; "
                        "generated-only: generated images alone (--real then only fixes the classes). "
                        "Default: add, or generated-only with --real none")
    t.add_argument("--ratio", type=float, default=1.0, help="add mode: k x |real| generated images (k >= 0)")
    t.add_argument("--fraction", type=float, default=0.5, help="replace mode: generated share of the |real| images")
    t.add_argument("--limit", type=int, default=None, help="generated-only mode: use this many images (default all)")
    t.add_argument("--max-corrupt", type=float, default=0.01,
                   help="fraction of unreadable images per folder skipped (and reported) rather than an error")
    t.add_argument("--stream", choices=["auto", "on", "off"], default="auto",
                   help="decode ImageFolders from disk while training (auto: when too large for memory or of "
                        "mixed image sizes) rather than load them into memory")
    t.add_argument("--input-size", type=int, default=None,
                   help="streamed images are cropped to this (default: the model's own input size)")
    t.add_argument("--crop-scale", type=float, nargs="+", default=[0.08, 1.0], metavar="F",
                   help="streamed images: MIN MAX area fraction of the random resized crop of the full image")
    t.add_argument("--crop-ratio", type=float, nargs="+", default=[3 / 4, 4 / 3], metavar="R",
                   help="streamed images: MIN MAX aspect ratio (w/h) of the random resized crop")
    t.add_argument("--interpolation", default=None,
                   choices=["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming", "random"],
                   help="streamed images: resampling filter of the crop (default: the model's own, timm config)")
    # the CPUs this process may use (affinity, cgroup, Slurm), shared by the ranks of a node
    t.add_argument("--workers", type=int, default=max(1, context.default_workers()),
                   help="DataLoader workers decoding streamed images")
    t.add_argument("--model", default="resnet10t", help="timm model name")
    t.add_argument("--pretrained", default=None, metavar="PATH",
                   help="start from local timm weights: a .safetensors/.bin/.pth file or a folder holding "
                        "model.safetensors or pytorch_model.bin (nothing is downloaded); the head is re-initialised "
                        "when the class count differs from the weights' config")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=128, help="global batch size")
    t.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.1 sgd, 1e-3 adamw)")
    t.add_argument("--weight-decay", type=float, default=None,
                   help="not applied to norms and biases (default: 5e-4 sgd, 0.05 adamw)")
    t.add_argument("--momentum", type=float, default=0.9, help="sgd (Nesterov) momentum")
    t.add_argument("--schedule", choices=["cosine", "step", "cyclic"], default="cosine",
                   help="after the linear warm-up: cosine to 0; step (x gamma at the milestones); cyclic (one "
                        "triangular cycle peaking at the end of the warm-up)")
    t.add_argument("--warmup-epochs", type=float, default=1.0)
    t.add_argument("--milestones", type=float, nargs="+", default=[0.5, 0.75],
                   help="step schedule: fractions of training at which lr is multiplied by --gamma")
    t.add_argument("--gamma", type=float, default=0.1)
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument("--augmentation", default="standard", help="genrobust list augmentations")
    t.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False,
                   help="horizontal flips in the augmentation (not for digits)")
    t.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                   help="mixed precision on CUDA (auto: bf16 where supported, else fp16); ignored on CPU")
    t.add_argument("--no-channels-last", action="store_true", help="keep NCHW on CUDA")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="checkpoint folder (required, here or in --config)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last finished epoch (same config and data)")
    t.add_argument("--force", action="store_true", help="overwrite a complete checkpoint in --out")
    _add_device(t)
    t.set_defaults(func=cmd_train, parsers=(p, t))  # --config parses the command line again (apply_config)

    e = sub.add_parser("evaluate", formatter_class=_FMT,
                       help="score checkpoints on eval sets; append rows to a results file")
    e.add_argument("checkpoints", nargs="+", help="checkpoint folders written by `genrobust train`")
    e.add_argument("--eval-sets", nargs="+", default=["digits"],
                   help="eval sets or suites (digits = digits-mnist/test digits-uci digits-fonts/unseen); "
                        "imagefolder:PATH for any folder")
    e.add_argument("--results", default="results.jsonl")
    e.add_argument("--force", action="store_true", help="rescore pairs already in the results file")
    e.add_argument("--data-root", default=os.environ.get("GENROBUST_DATA"),
                   help="folder holding the ImageNet-family sets (default: $GENROBUST_DATA); layouts in README")
    e.add_argument("--id-set", default=None,
                   help="in-distribution counterpart of imagefolder: sets, e.g. digits-mnist/test")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--max-corrupt", type=float, default=0.01,
                   help="fraction of unreadable images per folder set skipped (counted in the row's "
                        "`unreadable`) rather than an error")
    e.add_argument("--workers", type=int, default=context.default_workers(),
                   help="DataLoader workers decoding folder sets")
    _add_device(e)
    e.set_defaults(func=cmd_evaluate)

    rb = sub.add_parser("robustness", formatter_class=_FMT,
                        help="effective robustness of evaluated models against a baseline line")
    rb.add_argument("results", nargs="+", help="results.jsonl files with accuracy rows")
    rb.add_argument("--baseline", required=True,
                    help="'testbed' (published accuracies of standard ImageNet models) or the results.jsonl "
                         "of baseline models (e.g. a digits baseline zoo)")
    rb.add_argument("--reference", default=None, help="model name for relative robustness (e.g. the real-only)")
    rb.add_argument("--bootstrap", type=cli_finetune.positive_int, default=1000,
                    help="bootstrap resamples for the 95%% interval")
    rb.add_argument("--seed", type=int, default=0)
    rb.add_argument("--out", default=None, help="results file receiving the ER rows (default: the first)")
    rb.set_defaults(func=cmd_robustness)
    rb.set_defaults(func=cmd_robustness)

    bl = sub.add_parser("baselines", formatter_class=_FMT,
                        help="train a zoo of real-only standard models: the points of the ER line")
    bsub = bl.add_subparsers(dest="baselines_command", required=True, metavar="ACTION")
    bsub.add_parser("list", formatter_class=_FMT, help="baseline suites and their models").set_defaults(
        func=cmd_baselines_list)
    bt = bsub.add_parser("train", formatter_class=_FMT,
                         help="train (or reuse) and evaluate every model of a suite")
    bt.add_argument("--suite", default="digits")
    bt.add_argument("--out", required=True, help="zoo folder (models/, results.jsonl, zoo.json)")
    bt.add_argument("--seed", type=int, default=0)
    bt.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_device(bt)
    bt.set_defaults(func=cmd_baselines_train)

    r = sub.add_parser("report", formatter_class=_FMT,
                       help="write report.md and a self-contained report.html from results files")
    r.add_argument("results", nargs="+", help="results.jsonl files")
    r.add_argument("--out", required=True, help="report folder (report.md, report.html, figures/)")
    r.add_argument("--baseline", default=None,
                   help="'testbed' (published ImageNet models) or a baseline zoo's results.jsonl: recompute "
                        "effective robustness and draw accuracy-on-the-line plots")
    r.add_argument("--reference", default=None, help="model name for relative robustness (e.g. real)")
    r.add_argument("--generated", action="append", default=[], metavar="DIR",
                   help="generated folder to show a sample grid of (repeatable); the checkpoints' own "
                        "generated folders are added when present")
    r.add_argument("--title", default="genrobust report")
    r.set_defaults(func=cmd_report)

    q = sub.add_parser("quickstart", formatter_class=_FMT,
                       help="the fast embedded study: generate, train, evaluate, report")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--per-class", type=int, default=50, help="generated images per class per strategy")
    q.add_argument("--ratio", type=_nonneg_float, default=0.5, help="k x |real| generated images added")
    q.add_argument("--epochs", type=int, default=15, help="training epochs of each classifier")
    q.add_argument("--model", default="resnet10t")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--baseline", default=None,
                   help="a baseline zoo's results.jsonl (genrobust baselines train) for effective robustness")
    _add_sampling(q)
    _add_device(q)
    q.set_defaults(func=cmd_quickstart)

    st = sub.add_parser("study", formatter_class=_FMT,
                        help="run a study grid (strategies x amounts x augmentations x seeds), cached per cell",
                        description="Run the cells of a study config (configs/digits-study.yaml) "
                                    "that are not cached yet, then evaluate and write the report. A killed study resumes; "
                                    "an added cell runs alone.")
    st.add_argument("config", help="study config (YAML)")
    st.add_argument("--out", required=True, help="study folder (generated/, models/, results.jsonl, report)")
    st.add_argument("--dry-run", action="store_true",
                    help="print the plan (each cell cached or to run, a time estimate) and run nothing")
    st.add_argument("--cells", default=None, metavar="I/N",
                    help="run only cells whose index %% N == I (machines sharing one --out folder)")
    st.add_argument("--jobs", type=cli_finetune.positive_int, default=None,
                    help="cells run at once on this machine, in that many worker processes sharing the cores "
                         "(default: the config's `jobs`, 1)")
    st.add_argument("--cell-index", type=int, default=None, help=argparse.SUPPRESS)
    st.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    st.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_device(st)
    st.set_defaults(func=cmd_study)
    cli_testset.add_testset_parser(sub, _FMT, _add_device)
    return p


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record (tests and progress bars replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _configure_logging(verbose):
    """Only the `genrobust` logger is configured: -v shows genrobust's debug lines, not PIL's or torch's."""
    log = logging.getLogger("genrobust")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv=None):
    from .registry import UnknownNameError

    argv = list(sys.argv[1:] if argv is None else argv)
    parse = argv
    if "generate" in argv:  # `generate` takes options, so its `merge` action is routed to `generate-merge`
        i = argv.index("generate")
        if argv[i + 1:i + 2] in (["merge"], ["stats"]):
            parse = [*argv[:i], f"generate-{argv[i + 1]}", *argv[i + 2:]]
    args = build_parser().parse_args(parse)
    args.argv = argv
    _configure_logging(args.verbose)
    try:
        args.func(args)
    except (UnknownNameError, FileNotFoundError, NotADirectoryError, ValueError, FloatingPointError) as e:
        if args.verbose:
            raise
        print(f"genrobust: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
