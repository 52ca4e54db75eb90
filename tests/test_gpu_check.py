"""bench/gpu_check.py: the committed SD 1.5 configs, and the whole check at toy scale on CPU (--smoke)."""
import importlib.util
import pathlib

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_are_sd15(gpu_check):
    """The committed configs build SD 1.5's modules: parameter counts as published (bench/sd15/README.md)."""
    from diffusers import PNDMScheduler

    configs = gpu_check.load_configs()
    unet, vae, text_encoder = gpu_check.parameter_counts(configs)
    assert (unet, vae, text_encoder) == (859_520_964, 83_653_863, 123_060_480)
    unet, vae, _ = gpu_check.build_models(configs, "meta")
    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 512
    assert vae.config.scaling_factor == 0.18215
    scheduler = PNDMScheduler.from_config(configs["scheduler"])
    assert scheduler.config.skip_prk_steps and scheduler.config.steps_offset == 1


def test_no_cuda_exits_clearly(gpu_check, capsys):
    assert not torch.cuda.is_available()  # conftest hides GPUs
    assert gpu_check.main([]) == 2
    assert "--smoke" in capsys.readouterr().err


def test_smoke_table(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_check.main(["--smoke"]) == 0
    text = (tmp_path / "gpu_check.md").read_text()
    rows = {}
    table = [line for line in text.splitlines() if line.startswith("|")][2:]
    assert text.rstrip().splitlines()[-1].startswith("_Measured by `bench/gpu_check.sh --smoke` at commit ")
    for line in table:
        part, metric, value, _notes = [c.strip() for c in line.strip("|").split("|", 3)]
        rows[part, metric] = value
    numbers = [("a", "paper loop images/s"), ("a", "pipeline alone images/s"), ("b", "genrobust runner images/s"),
               ("c", "UNet GFLOP per forward"),
               ("c", "UNet TFLOP/s achieved (a)"), ("d", "ResNet-50 train images/s"),
               ("d", "ResNet-50 GFLOP/image, forward"), ("-", "matmul TFLOP/s, measured")]
    mfus = [("c", "UNet MFU (a)"), ("d", "ResNet-50 MFU")]
    assert set(numbers + mfus + [("b", "runner overhead vs (a)"), ("-", "device"), ("-", "wall time s"),
                                 ("e", "genrobust generate + train + predict on the device")]) <= set(rows)
    assert all(float(rows[k]) > 0 for k in numbers), rows
    assert all(0 < float(rows[k]) <= 1 for k in mfus), rows
    assert rows["b", "runner overhead vs (a)"].endswith("%")
    assert rows["e", "genrobust generate + train + predict on the device"] == "pass"
    # ResNet-50 at 32 px: 4.1 GMAC at 224 px scaled by (32/224)^2 is ~0.17 GFLOP a forward
    assert 0.1 < float(rows["d", "ResNet-50 GFLOP/image, forward"]) < 0.25


def test_record_writes_between_markers_only(gpu_check, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# before\n\n<!-- gpu_check:begin -->\nold\n<!-- gpu_check:end -->\n\n## after\n")
    table = tmp_path / "gpu_check.md"
    table.write_text("| part | metric | value | notes |\n|---|---|---:|---|\n| a | x | 1 | |\n\n_Measured by ..._\n")
    gpu_check.record(table, results)
    text = results.read_text()
    assert text.startswith("# before\n\n<!-- gpu_check:begin -->\n### GPU checks")
    assert "| a | x | 1 | |\n\n_Measured by ..._\n<!-- gpu_check:end -->\n\n## after\n" in text
    assert "old" not in text
