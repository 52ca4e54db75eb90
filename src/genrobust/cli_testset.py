"""`genrobust testset ...`: build, version, verify, diff, evaluate and export generated test sets."""
import os
import pathlib

ROOT_HELP = "test-set root folder (default: $GENROBUST_TESTSETS, else runs/testsets)"
# generator arguments given as flags: (factory keyword, flag)
FLAG_PARAMS = (("steps", "steps"), ("guidance", "guidance"), ("eta", "eta"), ("strength", "strength"),
               ("batch_size", "batch-size"), ("path", "generator-path"), ("model", "model"),
               ("scheduler", "scheduler"), ("height", "height"), ("width", "width"), ("dtype", "dtype"))


def _distance(text):
    """A Hamming distance (0..64) or `off`."""
    if text == "off":
        return text
    value = int(text)
    if not 0 <= value <= 64:
        raise ValueError(f"a pHash Hamming distance is 0..64 or 'off', got {text}")
    return value


def _names(text):
    return [c for c in text.split(",") if c] if text else None


def _flag_source(args):
    """The one generated source the flags describe, or None when --from/--based-on give the sources."""
    given = any(v is not None for v in (args.generator, args.strategy, args.per_class, args.per_image))
    flags = {flag: getattr(args, flag.replace("-", "_")) for _, flag in FLAG_PARAMS}
    if not given and (args.from_ or args.based_on):
        stray = [f for f, v in {**flags, "seed": args.seed, "source": args.source, "source-id": args.source_id}.items()
                 if v is not None]
        if stray:
            raise ValueError(f"--{stray[0]} describes a generated source from flags; with --from or --based-on put it "
                             "in the spec's sources, or add --strategy/--per-class for a new source")
        return None
    params = {key: flags[flag] for key, flag in FLAG_PARAMS if flags[flag] is not None}
    per_class = args.per_class if args.per_class is not None or args.per_image is not None else 100
    src = {"generator": args.generator or "digits-ddpm", "strategy": args.strategy or "label",
           "per_class": per_class, "per_image": args.per_image, "seed": args.seed or 0, "params": params,
           "id": args.source_id, "source": args.source}
    return {k: v for k, v in src.items() if v is not None}


def _overrides(args):
    """Top-level spec keys given as flags (they win over --from)."""
    out = {k: v for k, v in {"description": args.description, "licence": args.licence, "quota": args.quota,
                             "real": args.real, "based_on": args.based_on, "classes": _names(args.classes),
                             "remove_classes": _names(args.remove_classes),
                             "regenerate_classes": _names(args.regenerate_classes),
                             "remove_images": _names(args.remove_images)}.items() if v is not None}
    filters = {"reference": args.reference or None, "clip_model": args.clip_model,
               "clip_threshold": args.clip_threshold, "duplicates": args.duplicates, "near_copies": args.near_copies}
    filters = {k: (None if v == "off" else v) for k, v in filters.items() if v is not None}
    if filters:
        out["filters"] = filters
    source = _flag_source(args)
    if source is not None:
        out["sources"] = [source]
    return out


def cmd_build(args):
    from .context import resolve_device
    from .testset import build, spec

    base = spec.read_from(args.from_ or [])
    card, built = build(args.name, args.version, spec.merge(base, _overrides(args)), root=args.root,
                        device=resolve_device(args.device), progress=not args.quiet)
    root = pathlib.Path(args.root) if args.root else _root()
    if card is None:
        print("this process's share is generated; rank 0 assembles the version")
    elif built:
        print(f"built {args.name}/{args.version}: {card['num_images']} images in {len(card['classes'])} classes "
              f"-> {root / args.name / args.version}")
    else:
        print(f"{args.name}/{args.version} is already built from these inputs (nothing to do)")


def _root():
    from .testset import default_root
    return default_root()


def cmd_verify(args):
    from .testset import store

    problems = []
    for ref in args.refs:
        path = store.resolve(ref, args.root)
        result = store.verify(path)
        if result["ok"]:
            print(f"ok: {path}: {result['checked']} files match card.json")
        else:
            problems.append(store.describe_problems(path, result))
    if problems:
        raise ValueError(" | ".join(problems))


def cmd_diff(args):
    import json

    from .testset import store

    if len(args.refs) == 3:
        name, a, b = args.refs
        a, b = f"{name}/{a}", f"{name}/{b}"
    elif len(args.refs) == 2:
        a, b = args.refs
    else:
        raise ValueError("testset diff takes NAME V1 V2, or two versions (NAME/V1 NAME/V2 or their folders)")
    d = store.diff(store.resolve(a, args.root), store.resolve(b, args.root))
    if args.json:
        print(json.dumps(d, indent=2))
        return
    t = d["total"]
    print(f"{d['old']} -> {d['new']}: {t['before']} -> {t['after']} images ({t['added']} added, {t['removed']} "
          f"removed, {t['changed']} changed, {t['kept']} kept)")
    print(store.diff_table(d), end="")


def cmd_evaluate(args):
    from .context import resolve_device
    from .study import write_config
    from .testset import bench

    classes = bench.read_class_list(args.timm_classes) if args.timm_classes else None
    entries, out = bench.benchmark(args.ref, args.models, out=args.out, real=args.real, root=args.root,
                                   device=resolve_device(args.device), data_root=args.data_root,
                                   batch_size=args.batch_size, workers=args.workers, force=args.force,
                                   timm_classes=classes, progress=not args.quiet)
    write_config(out, {"command": "testset evaluate", **{k: v for k, v in vars(args).items()
                                                         if k not in ("func", "argv")}})
    print((out / "leaderboard.md").read_text(), end="")
    print(f"\nwritten to {out}: {', '.join(bench.FILES)}")


def cmd_export(args):
    from .testset import export

    out = export(args.ref, args.out, root=args.root)
    print(f"exported to {out}; load it with datasets.load_dataset(\"{out}\")[\"test\"] or genrobust.load_testset")


def cmd_list(args):
    from .testset import list_testsets, store

    root = pathlib.Path(args.root) if args.root else _root()
    found = list_testsets(root)
    if not found:
        print(f"no test sets under {root}")
        return
    for name, versions in found.items():
        for v in versions:
            c = store.read_card(root / name / v)
            based = f", based on {c['based_on']['version']}" if c.get("based_on") else ""
            print(f"{name}/{v}: {c['num_images']} images, {len(c['classes'])} classes, real {c['real']}, "
                  f"built {c['created']}{based}")


def _add_build(tsub, fmt, add_device):
    b = tsub.add_parser("build", formatter_class=fmt, help="build a version of a generated test set",
                        description="Build NAME/VERSION under the root: generate (resumable), filter (CLIP score, "
                                    "duplicates and near-copies by perceptual hash), apply the per-class quota, and "
                                    "write the images, metadata.jsonl, card.json, README.md (and CHANGELOG.md for "
                                    "--based-on). A built version is immutable. See docs/testsets.md.")
    b.add_argument("name", help="test-set name, e.g. digits-g")
    b.add_argument("--version", required=True, help="version to build, e.g. v1")
    b.add_argument("--from", dest="from_", action="append", default=[], metavar="SPEC-OR-DIR",
                   help="a YAML build spec, a study config, a generated folder or a study folder (repeatable)")
    b.add_argument("--based-on", default=None, metavar="VERSION", help="derive from this version of NAME")
    src = b.add_argument_group("one generated source from flags (used when --strategy/--per-class is given, or "
                               "when there is no --from/--based-on)")
    src.add_argument("--generator", default=None, help="registered generator (default digits-ddpm)")
    src.add_argument("--strategy", default=None, help="conditioning strategy (default label)")
    src.add_argument("--per-class", type=int, default=None, help="images generated per class (default 100)")
    src.add_argument("--per-image", type=int, default=None, help="images per real source image (image strategies)")
    src.add_argument("--source", default=None, help="real source images of image strategies (a dataset spec)")
    src.add_argument("--seed", type=int, default=None, help="the source's run seed (default 0)")
    src.add_argument("--source-id", default=None, help="the source's id (names its images; default STRATEGY-sSEED)")
    for flag, kind, text in (("--steps", int, "sampling steps"), ("--guidance", float, "guidance scale"),
                             ("--eta", float, "DDIM eta (digits-ddpm)"), ("--strength", float, "SDEdit strength"),
                             ("--batch-size", int, "generation batch size"),
                             ("--generator-path", str, "digits-ddpm folder (default: the shipped one)"),
                             ("--model", str, "diffusers generators: local folder or cached hub id"),
                             ("--scheduler", str, "diffusers scheduler"), ("--height", int, "image height"),
                             ("--width", int, "image width"), ("--dtype", str, "diffusers dtype")):
        src.add_argument(flag, type=kind, default=None, help=f"{text} (default: the generator's)")
    s = b.add_argument_group("the set (override the spec; a derived version inherits them from its base)")
    s.add_argument("--classes", default=None, help="comma-separated classes (default: the sources')")
    s.add_argument("--quota", type=int, default=None, help="images kept per class after the filters (default all)")
    s.add_argument("--real", default=None, help="real counterpart for evaluate (default digits-mnist/test for "
                                                "digits-ddpm sets)")
    s.add_argument("--reference", action="append", default=[], metavar="SPEC",
                   help="reference set for the near-copy filter: a dataset spec or folder (repeatable)")
    s.add_argument("--near-copies", type=_distance, default=None, metavar="D|off",
                   help="pHash Hamming distance to a reference image at which an image is a near-copy (default 2)")
    s.add_argument("--duplicates", type=_distance, default=None, metavar="D|off",
                   help="pHash Hamming distance at which two images are duplicates (default 2)")
    s.add_argument("--clip-model", default=None, help="CLIP model scoring every image (local folder or cached id)")
    s.add_argument("--clip-threshold", type=float, default=None, help="leave out images scoring below this")
    s.add_argument("--licence", default=None, help="licence of the images (default: unspecified)")
    s.add_argument("--description", default=None)
    s.add_argument("--remove-classes", default=None, help="--based-on: classes to drop (comma-separated)")
    s.add_argument("--regenerate-classes", default=None,
                   help="--based-on: classes whose images are all replaced by the new sources' (comma-separated)")
    s.add_argument("--remove-images", default=None, help="--based-on: file names to drop (comma-separated)")
    b.add_argument("--root", default=None, help=ROOT_HELP)
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device(b)
    b.set_defaults(func=cmd_build)


def _add_evaluate(tsub, fmt, add_device):
    e = tsub.add_parser("evaluate", formatter_class=fmt, help="benchmark a model zoo on a version and its real "
                                                              "counterpart; write a leaderboard")
    e.add_argument("ref", help="NAME/VERSION, NAME (latest version) or a version folder")
    e.add_argument("--models", nargs="+", required=True,
                   help="checkpoint folders, zoo folders (models/*/), or timm:NAME=WEIGHTS (local weights)")
    e.add_argument("--real", default=None, help="real counterpart (default: the card's), e.g. digits-mnist/test, "
                                                "imagenet-val, imagefolder:PATH")
    e.add_argument("--out", default=None, help="results folder (default ROOT/NAME/evaluations/VERSION)")
    e.add_argument("--force", action="store_true", help="rescore models already in the results")
    e.add_argument("--timm-classes", default=None, metavar="FILE",
                   help="class names of timm:... models (JSON list or one per line; default ImageNet-1k wnids)")
    e.add_argument("--data-root", default=os.environ.get("GENROBUST_DATA"),
                   help="folder holding the ImageNet-family sets (default: $GENROBUST_DATA)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    e.add_argument("--root", default=None, help=ROOT_HELP)
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device(e)
    e.set_defaults(func=cmd_evaluate)


def add_testset_parser(sub, fmt, add_device):
    """Register the `testset` command on the top-level subparsers."""
    ts = sub.add_parser("testset", formatter_class=fmt,
                        help="build, verify, diff, benchmark and export versioned generated test sets",
                        description="Standalone generated test sets (ImageNet-G style), versioned under a root "
                                    "folder: ROOT/NAME/VERSION/. See docs/testsets.md.")
    tsub = ts.add_subparsers(dest="testset_command", required=True, metavar="ACTION")
    _add_build(tsub, fmt, add_device)
    v = tsub.add_parser("verify", formatter_class=fmt, help="recheck every file's sha256 against card.json")
    v.add_argument("refs", nargs="+", help="NAME/VERSION, NAME (latest) or version folders")
    v.add_argument("--root", default=None, help=ROOT_HELP)
    v.set_defaults(func=cmd_verify)
    d = tsub.add_parser("diff", formatter_class=fmt, help="per-class changes between two versions")
    d.add_argument("refs", nargs="+", metavar="REF", help="NAME V1 V2, or two versions (NAME/V or folders)")
    d.add_argument("--json", action="store_true", help="print the diff as JSON")
    d.add_argument("--root", default=None, help=ROOT_HELP)
    d.set_defaults(func=cmd_diff)
    _add_evaluate(tsub, fmt, add_device)
    x = tsub.add_parser("export", formatter_class=fmt,
                        help="copy a verified version as a writable Hugging Face imagefolder dataset")
    x.add_argument("ref", help="NAME/VERSION, NAME (latest) or a version folder")
    x.add_argument("--out", required=True, help="an empty or new folder")
    x.add_argument("--root", default=None, help=ROOT_HELP)
    x.set_defaults(func=cmd_export)
    ls = tsub.add_parser("list", formatter_class=fmt, help="test sets and their versions under the root")
    ls.add_argument("--root", default=None, help=ROOT_HELP)
    ls.set_defaults(func=cmd_list)
