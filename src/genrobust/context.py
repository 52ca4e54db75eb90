"""The process context: rank, local rank, world size, the device this process uses and how many CPUs it may.

Every stage asks this module rather than reading the environment itself. Launchers describe a process through
environment variables: torchrun and `accelerate launch` set RANK, LOCAL_RANK and WORLD_SIZE; Slurm sets
SLURM_CPUS_PER_TASK; a job scheduler or container restricts the CPUs through the affinity mask and cgroups,
which `os.cpu_count()` ignores.
"""
import dataclasses
import os
import pathlib


@dataclasses.dataclass(frozen=True)
class ProcessContext:
    """Where this process stands: its global rank, its rank on this node, the number of processes, its device."""

    rank: int
    local_rank: int
    world_size: int
    device: str

    @property
    def is_main(self):
        return self.rank == 0


def _env_int(name, default):
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; unset it or fix the "
                         "launcher that set it") from None


def rank():
    return _env_int("RANK", 0)


def local_rank():
    return _env_int("LOCAL_RANK", 0)


def world_size():
    return _env_int("WORLD_SIZE", 1)


def local_world_size():
    return _env_int("LOCAL_WORLD_SIZE", 1)


def is_main():
    """Whether this is rank 0, the process that writes shared files and prints the summary."""
    return rank() == 0


def _cgroup_cpus():
    """CPUs a cgroup v2 quota allows (`cpu.max` "quota period"), or None when unlimited or unknown."""
    try:
        quota, period = pathlib.Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(int(quota) // int(period)))


def available_cpus():
    """CPUs this process may use: the affinity mask, capped by a cgroup quota and Slurm's CPUs per task."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    for limit in (_cgroup_cpus(), _env_int("SLURM_CPUS_PER_TASK", None)):
        if limit:
            n = min(n, limit)
    return max(1, n)


def default_workers(cap=8):
    """DataLoader workers for one process: the CPUs it may use, less one for the main process, at most `cap`.
    Several processes on one node (torchrun) share the node's CPUs, so each takes its share."""
    per_process = available_cpus() // max(1, local_world_size())
    return max(0, min(cap, per_process - 1))


def resolve_device(requested="auto", local=None, cuda_count=None):
    """The device this process uses, as a string.

    `auto` is CUDA when a GPU is visible, else CPU. A bare `cuda` under a launcher becomes `cuda:LOCAL_RANK`, so
    that each rank of a node takes its own GPU; an explicit index (`cuda:1`) is kept as given.

    Args:
        requested: "auto", "cpu", "cuda", "cuda:N", "mps", ...
        local: the local rank (default: LOCAL_RANK from the environment).
        cuda_count: GPUs visible to this process (default: torch.cuda.device_count()).
    """
    requested = str(requested or "auto")
    if requested not in ("auto", "cuda"):
        return requested
    if cuda_count is None:
        import torch
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_count == 0:
        if requested == "cuda":
            raise ValueError("--device cuda, but no GPU is visible to this process (CUDA_VISIBLE_DEVICES, "
                             "driver); use --device cpu or auto")
        return "cpu"
    local = local_rank() if local is None else local
    if local >= cuda_count:
        raise ValueError(f"LOCAL_RANK {local} but only {cuda_count} GPU(s) are visible to this process; start "
                         "at most one process per GPU (torchrun --nproc_per_node)")
    return f"cuda:{local}"


def current(device="auto"):
    """This process's context, with `device` resolved as `resolve_device` does."""
    return ProcessContext(rank(), local_rank(), world_size(), resolve_device(device))


def visible_gpus():
    """The GPU ids a child process may be given: CUDA_VISIBLE_DEVICES's entries, else 0..count-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def gpu_for_worker(index, gpus):
    """Round-robin: worker `index` of a study's `--jobs` gets one GPU id of `gpus` (None when there are none)."""
    return gpus[index % len(gpus)] if gpus else None
