"""pyproject.toml declares every package the code imports (core or an extra), with ranges, not pins."""
import ast
import importlib.metadata
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "genrobust"


def imported_top_level_modules():
    mods = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m != "genrobust"}


def declared():
    """{distribution name (normalised): [requirement strings]} from the installed metadata."""
    out = {}
    for req in importlib.metadata.requires("genrobust") or []:
        name = re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0]
        out.setdefault(re.sub(r"[-_.]+", "-", name).lower(), []).append(req)
    return out


def test_every_imported_package_is_declared():
    dists = importlib.metadata.packages_distributions()
    have = declared()
    missing = {}
    for mod in imported_top_level_modules():
        names = [re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(mod, [])]
        assert names, f"genrobust imports {mod!r}, which no installed distribution provides"
        if not any(n in have for n in names):
            missing[mod] = names
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_requirements_are_ranges_and_the_lock_pins_them():
    lock = {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower(): line.split("==")[1]
            for line in (SRC.parents[1] / "requirements.txt").read_text().split() if "==" in line}
    for name, reqs in declared().items():
        for req in reqs:
            assert "==" not in req.split(";")[0], f"{req}: a pin in pyproject.toml keeps genrobust out of existing environments"
        assert name in lock, f"{name} is declared but not in the tested lock requirements.txt"
