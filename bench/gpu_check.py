"""GPU checks that need no network: Stable Diffusion 1.5 generation, UNet MFU, ResNet-50 training, GPU smoke run.

Speed does not depend on weight values, so every model here has random weights: SD 1.5's UNet, VAE and CLIP
text encoder are built from the configs committed in bench/sd15/ (sources in bench/sd15/README.md), the
tokenizer is a tiny hand-written vocabulary (prompts are padded to 77 tokens, as SD's own tokenizer does).

  (a) the paper repo's loop: StableDiffusionPipeline at 512 px, 50 PNDM steps, guidance 7.5, batch 8, fp16,
      each PIL image saved as PNG in the loop: images/s;
  (b) genrobust's runner on the same pipeline, saved with save_pretrained and loaded by
      `create_generator("text2img", ...)`, `generate(...)` writing PNGs and the manifest: images/s, overhead;
  (c) the UNet's FLOPs per forward (FlopCounterMode on the meta device, batch 2 x 8 for guidance, 64 x 64
      latents) x steps x images/s over the GPU's dense fp16/bf16 datasheet peak: MFU;
  (d) timm ResNet-50 training at 224 px on synthetic batches (channels_last, bf16 autocast, SGD, batch 256):
      images/s and MFU (forward FLOPs x 3 for forward + backward);
  (e) `pytest -m gpu` where tests carry that marker, else genrobust itself on the device: generate with a
      tiny SD, train a tiny classifier on the result for one epoch, predict.

Run it through bench/gpu_check.sh (it picks the python and finds diffusers). On a CUDA machine:
  bench/gpu_check.sh              # the full run, under 8 minutes on an H200 (--compile: also compiled)
  bench/gpu_check.sh --smoke      # anywhere: the same code path on CPU at toy scale, in seconds
Prints one markdown table (part, metric, value, notes); writes it to $OUT/gpu_check.md too when OUT is set.
`python bench/gpu_check.py --record gpu_check.md` then puts a run's table into bench/RESULTS.md.
"""
import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
SD15 = HERE / "sd15"

# Dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets; the datasheets print
# twice these, "with sparsity". Most specific name first: "H100" alone is the SXM part.
PEAKS = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.5), ("H100", 989.4),
         ("A100", 312.0))
CLASSES = ("tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray",
           "cock")

# --smoke shrinks the committed SD 1.5 configs (same classes, same code path): 8 x 8 latents, 64 px images.
SMOKE_CONFIGS = {
    "unet": dict(block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, sample_size=8),
    "vae": dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=64),
    "text_encoder": dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         projection_dim=32, vocab_size=1000),
}


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big each part runs; the full scale is the paper's setting, the smoke scale seconds on a CPU."""

    device: str = "cuda"
    steps: int = 50
    guidance: float = 7.5
    batch: int = 8
    batches: int = 8  # timed batches per generation setting (after one warm-up batch)
    resnet_size: int = 224
    resnet_batch: int = 256
    resnet_warmup: int = 10
    resnet_iters: int = 30
    smoke: bool = False


FULL = Scale()
SMOKE = Scale(device="cpu", steps=2, batch=1, batches=2, resnet_size=32, resnet_batch=2, resnet_warmup=1,
              resnet_iters=2, smoke=True)


class Table:
    """The one result table: rows of (part, metric, value, notes)."""

    def __init__(self):
        self.rows = []

    def add(self, part, metric, value, notes=""):
        self.rows.append((part, metric, value, notes))
        print(f"  {part} | {metric} | {_fmt(value)} | {notes}", flush=True)

    def get(self, part, metric):
        return next(v for p, m, v, _ in self.rows if (p, m) == (part, metric))

    def markdown(self):
        lines = ["| part | metric | value | notes |", "|---|---|---:|---|"]
        lines += [f"| {p} | {m} | {_fmt(v)} | {n} |" for p, m, v, n in self.rows]
        return "\n".join(lines)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- models
def load_configs(smoke=False):
    """The committed SD 1.5 configs {unet, vae, text_encoder, scheduler}, shrunk for --smoke."""
    configs = {name: json.loads((SD15 / f"{name}.json").read_text())
               for name in ("unet", "vae", "text_encoder", "scheduler")}
    if smoke:
        for name, override in SMOKE_CONFIGS.items():
            configs[name].update(override)
    return configs


def build_models(configs, device="meta"):
    """(unet, vae, text_encoder) with random weights, created directly on `device` ("meta": no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):  # initialise on the GPU itself: seconds instead of a minute on the CPU
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    return unet, vae, text_encoder


def tiny_tokenizer(folder):
    """A CLIPTokenizer over lower-case letters, digits and word ends (pad = end of text, 77 tokens, as SD's)."""
    from transformers import CLIPTokenizer

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,")
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def build_pipeline(configs, device, dtype, tmp, seed=0):
    """A StableDiffusionPipeline of random-weight SD 1.5 components on `device` in `dtype` (no safety checker)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    unet, vae, text_encoder = build_models(configs, device)
    pipe = StableDiffusionPipeline(
        vae=vae.to(dtype).eval(), text_encoder=text_encoder.to(dtype).eval(),
        tokenizer=tiny_tokenizer(pathlib.Path(tmp) / "vocab"), unet=unet.to(dtype).eval(),
        scheduler=PNDMScheduler.from_config(configs["scheduler"]),  # as SD 1.5 ships, and the paper ran it
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(configs):
    """Parameters of (unet, vae, text_encoder) built on the meta device: no memory, milliseconds."""
    return tuple(sum(p.numel() for p in m.parameters()) for m in build_models(configs, "meta"))


def count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sd_flops(configs, batch, tokens=77):
    """(UNet FLOPs of one forward at `batch`, VAE decoder FLOPs of one image), counted on the meta device.

    Counted from shapes alone, so the count is the same on every machine: on the meta device attention runs
    as its math form (two batched matmuls) and is counted, whereas the CPU's fused attention kernel is not
    known to FlopCounterMode and would be left out.
    """
    unet, vae, _ = build_models(configs, "meta")
    lat = unet.config.sample_size
    with torch.device("meta"):
        x = torch.randn(batch, unet.config.in_channels, lat, lat)
        text = torch.randn(batch, tokens, unet.config.cross_attention_dim)
        t = torch.tensor(500)
        z = torch.randn(1, vae.config.latent_channels, lat, lat)
    with torch.no_grad():
        return (count_flops(lambda: unet(x, t, encoder_hidden_states=text)),
                count_flops(lambda: vae.decode(z)))


# ---------------------------------------------------------------------------------------------- peaks
def peak_tflops(device):
    """(dense fp16/bf16 peak in TFLOP/s or None, device name) from the datasheet table."""
    if torch.device(device).type != "cuda":
        return None, "CPU"
    name = torch.cuda.get_device_name(torch.device(device))
    for key, tflops in PEAKS:
        if key.lower() in name.lower():
            return tflops, name
    return None, name


def matmul_tflops(device, dtype):
    """Best measured rate of a square matrix product: 8192^3 on a GPU, 512^3 on a CPU."""
    n, reps = (8192, 10) if torch.device(device).type == "cuda" else (512, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


# ---------------------------------------------------------------------------------------------- parts
def paper_loop(pipe, prompts, s, folder):
    """(a) The paper repo's generation loop: prompts in batches through the pipeline, every image saved.

    Returns (images/s, images/s without the PNG saving): the loop saves in line, so both are known.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saving = [0.0]

    def run(batch, tag):
        images = pipe(batch, num_inference_steps=s.steps, guidance_scale=s.guidance).images
        t0 = time.perf_counter()
        for i, image in enumerate(images):
            image.save(folder / f"{tag}_{i}.png")
        saving[0] += time.perf_counter() - t0

    run(prompts[:s.batch], "warm")
    sync(s.device)
    saving[0] = 0.0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), s.batch):
        run(prompts[i:i + s.batch], f"b{i}")
    sync(s.device)
    total = time.perf_counter() - t0
    return len(prompts) / total, len(prompts) / (total - saving[0])


def runner(model_dir, classes, per_class, s, folder, compile_=False):
    """(b) genrobust's runner: load the saved pipeline, generate `label` images; (images/s, load s, retries)."""
    from genrobust.generate import create_generator, generate
    from genrobust.generate.runner import read_manifest

    t0 = time.perf_counter()
    gen = create_generator("text2img", model=str(model_dir), steps=s.steps, guidance=s.guidance,
                           batch_size=s.batch, device=s.device, compile=compile_)  # dtype auto: fp16 on CUDA
    sync(s.device)
    load_s = time.perf_counter() - t0
    generate(gen, "label", list(classes[:1]), f"{folder}/warm", per_class=s.batch, progress=False)
    sync(s.device)
    t0 = time.perf_counter()
    generate(gen, "label", list(classes), f"{folder}/run", per_class=per_class, progress=False)
    sync(s.device)
    ips = len(classes) * per_class / (time.perf_counter() - t0)
    rows = read_manifest(f"{folder}/run")
    retries = sum(len(r.get("attempts") or []) for r in rows)
    return ips, load_s, retries, str(gen.dtype).removeprefix("torch.")


def resnet50_train(s, table, peak, peak_note):
    """(d) timm ResNet-50 training steps on one synthetic batch: images/s and MFU."""
    import timm

    device = torch.device(s.device)
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=1000).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(s.resnet_batch, 3, s.resnet_size, s.resnet_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (s.resnet_batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x)

    fwd = count_flops(forward) / s.resnet_batch
    for _ in range(s.resnet_warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(s.resnet_iters):
        step()
    sync(device)
    ips = s.resnet_batch * s.resnet_iters / (time.perf_counter() - t0)
    setting = (f"timm resnet50, {s.resnet_size} px, batch {s.resnet_batch}, bf16 autocast, channels_last, SGD, "
               f"eager; {s.resnet_iters} steps after {s.resnet_warmup} warm-up; synthetic data (no loading)")
    table.add("d", "ResNet-50 train images/s", ips, setting)
    table.add("d", "ResNet-50 GFLOP/image, forward", fwd / 1e9, "FlopCounterMode; training counted as 3x this")
    table.add("d", "ResNet-50 MFU", 3 * fwd * ips / (peak * 1e12), peak_note)


def gpu_tests(s, table, tmp):
    """(e) `pytest -m gpu` when tests carry that marker, else genrobust end to end on the device."""
    marked = [p.name for p in sorted((ROOT / "tests").glob("test_*.py"))
              if re.search(r"pytest\.mark\.gpu\b", p.read_text())]
    if marked:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        tail = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        table.add("e", "pytest -m gpu", "pass" if proc.returncode == 0 else f"FAIL (rc {proc.returncode})",
                  f"{', '.join(marked)}: {tail}; {time.perf_counter() - t0:.0f} s")
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        return
    from genrobust import train as tr
    from genrobust.data import load_dataset
    from genrobust.generate import create_generator, generate

    t0 = time.perf_counter()
    # genrobust caches folder listings; keep this run's in its temporary folder unless a cache is chosen
    os.environ.setdefault("GENROBUST_CACHE", str(pathlib.Path(tmp) / "cache"))
    try:
        folder = pathlib.Path(tmp) / "e2e"
        pipe = build_pipeline(load_configs(smoke=True), s.device, torch.float32, folder)
        pipe.save_pretrained(folder / "tiny-sd")
        gen = create_generator("text2img", model=str(folder / "tiny-sd"), steps=2, batch_size=4, device=s.device)
        generate(gen, "label", ["tench", "goldfish"], folder / "generated", per_class=4, progress=False)
        data = load_dataset(f"imagefolder:{folder / 'generated'}", channels=3)
        config = tr.TrainConfig(model="test_resnet", epochs=1, batch_size=4, workers=0, seed=0)
        rows = tr.train(data, folder / "ckpt", config, device=s.device, progress=False)
        model, _, classes = tr.load_checkpoint(folder / "ckpt", device=s.device)
        logits = tr.predict(model, data.images, device=s.device)
        assert logits.shape == (len(data), len(classes)) and torch.isfinite(logits).all(), logits.shape
        value, notes = "pass", (f"text2img tiny SD ({gen.dtype}) -> {len(data)} images -> train test_resnet 1 epoch "
                                f"(amp {config.amp}, {len(rows)} row) -> predict, on {s.device}")
    except Exception as e:  # the table still prints; the traceback says where
        import traceback
        traceback.print_exc()
        value, notes = "FAIL", f"{type(e).__name__}: {e}"[:300]
    table.add("e", "genrobust generate + train + predict on the device", value,
              f"{notes}; {time.perf_counter() - t0:.1f} s (no tests carry a gpu marker)")


# ---------------------------------------------------------------------------------------------- main
def run(s, table, compile_=False):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):  # one table, no loading bars or cast warnings
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    device = torch.device(s.device)
    sd_dtype = torch.float16 if device.type == "cuda" else torch.float32  # the runner's dtype "auto"
    peak, name = peak_tflops(device)
    measured = matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if peak is None:
        peak_note = f"{name}: no datasheet peak, MFU against the measured matmul rate {measured:.4g} TFLOP/s"
        peak = measured
    else:
        peak_note = (f"against {name}'s datasheet dense fp16/bf16 peak {peak:g} TFLOP/s "
                     f"(measured 8192^3 bf16 matmul: {measured:.0f})")
    table.add("-", "device", name, f"torch {torch.__version__}, {'full' if not s.smoke else 'smoke'} scale")
    table.add("-", "matmul TFLOP/s, measured", measured,
              "bf16 8192^3, best of 10" if device.type == "cuda" else "fp32 512^3, best of 5")

    configs = load_configs(smoke=s.smoke)
    n_images = s.batch * s.batches
    classes = CLASSES[:min(len(CLASSES), n_images)]
    per_class = n_images // len(classes)
    prompts = [f"a photo of a {c}." for c in classes for _ in range(per_class)]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        t0 = time.perf_counter()
        pipe = build_pipeline(configs, device, sd_dtype, tmp)
        sync(device)
        build_s = time.perf_counter() - t0
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        setting = (f"{size} px, {s.steps} PNDM steps, guidance {s.guidance:g}, batch {s.batch}, "
                   f"{str(sd_dtype).removeprefix('torch.')}, {n_images} images, PNGs written; no safety checker "
                   "(the paper ran one: a ViT-L/14 pass per image, ~0.2% of the UNet's FLOPs)")

        # (a) the paper repo's loop
        ips_a, ips_pipe = paper_loop(pipe, prompts, s, pathlib.Path(tmp) / "paper")
        table.add("a", "paper loop images/s", ips_a, f"StableDiffusionPipeline, {setting}; build {build_s:.1f} s")
        table.add("a", "pipeline alone images/s", ips_pipe, "(a) without its in-line PNG saving")

        # (c) UNet FLOPs per forward at the guidance batch
        lat = pipe.unet.config.sample_size
        unet_flops, vae_flops = sd_flops(configs, 2 * s.batch)
        per_image = unet_flops / s.batch * s.steps  # the forward holds 2 x batch rows: guidance is inside

        # (b) genrobust's runner on the same pipeline, saved and loaded back
        t0 = time.perf_counter()
        pipe.save_pretrained(pathlib.Path(tmp) / "sd15-random")
        save_s = time.perf_counter() - t0
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ips_b, load_s, retries, dtype_b = runner(pathlib.Path(tmp) / "sd15-random", classes, per_class, s,
                                                 pathlib.Path(tmp) / "runner")
        table.add("b", "genrobust runner images/s", ips_b,
                  f"text2img, dtype auto ({dtype_b}), manifest + PNGs; save {save_s:.1f} s, load {load_s:.1f} s; "
                  f"{retries} retried")
        table.add("b", "runner overhead vs (a)", f"{ips_a / ips_b - 1:+.1%}",
                  f"time per image, (b) / (a) - 1; vs the pipeline alone {ips_pipe / ips_b - 1:+.1%}")
        if compile_:  # the warm-up batch inside runner() pays the compilation
            ips_c, _, _, _ = runner(pathlib.Path(tmp) / "sd15-random", classes, per_class, s,
                                    pathlib.Path(tmp) / "runner-compiled", compile_=True)
            table.add("b", "genrobust runner, compile=True, images/s", ips_c,
                      f"torch.compile of the UNet (CUDA only); {ips_a / ips_c - 1:+.1%} vs (a)")

        table.add("c", "UNet GFLOP per forward", unet_flops / 1e9,
                  f"FlopCounterMode on meta, batch {2 * s.batch} (guidance doubles {s.batch}), {lat}x{lat} "
                  f"latents, 77 tokens; VAE decode {vae_flops / 1e9:.4g} GFLOP/image (not counted)")
        table.add("c", "UNet TFLOP/s achieved (a)", per_image * ips_a / 1e12,
                  f"{per_image / 1e12:.4g} TFLOP/image = GFLOP per forward / {s.batch} x {s.steps} steps")
        table.add("c", "UNet MFU (a)", per_image * ips_a / (peak * 1e12),
                  f"{peak_note}; pipeline alone: {per_image * ips_pipe / (peak * 1e12):.3f}, runner (b): "
                  f"{per_image * ips_b / (peak * 1e12):.3f}")

        # (d) ResNet-50 training
        if device.type == "cuda":
            torch.cuda.empty_cache()
        resnet50_train(s, table, peak, peak_note)

        # (e) GPU-marked tests or genrobust end to end on the device
        gpu_tests(s, table, tmp)
    return table


RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
ABOUT = """### GPU checks: `bench/gpu_check.sh`

Random-weight Stable Diffusion 1.5 (UNet, VAE, CLIP text encoder built from the configs in `bench/sd15/`) at
512 px, 50 PNDM steps, guidance 7.5, batch 8, fp16: the paper repo's `StableDiffusionPipeline` loop against
genrobust's runner (images/s, overhead), the UNet's MFU; timm ResNet-50 training at 224 px, batch 256, bf16,
channels_last (images/s, MFU); genrobust generate + train + predict on the GPU. One table, under 8 minutes on
an H200; `bench/gpu_check.sh --smoke` runs the same code on CPU at toy scale (`tests/test_gpu_check.py`).
The device machine sends back `$OUT/gpu_check.md`; `python bench/gpu_check.py --record FILE` puts it here."""


def stamp(argv):
    """One line: what ran, where, when (the commit from git, else $GENROBUST_COMMIT: a device copy has no .git)."""
    try:
        git = ["git", "-C", str(ROOT)]
        rev = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        if subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                          text=True, check=True).stdout.strip():
            rev += "+changes"
    except (OSError, subprocess.CalledProcessError):
        rev = os.environ.get("GENROBUST_COMMIT", "unknown")
    command = " ".join(["bench/gpu_check.sh", *argv])
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (f"_Measured by `{command}` at commit {rev} on {name} ({os.cpu_count()} CPU cores), "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}._")


def record(file, results=RESULTS):
    """Put a table written by a run (its `gpu_check.md`) between the gpu_check markers of RESULTS.md."""
    body = pathlib.Path(file).read_text().strip()
    text = pathlib.Path(results).read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{results} has no {BEGIN} ... {END} section to write into")
    head, rest = text.split(BEGIN, 1)
    tmp = pathlib.Path(results).with_name(f".{pathlib.Path(results).name}.tmp")
    tmp.write_text(f"{head}{BEGIN}\n{ABOUT}\n\n{body}\n{END}{rest.split(END, 1)[1]}")
    os.replace(tmp, results)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="run on CPU at toy scale (no GPU needed)")
    ap.add_argument("--record", metavar="FILE",
                    help="only put FILE (a run's gpu_check.md) into bench/RESULTS.md between its gpu_check markers")
    ap.add_argument("--compile", action="store_true",
                    help="also time the runner with compile=True (adds a minute or two of compilation)")
    ap.add_argument("--out", help="also write the table here (default: $OUT/gpu_check.md when OUT is set)")
    args = ap.parse_args(argv)
    if args.record:
        record(args.record)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible, so there is nothing to time. Run it on a GPU machine, or "
              "pass --smoke to run the same code path on CPU at toy scale.", file=sys.stderr)
        return 2
    s = SMOKE if args.smoke else FULL
    t0 = time.perf_counter()
    table = Table()
    run(s, table, compile_=args.compile)
    table.add("-", "wall time s", time.perf_counter() - t0, "this script, imports excluded")
    text = table.markdown() + "\n\n" + stamp(argv)
    print("\n" + text)
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_check.md") if os.environ.get("OUT") else None)
    if out:
        pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
