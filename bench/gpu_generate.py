"""GPU generation throughput: Stable Diffusion 1.5-class text-to-image at 512 px, images/s.

Two settings on the same prompts: the paper repo's (fp16, 50 steps, PNDM as the checkpoint ships, batch 8,
safety checker on) and genrobust's defaults through the runner (`text2img`, --dtype auto = fp16, SDPA,
batch 8, the manifest and PNG writing included). Needs a GPU and a local SD 1.5-class folder (no network):
  python bench/gpu_generate.py --model /path/to/stable-diffusion-v1-5 [--images 64] [--steps 50]
Prints a markdown table to paste into bench/RESULTS.md.
"""
import argparse
import tempfile
import time

import torch


def paper_loop(model, prompts, steps, batch):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float16, local_files_only=True)
    pipe = pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    pipe(prompts[:batch], num_inference_steps=steps)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        pipe(prompts[i:i + batch], num_inference_steps=steps)
    torch.cuda.synchronize()
    return len(prompts) / (time.perf_counter() - t0)


def genrobust_runner(model, classes, per_class, steps, batch, compile_):
    from genrobust.generate import create_generator, generate
    gen = create_generator("text2img", model=model, steps=steps, batch_size=batch, device="cuda",
                           compile=compile_)
    with tempfile.TemporaryDirectory() as out:
        generate(gen, "label", classes[:1], f"{out}/warm", per_class=batch, progress=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(gen, "label", classes, f"{out}/g", per_class=per_class, progress=False)
        torch.cuda.synchronize()
        return len(classes) * per_class / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, help="local Stable Diffusion 1.5-class folder")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no GPU: this benchmark times CUDA generation")
    classes = ["tench", "goldfish", "great white shark", "tiger shark"]
    per_class = max(1, args.images // len(classes))
    prompts = [f"a photo of a {c}." for c in classes for _ in range(per_class)]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, 512 px, {args.steps} steps, "
          f"batch {args.batch}, {len(prompts)} images\n")
    print("| setting | images/s |\n|---|---:|")
    print(f"| paper repo loop (fp16, pipeline defaults) | {paper_loop(args.model, prompts, args.steps, args.batch):.2f} |")
    print(f"| genrobust runner (text2img defaults) | "
          f"{genrobust_runner(args.model, classes, per_class, args.steps, args.batch, False):.2f} |")
    print(f"| genrobust runner, --compile | "
          f"{genrobust_runner(args.model, classes, per_class, args.steps, args.batch, True):.2f} |")


if __name__ == "__main__":
    main()
