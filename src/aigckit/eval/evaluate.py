"""`aigc image eval`: a run's classifier-FID/KID at n samples beside the real-data floor, per-class accuracy of
conditional samples, and for VAEs the ELBO on the test split. Class-conditional runs sample the classes in turn;
text-conditioned ones sample the same class sequence from the held-out phrasings (``captions.heldout_prompts``; or
the training captions, ``phrasings="training"``), so
their FID compares with a class-conditional run's and their class accuracy is the held-out prompt accuracy.

Reference: features of the whole Fashion-MNIST train split. Floor: the first n held-out test images against the same
reference (n capped at the 10,000 test images), i.e. the score a perfect generator would get at this n.
"""

from __future__ import annotations

import time

import torch

from aigckit.errors import AigcError


def evaluate_run(run, *, n: int = 10000, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
                 guidance: float | None = None, seed: int = 0, progress: bool = True,
                 classifier_path=None, reference_n: int | None = None, dtype: str = "float32",
                 temperature: float = 1.0, copies_grid=None, phrasings: str = "held-out") -> dict:
    from aigckit.data.images import load_dataset, to_float
    from aigckit.eval.classifier import load_classifier, predict
    from aigckit.eval.fid import fid, kid
    from aigckit.image.api import load_image_model

    if not 2 <= n <= 100_000:
        raise AigcError(f"n must be in 2..100000, got {n}")
    clf, manifest = load_classifier(classifier_path)
    m = load_image_model(run)
    if m.model.cfg.channels != 1:
        raise AigcError("eval measures Fashion-MNIST models (1 channel); this run has RGB images")
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    f_train = _reference_features(clf, manifest, train, reference_n)
    n_floor = min(n, len(test))
    f_test, _ = predict(clf, to_float(test.images[:n_floor]))

    t0 = time.perf_counter()
    if m.text_conditioned:
        prompts, labels = prompt_sequence(n, seed, phrasings)
        out = m.sample(n, prompts=prompts, seed=seed, sampler=sampler, steps=steps, eta=eta, guidance=guidance,
                       progress=progress, dtype=dtype)
        out.labels = labels
    else:
        out = m.sample(n, classes="all" if m.conditional else None, seed=seed, sampler=sampler, steps=steps,
                       eta=eta, guidance=guidance, progress=progress, dtype=dtype, temperature=temperature)
    sample_s = time.perf_counter() - t0
    f_gen, pred = predict(clf, out.tensor)

    kid_gen, kid_gen_std = kid(f_gen, f_train, seed=seed)
    kid_floor, kid_floor_std = kid(f_test, f_train, seed=seed)
    rep = {
        "run": str(m.checkpoint), "family": m.family, "step": m.step, "n": n,
        "sampling": {k: v for k, v in out.params.items() if k not in ("run", "n", "classes")},
        "sample_seconds": round(sample_s, 1), "images_per_s_sampling": round(n / max(sample_s, 1e-9), 2),
        "fid": round(fid(f_gen, f_train), 4), "kid": kid_gen, "kid_std": kid_gen_std,
        "floor": {"n": n_floor, "fid": round(fid(f_test, f_train), 4), "kid": kid_floor, "kid_std": kid_floor_std},
        "classifier": {"sha256": manifest["sha256"]["model.safetensors"],
                       "test_accuracy": manifest.get("training", {}).get("test_accuracy")},
    }
    rep["fid_over_floor"] = round(rep["fid"] / max(rep["floor"]["fid"], 1e-12), 3)
    if out.labels is not None:
        from aigckit.data.images import FASHION_MNIST_CLASSES

        names = m.class_names or (FASHION_MNIST_CLASSES if m.text_conditioned else None) or \
            [str(i) for i in range(m.num_classes)]
        hit = pred == out.labels
        rep["class_accuracy"] = round(hit.float().mean().item(), 4)
        rep["class_accuracy_per_class"] = {names[c]: round(hit[out.labels == c].float().mean().item(), 4)
                                           for c in range(len(names)) if (out.labels == c).any()}
        if m.text_conditioned:
            rep["prompts"] = f"{phrasings} phrasings, classes in turn"
    rep["predicted_class_histogram"] = torch.bincount(pred, minlength=10).tolist()
    if m.family == "vae":
        rep["test_neg_elbo_nats"] = round(vae_test_neg_elbo(m.model, test, m.conditional), 3)
    rep["train_images_per_s"] = _train_speed(m.checkpoint)
    from aigckit.trust.memorisation import memorisation_report, pairs_grid  # nearest training images

    ref = train.images[:len(f_train)]
    rep["memorisation"] = memorisation_report(out.tensor, f_gen, ref, f_train, test.images)
    if copies_grid is not None:
        rep["memorisation"]["grid"] = str(pairs_grid(out.tensor, ref, rep["memorisation"], copies_grid))
    return rep


def prompt_sequence(n: int, seed: int = 0, phrasings: str = "held-out") -> tuple[list[str], torch.Tensor]:
    """n prompts whose classes go 0, 1, ..., 9, 0, ... (as a class-conditional run's "all"), from the held-out
    phrasings or (the control) the training captions."""
    from aigckit.multimodal.captions import class_prompts

    per_class = -(-n // 10)
    pairs = class_prompts(per_class, seed, phrasings)  # class by class: class c's i-th prompt at c * per_class + i
    chosen = [pairs[(i % 10) * per_class + i // 10] for i in range(n)]
    return [p for p, _ in chosen], torch.tensor([c for _, c in chosen])


def _reference_features(clf, manifest: dict, train, reference_n: int | None) -> torch.Tensor:
    """Classifier features of the train split (or its first ``reference_n`` images), cached per classifier sha256."""
    from safetensors.torch import load_file, save_file

    from aigckit import store
    from aigckit.data.images import to_float
    from aigckit.eval.classifier import predict

    n = min(reference_n or len(train), len(train))
    path = store.cache_dir("fid-reference") / f"{manifest['sha256']['model.safetensors'][:16]}-{n}.safetensors"
    if path.exists():
        try:
            return load_file(str(path))["features"]
        except Exception:  # noqa: BLE001 - a broken cache is recomputed
            pass
    f, _ = predict(clf, to_float(train.images[:n]))
    path.parent.mkdir(parents=True, exist_ok=True)
    from aigckit.checkpoints import private_tmp

    tmp = private_tmp(path)
    save_file({"features": f.contiguous()}, str(tmp))
    tmp.replace(path)
    return f


@torch.no_grad()
def vae_test_neg_elbo(vae, test, conditional: bool, batch: int = 1000) -> float:
    """Single-sample Monte-Carlo estimate of -ELBO (nats per image, β = 1) on the test split."""
    from aigckit.data.images import to_float

    g = torch.Generator().manual_seed(0)
    total = 0.0
    x_all = to_float(test.images)
    if x_all.shape[-1] != vae.cfg.resolution:
        x_all = torch.nn.functional.interpolate(x_all, size=(vae.cfg.resolution,) * 2, mode="bilinear",
                                                antialias=True)
    for i in range(0, len(test), batch):
        y = test.labels[i:i + batch] if conditional else None
        total += vae.loss(x_all[i:i + batch], y, g, beta=1.0)["loss"].item() * x_all[i:i + batch].shape[0]
    return total / len(test)


def _train_speed(ckpt) -> float | None:
    from aigckit.train.metrics import read_metrics

    rows = read_metrics(ckpt.parent.parent)
    if not rows or "images" not in rows[-1]:
        return None
    last = rows[-1]
    return round(last["images"] / max(last["time"], 1e-9), 2)


def format_report(rep: dict) -> str:
    lines = [f"{rep['family']} {rep['run']} (step {rep['step']}), n = {rep['n']}",
             f"  FID {rep['fid']:.3f}  (real-data floor {rep['floor']['fid']:.3f} at n = {rep['floor']['n']}; "
             f"ratio {rep['fid_over_floor']:.2f})",
             f"  KID {rep['kid']:.5f} ± {rep['kid_std']:.5f}  (floor {rep['floor']['kid']:.5f})",
             f"  sampling {rep['images_per_s_sampling']} img/s; training {rep.get('train_images_per_s')} img/s"]
    if "class_accuracy" in rep:
        lines.append(f"  conditional samples classified as requested: {rep['class_accuracy']:.1%}")
        lines.append("    " + ", ".join(f"{k} {v:.0%}" for k, v in rep["class_accuracy_per_class"].items()))
    if "test_neg_elbo_nats" in rep:
        lines.append(f"  test -ELBO {rep['test_neg_elbo_nats']:.2f} nats/image")
    if "memorisation" in rep:
        mem = rep["memorisation"]
        lines.append(f"  nearest training image: pixel RMS median {mem['pixel_rms_to_nearest']['median']:.3f} "
                     f"(held-out test {mem['test_median_rms_to_nearest']:.3f}); near-copies "
                     f"{mem['near_copy_share']:.1%} under RMS {mem['copy_threshold_rms']:.3f}"
                     + (f"; grid {mem['grid']}" if mem.get("grid") else ""))
    return "\n".join(lines)
