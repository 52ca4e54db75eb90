"""The process context: devices per rank, CPUs a process may use, and the environments of a study's children.

No GPU here: the GPU count is monkeypatched, and a 2-process torchrun run (gloo, CPU) pretends each rank sees two
GPUs and records the device every stage resolves.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from genrobust import context
from genrobust.study import workers as study_jobs

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this process sees `n` GPUs (torch.cuda.is_available / device_count)."""
    def set_count(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_count


# --- devices -----------------------------------------------------------------------------------------------

def test_resolve_device_exactly(monkeypatch, gpus):
    assert context.resolve_device("auto", local=0, cuda_count=0) == "cpu"
    assert context.resolve_device("cuda", local=1, cuda_count=2) == "cuda:1"
    assert context.resolve_device("auto", local=1, cuda_count=2) == "cuda:1"
    assert context.resolve_device("cuda:1", local=0, cuda_count=2) == "cuda:1"  # an explicit index is kept
    assert context.resolve_device("cpu", local=1, cuda_count=2) == "cpu"
    assert context.resolve_device(None, local=0, cuda_count=0) == "cpu"
    assert context.resolve_device(torch.device("cuda"), local=1, cuda_count=2) == "cuda:1"
    # from the environment, as a launched rank sees it
    monkeypatch.setenv("LOCAL_RANK", "1")
    gpus(2)
    assert context.resolve_device("cuda") == "cuda:1"
    assert context.resolve_device("auto") == "cuda:1"
    gpus(0)
    assert context.resolve_device("auto") == "cpu"


def test_resolve_device_errors_name_the_fix(monkeypatch, gpus):
    with pytest.raises(ValueError, match=r"LOCAL_RANK 2 but only 2 GPU\(s\) are visible.*--nproc_per_node"):
        context.resolve_device("cuda", local=2, cuda_count=2)
    with pytest.raises(ValueError, match="--device cuda, but no GPU is visible.*use --device cpu"):
        context.resolve_device("cuda", local=0, cuda_count=0)
    gpus(0)
    with pytest.raises(ValueError, match="no GPU is visible"):
        context.resolve_device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "one")
    gpus(2)
    with pytest.raises(ValueError, match="LOCAL_RANK='one' is not an integer"):
        context.resolve_device("cuda")


def test_current_reads_the_launcher_environment(monkeypatch, gpus):
    assert context.current("cpu") == context.ProcessContext(0, 0, 1, "cpu")
    for k, v in {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(k, v)
    gpus(2)
    ctx = context.current("auto")
    assert ctx == context.ProcessContext(3, 1, 4, "cuda:1") and not ctx.is_main and not context.is_main()


# --- CPUs and workers --------------------------------------------------------------------------------------

@pytest.fixture
def cpus(monkeypatch):
    """Pretend the affinity mask holds `n` CPUs, with no cgroup quota and no Slurm limit."""
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(context, "_cgroup_cpus", lambda: None)

    def set_count(n):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))
    return set_count


def test_available_cpus_honours_affinity_cgroup_and_slurm(monkeypatch, cpus):
    cpus(6)
    assert context.available_cpus() == 6
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert context.available_cpus() == 3
    monkeypatch.setattr(context, "_cgroup_cpus", lambda: 2)
    assert context.available_cpus() == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")  # a limit above the mask does not raise it
    monkeypatch.setattr(context, "_cgroup_cpus", lambda: None)
    assert context.available_cpus() == 6
    cpus(1)
    assert context.available_cpus() == 1


def test_default_workers_share_the_cpus(monkeypatch, cpus):
    cpus(6)
    assert context.default_workers() == 5
    assert context.default_workers(cap=4) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this node: 3 CPUs each
    assert context.default_workers() == 2
    cpus(12)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert context.default_workers() == 1
    cpus(1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert context.default_workers() == 0


def test_cli_worker_defaults_come_from_the_context(monkeypatch, cpus):
    from genrobust.cli import build_parser

    cpus(5)
    assert build_parser().parse_args(["evaluate", "ck"]).workers == 4
    assert build_parser().parse_args(["train", "--real", "digits-mnist/train"]).workers == 4
    cpus(1)
    assert build_parser().parse_args(["evaluate", "ck"]).workers == 0
    assert build_parser().parse_args(["train", "--real", "digits-mnist/train"]).workers == 1  # streaming needs one


def test_visible_gpus(monkeypatch, gpus):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert context.visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert context.visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    gpus(3)
    assert context.visible_gpus() == ["0", "1", "2"]
    assert [context.gpu_for_worker(i, ["0", "1"]) for i in range(4)] == ["0", "1", "0", "1"]
    assert context.gpu_for_worker(0, []) is None


# --- the environments of a study's children ----------------------------------------------------------------

def test_child_env_gives_gpus_round_robin_and_a_share_of_the_cpus(monkeypatch):
    monkeypatch.setattr(context, "available_cpus", lambda: 6)
    envs = [study_jobs.child_env(i, 3, "cuda:0", gpus=["0", "1"], base={}) for i in range(3)]
    assert envs == [{"OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": g} for g in ("0", "1", "0")]
    two = study_jobs.child_env(1, 1, "cuda", processes=2, gpus=["0", "1", "2"], base={})
    assert two == {"OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "1,2"}
    assert study_jobs.child_env(0, 4, "cpu", base={"A": "1"}) == {"A": "1", "OMP_NUM_THREADS": "1"}  # no GPUs
    with pytest.raises(ValueError, match="a cell of 3 processes needs 3 GPUs, but 2 are visible"):
        study_jobs.child_env(0, 1, "cuda", processes=3, gpus=["0", "1"], base={})


class _Cell:
    def __init__(self, index, kind="evaluation"):
        self.index, self.kind, self.deps, self.estimate_s, self.done = index, kind, [], 1.0, False
        self.folder = pathlib.Path(f"cell-{index}")

    def cached(self):
        return self.done


def test_study_workers_and_launched_cells_get_their_gpus(tmp_path, monkeypatch):
    """run_in_processes with fake children: what each would be started with (command, environment)."""
    started = []

    class FakeWorker:
        def __init__(self, number, config_path, out, device, env, logs):
            started.append((study_jobs.worker_command(config_path, out, device), env))
            self.cell, self.proc = None, None

        def start(self, c):
            self.cell, c.done = c, True

        def poll(self):
            return study_jobs.OK

        def alive(self):
            return True

        def close(self):
            pass

    class FakeLaunched:
        def __init__(self, c, config_path, out, device, cfg, env):
            started.append((study_jobs.cell_command(c, config_path, out, device, cfg), env))
            self.cell, self.proc, c.done = c, None, True

        def poll(self):
            return study_jobs.OK

    monkeypatch.setattr(study_jobs, "_Worker", FakeWorker)
    monkeypatch.setattr(study_jobs, "_Launched", FakeLaunched)
    monkeypatch.setattr(context, "available_cpus", lambda: 6)
    monkeypatch.setattr(context, "visible_gpus", lambda: ["0", "1"])
    cfg = {"processes": 1, "launcher": "torchrun"}
    ran, _, failed = study_jobs.run_in_processes([_Cell(i) for i in range(3)], "s.yaml", tmp_path, "cuda:0", 3,
                                                 cfg, False, waiting=lambda c: False)
    assert len(ran) == 3 and not failed
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["0", "1", "0"]
    assert {env["OMP_NUM_THREADS"] for _, env in started} == {"2"}
    for cmd, _ in started:  # each child counts its own GPUs from 0: "cuda", never the parent's "cuda:0"
        assert cmd[cmd.index("--device") + 1] == "cuda"

    started.clear()
    cfg = {"processes": 2, "launcher": "torchrun"}
    study_jobs.run_in_processes([_Cell(0, "training")], "s.yaml", tmp_path, "cuda:0", 1, cfg, False,
                                waiting=lambda c: False)
    (cmd, env), = started
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["OMP_NUM_THREADS"] == "3"
    assert "torch.distributed.run" in cmd and cmd[cmd.index("--device") + 1] == "cuda"
    with pytest.raises(ValueError, match="a cell of 3 processes needs 3 GPUs"):
        study_jobs.run_in_processes([_Cell(0, "training")], "s.yaml", tmp_path, "cuda:0", 1,
                                    {"processes": 3, "launcher": "torchrun"}, False, waiting=lambda c: False)

    started.clear()
    monkeypatch.setattr(context, "visible_gpus", lambda: pytest.fail("no GPU is looked up on CPU"))
    study_jobs.run_in_processes([_Cell(i) for i in range(2)], "s.yaml", tmp_path, "cpu", 2,
                                {"processes": 1, "launcher": "torchrun"}, False, waiting=lambda c: False)
    for cmd, env in started:  # on CPU the children inherit the GPU setting as it was
        assert env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
        assert cmd[cmd.index("--device") + 1] == "cpu" and env["OMP_NUM_THREADS"] == "3"
    assert len(started) == 2


# --- a 2-process torchrun run: every stage puts rank r on cuda:r -------------------------------------------

RANK_SCRIPT = textwrap.dedent('''
    """Under torchrun, pretend each rank sees 2 GPUs and record the device each stage resolves."""
    import json
    import pathlib
    import sys

    import torch
    import torch.distributed as dist

    out = pathlib.Path(sys.argv[1])
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 2
    seen = {}
    torch.cuda.set_device = lambda d: seen.setdefault("set_device", []).append(str(d))


    class Stop(Exception):
        pass


    def stop_with(key, arg=None):
        def record(*args, **kwargs):
            seen[key] = str(kwargs["device"] if arg is None else args[arg])
            raise Stop
        return record


    def until_stopped(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Stop:
            return
        raise AssertionError(f"{fn.__name__} did not reach the recorded call")


    from genrobust import cli, context
    from genrobust.generate import create_generator, digits_ddpm, runner

    rank = context.rank()
    # generate: the CLI's arguments -> the generator factory -> where its UNet is loaded, as `genrobust generate`
    # does (the loading itself is skipped: importing diffusers alone takes longer than all of this)
    def load(path, device):
        seen.setdefault("loaded", []).append(device)
        return None, None, {}


    digits_ddpm.load = load
    args = cli.build_parser().parse_args(["generate", "--out", str(out / "g"), "--device", "cuda"])
    gen = create_generator(args.generator, **cli._generator_kwargs(args))
    seen["generate"] = gen.device
    seen["generate_shard"] = list(runner._shard_of(None))

    # train: the trainer's own process-group and device step (the group exists already: gloo on this CPU)
    from genrobust import train as tr

    dist.init_process_group("gloo")
    r, world, device, started = tr._distributed("auto")
    seen["train"], seen["train_rank"] = str(device), [r, world, started]

    # evaluate: up to loading the checkpoint onto its device
    tr.load_checkpoint = stop_with("evaluate", 1)
    from genrobust.evaluate import evaluate

    until_stopped(evaluate, out / "ck", ["digits-mnist/test"], out / f"r{rank}.jsonl", device="cuda")

    # generator fine-tuning: up to digits-ddpm's training loop
    from genrobust.finetune import finetune

    digits_ddpm.styled_set = lambda spec, style: (torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.arange(10),
                                                  None)
    digits_ddpm.train = stop_with("finetune")
    until_stopped(finetune, "digits-ddpm", "digits-mnist/train", out / f"ft{rank}", steps=1, device="cuda")

    # testset build: up to creating its generator
    import genrobust.generate
    from genrobust.testset import build

    genrobust.generate.create_generator = stop_with("testset")
    spec = {"sources": [{"generator": "digits-ddpm", "strategy": "label", "per_class": 1}]}
    until_stopped(build, "ctx", "v1", spec, root=out / f"ts{rank}", device="cuda")

    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ranks_take_their_own_gpu_in_every_stage(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"torchrun 2 processes: {time.time() - t0:.1f} s")
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        gpu = f"cuda:{rank}"
        assert {k: seen[k] for k in ("generate", "train", "evaluate", "finetune", "testset")} == dict.fromkeys(
            ("generate", "train", "evaluate", "finetune", "testset"), gpu)
        assert seen["loaded"] == [gpu]  # the generator's UNet is loaded onto this rank's GPU
        assert seen["set_device"] == [gpu]
        assert seen["generate_shard"] == [rank, 2]
        assert seen["train_rank"] == [rank, 2, False]
