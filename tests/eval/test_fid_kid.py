import json

import pytest
import torch

from aigckit.errors import CorruptFileError, ModelNotFoundError
from aigckit.eval.fid import fid, frechet_distance, kid
from imageutil import needs_data




def test_fid_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(m, 4I): |m|² + Tr(I + 4I - 2·2I) = |m|² + d
    mu = torch.tensor([1.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    val = frechet_distance(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), mu,
                           4 * torch.eye(4, dtype=torch.float64))
    assert val == pytest.approx(5.0 + 4.0)
    b = torch.randn(20000, 4, generator=g) * 2 + mu.float()
    assert fid(a, b) == pytest.approx(9.0, rel=0.05)


def test_kid_near_zero_for_same_distribution():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 8, generator=g), torch.randn(2000, 8, generator=g)
    same, _ = kid(a, b, subsets=10, subset_size=500)
    diff, _ = kid(a, b + 1.0, subsets=10, subset_size=500)
    assert abs(same) < 0.01 and diff > 0.1


@pytest.mark.slow
@needs_data
def test_classifier_store_verify_and_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    from aigckit.cli import main
    from aigckit.eval.classifier import load_classifier, train_classifier
    from aigckit.eval.evaluate import evaluate_run

    with pytest.raises(ModelNotFoundError, match="train-classifier"):
        load_classifier()
    d = train_classifier(epochs=1, limit=1024, threads=1, progress=False)
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {"config.json", "model.safetensors"}
    assert 0.3 < manifest["training"]["test_accuracy"] <= 1.0
    load_classifier()
    run = tmp_path / "vae"
    assert main(["image", "train", "--model", "vae", "--size", "tiny", "--conditional", "--out", str(run),
                 "--steps", "3", "--batch-size", "16", "--grid-n", "4", "--quiet"]) == 0
    rep = evaluate_run(run, n=40, progress=False, reference_n=2000)
    assert rep["fid"] > 0 and rep["floor"]["n"] == 40 and "class_accuracy" in rep
    assert len(rep["class_accuracy_per_class"]) == 10 and rep["test_neg_elbo_nats"] > 0
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(CorruptFileError, match="sha256"):
        load_classifier()


@pytest.mark.slow
@needs_data
def test_classifier_training_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    from aigckit.eval.classifier import train_classifier

    a = train_classifier(epochs=1, limit=512, threads=1, progress=False, store_dir=tmp_path / "a")
    b = train_classifier(epochs=1, limit=512, threads=1, progress=False, store_dir=tmp_path / "b")
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["sha256"] == mb["sha256"]
