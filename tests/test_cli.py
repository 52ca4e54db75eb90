"""The CLI, in process: listings, help, one-line errors for bad input, and end-to-end runs."""
import json

import pytest
import yaml

from genrobust.cli import main
from genrobust.data.folder import read_jsonl
from genrobust.generate.generators import SHIPPED
from helpers import fails

SUBCOMMANDS = [[], ["list"], ["datasets"], ["datasets", "list"], ["datasets", "export"], ["generator"],
               ["generator", "train"], ["generate"], ["train"], ["evaluate"], ["report"], ["quickstart"]]
DIGITS_SUITE = ["digits-mnist/test", "digits-uci", "digits-fonts/unseen"]


# --- listings and help -------------------------------------------------------------------------------

def test_list_strategies(capsys):
    assert main(["list", "strategies"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["captions", "class", "image", "image-label", "label",
                                                 "templates"]


def test_list_with_pattern(capsys):
    assert main(["list", "datasets", "digits-f*"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("digits-fonts ") and "(splits: seen, unseen)" in out[0]


def test_datasets_list(capsys):
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["digits-fonts", "digits-mnist", "digits-uci"]
    assert "(splits: train, pool, test)" in out


@pytest.mark.parametrize("sub", SUBCOMMANDS, ids=lambda s: " ".join(s) or "top")
def test_help_exits_0(capsys, sub):
    with pytest.raises(SystemExit) as e:
        main([*sub, "--help"])
    assert e.value.code == 0
    assert "usage: genrobust" in capsys.readouterr().out


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


# --- bad input: exit 2, one line naming the input, no traceback ---------------------------------------

@pytest.fixture
def real_folder(tiny_images):
    return tiny_images("real", classes=tuple("0123456789"), per_class=2)


def test_unknown_dataset(capsys, tmp_path):
    line = fails(capsys, ["train", "--real", "digits-mnst/train", "--out", str(tmp_path / "ck")])
    assert "unknown dataset 'digits-mnst'" in line and "did you mean 'digits-mnist'" in line


def test_unknown_split(capsys, tmp_path):
    line = fails(capsys, ["train", "--real", "digits-mnist/validation", "--out", str(tmp_path / "ck")])
    assert "no split 'validation'" in line


def test_unknown_generator(capsys, tmp_path):
    line = fails(capsys, ["generate", "--generator", "digits-dpm", "--out", str(tmp_path / "g")])
    assert "unknown generator 'digits-dpm'" in line and "did you mean 'digits-ddpm'" in line


def test_unknown_strategy(capsys, tmp_path, tiny_generator_dir):
    line = fails(capsys, ["generate", "--generator-path", str(tiny_generator_dir), "--steps", "2",
                          "--strategy", "lable", "--out", str(tmp_path / "g")])
    assert "'lable'" in line and "label" in line


def test_missing_generator_path(capsys, tmp_path):
    line = fails(capsys, ["generate", "--generator-path", str(tmp_path / "nope"), "--out", str(tmp_path / "g")])
    assert str(tmp_path / "nope") in line


def test_unknown_timm_model(capsys, tmp_path, real_folder):
    line = fails(capsys, ["train", "--real", f"imagefolder:{real_folder}", "--model", "test_resnt",
                          "--out", str(tmp_path / "ck")])
    assert "unknown timm model 'test_resnt'" in line and "test_resnet" in line


def test_missing_generated_folder(capsys, tmp_path, real_folder):
    missing = tmp_path / "no-such-folder"
    line = fails(capsys, ["train", "--real", f"imagefolder:{real_folder}", "--generated", str(missing),
                          "--model", "test_resnet", "--out", str(tmp_path / "ck")])
    assert str(missing) in line


def test_generated_folder_that_is_not_an_imagefolder(capsys, tmp_path, real_folder, tiny_images):
    flat = tiny_images("flat", classes=("x",))
    for f in (flat / "x").iterdir():
        f.rename(flat / f.name)
    line = fails(capsys, ["train", "--real", f"imagefolder:{real_folder}", "--generated", str(flat),
                          "--model", "test_resnet", "--out", str(tmp_path / "ck")])
    assert str(flat) in line and "ImageFolder" in line


def test_corrupt_image_in_generated_folder(capsys, tmp_path, real_folder, tiny_images):
    gen = tiny_images("gen", classes=("3", "4"))
    bad = gen / "4" / "img01.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    line = fails(capsys, ["train", "--real", f"imagefolder:{real_folder}", "--generated", str(gen),
                          "--model", "test_resnet", "--out", str(tmp_path / "ck")])
    assert f"unreadable image {bad}" in line


def test_train_negative_ratio(capsys, tmp_path):
    line = fails(capsys, ["train", "--ratio", "-1", "--out", str(tmp_path / "ck")])
    assert "--ratio must be >= 0" in line and "-1" in line


def test_quickstart_negative_ratio(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["quickstart", "--ratio", "-1", "--out", str(tmp_path / "q")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --ratio: must be >= 0, got -1" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


def test_evaluate_missing_checkpoint(capsys, tmp_path):
    line = fails(capsys, ["evaluate", str(tmp_path / "ck"), "--results", str(tmp_path / "r.jsonl")])
    assert str(tmp_path / "ck") in line


def test_report_missing_results(capsys, tmp_path):
    line = fails(capsys, ["report", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "rep")])
    assert str(tmp_path / "r.jsonl") in line


def test_verbose_reraises_for_debugging(tmp_path):
    from genrobust.registry import UnknownNameError
    with pytest.raises(UnknownNameError):
        main(["-v", "train", "--real", "digits-mnst", "--out", str(tmp_path / "ck")])


# --- datasets export ---------------------------------------------------------------------------------

def test_datasets_export(capsys, tmp_path):
    out = tmp_path / "mnist-test"
    assert main(["datasets", "export", "digits-mnist", "--split", "test", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 1000 images of digits-mnist/test to {out}"
    pngs = list(out.rglob("*.png"))
    assert len(pngs) == 1000
    assert sorted({p.parent.name for p in pngs}) == [str(i) for i in range(10)]
    rows = read_jsonl(out / "metadata.jsonl")
    assert len(rows) == 1000 and {r["file_name"] for r in rows} == {p.relative_to(out).as_posix() for p in pngs}


# --- end to end --------------------------------------------------------------------------------------

@pytest.fixture
def generated(tmp_path, tiny_generator_dir, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--generator-path", str(tiny_generator_dir), "--steps", "2", "--per-class", "10",
                 "--batch-size", "32", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"100 images (label) in {out}"
    return out


def test_generate_train_evaluate_report(capsys, tmp_path, generated, tiny_images):
    cfg = yaml.safe_load((generated / "config.yaml").read_text())
    assert cfg["command"] == "generate" and cfg["per_class"] == 10 and cfg["strategy"] == "label"
    assert len(read_jsonl(generated / "metadata.jsonl")) == 100

    ck = tmp_path / "real+label"
    assert main(["train", "--generated", str(generated), "--ratio", "0.1", "--model", "test_resnet",
                 "--epochs", "1", "--out", str(ck)]) == 0
    assert "trained test_resnet on digits-mnist/train + 0.1x gen (1100 images)" in capsys.readouterr().out
    info = json.loads((ck / "data.json").read_text())
    assert info["mode"] == "add" and info["num_images"] == 1100
    assert info["counts"]["generated"] == {str(c): 10 for c in range(10)}

    evalset = tiny_images("evalset", classes=("1", "7"), per_class=2)
    results = tmp_path / "res" / "results.jsonl"
    argv = ["evaluate", str(ck), "--eval-sets", f"imagefolder:{evalset}", "--results", str(results)]
    assert main(argv) == 0
    assert f"imagefolder:{evalset}" in capsys.readouterr().out
    rows = read_jsonl(results)
    assert len(rows) == 1 and rows[0]["model"] == "real+label" and rows[0]["n"] == 4
    assert rows[0]["train_data"] == "digits-mnist/train + 0.1x gen"
    assert (tmp_path / "res" / "results.evaluate.yaml").exists()
    assert main(argv) == 0
    assert "already scored" in capsys.readouterr().out
    assert len(read_jsonl(results)) == 1

    rep = tmp_path / "rep"
    assert main(["report", str(results), "--out", str(rep)]) == 0
    text = (rep / "report.md").read_text()
    assert f"| model | training data | augmentation | imagefolder:{evalset} |" in text
    assert f"| real+label | digits-mnist/train + 0.1x gen | standard | {100 * rows[0]['value']:.1f} |" in text


def test_train_ratio_needing_more_images_than_generated(capsys, tmp_path, generated):
    line = fails(capsys, ["train", "--generated", str(generated), "--ratio", "0.2", "--model", "test_resnet",
                          "--epochs", "1", "--out", str(tmp_path / "ck")])
    assert "has 10 images of class" in line and "ratio 0.2 needs 20" in line


def test_train_generated_only(capsys, tmp_path, generated):
    ck = tmp_path / "gen-only"
    assert main(["train", "--real", "none", "--generated", str(generated), "--model", "test_resnet",
                 "--epochs", "1", "--augmentation", "none", "--out", str(ck)]) == 0
    info = json.loads((ck / "data.json").read_text())
    assert info["mode"] == "generated-only" and info["num_images"] == 100


def test_rejected_generate_rerun_keeps_the_config(capsys, tiny_generator_dir, generated):
    line = fails(capsys, ["generate", "--generator-path", str(tiny_generator_dir), "--steps", "2",
                          "--per-class", "10", "--batch-size", "32", "--seed", "5", "--out", str(generated)])
    assert "other settings (seed)" in line
    assert yaml.safe_load((generated / "config.yaml").read_text())["seed"] == 0


def _quickstart(capsys, out, generator_args):
    argv = ["quickstart", "--out", str(out), "--per-class", "3", "--epochs", "1", "--model", "test_resnet",
            "--steps", "2", *generator_args, "--ratio", "0.03"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"results: {out / 'results.jsonl'}")

    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 9
    models = ["real", "real+label", "real+templates"]
    pairs = sorted((m, s) for m in models for s in DIGITS_SUITE)
    assert sorted((r["model"], r["eval_set"]) for r in rows) == pairs
    assert {r["eval_set"]: r["n"] for r in rows} == {"digits-mnist/test": 1000, "digits-uci": 1797,
                                                      "digits-fonts/unseen": 1800}
    assert all(0 <= r["value"] <= 1 for r in rows)
    for s in ("label", "templates"):
        assert len(read_jsonl(out / "generated" / s / "metadata.jsonl")) == 30
        info = json.loads((out / "models" / f"real+{s}" / "data.json").read_text())
        assert info["counts"]["generated"] == {str(c): 3 for c in range(10)}
        assert (out / "figures" / f"samples-{s}.png").stat().st_size > 0
    assert json.loads((out / "models" / "real" / "data.json").read_text())["mode"] == "real-only"

    report = (out / "report.md").read_text()
    assert "| model | training data | augmentation | " + " | ".join(DIGITS_SUITE) + " |" in report
    for m in models:
        assert f"\n| {m} | " in report
    assert "![label](figures/samples-label.png)" in report
    assert "![templates](figures/samples-templates.png)" in report
    assert "strategy templates, generator digits-ddpm" in report
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["ratio"] == 0.03

    # a rerun reuses every finished stage
    weights = out / "models" / "real+label" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert main(argv) == 0
    assert len(read_jsonl(out / "results.jsonl")) == 9
    assert weights.stat().st_mtime_ns == mtime


def test_quickstart_reduced(capsys, tmp_path, tiny_generator_dir):
    _quickstart(capsys, tmp_path / "quickstart", ["--generator-path", str(tiny_generator_dir)])


@pytest.mark.skipif(not (SHIPPED / "unet").exists(),
                    reason=f"no shipped digits-ddpm at {SHIPPED}/unet yet (train it with `genrobust generator "
                           "train` and copy it there)")
def test_quickstart_shipped_generator(capsys, tmp_path):
    _quickstart(capsys, tmp_path / "quickstart", [])


def test_version_and_verbose_logging_stays_in_genrobust(capsys):
    import logging

    import genrobust
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"genrobust {genrobust.__version__}"
    root = logging.getLogger().level
    assert main(["-v", "list", "datasets"]) == 0
    assert logging.getLogger("genrobust").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger().level == root  # the root logger is left alone
    assert logging.getLogger("PIL").getEffectiveLevel() > logging.DEBUG  # no library's debug lines


def test_robustness_without_er_says_why_in_its_error(tmp_path, capsys):
    import json
    rows = [{"model": "m", "checkpoint": "ck", "eval_set": "digits-uci", "role": "shift", "metric": "accuracy",
             "value": 0.5, "n": 10}]
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    zoo = tmp_path / "zoo.jsonl"
    zoo.write_text(results.read_text())
    line = fails(capsys, ["robustness", str(results), "--baseline", "testbed"])
    assert "no effective robustness could be computed: " in line and "see the warnings above" not in line
