"""Benchmarks write their tables into bench/RESULTS.md themselves, so that every number a reader sees there
comes from a command: each table sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->`, where NAME is the
script that writes it (bench/NAME.py or bench/NAME.sh), stamped with the commit, the machine, the date and the
command. tests/test_results_md.py checks that every marked section names a script that writes it.

Also: the statistics every benchmark reports (median and spread of repeated, interleaved runs, in random order).
"""
import datetime
import os
import pathlib
import platform
import random
import shlex
import statistics
import subprocess
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def cpu_model():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit():
    root = RESULTS.parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+changes" if dirty else "")


def stamp(command=None):
    """One line: where and when a table was measured, and the command that measured it."""
    command = command or "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return (f"_Measured by `{command}` at commit {commit()} on {cpu_model()} ({cores} cores), "
            f"{datetime.date.today().isoformat()}._")


def write_section(name, body, command=None, path=RESULTS, title=None):
    """Put `body` (markdown) between NAME's markers in RESULTS.md, stamped; append the section if it is new.
    Everything outside the markers is left as it is."""
    path = pathlib.Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = "\n".join([begin, *( [f"### {title}", ""] if title else []), body.rstrip(), "", stamp(command), end])
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def interleaved(runs, repeats, seed=0):
    """Run each of `runs` ({name: callable returning a number}) `repeats` times, in a random order within every
    round, so that a neighbour's load and the machine's drift fall on all of them alike.
    Returns {name: [values in round order]}."""
    rng = random.Random(seed)
    out = {name: [] for name in runs}
    for _ in range(repeats):
        order = list(runs)
        rng.shuffle(order)
        for name in order:
            out[name].append(runs[name]())
    return out


def summary(values):
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def ratio_verdict(ratios, target, higher_is_better=True):
    """`met`, `missed` or `not resolved`: a target counts as met (or missed) only when every paired ratio is on
    the same side of it; otherwise the spread does not allow a verdict."""
    above = [r >= target for r in ratios]
    if all(above):
        return "met" if higher_is_better else "missed"
    if not any(above):
        return "missed" if higher_is_better else "met"
    return "not resolved (the spread straddles the target)"
