"""FID and KID on Inception features, offline: the test builds the reference network's architecture with random
weights, saves them, and genrobust loads them through --inception-weights as it would the real file."""
import pickle

import numpy as np
import pytest
import torch

from genrobust.generate import fid as F


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random Inception-v3 (FID layout) weights saved as .pth (tensors only) and as .safetensors."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from safetensors.torch import save_file

    with pytest.MonkeyPatch.context() as mp:  # build the architecture without fetching any weights
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        state = {k: v.clone() for k, v in fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
                 .state_dict().items()}
    root = tmp_path_factory.mktemp("inception")
    torch.save(state, root / F.WEIGHTS_FILE)
    save_file({k: v.contiguous() for k, v in state.items()}, root / "inception.safetensors")
    return root


def _images(seed, n=8, size=48, channels=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n // 2, channels, size, size), generator=g, dtype=torch.uint8) for _ in range(2)]


def _frechet(a, b):
    from scipy import linalg
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_the_frechet_distance_of_the_networks_own_features(weights):
    real, gen = _images(0), _images(1)
    got = F.fid_kid(real, gen, weights=weights / F.WEIGHTS_FILE, kid_subset_size=4)
    net = F.load_inception(weights / "inception.safetensors")
    with torch.no_grad():
        fa = torch.cat([net(b) for b in real]).double().numpy()
        fb = torch.cat([net(b) for b in gen]).double().numpy()
    assert got["n_real"] == got["n_generated"] == 8
    assert got["fid"] == pytest.approx(_frechet(fa, fb), rel=1e-3)
    assert got["fid"] > 0 and np.isfinite(got["kid_mean"]) and got["kid_std"] >= 0


def test_identical_sets_are_at_distance_zero_and_grayscale_is_accepted(weights):
    real = _images(2, channels=1)
    got = F.fid_kid(real, real, weights=weights / "inception.safetensors", kid_subset_size=4)
    assert got["fid"] == pytest.approx(0.0, abs=1e-2)
    assert got["kid_mean"] == pytest.approx(0.0, abs=1e-3)


def test_weights_are_never_unpickled(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(ValueError, match="not a readable weight file"):
        F.load_inception(evil)
    assert not marker.exists()


def test_missing_weights_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="pass --inception-weights FILE"):
        F.load_inception()
    with pytest.raises(FileNotFoundError, match="no such file"):
        F.load_inception(tmp_path / "nope.pth")
    bad = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not the Inception-v3 FID weights"):
        F.load_inception(bad)


def test_generate_stats_reports_fid_and_kid(weights, trained, tmp_path, capsys):
    import json

    from genrobust.data.folder import export_imageset
    from helpers import digits_subset, fails

    gen = export_imageset(digits_subset(per_class=2), tmp_path / "gen")
    real = export_imageset(digits_subset(per_class=3, split="digits-mnist/test"), tmp_path / "real")
    out = tmp_path / "stats.json"
    from genrobust.cli import main
    assert main(["generate", "stats", str(gen), "--classifier", str(trained["out"]), "--real",
                 f"imagefolder:{real}", "--fid", "--inception-weights", str(weights / "inception.safetensors"),
                 "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())["fid"]
    assert result["n_generated"] == 20 and result["n_real"] == 30 and result["fid"] > 0
    assert f"FID (Inception-v3) to imagefolder:{real}: {result['fid']:.3f}" in capsys.readouterr().out
    assert "give --real SPEC" in fails(capsys, ["generate", "stats", str(gen), "--classifier", str(trained["out"]),
                                                "--fid"])
    assert "--inception-weights" in fails(capsys, [
        "generate", "stats", str(gen), "--classifier", str(trained["out"]), "--real", f"imagefolder:{real}",
        "--fid", "--inception-weights", str(tmp_path / "missing.pth"), "--out", str(out)])
