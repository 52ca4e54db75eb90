"""Effective robustness: exact values on hand-computed lines."""
import math

import numpy as np
import pytest

from genrobust import robustness as rb


def _sig(z):
    return 1 / (1 + math.exp(-z))


def _lg(p):
    return math.log(p / (1 - p))


def test_fit_recovers_a_hand_made_line():
    xs = [0.6, 0.7, 0.8, 0.9]
    ys = [_sig(0.5 * _lg(x) - 1.0) for x in xs]
    line = rb.fit_line(xs, ys)
    assert line.slope == pytest.approx(0.5, abs=1e-9)
    assert line.intercept == pytest.approx(-1.0, abs=1e-9)
    assert line.n == 4


def test_points_on_the_line_have_zero_er_and_offsets_are_exact():
    xs = [0.6, 0.7, 0.8, 0.9]
    ys = [_sig(0.5 * _lg(x) - 1.0) for x in xs]
    line = rb.fit_line(xs, ys)
    on = _sig(0.5 * _lg(0.75) - 1.0)
    assert rb.effective_robustness(0.75, on, line) == pytest.approx(0.0, abs=1e-12)
    # x = 0.5: logit 0, predicted sigmoid(-1) = 0.268941...; measured 0.40 -> ER 0.131058...
    assert rb.effective_robustness(0.5, 0.40, line) == pytest.approx(0.40 - 0.2689414213699951, abs=1e-12)


def test_too_few_points_nan_and_flat_x_are_errors():
    with pytest.raises(ValueError, match="at least 3"):
        rb.fit_line([0.6, 0.7], [0.3, 0.4])
    with pytest.raises(ValueError, match="NaN"):
        rb.fit_line([0.6, 0.7, float("nan")], [0.3, 0.4, 0.5])
    with pytest.raises(ValueError, match="same in-distribution"):
        rb.fit_line([0.7, 0.7, 0.7], [0.3, 0.4, 0.5])


def test_accuracies_of_0_or_1_are_clipped_with_a_warning(caplog):
    line = rb.fit_line([0.5, 0.8, 1.0], [0.2, 0.5, 0.9])
    assert math.isfinite(line.slope) and math.isfinite(line.intercept)
    assert "clipped" in caplog.text


def test_bootstrap_interval_is_zero_width_for_exact_lines_and_seeded():
    xs = np.linspace(0.55, 0.95, 8)
    ys = [_sig(0.8 * _lg(x) - 0.5) for x in xs]
    lo, hi = rb.bootstrap_interval(xs, ys, 0.7, _sig(0.8 * _lg(0.7) - 0.5) + 0.05, n=200)
    assert lo == pytest.approx(0.05, abs=1e-9) and hi == pytest.approx(0.05, abs=1e-9)
    noisy = np.array(ys) + np.linspace(-0.02, 0.02, 8)[::-1] * np.array([1, -1] * 4)
    a = rb.bootstrap_interval(xs, noisy, 0.7, 0.5, n=200, seed=1)
    assert a == rb.bootstrap_interval(xs, noisy, 0.7, 0.5, n=200, seed=1)
    assert a.low < a.high and a.dropped == 0 and a.n == 200


def _exact_bootstrap(bx, by, x, y):
    """Every resample of the baseline points with replacement (equally likely), each line fitted by the
    closed-form least squares in logit space; degenerate resamples (one repeated ID accuracy) dropped.
    Returns (sorted ER values, how many resamples were degenerate)."""
    import itertools
    lx, ly = [_lg(v) for v in bx], [_lg(v) for v in by]
    values, degenerate = [], 0
    for idx in itertools.product(range(len(bx)), repeat=len(bx)):
        xs, ys = [lx[i] for i in idx], [ly[i] for i in idx]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((v - mx) ** 2 for v in xs)
        if var == 0:
            degenerate += 1
            continue
        slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / var
        values.append(y - _sig(slope * _lg(x) + my - slope * mx))
    return sorted(values), degenerate


def test_bootstrap_interval_matches_the_exact_resampling_distribution():
    # four baseline points off any one line: 4^4 = 256 equally likely resamples, 4 of them degenerate
    bx, by, x, y = [0.55, 0.7, 0.8, 0.92], [0.3, 0.48, 0.5, 0.8], 0.75, 0.6
    exact, degenerate = _exact_bootstrap(bx, by, x, y)
    assert degenerate == 4 and len(exact) == 252

    def quantile(q):  # of the exact distribution (conditioned on a defined line)
        return exact[min(len(exact) - 1, int(q * len(exact)))]

    ci = rb.bootstrap_interval(bx, by, x, y, n=20000, seed=3)
    # 20,000 draws put each empirical percentile within about 0.5 points of its level
    assert quantile(0.015) <= ci.low <= quantile(0.035)
    assert quantile(0.965) <= ci.high <= quantile(0.985)
    assert quantile(0.035) < quantile(0.965)  # the case is not degenerate: a wrong level would miss
    assert ci.dropped == pytest.approx(20000 * 4 / 256, rel=0.15)


def test_bootstrap_refuses_an_interval_when_too_many_resamples_are_degenerate():
    # three points, two at one ID accuracy: 1/27 + 8/27 of the resamples repeat one x: a third defines no line
    with pytest.raises(ValueError, match=r"of 1000 bootstrap resamples defined no line \(more than 5%\)"):
        rb.bootstrap_interval([0.6, 0.6, 0.8], [0.3, 0.35, 0.5], 0.7, 0.4, n=1000)
    with pytest.raises(ValueError, match="at least 1 resample"):
        rb.bootstrap_interval([0.6, 0.7, 0.8], [0.3, 0.35, 0.5], 0.7, 0.4, n=0)


def test_relative_robustness():
    assert rb.relative_robustness(0.8, 0.75) == pytest.approx(0.05)


# --- baselines and ER rows ---------------------------------------------------------------------------------

def _acc_rows(model, x, y, seed=0, shift="digits-uci", subset="all", num_classes=10):
    ck = f"runs/{model}-{seed}"
    base = {"model": model, "checkpoint": ck, "train_data": "real", "augmentation": "standard", "seed": seed,
            "metric": "top1", "class_subset": subset, "num_classes": num_classes}
    return [{**base, "eval_set": "digits-mnist/test", "role": "id", "value": x, "n": 100},
            {**base, "eval_set": shift, "role": "shift", "value": y, "n": 100, "id_set": "digits-mnist/test"}]


def _zoo(tmp_path, xs=(0.6, 0.7, 0.8, 0.9), extra=()):
    import json
    rows = [r for i, x in enumerate(xs) for r in _acc_rows(f"zoo{i}", x, _sig(0.5 * _lg(x) - 1.0))]
    rows += list(extra)
    path = tmp_path / "zoo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_baseline_from_a_results_file_pairs_id_and_shift_rows(tmp_path):
    chance = _acc_rows("chance", 0.11, 0.1)
    base = rb.load_baseline(_zoo(tmp_path, extra=chance))
    assert [p.model for p in base.points["digits-uci"]] == ["zoo0", "zoo1", "zoo2", "zoo3"]
    assert base.points["digits-uci"][0].x == 0.6
    assert any("chance is near chance" in w for w in base.warnings)


def test_er_rows_exact_against_a_known_line(tmp_path):
    base = rb.load_baseline(_zoo(tmp_path))
    x, y = 0.85, 0.5
    rows = _acc_rows("generated", x, y) + _acc_rows("real", 0.85, 0.4)
    er, lines, warnings = rb.er_rows(rows, base, n_boot=200, reference="real")
    assert warnings == []
    line = lines[("digits-uci", "all")]
    assert line.slope == pytest.approx(0.5) and line.intercept == pytest.approx(-1)
    eff = {r["model"]: r for r in er if r["metric"] == "effective_robustness"}
    expected = y - _sig(0.5 * _lg(x) - 1.0)
    assert eff["generated"]["value"] == pytest.approx(expected, abs=1e-6)
    assert eff["generated"]["id_value"] == x and eff["generated"]["shift_value"] == y
    assert eff["generated"]["baseline_n"] == 4 and eff["generated"]["baseline"].endswith("zoo.jsonl")
    # baseline points lie exactly on the line: every resample refits it, so the interval is the point
    assert eff["generated"]["ci_low"] == pytest.approx(expected, abs=1e-6)
    assert eff["generated"]["ci_high"] == pytest.approx(expected, abs=1e-6)
    rel = [r for r in er if r["metric"] == "relative_robustness"]
    assert [(r["model"], r["reference"]) for r in rel] == [("generated", "real")]
    assert rel[0]["value"] == pytest.approx(0.1)


def test_er_rows_say_why_a_row_has_no_er(tmp_path):
    base = rb.load_baseline(_zoo(tmp_path))
    lone = [r for r in _acc_rows("lone", 0.8, 0.5) if r["role"] == "shift"]
    other = _acc_rows("fonts", 0.8, 0.5, shift="digits-fonts/unseen")
    er, _, warnings = rb.er_rows(lone + other, base, n_boot=10)
    assert er == []
    assert any("lone on digits-uci: no in-distribution row" in w for w in warnings)
    assert any("digits-fonts/unseen: no baseline line" in w and "at least 3" in w for w in warnings)


def test_testbed_baseline_holds_the_standard_models():
    base = rb.load_baseline("testbed")
    assert set(base.points) == set(rb.TESTBED_COLUMNS)
    # 87 standard models; 5 of them have no ImageNet-R numbers in the testbed file
    assert len(base.points["imagenet-v2"]) == 87 and len(base.points["imagenet-r"]) == 82
    resnet50 = [p for p in base.points["imagenet-v2"] if p.model == "resnet50"][0]
    assert 0.75 < resnet50.x < 0.77 and 0.62 < resnet50.y < 0.64
    line = rb.fit_line([p.x for p in base.points["imagenet-v2"]], [p.y for p in base.points["imagenet-v2"]])
    assert 0.8 < line.slope < 1.2  # V2 sits on a line close to parallel to y = x in logit space
    # an ImageNet-100 model scored on 19 ImageNet-R classes is flagged against the 200-class testbed line
    rows = _acc_rows("in100", 0.9, 0.4, shift="imagenet-r", subset="imagenet-r", num_classes=19)
    for r in rows:
        r["eval_set"] = "imagenet-val" if r["role"] == "id" else r["eval_set"]
        r["id_set"] = "imagenet-val"
    er, _, warnings = rb.er_rows(rows, base, n_boot=10)
    assert len(er) == 1 and any("scored on 19 classes, the testbed line on 200" in w for w in warnings)


def test_robustness_cli_writes_er_rows_once(tmp_path, capsys):
    import json

    from genrobust.cli import main
    results = tmp_path / "results.jsonl"
    rows = _acc_rows("generated", 0.85, 0.5)
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["robustness", str(results), "--baseline", str(_zoo(tmp_path)), "--bootstrap", "50"]
    assert main(argv) == 0
    assert main(argv) == 0
    written = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(written) == 3 and written[2]["metric"] == "effective_robustness"
    assert "generated" in capsys.readouterr().out
    assert main(["robustness", str(results), "--baseline", str(tmp_path / "nope.jsonl")]) == 2
    assert "neither 'testbed' nor a results file" in capsys.readouterr().err


def test_er_rows_say_when_accuracies_are_clipped(tmp_path):
    import json
    rows = [r for i, x in enumerate((0.6, 0.7, 0.8, 1.0)) for r in _acc_rows(f"zoo{i}", x, min(x, 0.9))]
    path = tmp_path / "zoo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    er, _, warnings = rb.er_rows(_acc_rows("perfect", 1.0, 0.5), rb.load_baseline(path), n_boot=20)
    assert len(er) == 1
    assert any("1 baseline models at accuracy 0 or 1 (e.g. zoo3) were clipped" in w for w in warnings)
    assert any("perfect on digits-uci: an accuracy of 0 or 1 was clipped" in w for w in warnings)


def test_the_line_is_keyed_by_eval_set_and_class_subset(tmp_path):
    # the zoo scored on all classes lies on logit(y) = 0.5 logit(x) - 1; three models scored on a 19-class
    # subset of the same shift lie on another line, logit(y) = logit(x) + 1: the two never mix
    sub = '["a", "b"]'
    subset_rows = [r for i, x in enumerate((0.5, 0.65, 0.85))
                   for r in _acc_rows(f"sub{i}", x, _sig(_lg(x) + 1.0), subset=sub, num_classes=19)]
    base = rb.load_baseline(_zoo(tmp_path, extra=subset_rows))
    assert len(base.points["digits-uci"]) == 7
    assert [p.model for p in base.points_for("digits-uci", sub)] == ["sub0", "sub1", "sub2"]
    rows = _acc_rows("model", 0.75, 0.5) + _acc_rows("model-sub", 0.75, 0.5, subset=sub, num_classes=19)
    er, lines, warnings = rb.er_rows(rows, base, n_boot=200)
    assert set(lines) == {("digits-uci", "all"), ("digits-uci", sub)}
    assert lines[("digits-uci", "all")].slope == pytest.approx(0.5)
    assert lines[("digits-uci", sub)].slope == pytest.approx(1.0) and lines[("digits-uci", sub)].n == 3
    by = {r["model"]: r for r in er if r["metric"] == "effective_robustness"}
    assert by["model"]["value"] == pytest.approx(0.5 - _sig(0.5 * _lg(0.75) - 1.0), abs=1e-6)
    assert by["model-sub"]["value"] == pytest.approx(0.5 - _sig(_lg(0.75) + 1.0), abs=1e-6)
    # a subset no baseline model was scored on has no line, and the warning says why
    other = _acc_rows("model-other", 0.75, 0.5, subset='["c"]', num_classes=5)
    er, lines, warnings = rb.er_rows(other, base, n_boot=200)
    assert lines == {("digits-uci", '["c"]'): None} and not er
    assert any("7 baseline points on other class subsets are not on this line" in w for w in warnings)
