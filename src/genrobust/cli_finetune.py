"""`genrobust generator finetune` and `genrobust generate stats`."""
import shlex

from . import context


def positive_int(text):
    """An argparse type: an int >= 1 (`cli.py` uses it too)."""
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def cmd_finetune(args):
    from .finetune import finetune

    if args.generator_path is not None and args.generator != "digits-ddpm":
        raise ValueError("--generator-path is for digits-ddpm; give a text2img base with --model")
    if args.model is not None and args.generator == "digits-ddpm":
        raise ValueError("digits-ddpm's base is a folder given with --generator-path (default: the shipped one), "
                         "not --model")
    command = "genrobust " + " ".join(shlex.quote(a) for a in args.argv)
    out = finetune(args.generator, args.dataset, args.out, model=args.model or args.generator_path, steps=args.steps,
                   lr=args.lr, batch_size=args.batch_size, seed=args.seed, mode=args.mode, lora_rank=args.lora_rank,
                   grad_accum=args.grad_accum, grad_checkpointing=args.grad_checkpointing or None,
                   mixed_precision=args.mixed_precision, ema=args.ema, ema_decay=args.ema_decay, warmup=args.warmup,
                   prompt=args.prompt, resolution=args.resolution, save_every=args.save_every, workers=args.workers,
                   device=context.resolve_device(args.device), progress=not args.quiet, command=command)
    if context.is_main():
        print(f"fine-tuned {args.generator} written to {out}")


def add_finetune_parser(gsub, fmt, add_device):
    """Register `finetune` under `genrobust generator`."""
    import argparse

    f = gsub.add_parser(
        "finetune", formatter_class=fmt,
        help="fine-tune a generator on a real dataset (class prompts); the folder loads like any other model",
        description="Fine-tune a generator on a real training set, each image prompted with its class name. "
                    "text2img: a diffusers Stable Diffusion-class pipeline (--model), full UNet or LoRA, the output "
                    "a pipeline folder for `genrobust generate --generator text2img --model OUT`; under "
                    "`accelerate launch` every process trains on its slice of each batch. digits-ddpm: the shipped "
                    "generator (or --generator-path) on digits-mnist/train in the handwritten style, the output "
                    "for `--generator-path OUT`. A rerun on the same --out resumes from the last checkpoint, or "
                    "returns a complete folder as it is. Options left unset take the generator's defaults "
                    "(docs/finetune.md).")
    f.add_argument("--generator", required=True, choices=["text2img", "digits-ddpm"])
    f.add_argument("--dataset", default="digits-mnist/train",
                   help="real training data: a dataset spec (digits-mnist/train, imagefolder:PATH) or a folder")
    f.add_argument("--out", required=True, help="output generator folder (resumes if it holds a partial run)")
    f.add_argument("--model", default=None, help="text2img base: a local diffusers folder or a cached hub id")
    f.add_argument("--generator-path", default=None, help="digits-ddpm base folder; None: the shipped one")
    f.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer steps; None: text2img one epoch, digits-ddpm 600")
    f.add_argument("--lr", type=float, default=None,
                   help="learning rate; None: text2img 1e-5 full / 1e-4 lora, digits-ddpm 2e-4")
    f.add_argument("--batch-size", type=positive_int, default=None,
                   help="global batch of one micro-step; None: text2img 16, digits-ddpm 64")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--mode", choices=["full", "lora"], default=None,
                   help="text2img: train the whole UNet or LoRA adapters; None: full")
    f.add_argument("--lora-rank", type=positive_int, default=None, help="text2img LoRA rank (= alpha); None: 4")
    f.add_argument("--grad-accum", type=positive_int, default=None,
                   help="text2img: micro-batches per optimizer step; None: 1")
    f.add_argument("--grad-checkpointing", action="store_true", help="text2img: trade compute for UNet memory")
    f.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default=None,
                   help="text2img; None or auto: bf16 (or fp16) on CUDA, float32 on CPU")
    f.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="text2img: keep and save an EMA of the weights; None: off (digits-ddpm always keeps one)")
    f.add_argument("--ema-decay", type=float, default=None,
                   help="EMA decay; None: text2img 0.9999, digits-ddpm 0.999")
    f.add_argument("--warmup", type=int, default=None,
                   help="linear lr warm-up steps; None: text2img 0, digits-ddpm 50")
    f.add_argument("--prompt", default=None,
                   help="text2img class prompt template with one {}; None: 'a photo of a {}.' (wnids become "
                        "class names)")
    f.add_argument("--resolution", type=positive_int, default=None,
                   help="text2img training size in pixels; None: the model's native size")
    f.add_argument("--save-every", type=positive_int, default=None,
                   help="checkpoint every N steps; None: text2img 500, digits-ddpm 200")
    f.add_argument("--workers", type=int, default=None,
                   help="text2img: DataLoader workers decoding images; None: this process's CPUs less one, at most 4")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device(f)
    f.set_defaults(func=cmd_finetune)


def _table(result):
    """The printed summary: one row per set (generated, real), fidelity and diversity per class and overall."""
    sets = [("generated", result["generated"])] + ([("real", result["real_set"])] if result["real_set"] else [])
    classes = result["classes"]
    lines = [f"{'':10s} {'images':>7s} {'fidelity':>9s} {'diversity':>10s}  " + " ".join(f"{c:>6.6s}" for c in classes)]
    for name, row in sets:
        fid = row.get("fidelity")
        div = row.get("diversity")
        per = [f"{fid['per_class'].get(c, float('nan')):6.3f}" if fid else "     -" for c in classes]
        lines.append(f"{name:10s} {row['num_images']:7d} {fid['accuracy'] if fid else float('nan'):9.4f} "
                     f"{div['mean'] if div else float('nan'):10.4f}  " + " ".join(per))
    frechet = result["frechet"]
    lines.append(f"Fréchet distance of the classifier embeddings to {result['real']}: "
                 + ("-" if frechet is None else f"{frechet:.3f}"))
    if result.get("fid"):
        f = result["fid"]
        lines.append(f"FID (Inception-v3) to {result['real']}: {f['fid']:.3f}; KID: {f['kid_mean']:.5f} "
                     f"± {f['kid_std']:.5f} ({f['n_generated']} generated, {f['n_real']} real images)")
    lines.append(f"per-class columns: fidelity; diversity = mean pairwise {result['metric']} distance within a class")
    return "\n".join(lines)


def cmd_stats(args):
    from .generate.stats import folder_stats

    result = folder_stats(args.folder, real=args.real, classifier=args.classifier, embedder=args.embedder,
                          embedder_weights=args.embedder_weights, metric=args.metric,
                          device=context.resolve_device(args.device),
                          batch_size=args.batch_size, out=args.out, fid=args.fid,
                          inception_weights=args.inception_weights)
    print(_table(result))
    print(f"written to {result['path']}")


def add_stats_parser(sub, fmt, add_device):
    """Register `generate-stats` (reached as `genrobust generate stats DIR`)."""
    s = sub.add_parser(
        "generate-stats", formatter_class=fmt,
        help="fidelity, diversity and Fréchet distance of a generated folder (also: `genrobust generate stats DIR`)",
        description="Measure a generated folder: fidelity (a real-data classifier's accuracy on it, per class), "
                    "diversity (mean pairwise distance of embeddings within each class) and the Fréchet distance "
                    "of its embeddings to a real set (FID's formula). Embeddings are a model's penultimate "
                    "features: --embedder, else the classifier's. Written as JSON (default DIR/stats.json).")
    s.add_argument("folder", help="generated folder (an ImageFolder) or a dataset spec")
    s.add_argument("--classifier", default=None, help="checkpoint folder trained on real data (genrobust train)")
    s.add_argument("--embedder", default=None,
                   help="checkpoint folder, or a timm model name with --embedder-weights; None: the classifier")
    s.add_argument("--embedder-weights", default=None, help="local weights file for a timm --embedder")
    s.add_argument("--real", default=None, help="real dataset spec for the Fréchet distance (e.g. digits-mnist/test)")
    s.add_argument("--metric", choices=["cosine", "l2"], default="cosine", help="diversity distance")
    s.add_argument("--fid", action="store_true",
                   help="also FID and KID to --real on Inception-v3 features (torchmetrics), as papers report them")
    s.add_argument("--inception-weights", default=None,
                   help="the FID Inception weights file (pt_inception-2015-12-05-6726825d.pth or a .safetensors "
                        "copy) for offline machines; None: torch hub's cache")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--out", default=None, help="JSON file to write; None: FOLDER/stats.json")
    add_device(s)
    s.set_defaults(func=cmd_stats)
