"""`genrobust generate` end to end through the CLI: a run killed with SIGKILL and resumed, the diffusers
generators and the BLIP captioner on tiny random-weight models (tests/tiny_models.py), and sharded runs merged
with `genrobust generate merge`."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image

import tiny_models
from genrobust.cli import main
from genrobust.data.folder import read_jsonl
from genrobust.generate.captioners import class_prompt
from genrobust.generate.generators import file_sha256
from genrobust.generate.pipelines import imagenet_prompts
from helpers import fails


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny diffusers/transformers folders, built once for the file."""
    root = tmp_path_factory.mktemp("tiny-cli-models")
    return {"sd": tiny_models.tiny_sd(root / "sd"), "variation": tiny_models.tiny_sd_variation(root / "variation"),
            "dit": tiny_models.tiny_dit(root / "dit"), "blip": tiny_models.tiny_blip(root / "blip")}


def _pngs(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(pathlib.Path(root).rglob("*.png"))}


def _files(root):
    root = pathlib.Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _generate(capsys, out, *args):
    """`genrobust generate ... --device cpu --out OUT` in process; exit 0; (manifest rows, stdout)."""
    assert main(["generate", *args, "--device", "cpu", "--out", str(out)]) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    return read_jsonl(out / "metadata.jsonl"), stdout


# --- a run killed with SIGKILL resumes to the uninterrupted result, bit for bit ------------------------

# 120 images in 15 fixed batches of 8. With 6 steps the images take ~2 s after the ~7 s start-up: room to
# kill between two batches. The processes use one thread each so that every one computes the same bits.
KILL_STEPS = "6"


def _digits_argv(generator_dir, out):
    return [sys.executable, "-m", "genrobust.cli", "generate", "--generator-path", str(generator_dir),
            "--steps", KILL_STEPS, "--per-class", "30", "--classes", "0,1,2,3", "--batch-size", "8",
            "--device", "cpu", "--out", str(out)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}


def _lines(path):
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _run_and_kill(argv, out, at_least, timeout=180):
    """Start the command, SIGKILL it once `shards/rank0.jsonl` has `at_least` rows; the rows it had."""
    shard = out / "shards" / "rank0.jsonl"
    proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while (n := _lines(shard)) < at_least:
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) at {n} rows, before the kill: " \
                                        "make it larger (--per-class or --steps)"
            assert time.monotonic() < deadline, f"no {at_least} rows in {shard} after {timeout} s"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metadata.jsonl").exists(), "the run finished before the kill: make it larger"
    return n


def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, tiny_generator_dir):
    a, b = tmp_path / "A", tmp_path / "B"
    # the uninterrupted run goes alongside the killed ones (one thread each)
    whole = subprocess.Popen(_digits_argv(tiny_generator_dir, b), env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        first = _run_and_kill(_digits_argv(tiny_generator_dir, a), a, 12)
        assert 12 <= first < 120
        # the resumed run is killed too, at a later moment
        second = _run_and_kill(_digits_argv(tiny_generator_dir, a), a, first + 48)
        assert first + 48 <= second < 120
        done = subprocess.run(_digits_argv(tiny_generator_dir, a), env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().endswith(f"120 images (label) in {a}")
        assert "resuming" in done.stderr  # logged by the runner: the second rerun did pick up the folder
    finally:
        out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-3000:]

    assert (a / "metadata.jsonl").read_bytes() == (b / "metadata.jsonl").read_bytes()
    pngs = _pngs(a)
    assert len(pngs) == 120 and len(read_jsonl(a / "metadata.jsonl")) == 120
    assert pngs == _pngs(b)
    leftovers = [f for f in _files(a) if pathlib.PurePosixPath(f).name.startswith(".") or f.endswith(".tmp")]
    assert leftovers == []
    assert _files(a) == _files(b)
    # every request once in the shard file, though three processes appended to it
    keys = [json.loads(line)["_key"] for line in (a / "shards" / "rank0.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 120
    card = json.loads((a / "dataset_card.json").read_text())
    assert card["num_images"] == 120 and card["counts"] == {c: 30 for c in "0123"}
    assert card["metadata_sha256"] == json.loads((b / "dataset_card.json").read_text())["metadata_sha256"]


# --- text-to-image ------------------------------------------------------------------------------------

def test_text2img_templates(capsys, tmp_path, models):
    out = tmp_path / "t2i"
    rows, stdout = _generate(capsys, out, "--generator", "text2img", "--model", str(models["sd"]), "--strategy",
                             "templates", "--classes", "cat,dog", "--per-class", "2", "--steps", "2", "--height",
                             "32", "--width", "32", "--batch-size", "4")
    assert stdout.strip() == f"4 images (templates) in {out}"
    assert len(rows) == 4 and len(_pngs(out)) == 4
    revision = file_sha256(models["sd"] / "unet" / "diffusion_pytorch_model.safetensors")
    templates = imagenet_prompts().templates
    for r in rows:
        assert (r["generator"], r["scheduler"], r["steps"], r["guidance_scale"]) == \
               ("text2img", "DDIMScheduler", 2, 7.5)
        assert (r["height"], r["width"], r["dtype"], r["revision"]) == (32, 32, "float32", revision)
        assert r["strength"] is None and r["source_image"] is None and r["caption"] is None
        assert r["strategy"] == "templates"
        assert r["prompt"] in {t.format(r["class_name"]) for t in templates}
        with Image.open(out / r["file_name"]) as im:
            assert (im.size, im.mode) == ((32, 32), "RGB")
    assert [r["class_name"] for r in rows] == ["cat", "cat", "dog", "dog"]
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["generator"]["model"] == str(models["sd"]) and card["generation"]["generator"] == "text2img"
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["generator"] == "text2img" and cfg["model"] == str(models["sd"])


def test_text2img_scheduler_is_recorded(capsys, tmp_path, models):
    out = tmp_path / "dpm"
    rows, _ = _generate(capsys, out, "--generator", "text2img", "--model", str(models["sd"]), "--scheduler",
                        "dpm-solver++", "--classes", "cat", "--per-class", "1", "--steps", "2", "--height", "32",
                        "--width", "32")
    assert [r["scheduler"] for r in rows] == ["DPMSolverMultistepScheduler"]
    assert rows[0]["prompt"] == "a photo of a cat."  # the default strategy: label
    assert json.loads((out / "run.json").read_text())["generator"]["scheduler"] == "dpm-solver++"


def test_text2img_errors(capsys, tmp_path, models):
    base = ["generate", "--generator", "text2img", "--classes", "cat", "--per-class", "1", "--device", "cpu"]
    line = fails(capsys, [*base, "--model", str(models["sd"]), "--scheduler", "heun", "--out", str(tmp_path / "a")])
    assert "unknown scheduler 'heun'; choose from: ddim, dpm-solver++" in line
    line = fails(capsys, [*base, "--out", str(tmp_path / "b")])
    assert "generator 'text2img' needs --model" in line
    missing = tmp_path / "no-such-model"
    line = fails(capsys, [*base, "--model", str(missing), "--out", str(tmp_path / "c")])
    assert f"no model folder at {missing}" in line
    line = fails(capsys, [*base, "--model", str(models["sd"]), "--strategy", "image", "--out", str(tmp_path / "d")])
    assert "generator 'text2img' cannot run strategy 'image'" in line and "'label', 'templates'" in line
    assert not any((tmp_path / d).exists() for d in "abcd")  # nothing written by a refused command


# --- generators that start from real images, and the class-conditional one -----------------------------

@pytest.fixture
def source(tiny_images):
    return tiny_images("src", classes=("cat", "dog"), per_class=2)


def test_img2img_image_label(capsys, tmp_path, models, source):
    out = tmp_path / "i2i"
    rows, stdout = _generate(capsys, out, "--generator", "img2img", "--model", str(models["sd"]), "--strategy",
                             "image-label", "--source", f"imagefolder:{source}", "--classes", "cat,dog",
                             "--per-image", "1", "--strength", "0.5", "--steps", "2", "--height", "32", "--width",
                             "32")
    assert stdout.strip() == f"4 images (image-label) in {out}" and len(_pngs(out)) == 4
    assert [r["source_image"] for r in rows] == ["cat/img00.png", "cat/img01.png", "dog/img00.png",
                                                 "dog/img01.png"]
    for r in rows:
        assert r["generator"] == "img2img" and r["strength"] == 0.5 and r["steps"] == 2
        assert r["prompt"] == f"a photo of a {r['class_name']}."
        with Image.open(out / r["file_name"]) as im:
            assert im.size == (32, 32)
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["source"] == f"imagefolder:{source}" and card["per_image"] == 1


def test_image_variation(capsys, tmp_path, models, source):
    out = tmp_path / "var"
    rows, _ = _generate(capsys, out, "--generator", "image-variation", "--model", str(models["variation"]),
                        "--strategy", "image", "--source", f"imagefolder:{source}", "--classes", "cat,dog",
                        "--per-image", "1", "--steps", "2", "--height", "32", "--width", "32")
    assert len(rows) == 4 and len(_pngs(out)) == 4
    assert sorted(r["source_image"] for r in rows) == ["cat/img00.png", "cat/img01.png", "dog/img00.png",
                                                       "dog/img01.png"]
    for r in rows:
        assert r["generator"] == "image-variation" and r["prompt"] is None and r["strength"] is None
        assert r["guidance_scale"] == 3.0 and r["source_image"].startswith(r["class_name"] + "/")


def test_class_conditional(capsys, tmp_path, models):
    out = tmp_path / "dit"
    rows, stdout = _generate(capsys, out, "--generator", "class-conditional", "--model", str(models["dit"]),
                             "--strategy", "class", "--classes", "tench,goldfish", "--per-class", "2", "--steps",
                             "2")
    assert stdout.strip() == f"4 images (class) in {out}" and len(_pngs(out)) == 4
    assert [r["class_name"] for r in rows] == ["tench", "tench", "goldfish", "goldfish"]
    assert [r["label"] for r in rows] == [0, 0, 1, 1]  # labels are the run's, not ImageNet's ids
    for r in rows:
        assert r["generator"] == "class-conditional" and r["prompt"] is None and r["source_image"] is None
        assert (r["height"], r["width"], r["guidance_scale"]) == (32, 32, 4.0)
    line = fails(capsys, ["generate", "--generator", "class-conditional", "--model", str(models["dit"]),
                          "--strategy", "class", "--classes", "tench,unicorn", "--per-class", "1", "--device", "cpu",
                          "--out", str(tmp_path / "bad")])
    assert "not 'unicorn'" in line


# --- captions -----------------------------------------------------------------------------------------

def test_captions(capsys, tmp_path, models, source):
    out = tmp_path / "cap"
    args = ["--generator", "text2img", "--model", str(models["sd"]), "--strategy", "captions", "--source",
            f"imagefolder:{source}", "--classes", "cat,dog", "--per-image", "1", "--steps", "2", "--height", "32",
            "--width", "32"]
    rows, stdout = _generate(capsys, out, *args, "--captioner-model", str(models["blip"]))
    assert stdout.strip() == f"4 images (captions) in {out}" and len(_pngs(out)) == 4
    for r in rows:
        assert isinstance(r["caption"], str)
        assert r["prompt"] == class_prompt(r["caption"], r["class_name"]) and r["class_name"] in r["prompt"]
    cached = read_jsonl(out / "captions" / "rank0.jsonl")
    assert {c["source_image"]: c["caption"] for c in cached} == {r["source_image"]: r["caption"] for r in rows}
    assert json.loads((out / "dataset_card.json").read_text())["captioner"]["model"] == str(models["blip"])
    line = fails(capsys, ["generate", *args, "--device", "cpu", "--out", str(tmp_path / "no-captioner")])
    assert "strategy 'captions' needs --captioner-model" in line


# --- sharded runs and `genrobust generate merge` ------------------------------------------------------

def test_shards_and_merge(capsys, tmp_path, tiny_generator_dir):
    out = tmp_path / "sharded"
    args = ["generate", "--generator-path", str(tiny_generator_dir), "--steps", "2", "--per-class", "3",
            "--classes", "0,1,2", "--batch-size", "4", "--device", "cpu", "--out", str(out)]
    assert main([*args, "--shard", "0/2"]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith(f"shard done; {out} is merged when the last shard finishes")
    assert not (out / "metadata.jsonl").exists() and len(_pngs(out)) == 5  # requests 0, 2, 4, 6, 8
    line = fails(capsys, ["generate", "merge", str(out)])
    assert "4 of 9 requests are not done yet" in line
    assert not (out / "metadata.jsonl").exists()

    assert main([*args, "--shard", "1/2"]) == 0  # the last shard to finish merges
    assert capsys.readouterr().out.strip() == f"9 images (label) in {out}"
    rows = read_jsonl(out / "metadata.jsonl")
    assert len(rows) == 9 and {r["file_name"] for r in rows} == set(_pngs(out))
    manifest = (out / "metadata.jsonl").read_bytes()

    assert main(["generate", "merge", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"9 images merged into {out / 'metadata.jsonl'}"
    assert (out / "metadata.jsonl").read_bytes() == manifest
    assert main(["generate-merge", str(out)]) == 0  # the parser's own name for it
    capsys.readouterr()


@pytest.mark.parametrize("shard,message", [("3/2", "--shard 3/2: the shard index must be in 0..1"),
                                           ("0/0", "--shard 0/0: the number of shards must be at least 1"),
                                           ("x", "--shard takes I/N"), ("1/2/3", "--shard takes I/N")])
def test_bad_shard(capsys, tmp_path, tiny_generator_dir, shard, message):
    out = tmp_path / "g"
    line = fails(capsys, ["generate", "--generator-path", str(tiny_generator_dir), "--steps", "2", "--per-class",
                          "1", "--device", "cpu", "--shard", shard, "--out", str(out)])
    assert message in line
    assert not out.exists()


def test_merge_of_a_folder_without_a_plan(capsys, tmp_path):
    line = fails(capsys, ["generate", "merge", str(tmp_path)])
    assert "holds no generation plan (shards/plan.json)" in line


def test_list_captioners(capsys):
    assert main(["list", "captioners"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["blip"]


# --- fixes found by these tests ---------------------------------------------------------------------------

def test_merge_with_a_global_option_in_front(capsys, tmp_path, tiny_generator_dir):
    out = tmp_path / "g"
    assert main(["generate", "--generator-path", str(tiny_generator_dir), "--steps", "2", "--per-class", "1",
                 "--classes", "0", "--device", "cpu", "--out", str(out)]) == 0
    assert main(["-v", "generate", "merge", str(out)]) == 0
    assert "1 images merged" in capsys.readouterr().out


def test_another_captioner_model_is_another_run(capsys, tmp_path, models, source):
    args = ["--generator", "text2img", "--model", str(models["sd"]), "--strategy", "captions", "--source",
            f"imagefolder:{source}", "--classes", "cat", "--per-image", "1", "--steps", "2", "--height", "32",
            "--width", "32"]
    out = tmp_path / "cap"
    _generate(capsys, out, *args, "--captioner-model", str(models["blip"]))
    other = tiny_models.tiny_blip(tmp_path / "blip2", seed=1)
    line = fails(capsys, ["generate", *args, "--captioner-model", str(other), "--device", "cpu", "--out", str(out)])
    assert "other settings (captioner)" in line


def test_classes_come_from_the_source(capsys, tmp_path, tiny_generator_dir, tiny_images):
    src = tiny_images("digits", classes=("0", "1"), per_class=2, size=28, mode="L")
    rows, _ = _generate(capsys, tmp_path / "g", "--generator-path", str(tiny_generator_dir), "--steps", "2",
                        "--strategy", "image", "--source", f"imagefolder:{src}", "--per-image", "1")
    assert sorted({r["class_name"] for r in rows}) == ["0", "1"] and len(rows) == 4


def test_a_bad_strategy_fails_before_the_model_loads(capsys, tmp_path):
    for strategy, message in (("imag", "unknown strategy 'imag'"), ("image", "cannot run strategy 'image'")):
        line = fails(capsys, ["generate", "--generator", "text2img", "--model", str(tmp_path / "nowhere"),
                              "--strategy", strategy, "--out", str(tmp_path / "g")])
        assert message in line  # not the missing model: nothing was loaded


def test_merge_removes_temp_files_of_killed_writes(capsys, tmp_path, tiny_generator_dir):
    out = tmp_path / "g"
    args = ["generate", "--generator-path", str(tiny_generator_dir), "--steps", "2", "--per-class", "2",
            "--classes", "0", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    (out / "metadata.jsonl").unlink()
    (out / "0" / "0000_000001.png").unlink()
    stale = out / "0" / ".0000_000001.png.4242.tmp"
    stale.write_bytes(b"half")
    assert main(args) == 0
    assert not stale.exists() and len(_pngs(out)) == 2
    capsys.readouterr()
