"""Running study cells in other processes: `jobs` long-lived workers on this machine, torchrun or accelerate
launch for cells that ask for several processes.

A worker (`genrobust study CONFIG --out OUT --worker`) reads cell indices on stdin, runs each cell with its
output in `logs/<cell>.log`, scores a trained model right away, and answers `cell INDEX STATUS` on stdout. One
process per slot rather than one per cell: starting Python, importing torch and timm and loading the digits
data took ~9 s of every cell's ~45 s in the digits study (bench/RESULTS.md).
"""
import contextlib
import logging
import os
import pathlib
import queue
import subprocess
import sys
import threading
import time

from .. import context

logger = logging.getLogger(__name__)

OK, FAILED, UNSCORED = 0, 1, 2  # a worker's answer per cell: done, failed, trained but scoring failed


def _child_device(device):
    """The --device a child is given. A child sees only its own GPUs (`child_env`), so any CUDA device becomes
    "cuda", which each of its ranks resolves to cuda:LOCAL_RANK; "cuda:0" would put every rank on one GPU."""
    return "cuda" if str(device).startswith("cuda") else str(device)


def child_env(slot, jobs, device, processes=1, gpus=None, base=None):
    """The environment of a study's child process (a worker, or a launched cell of `processes` ranks).

    Its threads are its share of the CPUs this process may use (`jobs` children at once, `processes` ranks
    each). On CUDA it gets `processes` GPUs of `gpus` (default: the visible ones) round-robin from position
    `slot`, as CUDA_VISIBLE_DEVICES; an index in --device is not kept, since each child counts from 0.
    """
    env = dict(os.environ if base is None else base)
    env["OMP_NUM_THREADS"] = str(max(1, context.available_cpus() // (jobs * processes)))
    if str(device).startswith("cuda"):
        gpus = context.visible_gpus() if gpus is None else gpus
        if len(gpus) < processes:
            raise ValueError(f"a cell of {processes} processes needs {processes} GPUs, but {len(gpus)} are visible "
                             f"({gpus}); lower `processes` in the study config or make more GPUs visible")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(context.gpu_for_worker(slot + i, gpus) for i in range(processes))
    return env


def cell_command(c, config_path, out, device, cfg):
    """The command line that runs one cell in its own process(es): `genrobust study CONFIG --cell-index I`,
    under torchrun or accelerate launch when the config asks for several processes."""
    base = ["-m", "genrobust.cli", "study", str(config_path), "--out", str(out), "--cell-index", str(c.index),
            "--device", _child_device(device), "--quiet"]
    n = _processes(c, cfg)
    if n == 1:
        return [sys.executable, *base]
    if cfg["launcher"] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *base]
    # --multi_gpu is accelerate's torchrun launcher (it runs on CPU too); a port of its own, since two cells
    # may launch at once; genrobust sets mixed precision itself (--amp)
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *base]


def _free_port():
    """A TCP port free on loopback now (the launcher binds it a moment later)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(config_path, out, device):
    return [sys.executable, "-m", "genrobust.cli", "study", str(config_path), "--out", str(out), "--worker",
            "--device", _child_device(device), "--quiet"]


def _processes(c, cfg):
    return cfg["processes"] if c.kind in ("generation", "training") else 1


def cell_log(out, c):
    """Where a cell's output goes, whichever process runs it."""
    return pathlib.Path(out) / "logs" / f"{c.folder.name}.log"


class _Launched:
    """A cell in its own process(es): torchrun or accelerate launch."""

    def __init__(self, c, config_path, out, device, cfg, env):
        self.cell, self.log = c, open(cell_log(out, c), "ab")
        self.proc = subprocess.Popen(cell_command(c, config_path, out, device, cfg), env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def poll(self):
        rc = self.proc.poll()
        if rc is not None:
            self.log.close()
        return rc


class _Worker:
    """A long-lived worker process; a reader thread turns its answers into a queue."""

    def __init__(self, number, config_path, out, device, env, logs):
        self.cell, self.answers = None, queue.Queue()
        self.log = open(logs / f"worker-{number}.log", "ab")  # what a worker prints between cells
        self.proc = subprocess.Popen(worker_command(config_path, out, device), env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("cell "):  # `cell INDEX STATUS`
                self.answers.put(int(line.split()[2]))
        self.answers.put(None)  # the worker ended

    def start(self, c):
        self.cell = c
        with contextlib.suppress(OSError):  # a worker that died while idle: its reader reports the exit
            self.proc.stdin.write(f"{c.index}\n")
            self.proc.stdin.flush()

    def poll(self):
        """The cell's status once answered; a worker that died mid-cell answers with its exit code."""
        try:
            status = self.answers.get_nowait()
        except queue.Empty:
            return None
        if status is None:
            return self.proc.wait() or -1
        return status

    def alive(self):
        return self.proc.poll() is None

    def close(self):
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def run_in_processes(selected, config_path, out, device, jobs, cfg, progress, waiting):
    """Run cells in other processes, `jobs` at a time, each once its dependencies are cached; longest first
    among the ready ones (a short cell last keeps the tail short). A failed cell is reported with its log and
    does not stop the cells that do not depend on it. A model whose scoring failed counts as run: the study
    scores what is left in its own process afterwards, where the error surfaces. Returns (ran, skipped, failed)."""
    from tqdm.auto import tqdm

    todo = [c for c in selected if not c.cached()]
    skipped = [c.folder.name for c in todo if waiting(c)]
    todo = sorted((c for c in todo if not waiting(c)), key=lambda c: -c.estimate_s)
    logs = pathlib.Path(out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gpus = context.visible_gpus() if str(device).startswith("cuda") else []
    child_env(0, jobs, device, max((_processes(c, cfg) for c in todo), default=1), gpus)  # too few GPUs: now
    idle, running, ran, failed, bad = [], {}, [], [], set()
    spawned = slot = 0  # slot: the next GPU, round-robin over workers and launched cells alike
    bar = tqdm(total=len(todo), desc="study cells", unit="cell", disable=not progress)
    try:
        while todo or running:
            for c in list(todo):
                if any(d.index in bad for d in c.deps):
                    todo.remove(c)
                    failed.append(f"{c.folder.name} (its input {c.deps[0].folder.name} failed)")
                    bad.add(c.index)
                elif len(running) < jobs and all(d.cached() for d in c.deps):
                    todo.remove(c)
                    n = _processes(c, cfg)
                    if n > 1:
                        env = child_env(slot, jobs, device, n, gpus)
                        running[c.index], slot = _Launched(c, config_path, out, device, cfg, env), slot + n
                        continue
                    if idle:
                        worker = idle.pop()
                    else:
                        env = child_env(slot, jobs, device, 1, gpus)
                        worker, spawned = _Worker(spawned, config_path, out, device, env, logs), spawned + 1
                        slot += 1
                    worker.start(c)
                    running[c.index] = worker
            for i, job in list(running.items()):
                status = job.poll()
                if status is None:
                    continue
                c = job.cell
                del running[i]
                bar.update(1)
                if isinstance(job, _Worker):
                    if job.alive():
                        job.cell = None
                        idle.append(job)
                    else:
                        job.close()
                if status in (OK, UNSCORED) and c.cached():
                    ran.append(c.folder.name)
                else:
                    bad.add(c.index)
                    failed.append(f"{c.folder.name} (exit {status}; log {cell_log(out, c)})")
            time.sleep(0.1)
    finally:
        bar.close()
        for job in running.values():  # only when interrupted
            job.proc.kill()
        for job in [*idle, *running.values()]:
            if isinstance(job, _Worker):
                job.close()
    return ran, skipped, failed


@contextlib.contextmanager
def _output_to(path):
    """Send this process's stdout and stderr (Python's and native code's) to `path` for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def serve(cfg, out, device="cpu", progress=False):
    """The worker loop: run the cell named on each input line, answer `cell INDEX STATUS` on the original
    stdout. Each cell's output goes to its own log; an exception fails that cell, not the worker."""
    from .cells import evaluate_cell, run_cell
    from .plan import plan

    answer = os.fdopen(os.dup(1), "w", buffering=1)  # the answers' own channel; any other output ...
    sys.stdout.flush()
    os.dup2(2, 1)  # ... goes to the worker's log
    cells = plan(cfg, out)
    for line in sys.stdin:
        c = cells[int(line)]
        status = OK
        with _output_to(cell_log(out, c)):
            try:
                if not c.cached():
                    run_cell(c, cfg, device, progress)
            except Exception:
                logger.exception("cell %s failed", c.folder.name)
                status = FAILED
            if status == OK and c.kind == "training":
                try:
                    evaluate_cell(c, cfg, pathlib.Path(out) / "results.jsonl", device)
                except Exception:
                    logger.exception("cell %s: scoring its model failed", c.folder.name)
                    status = UNSCORED
        answer.write(f"cell {c.index} {status}\n")
    answer.close()
