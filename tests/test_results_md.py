"""bench/RESULTS.md: every marked section is written by the script it names (bench/resultsfile.py's scheme)."""
import pathlib
import re

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
MARKER = re.compile(r"<!-- ([a-z0-9_]+):(begin|end) -->")


def sections(text):
    """[(name, body)] of the marked sections; unpaired or nested markers are an error."""
    out, open_name, start = [], None, 0
    for m in MARKER.finditer(text):
        name, kind = m.groups()
        if kind == "begin":
            assert open_name is None, f"section {name} begins inside {open_name}"
            open_name, start = name, m.end()
        else:
            assert open_name == name, f"section end {name} without its begin (open: {open_name})"
            out.append((name, text[start:m.start()]))
            open_name = None
    assert open_name is None, f"section {open_name} is never closed"
    return out


def test_every_marked_section_names_a_script_that_writes_it():
    found = sections((BENCH / "RESULTS.md").read_text())
    assert found, "RESULTS.md has no marked sections"
    for name, body in found:
        scripts = [p for p in (BENCH / f"{name}.py", BENCH / f"{name}.sh") if p.exists()]
        assert scripts, f"RESULTS.md section {name!r}: no bench/{name}.py or bench/{name}.sh writes it"
        assert any(f'"{name}"' in p.read_text() or f"{name}:begin" in p.read_text() for p in scripts), \
            f"bench/{name}: never names its section {name!r}"
        assert "Measured by `" in body or "Not run yet" in body, f"section {name!r} carries no stamp"


def test_sections_parse_strictly():
    import pytest
    with pytest.raises(AssertionError, match="never closed"):
        sections("<!-- a:begin -->")
    with pytest.raises(AssertionError, match="without its begin"):
        sections("<!-- a:end -->")
    assert sections("x <!-- a:begin -->body<!-- a:end --> y") == [("a", "body")]
