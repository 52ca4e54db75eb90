"""The study grid: config parsing, cache keys, controls, the dry-run plan, `--cells` slices, child processes,
the study's figures, and tiny end-to-end runs."""
import json
import pathlib

import pytest
import yaml

from genrobust.cli import main
from genrobust.study import load_study, plan, resolve_study, run_study, select_cells, step_matched_epochs
from genrobust.study.figures import bar_amount, bar_data, curve_data

CONFIGS = pathlib.Path(__file__).parents[1] / "configs"
NO_CONTROLS = {"step_matched": False, "retrieval": None}


def write_study(tmp_path, **overrides):
    cfg = {"name": "tiny", "real": "digits-mnist/train", "generator": {"name": "digits-ddpm", "steps": 2},
           "strategies": ["label"], "amounts": [0.03], "model": "test_resnet", "epochs": 1, "seeds": [0],
           "eval_sets": ["digits-mnist/test"], "per_class": 3, "train": {"batch_size": 64}, "controls": NO_CONTROLS}
    cfg.update(overrides)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def names(cells, kind="training"):
    return [c.folder.name[:-9] for c in cells if c.kind == kind]


def test_load_study_resolves_defaults(tmp_path):
    path = write_study(tmp_path, amounts=[0.5, 2, "generated-only"], per_class=None, strategies=["label", "image"])
    raw = yaml.safe_load(path.read_text())
    del raw["controls"]
    cfg = resolve_study(raw)
    assert cfg["per_class"] == 200  # ceil(2 x 1,000 real / 10 classes)
    assert cfg["classes"] == [str(i) for i in range(10)]
    assert cfg["augmentations"] == ["standard"]
    image = cfg["strategies"][1]
    assert image == {"name": "image", "strategy": "image", "generator": "default", "amounts": [0.5, 2, "generated-only"],
                     "source": "digits-mnist/train", "per_class": 200}  # image starts from the real images
    assert cfg["strategies"][0]["source"] is None
    # both controls by default; digits-ddpm's retrieval data is its own training data
    assert cfg["controls"] == {"step_matched": True, "retrieval": {"source": ["digits-mnist/pool", "digits-fonts/seen"],
                                                                   "amounts": [0.5, 2]}}


def test_resolving_the_recorded_config_gives_the_same_plan(tmp_path):
    cfg = load_study(write_study(tmp_path, amounts=[0, 0.5, "generated-only"], controls={}, seeds=[0, 1],
                                 augmentations=["standard", "augmix"]))
    recorded = {k: v for k, v in cfg.items() if k != "num_real"}
    again = resolve_study(yaml.safe_load(yaml.safe_dump(recorded)))
    assert [c.key for c in plan(again, tmp_path)] == [c.key for c in plan(cfg, tmp_path)]


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'epoch'") as e:
        load_study(write_study(tmp_path, epoch=3))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown train key 'lr_rate'"):
        load_study(write_study(tmp_path, train={"lr_rate": 0.1}))
    with pytest.raises(ValueError, match="amounts"):
        load_study(write_study(tmp_path, amounts=[-1]))
    with pytest.raises(ValueError, match="names generator 'sd'"):
        load_study(write_study(tmp_path, strategies=[{"strategy": "label", "generator": "sd"}]))
    with pytest.raises(ValueError, match="two arms would be called 'label'"):
        load_study(write_study(tmp_path, strategies=["label", "label"]))
    with pytest.raises(ValueError, match="retrieval needs a 'source'"):
        load_study(write_study(tmp_path, controls={"retrieval": {"amounts": [1]}}))
    with pytest.raises(ValueError, match=r"\$NO_SUCH_ROOT_XYZ, which is not set"):
        load_study(write_study(tmp_path, real="imagefolder:$NO_SUCH_ROOT_XYZ/train"))


def test_step_matched_epochs_match_the_largest_arm():
    # 5,000 images at batch 128: 40 steps an epoch, 15 epochs = 600 steps; real-only has 8 steps an epoch
    assert step_matched_epochs(1000, 5000, 128, 15) == 75
    assert step_matched_epochs(1000, 1000, 128, 15) == 15
    assert step_matched_epochs(1000, 1030, 64, 1) == 2  # 17 steps vs 16 an epoch: one more epoch


def test_plan_keys_are_stable_and_follow_their_inputs(tmp_path):
    path = write_study(tmp_path, augmentations=["standard", "randaugment"], amounts=[0, 0.5, "generated-only"],
                       seeds=[0, 1], controls={"retrieval": {"source": "digits-mnist/test"}})
    cfg = load_study(path)
    cells = plan(cfg, tmp_path / "out")
    assert [c.key for c in cells] == [c.key for c in plan(load_study(path), tmp_path / "out")]
    assert len({c.key for c in cells}) == len(cells)
    # 1 generation, 1 retrieval export; per seed: 2 real-only arms (k = 0 is the standard one), 1 strategy x 2
    # amounts, the step-matched arm and retrieval at k = 0.5
    kinds = [c.kind for c in cells]
    assert (kinds.count("generation"), kinds.count("retrieval"), kinds.count("training")) == (1, 1, 2 * 6)
    assert names(cells)[:6] == ["real-standard-s0", "real-randaugment-s0", "real+label-k0.5-s0", "label-only-s0",
                                "real-step-matched-s0", "real+retrieval-k0.5-s0"]
    arms = {c.arm for c in cells if c.kind == "training"}
    assert arms == {"real-standard", "real-randaugment", "real+label-k0.5", "label-only", "real-step-matched",
                    "real+retrieval-k0.5"}  # seeds share an arm: the report shows mean ± std
    sm = next(c for c in cells if c.arm == "real-step-matched")
    assert sm.inputs["epochs"] == 2 and sm.meta["epochs"] == 2  # 24 steps (1,500 at 64) vs 16 per real epoch
    assert cells[0].folder.name.endswith(cells[0].key[:8])

    more_epochs = plan({**cfg, "epochs": 2}, tmp_path / "out")
    assert [c.key for c in more_epochs[:2]] == [c.key for c in cells[:2]]  # data do not depend on the recipe
    assert all(a.key != b.key for a, b in zip(cells[2:], more_epochs[2:]))
    steps = plan({**cfg, "generator": {**cfg["generator"], "steps": 3}}, tmp_path / "out")
    changed = {c.folder.name[:-9] for c, d in zip(cells, steps) if c.key != d.key}
    assert changed == {"label", "real+label-k0.5-s0", "label-only-s0", "real+label-k0.5-s1", "label-only-s1"}


def test_strategy_entries_name_generators_and_their_own_amounts(tmp_path):
    path = write_study(tmp_path, amounts=[1, 2], per_class=None, generators={"slow": {"name": "digits-ddpm", "steps": 4}},
                       strategies=["label", {"name": "label-slow", "strategy": "label", "generator": "slow",
                                             "amounts": [1]}])
    cells = plan(load_study(path), tmp_path / "out")
    assert names(cells, "generation") == ["label", "label-slow"]
    assert names(cells) == ["real-standard-s0", "real+label-k1-s0", "real+label-k2-s0", "real+label-slow-k1-s0"]
    slow = next(c for c in cells if c.arm == "real+label-slow-k1")
    assert slow.deps[0].inputs["generator"]["steps"] == 4
    # each strategy generates what its largest amount draws: 2 x 1,000 and 1 x 1,000 images over 10 classes
    assert [c.inputs["per_class"] for c in cells if c.kind == "generation"] == [200, 100]
    # equal generation inputs share one cell: two names for the same generator and strategy
    same = plan(load_study(write_study(tmp_path, strategies=["label", {"name": "again", "strategy": "label"}])),
                tmp_path / "out")
    assert names(same, "generation") == ["label"] and len(names(same)) == 3


def test_cells_slices_cover_every_cell_once(tmp_path):
    cells = plan(load_study(write_study(tmp_path, amounts=[0.5, 1], seeds=[0, 1, 2])), tmp_path / "out")
    for n in (1, 2, 3):
        taken = [c.index for i in range(n) for c in select_cells(cells, f"{i}/{n}")]
        assert sorted(taken) == list(range(len(cells)))
    with pytest.raises(ValueError, match="--cells"):
        select_cells(cells, "2/2")


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["study", str(write_study(tmp_path)), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "3 cells: generation: 1 cells (0 cached); training: 2 cells (0 cached)" in text
    assert "to run" in text and "estimated" in text
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["study", str(write_study(tmp_path)), "--out", str(out), "--jobs", "0"])
    assert "argument --jobs: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        run_study(load_study(write_study(tmp_path)), out, jobs=0)
    assert not out.exists()


def test_tiny_study_end_to_end_in_slices_then_cached(tmp_path, tiny_generator_dir):
    path = write_study(tmp_path, generator={"name": "digits-ddpm", "steps": 2, "path": str(tiny_generator_dir)})
    cfg, out = load_study(path), tmp_path / "out"
    first = run_study(cfg, out, cells="0/2", progress=False)  # generation, then real+label (depends on it)
    assert [n[:-9] for n in first["ran"]] == ["label", "real+label-k0.03-s0"] and first["report"] is None
    second = run_study(cfg, out, cells="1/2", progress=False)
    assert [n[:-9] for n in second["ran"]] == ["real-standard-s0"]
    assert (out / "report.md").exists() and (out / "report.html").exists()
    assert yaml.safe_load((out / "study.yaml").read_text())["per_class"] == 3
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"real-standard", "real+label-k0.03"}
    assert {r["eval_set"] for r in rows} == {"digits-mnist/test"}

    again = run_study(cfg, out, progress=False)
    assert again["ran"] == [] and again["report"] is not None
    assert (out / "results.jsonl").read_text().count("\n") == len(rows)
    plan_text = []
    run_study(cfg, out, dry_run=True, echo=plan_text.append)
    assert "3 cells: generation: 1 cells (1 cached); training: 2 cells (2 cached); estimated 0 s" in plan_text[0]


def test_controls_and_seeds_end_to_end_with_figures(tmp_path, tiny_generator_dir):
    """Two seeds, both controls (retrieval drawn from a dataset the test names), curves and bars."""
    path = write_study(tmp_path, generator={"name": "digits-ddpm", "steps": 2, "path": str(tiny_generator_dir)},
                       amounts=[0, 0.03, 0.06], seeds=[0, 1], per_class=6,
                       controls={"retrieval": {"source": ["digits-fonts/seen"], "amounts": [0.06]}})
    cfg, out = load_study(path), tmp_path / "out"
    run_study(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    per_arm = {}
    for r in rows:
        per_arm.setdefault(r["model"], set()).add(r["checkpoint"])
    assert {a: len(c) for a, c in per_arm.items()} == {
        "real-standard": 2, "real+label-k0.03": 2, "real+label-k0.06": 2, "real-step-matched": 2,
        "real+retrieval-k0.06": 2}
    steps = {a: {json.loads((pathlib.Path(c) / "complete.json").read_text())["steps"] for c in cs}
             for a, cs in per_arm.items()}
    assert steps["real-standard"] == {16} and steps["real+label-k0.06"] == {17}  # 1,000 and 1,060 at batch 64
    assert steps["real-step-matched"] == {32}  # 2 real epochs: the fewest that reach 17 steps
    retrieval = next(pathlib.Path(c) for c in per_arm["real+retrieval-k0.06"])
    data = json.loads((retrieval / "data.json").read_text())
    assert "retrieval" in json.dumps(data)  # the added images come from the exported retrieval folder
    md = (out / "report.md").read_text()
    assert "## Study figures" in md and "(n=2)" in md
    assert "real-step-matched` trains on real data only for 2 epochs" in md
    for fig in ("amount-accuracy-digits-mnist-test.png", "bars-accuracy.png"):
        assert (out / "figures" / fig).read_bytes()[:4] == b"\x89PNG"


def test_figure_data_from_rows_exactly():
    arms = {"real-standard": {"group": "real", "amount": 0}, "real-augmix": {"group": "augmentation", "amount": 0},
            "real+label-k1": {"group": "strategy", "strategy": "label", "amount": 1},
            "real+label-k4": {"group": "strategy", "strategy": "label", "amount": 4},
            "label-only": {"group": "strategy", "strategy": "label", "amount": "generated-only"},
            "real+image-k1": {"group": "strategy", "strategy": "image", "amount": 1},
            "real+retrieval-k1": {"group": "retrieval", "strategy": "retrieval", "amount": 1}}
    values = {("real-standard", "uci"): [0.5, 0.7], ("real-augmix", "uci"): [0.6],
              ("real+label-k1", "uci"): [0.8], ("real+label-k4", "uci"): [0.9, 0.9],
              ("label-only", "uci"): [0.3], ("real+image-k1", "uci"): [0.25],
              ("real+retrieval-k1", "uci"): [0.65]}
    series, levels = curve_data(values, arms, "uci")
    real = (60.0, pytest.approx(14.142, abs=1e-3))  # k = 0: the real-only arm, mean ± std of its two seeds
    assert {k: (m, s) for k, m, s in series["label"]} == {0: real, 1: (80.0, 0.0), 4: (90.0, 0.0),
                                                          "generated-only": (30.0, 0.0)}
    assert {k: (m, s) for k, m, s in series["image"]} == {0: real, 1: (25.0, 0.0)}
    assert series["retrieval"][0] == (1, 65.0, 0.0) and levels == {"real-augmix": (60.0, 0.0)}
    assert bar_amount(arms) == 1  # label ran at 1 and 4, image at 1 only
    assert bar_amount(arms, 4) == 4
    bars = bar_data(values, arms, ["uci", "fonts"], 1)
    assert list(bars) == ["real-standard", "real-augmix", "real+label-k1", "real+image-k1", "real+retrieval-k1"]
    assert bars["real+label-k1"] == [(80.0, 0.0), None]


def test_cells_run_in_worker_processes_with_jobs(tmp_path, tiny_generator_dir):
    """jobs: 2 runs cells in two long-lived workers, each cell's output in its own log, each model scored by
    the worker that trained it; the checkpoints equal those of one fresh process per cell, bit for bit (a
    worker carries nothing from one cell into the next)."""
    import os
    import subprocess
    import sys

    path = write_study(tmp_path, generator={"name": "digits-ddpm", "steps": 2, "path": str(tiny_generator_dir)},
                       jobs=2, seeds=[0, 1])
    cfg, out = load_study(path), tmp_path / "out"
    done = run_study(cfg, out, progress=False)
    assert sorted(n[:-9] for n in done["ran"]) == ["label", "real+label-k0.03-s0", "real+label-k0.03-s1",
                                                   "real-standard-s0", "real-standard-s1"]
    assert not done["failed"] and (out / "report.md").exists()
    logs = {p.name for p in (out / "logs").glob("*.log")}
    assert {n for n in logs if n.startswith("worker-")} <= {"worker-0.log", "worker-1.log"}
    cells = plan(cfg, out)
    for c in cells[1:]:
        text = (out / "logs" / f"{c.folder.name}.log").read_text()
        assert "epoch 1/1" in text and f"{c.arm} on digits-mnist/test" in text  # trained and scored there
    fresh = tmp_path / "fresh"
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2)), "HF_HUB_OFFLINE": "1"}
    for c in plan(cfg, fresh):
        subprocess.run([sys.executable, "-m", "genrobust.cli", "study", str(out / "study.yaml"), "--out",
                        str(fresh), "--cell-index", str(c.index), "--quiet"], env=env, check=True,
                       capture_output=True)
    for a, b in zip(cells[1:], plan(cfg, fresh)[1:]):
        assert (a.folder / "model.safetensors").read_bytes() == (b.folder / "model.safetensors").read_bytes()


def test_a_worker_that_dies_fails_its_cell_and_the_study_goes_on(tmp_path, tiny_generator_dir, monkeypatch):
    """A worker process that exits mid-cell (a crash, the OOM killer) fails that cell with its exit code; the
    next ready cell gets a new worker."""
    import sys

    from genrobust.study import workers as study_jobs

    path = write_study(tmp_path, generator={"name": "digits-ddpm", "steps": 2, "path": str(tiny_generator_dir)},
                       jobs=2, seeds=[0, 1])
    cfg, out = load_study(path), tmp_path / "out"
    monkeypatch.setattr(study_jobs, "worker_command", lambda *a: [
        sys.executable, "-c", "import sys; sys.stdin.readline(); sys.exit(3)"])
    with pytest.raises(ValueError, match=r"5 study cell\(s\) failed") as e:
        run_study(cfg, out, progress=False)
    msg = str(e.value)
    assert msg.count("(exit 3; log ") == 3 and msg.count("(its input label-") == 2  # label, real-standard x 2
    assert sorted(p.name for p in (out / "logs").glob("worker-*.log")) == [
        "worker-0.log", "worker-1.log", "worker-2.log"]  # the third cell got a new worker


def test_a_failed_child_cell_is_reported_and_the_rest_kept(tmp_path, tiny_generator_dir):
    path = write_study(tmp_path, generator={"name": "digits-ddpm", "steps": 2, "path": str(tiny_generator_dir)},
                       jobs=2, train={"batch_size": 64, "lr": -1.0})  # the trainer refuses a negative lr
    cfg, out = load_study(path), tmp_path / "out"
    with pytest.raises(ValueError, match=r"2 study cell\(s\) failed: .*log .*\.log") as e:
        run_study(cfg, out, progress=False)
    assert "rerun the same command" in str(e.value)
    assert (out / "generated").is_dir() and plan(cfg, out)[0].cached()  # the generation cell is kept


@pytest.mark.parametrize("config", ["digits-study.yaml"])
def test_shipped_digits_study_config_plans_the_full_grid(tmp_path, config):
    cells = plan(load_study(CONFIGS / config), tmp_path / "out")
    kinds = [c.kind for c in cells]
    cfg = load_study(CONFIGS / config)
    assert {s["strategy"] for s in cfg["strategies"]} >= {"label", "templates", "image", "image-label"}
    assert set(cfg["augmentations"]) == {"standard", "randaugment", "augmix"} and len(cfg["seeds"]) >= 5
    assert cfg["baseline"] == {"zoo": "digits"} and cfg["controls"]["retrieval"] is not None
    assert kinds.count("baseline") == 1 and kinds.count("retrieval") == 1
    arms = {c.arm for c in cells if c.kind == "training"}
    assert "real-step-matched" in arms and any(a.startswith("real+retrieval") for a in arms)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_cells_run_under_torchrun_with_processes(tmp_path, tiny_generator_dir, launcher):
    """processes: 2 runs generation (sharded by rank, merged by rank 0) and training (DDP) in two processes,
    under torchrun and under `accelerate launch` (on CPU too: its --multi_gpu launcher is torchrun's)."""
    path = write_study(tmp_path, generator={"name": "digits-ddpm", "steps": 2, "path": str(tiny_generator_dir)},
                       processes=2, launcher=launcher)
    cfg, out = load_study(path), tmp_path / "out"
    done = run_study(cfg, out, progress=False)
    assert not done["failed"] and (out / "report.md").exists()
    gen = plan(cfg, out)[0]
    rows = [json.loads(line) for line in (gen.folder / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and len({r["file_name"] for r in rows}) == 30
    assert sorted(p.name for p in (gen.folder / "shards").glob("rank*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]
    for c in plan(cfg, out)[1:]:
        assert json.loads((c.folder / "complete.json").read_text())["world_size"] == 2


def test_a_finetuned_generator_beside_the_base_one(tmp_path, tiny_generator_dir):
    """`finetune:` adds a fine-tuning cell; the strategy entry that names that generator generates from its
    output, so base and fine-tuned arms sit side by side in one study."""
    base = {"name": "digits-ddpm", "steps": 2, "path": str(tiny_generator_dir)}
    tuned = {**base, "finetune": {"dataset": "digits-mnist/train", "steps": 2, "batch_size": 8, "save_every": 1}}
    path = write_study(tmp_path, generator=base, generators={"tuned": tuned},
                       strategies=["label", {"name": "label-tuned", "strategy": "label", "generator": "tuned"}])
    cfg, out = load_study(path), tmp_path / "out"
    cells = plan(cfg, out)
    assert [c.kind for c in cells[:3]] == ["finetune", "generation", "generation"]
    assert cells[2].deps == [cells[0]] and cells[1].deps == []
    run_study(cfg, out, progress=False)
    card = json.loads((cells[0].folder / "card.json").read_text())
    assert card["finetune"]["dataset"] == "digits-mnist/train"
    gen_card = json.loads((cells[2].folder / "run.json").read_text())
    assert str(cells[0].folder) in json.dumps(gen_card)  # generated from the fine-tuned weights
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"real-standard", "real+label-k0.03", "real+label-tuned-k0.03"}
    with pytest.raises(ValueError, match="unknown finetune key 'step'"):
        load_study(write_study(tmp_path, generator={**base, "finetune": {"dataset": "digits-mnist/train", "step": 2}}))


def test_a_killed_study_resumes_to_the_uninterrupted_result(tmp_path, tiny_generator_dir):
    """SIGKILL the study while a training cell is between epochs; the same command finishes it, and every
    checkpoint equals the one an uninterrupted study makes, bit for bit (all runs in one thread: thread counts
    change float reductions)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path = write_study(tmp_path, generator={"name": "digits-ddpm", "steps": 2, "path": str(tiny_generator_dir)},
                       epochs=4)
    cfg = load_study(path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = lambda out: [sys.executable, "-m", "genrobust.cli", "study", str(path), "--out", str(out), "--quiet"]  # noqa: E731
    subprocess.run(argv(whole), env=env, check=True, capture_output=True)
    proc = subprocess.Popen(argv(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = plan(cfg, killed)[1].folder / "checkpoints"  # the first training cell
    deadline = time.time() + 300
    while not any(target.glob("epoch-0002")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the study ended before it could be killed"
    assert not plan(cfg, killed)[1].cached()
    subprocess.run(argv(killed), env=env, check=True, capture_output=True)
    for a, b in zip(plan(cfg, whole), plan(cfg, killed)):
        if a.kind == "training":
            assert (a.folder / "model.safetensors").read_bytes() == (b.folder / "model.safetensors").read_bytes()
    rows = lambda out: sorted((r["model"], r["value"]) for r in map(json.loads, (out / "results.jsonl").open()))  # noqa: E731
    assert rows(whole) == rows(killed)
