"""genrobust: train classifiers on generated data and measure them under natural distribution shifts.

Data flows one way: generate -> manifest -> train -> checkpoint -> evaluate -> results.jsonl -> report.
"""
import argparse
import logging
import pathlib
import shlex
import sys

logger = logging.getLogger("genrobust")


def _device(name):
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _registries():
    from .augment import AUGMENTATIONS
    from .data import DATASETS
    from .evaluate import EVAL_SETS
    from .generate import GENERATORS, STRATEGIES
    return {"datasets": DATASETS, "generators": GENERATORS, "strategies": STRATEGIES,
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
                            device=_device(args.device))
    print(f"digits-ddpm written to {out}")


def cmd_generate(args):
    from .generate import create_generator, generate
    from .study import write_config
    generator = create_generator(args.generator, path=args.generator_path, steps=args.steps,
                                 guidance=args.guidance, eta=args.eta, device=_device(args.device),
                                 batch_size=args.batch_size)
    classes = args.classes.split(",") if args.classes else generator.classes()
    card = generate(generator, args.strategy, classes, args.out, args.per_class, seed=args.seed)
    # written after the run is accepted: a refused rerun must not overwrite the folder's config
    write_config(args.out, {"command": "generate", **{k: v for k, v in vars(args).items()
                                                      if k not in ("func", "argv")}})
    print(f"{card['num_images']} images ({args.strategy}) in {args.out}")


def cmd_train(args):
    from .data.mixing import build_training_set
    from .train import TrainConfig, train
    if args.ratio < 0:
        raise ValueError(f"--ratio must be >= 0 (k x |real| generated images are added), got {args.ratio}")
    real = None if args.real == "none" else args.real
    data, info = build_training_set(real, args.generated, args.ratio, seed=args.seed)
    config = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         augmentation=args.augmentation, seed=args.seed)
    rows = train(data, args.out, config, device=_device(args.device), data_info=info)
    print(f"trained {args.model} on {info['label']} ({len(data)} images): final train acc "
          f"{rows[-1]['train_acc']:.3f}; checkpoint in {args.out}")


def cmd_evaluate(args):
    from .evaluate import evaluate
    from .study import write_config
    results = pathlib.Path(args.results)
    write_config(results.parent, {"command": "evaluate", "checkpoints": args.checkpoints,
                                  "eval_sets": args.eval_sets, "results": str(results), "force": args.force},
                 name=f"{results.stem}.evaluate.yaml")
    for ck in args.checkpoints:
        rows = evaluate(ck, args.eval_sets, results, device=_device(args.device), force=args.force)
        for r in rows:
            print(f"{r['model']:20s} {r['eval_set']:24s} {100 * r['value']:6.2f}%  (n={r['n']})")
        if not rows:
            print(f"{ck}: already scored on every set in {results} (use --force to redo)")


def cmd_report(args):
    from .evaluate import read_results
    from .report import write_report
    rows = []
    for path in args.results:
        if not pathlib.Path(path).exists():
            raise FileNotFoundError(f"no results file {path}; `genrobust evaluate` writes one")
        rows += read_results(path)
    path = write_report(rows, args.out)
    print(f"wrote {path}")


def cmd_quickstart(args):
    from .study import quickstart
    quickstart(args.out, per_class=args.per_class, ratio=args.ratio, epochs=args.epochs, model=args.model,
               seed=args.seed, generator_path=args.generator_path, steps=args.steps, guidance=args.guidance,
               eta=args.eta, device=_device(args.device))
    print(f"results: {pathlib.Path(args.out) / 'results.jsonl'}\nreport:  {pathlib.Path(args.out) / 'report.md'}")


def _nonneg_float(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_device(p):
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto = cuda if available")


def _add_sampling(p):
    p.add_argument("--generator-path", default=None, help="local generator folder; None = the shipped one")
    p.add_argument("--steps", type=int, default=20, help="DDIM sampling steps")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta: 1 = stochastic, 0 = deterministic")


_FMT = argparse.ArgumentDefaultsHelpFormatter


def build_parser():
    p = argparse.ArgumentParser(prog="genrobust", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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

    g = sub.add_parser("generate", formatter_class=_FMT,
                       help="generate a class-labelled dataset folder with a generator")
    g.add_argument("--generator", default="digits-ddpm", help="registered generator (genrobust list generators)")
    g.add_argument("--strategy", default="label", help="conditioning strategy (genrobust list strategies)")
    g.add_argument("--per-class", type=int, default=100, help="images per class")
    g.add_argument("--classes", default=None, help="comma-separated class names (default: all)")
    g.add_argument("--seed", type=int, default=0, help="run seed; per-image seeds derive from it")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--out", required=True, help="output folder (a rerun with the same settings resumes)")
    _add_sampling(g)
    _add_device(g)
    g.set_defaults(func=cmd_generate)

    t = sub.add_parser("train", formatter_class=_FMT,
                       help="train a timm classifier on real, generated, or real+generated data")
    t.add_argument("--real", default="digits-mnist/train",
                   help="real dataset spec (NAME[/SPLIT] or imagefolder:PATH), or 'none' for generated-only")
    t.add_argument("--generated", action="append", default=[], metavar="DIR",
                   help="generated folder (repeatable: folders are pooled)")
    t.add_argument("--ratio", type=float, default=1.0, help="add k x |real| generated images (k >= 0)")
    t.add_argument("--model", default="resnet10t", help="timm model name")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--augmentation", default="standard", help="genrobust list augmentations")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="checkpoint folder")
    _add_device(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", formatter_class=_FMT,
                       help="score checkpoints on eval sets; append rows to a results file")
    e.add_argument("checkpoints", nargs="+", help="checkpoint folders written by `genrobust train`")
    e.add_argument("--eval-sets", nargs="+", default=["digits"],
                   help="eval sets or suites (digits = digits-mnist/test digits-uci digits-fonts/unseen); "
                        "imagefolder:PATH for any folder")
    e.add_argument("--results", default="results.jsonl")
    e.add_argument("--force", action="store_true", help="rescore pairs already in the results file")
    _add_device(e)
    e.set_defaults(func=cmd_evaluate)

    r = sub.add_parser("report", formatter_class=_FMT, help="write report.md from results files")
    r.add_argument("results", nargs="+", help="results.jsonl files")
    r.add_argument("--out", required=True, help="report folder")
    r.set_defaults(func=cmd_report)

    q = sub.add_parser("quickstart", formatter_class=_FMT,
                       help="the fast embedded study: generate, train, evaluate, report")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--per-class", type=int, default=50, help="generated images per class per strategy")
    q.add_argument("--ratio", type=_nonneg_float, default=0.5, help="k x |real| generated images added")
    q.add_argument("--epochs", type=int, default=15, help="training epochs of each classifier")
    q.add_argument("--model", default="resnet10t")
    q.add_argument("--seed", type=int, default=0)
    _add_sampling(q)
    _add_device(q)
    q.set_defaults(func=cmd_quickstart)
    return p


def main(argv=None):
    from .registry import UnknownNameError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
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
