"""Evaluation: FID against its closed form and against pytorch-fid's own figures, Chinese CLIP score and
retrieval on tiny models built so that the answer is known, the weights' messages, and one run."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rapid_diffusion.evaluation.clip_score import ChineseClip, clip_score, recall_at_k, retrieval_recall
from rapid_diffusion.evaluation.fid import FeatureExtractor, feature_statistics, fid, frechet_distance
from rapid_diffusion.evaluation.inception import FIDInceptionV3, load_fid_state_dict, preprocess, seeded_state_dict
from rapid_diffusion.evaluation.report import Sampling
from rapid_diffusion.evaluation.run import Metrics, evaluate_generation, load_metrics
from rapid_diffusion.evaluation.weights import (
    FID_WEIGHTS_FILE,
    FID_WEIGHTS_SHA256,
    FID_WEIGHTS_URL,
    WeightsUnavailable,
    fid_weights_file,
    load_fid_weights,
    sha256_of,
)

FIXTURE = Path(__file__).parent / "fixtures" / "fid_reference.npz"
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_non_commuting_covariances_is_the_closed_form():
    """For 2x2 covariances, Tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))) (both eigenvalues are real and >= 0)."""
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    product = s1 @ s2
    trace_sqrt = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_fid_of_sampled_gaussian_features_approaches_the_closed_form():
    """Features drawn from two known Gaussians: the estimate lands within sampling error of the exact value."""
    rng = np.random.default_rng(1)
    mu1, mu2 = np.zeros(8), np.full(8, 0.5)
    s1, s2 = np.linspace(0.5, 2.0, 8), np.linspace(2.0, 0.5, 8)
    a = mu1 + rng.normal(size=(40_000, 8)) * np.sqrt(s1)
    b = mu2 + rng.normal(size=(40_000, 8)) * np.sqrt(s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid(a, b) == pytest.approx(expected, rel=0.03)
    assert fid(a, a + 0.1) == pytest.approx(8 * 0.01, rel=1e-6)  # a shifted copy: only the means differ


def test_identical_feature_sets_give_zero_even_with_singular_covariances():
    """Ten 2048-d features: covariances of rank 9, where scipy's sqrtm warns; the features route stays exact."""
    features = np.random.default_rng(2).normal(size=(10, 2048))
    trace = np.var(features, axis=0, ddof=1).sum()
    assert abs(fid(features, features.copy())) < 1e-12 * trace
    mean = features.mean(axis=0)
    # A scaled copy (order shuffled): |0.5 mu|^2 + Tr(S + 2.25 S - 2 * 1.5 S)
    assert fid(features, features[::-1] * 1.5) == pytest.approx(0.25 * (mean @ mean + trace), rel=1e-9)


def test_features_route_and_statistics_route_agree():
    """Fewer images than dimensions (the nuclear-norm route) and the covariances' eigen route give one value
    (the eigen route takes square roots of the rounding noise of ~40 zero eigenvalues: agreement to ~1e-8)."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 64)), rng.normal(0.3, 1.2, size=(30, 64)) @ rng.normal(size=(64, 64)) / 8
    assert fid(a, b) == pytest.approx(frechet_distance(*feature_statistics(a), *feature_statistics(b)), rel=1e-6)
    c = rng.normal(size=(100, 64))  # more images than dimensions: through the statistics
    assert fid(a, c) == pytest.approx(frechet_distance(*feature_statistics(a), *feature_statistics(c)), rel=1e-12)


def test_fid_needs_two_images_per_set():
    with pytest.raises(ValueError, match="至少需要 2 张"):
        feature_statistics(np.zeros((1, 2048)))
    with pytest.raises(ValueError, match="at least 2 images per set, got 1"):
        fid(np.zeros((3, 2048)), np.zeros((1, 2048)))


# ----------------------------------------------------------------------------- against pytorch-fid


@pytest.fixture(scope="module")
def reference():
    """Recorded by tests/fixtures/record_fid_reference.py: pytorch-fid's features and FID with seeded weights."""
    with np.load(FIXTURE) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def reference_extractor(reference) -> FeatureExtractor:
    """This project's network, loaded strictly with the seeded weights in the published file's layout (fc included)."""
    layout = json.loads(str(reference["layout"]))
    model = load_fid_state_dict(FIDInceptionV3(), seeded_state_dict(layout, int(reference["seed"])))
    return FeatureExtractor(model, "seeded", False, CPU)


@pytest.mark.slow
def test_inception_features_and_fid_match_pytorch_fid(reference, reference_extractor):
    set_a = [Image.fromarray(image) for image in reference["images_a"]]
    set_b = [Image.fromarray(image) for image in reference["images_b"]]
    features_a, features_b = reference_extractor(set_a), reference_extractor(set_b)
    scale = np.abs(reference["features_a"]).max()
    np.testing.assert_allclose(features_a, reference["features_a"], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(features_b, reference["features_b"], rtol=1e-4, atol=1e-5 * scale)
    assert fid(features_a, features_b) == pytest.approx(float(reference["fid"]), rel=1e-3)
    # pytorch-fid's scipy sqrtm is off by 5e-7 on these singular covariances; 40-digit arithmetic is the exact
    # reference, computed on the recorded features (ours differ from them by float rounding, which depends on the
    # thread count: about 6e-8 of the FID between 1 and 2 threads).
    assert fid(reference["features_a"], reference["features_b"]) == pytest.approx(float(reference["fid_exact"]), rel=1e-9)
    assert fid(features_a, features_b) == pytest.approx(float(reference["fid_exact"]), rel=1e-6)
    # Negative control: clean-fid's resize (antialiased bicubic to 299 in PIL) misses by far more than the tolerance.
    bicubic = preprocess(set_a[0].resize((299, 299), Image.Resampling.BICUBIC))[None]
    with torch.inference_mode():
        other = reference_extractor.model(bicubic).double().numpy()
    assert np.abs(other[0] - reference["features_a"][0]).max() > 100 * 1e-5 * scale


def test_the_published_file_layout_loads_unchanged(reference):
    """Every key of pytorch-fid's weights file has its place here; only the classifier is set aside."""
    layout = json.loads(str(reference["layout"]))
    ours = FIDInceptionV3().state_dict()
    assert set(layout) - set(ours) == {"fc.weight", "fc.bias"}
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(layout[k]) for k in ours}


# ----------------------------------------------------------------------------- weights: cache, download, messages


def test_missing_fid_weights_offline_say_what_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(WeightsUnavailable) as caught:
        fid_weights_file()
    message = str(caught.value)
    assert message.index("缺少 FID") < message.index("weights for FID")  # Chinese first
    for part in (FID_WEIGHTS_FILE, FID_WEIGHTS_URL, FID_WEIGHTS_SHA256, str(tmp_path / "empty-torch-home" / "hub" / "checkpoints"), "--fid-weights"):
        assert part in message


def _weights_file(tmp_path: Path, reference) -> Path:
    """A weights file in the published layout (seeded values) and its sha256."""
    path = tmp_path / "weights.pth"
    torch.save(seeded_state_dict(json.loads(str(reference["layout"])), 3), path)
    return path


def test_download_lands_in_the_torch_cache_only_with_the_right_hash(tmp_path, monkeypatch, reference):
    """A file:// URL stands in for the release URL (no network): the right hash is kept, a wrong one refused."""
    source = _weights_file(tmp_path, reference)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(WeightsUnavailable, match="hash|sha256"):
        fid_weights_file(url=source.as_uri(), sha256="0" * 64)
    assert not cache.exists() or not any(cache.iterdir())  # no partial file left behind
    path = fid_weights_file(url=source.as_uri(), sha256=sha256_of(source))
    assert path == cache / FID_WEIGHTS_FILE
    model = load_fid_state_dict(FIDInceptionV3(), load_fid_weights(path))
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, torch.load(source, weights_only=True)["Mixed_7c.branch_pool.conv.weight"])


def test_a_local_file_with_other_bytes_is_refused(tmp_path, reference):
    path = _weights_file(tmp_path, reference)
    with pytest.raises(WeightsUnavailable, match=f"expected {FID_WEIGHTS_SHA256}"):
        fid_weights_file(path)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        fid_weights_file(tmp_path / "nothing.pth")


# ----------------------------------------------------------------------------- Chinese CLIP


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny random ChineseCLIPModel with a ChineseCLIPProcessor (Chinese BERT vocabulary), saved as a model folder."""
    from transformers import ChineseCLIPConfig, ChineseCLIPImageProcessorPil, ChineseCLIPModel, ChineseCLIPProcessor

    from rapid_diffusion.models.factory import build_tokenizer, chinese_vocab

    folder = tmp_path_factory.mktemp("tiny-chinese-clip")
    torch.manual_seed(0)
    config = ChineseCLIPConfig(
        text_config={"vocab_size": len(chinese_vocab()), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 37, "max_position_embeddings": 64},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    ChineseCLIPModel(config).save_pretrained(folder)
    image_processor = ChineseCLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ChineseCLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer(folder)).save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_clip(tiny_clip_dir) -> ChineseClip:
    return ChineseClip.load(str(tiny_clip_dir), device=CPU)


CAPTIONS = ["左边有一个红色的圆形", "蓝色正方形", "一只猫", "清蒸鲈鱼", "红烧肉", "山水画", "一碗牛肉拉面", "黄色的星形",
            "右边有一个小的绿色三角形", "白色菱形", "一张紫色十字形的图片", "中间有一个大的橙色圆形"]


def noise_images(count: int, seed: int = 0, size: tuple[int, int] = (40, 36)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def build_embeddings(clip: ChineseClip, texts, images, text_targets: torch.Tensor, image_targets: torch.Tensor) -> None:
    """Set both projections so text i embeds exactly as ``text_targets[i]`` and image j as ``image_targets[j]``.

    The towers' pooled outputs of a dozen inputs are linearly independent (32 wide), so a projection mapping
    each to any chosen target exists: the least-squares solution reaches it exactly.
    """
    model = clip.model
    with torch.no_grad():
        tokens = clip.processor.tokenizer(list(texts), padding=True, return_tensors="pt")
        pooled_text = model.text_model(**tokens).last_hidden_state[:, 0, :]
        pixels = clip.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        pooled_image = model.vision_model(pixel_values=pixels).pooler_output
        model.text_projection.weight.copy_((torch.linalg.pinv(pooled_text.double()) @ text_targets.double()).T.float())
        model.visual_projection.weight.copy_((torch.linalg.pinv(pooled_image.double()) @ image_targets.double()).T.float())


def test_clip_score_follows_the_similarity_the_model_is_built_to_have(tiny_clip):
    """One caption, five images built to sit at known cosines from it: scores are 100 * max(cos, 0), in order."""
    cosines = [-0.4, 0.1, 0.35, 0.6, 0.9]
    images = noise_images(len(cosines))
    axes = torch.eye(16)
    build_embeddings(tiny_clip, CAPTIONS[:1], images, axes[:1],
                     torch.stack([c * axes[0] + math.sqrt(1 - c * c) * axes[1] for c in cosines]))
    scores = tiny_clip.pair_scores([(CAPTIONS[0], image) for image in images])
    assert scores == pytest.approx([0.0, 10.0, 35.0, 60.0, 90.0], abs=1e-3)
    assert all(low < high for low, high in zip(scores[1:], scores[2:]))
    assert clip_score(tiny_clip, [(CAPTIONS[0], image) for image in images]) == pytest.approx(39.0, abs=1e-3)


def test_pair_scores_match_the_models_own_forward(tiny_clip):
    """Unmodified random model: our batched feature path agrees with ChineseCLIPModel.forward's cosine."""
    images = noise_images(6, seed=1)
    inputs = tiny_clip.processor(text=CAPTIONS[:6], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = tiny_clip.model(**inputs)
    expected = output.logits_per_text.diagonal() / tiny_clip.model.logit_scale.exp()
    assert expected.abs().min() > 0.01  # the comparison is not between zeros
    torch.testing.assert_close(tiny_clip.pair_cosines(list(zip(CAPTIONS[:6], images))), expected, rtol=0, atol=1e-5)


def test_retrieval_recall_on_similarities_built_with_known_ranks(tiny_clip):
    """Twelve pairs; caption i is given ``ranks[i]`` other images scored above its own: R@K is known by counting."""
    ranks = [0, 0, 0, 0, 1, 2, 4, 5, 6, 9, 10, 11]
    n = len(ranks)
    similarity = np.zeros((n, n))
    for i, rank in enumerate(ranks):
        similarity[i, i] = 0.2
        for step in range(1, rank + 1):
            similarity[i, (i + step) % n] = 0.25
    image_targets = torch.zeros(n, 16, dtype=torch.float64)
    image_targets[:, :n] = torch.from_numpy(similarity.T)
    image_targets[:, n] = torch.sqrt(1 - (image_targets[:, :n] ** 2).sum(dim=1))  # unit length: cosines are the design
    images = noise_images(n, seed=2)
    build_embeddings(tiny_clip, CAPTIONS, images, torch.eye(16)[:n], image_targets)
    expected = {"R@1": 4 / 12, "R@5": 7 / 12, "R@10": 10 / 12}
    assert retrieval_recall(tiny_clip, CAPTIONS, iter(images)) == pytest.approx(expected)


def test_recall_counts_any_image_of_a_repeated_caption():
    """Images 0 and 1 share caption A: A is found at rank 0 through image 1 although image 0 scores low."""
    similarity = np.array([
        [0.1, 0.9, 0.5],  # A (row of image 0's caption)
        [0.1, 0.9, 0.5],  # A again
        [0.8, 0.2, 0.3],  # B: two images of A above its own
    ])
    assert recall_at_k(similarity, ["A", "A", "B"], ks=(1, 3)) == {"R@1": 0.5, "R@3": 1.0}


# ----------------------------------------------------------------------------- a run


@dataclass
class StoredPair:
    text: str
    picture: Image.Image

    def image(self) -> Image.Image:
        return self.picture


SAMPLING = Sampling(model="fake", seed=10, steps=4, sampler="pndm", guidance=5.0, width=64, height=64, negative_prompt="")


def pooled_pixels() -> FeatureExtractor:
    """A cheap non-standard extractor (8x8 mean-pooled pixels, 192-d) for testing what a run does with features."""
    return FeatureExtractor(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(8), torch.nn.Flatten()), "pooled pixels", False, CPU)


def test_a_run_that_regenerates_the_real_pictures_scores_fid_zero(tiny_clip):
    """The generator returns each caption's own real picture, whose embedding is built at cosine 0.6 from its
    caption's and 0 from the others': the distance is 0 (named fid_stand_in: not the standard features),
    the CLIP score 60 and every R@K 1."""
    real = [StoredPair(text, image) for text, image in zip(CAPTIONS[:3], noise_images(3, seed=3, size=(64, 64)))]
    axes = torch.eye(16)
    build_embeddings(tiny_clip, CAPTIONS[:3], [pair.picture for pair in real], axes[:3], 0.6 * axes[:3] + 0.8 * axes[15])
    metrics = Metrics(features=pooled_pixels(), clip=tiny_clip, retrieval=True)
    report = evaluate_generation(real, lambda text, seed, count: [real[CAPTIONS.index(text)].picture], SAMPLING, metrics,
                                 data="pairs", progress=False)
    assert set(report.metrics) == {"fid_stand_in", "clip_score", "R@1", "R@5", "R@10"}
    assert abs(report.metrics["fid_stand_in"]) < 1e-9
    assert report.metrics["clip_score"] == pytest.approx(60.0, abs=1e-3)
    assert [report.metrics[k] for k in ("R@1", "R@5", "R@10")] == [1.0, 1.0, 1.0]
    assert report.feature_extractor == "pooled pixels"
    shifted = evaluate_generation(real, lambda text, seed, count: [Image.eval(real[CAPTIONS.index(text)].picture, lambda v: v // 2)],
                                  SAMPLING, Metrics(features=pooled_pixels()), data="pairs", progress=False)
    assert shifted.metrics["fid_stand_in"] > 0.01  # darker copies are far


def test_a_run_records_seeds_files_and_what_it_could_not_measure(tiny_clip, tmp_path):
    real = [StoredPair(text, image) for text, image in zip(CAPTIONS[:3], noise_images(3, seed=4, size=(64, 64)))]
    calls = []

    def generate(text: str, first_seed: int, count: int) -> list[Image.Image]:
        calls.append((text, first_seed, count))
        return noise_images(count, seed=first_seed, size=(64, 64))

    sampling = Sampling(**{**SAMPLING.__dict__, "images_per_caption": 2})
    metrics = Metrics(clip=tiny_clip, unavailable={"fid": "缺少 … / missing …"})
    report = evaluate_generation(real, generate, sampling, metrics, data="pairs.tsv", out=tmp_path, progress=False)
    assert calls == [(CAPTIONS[0], 10, 2), (CAPTIONS[1], 12, 2), (CAPTIONS[2], 14, 2)]
    saved = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert saved == report.as_dict()
    assert [item["seeds"] for item in saved["items"]] == [[10, 11], [12, 13], [14, 15]]
    assert saved["num_generated"] == 6 and saved["sampling"]["images_per_caption"] == 2
    assert set(saved["metrics"]) == {"clip_score"} and saved["unavailable"] == {"fid": "缺少 … / missing …"}
    first = saved["items"][0]
    assert first["files"] == ["images/00000-10.png", "images/00000-11.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / first["files"][1])), np.asarray(noise_images(2, seed=10, size=(64, 64))[1]))
    assert first["clip_scores"] == pytest.approx(tiny_clip.pair_scores([(CAPTIONS[0], im) for im in noise_images(2, seed=10, size=(64, 64))]))


def test_load_metrics_keeps_what_it_can_and_says_what_it_cannot(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metrics = load_metrics(clip_model=str(tiny_clip_dir))
    assert metrics.features is None and FID_WEIGHTS_FILE in metrics.unavailable["fid"]
    assert metrics.clip is not None and metrics.retrieval and metrics.anything
    missing = load_metrics(stand_in=True, clip_model=str(tmp_path / "no-such-model"))
    assert not missing.features.standard and missing.fid_name == "fid_stand_in"
    assert missing.clip is None and str(tmp_path / "no-such-model") in missing.unavailable["clip_score"]
    assert missing.unavailable["R@K"] == missing.unavailable["clip_score"]


# ----------------------------------------------------------------------------- the command


def write_easynlp_tsv(path: Path, captions: list[str], images: list[Image.Image]) -> Path:
    rows = []
    for idx, (caption, image) in enumerate(zip(captions, images)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append(f"{idx}\t{caption}\t{base64.b64encode(buffer.getvalue()).decode('ascii')}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The real console entry in a subprocess, offline."""
    return subprocess.run([sys.executable, "-m", "rapid_diffusion", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=600)


@pytest.mark.slow
def test_eval_command_scores_a_test_set_offline(test_domains, registry, tiny_clip_dir, tmp_path):
    """Two TSV pairs on the tiny domain, stand-in features, the tiny CLIP: the report, and images identical to
    the ones the app's generation path makes for the same caption and seed."""
    data = write_easynlp_tsv(tmp_path / "test.tsv", CAPTIONS[:2], noise_images(2, seed=5, size=(64, 64)))
    out = run_cli("eval", "--domain", "tiny", "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "2", "--seed", "5",
                  "--stand-in-features", "--clip-model", str(tiny_clip_dir), TORCH_HOME=str(tmp_path / "no-torch-cache"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert {k: report["sampling"][k] for k in ("seed", "steps", "sampler", "guidance", "images_per_caption")} == {
        "seed": 5, "steps": 2, "sampler": "pndm", "guidance": 5.0, "images_per_caption": 1}
    assert report["sampling"]["model"].startswith("tiny")
    assert (report["num_captions"], report["num_real"], report["num_generated"]) == (2, 2, 2)
    assert set(report["metrics"]) == {"fid_stand_in", "clip_score", "R@1", "R@5", "R@10"}
    assert report["metrics"]["fid_stand_in"] > 0 and 0 <= report["metrics"]["clip_score"] <= 100
    assert "不是标准 FID" in report["feature_extractor"] and report["clip_model"] == str(tiny_clip_dir)
    assert [item["seeds"] for item in report["items"]] == [[5], [6]]
    assert "fid_stand_in:" in out.stdout and "fid:" not in out.stdout
    from helpers import generate_one
    from rapid_diffusion.generation.request import GenerationRequest
    from rapid_diffusion.models.registry import ModelRegistry

    spec = ModelRegistry().spec("tiny")
    expected = generate_one(GenerationRequest(prompt=CAPTIONS[1], num_inference_steps=2, seed=6), spec, registry=registry).images[0]
    saved = Image.open(tmp_path / "out" / report["items"][1]["files"][0])
    assert np.array_equal(np.asarray(saved), np.asarray(expected))


def test_eval_command_without_weights_says_what_is_missing_before_generating(test_domains, tmp_path):
    data = write_easynlp_tsv(tmp_path / "test.tsv", CAPTIONS[:2], noise_images(2, size=(64, 64)))
    out = run_cli("eval", "--domain", "tiny", "--data", str(data), "--out", str(tmp_path / "out"),
                  TORCH_HOME=str(tmp_path / "empty-torch"), HF_HOME=str(tmp_path / "empty-hf"))
    assert out.returncode == 2
    for part in (FID_WEIGHTS_FILE, FID_WEIGHTS_URL, "--fid-weights", "OFA-Sys/chinese-clip-vit-base-patch16", "--clip-model",
                 "没有可以计算的指标", "No metric can be computed"):
        assert part in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()


def test_eval_refuses_counts_and_seeds_out_of_range_before_generating(test_domains, tmp_path, capsys):
    """0 images per caption is refused, not read as the default; a seed whose last caption would pass the
    largest seed is refused before the first image (3 captions x 2 images from 4294967291 would reach 4294967296)."""
    from rapid_diffusion.serving.cli import main

    data = write_easynlp_tsv(tmp_path / "test.tsv", CAPTIONS[:3], noise_images(3, size=(64, 64)))
    common = ["eval", "--domain", "tiny", "--data", str(data), "--out", str(tmp_path / "out"), "--stand-in-features"]
    assert main(common + ["--images-per-caption", "0"]) == 2
    assert "Invalid --images-per-caption" in capsys.readouterr().err
    assert main(common + ["--images-per-caption", "2", "--seed", "4294967291"]) == 2
    assert "Invalid --seed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_refuses_an_option_of_the_other_mode(tmp_path, capsys):
    from rapid_diffusion.serving.cli import main

    assert main(["eval", "--domain", "demo", "--fid-weights", str(tmp_path / "w.pth"), "--no-super-resolution"]) == 2
    assert "--super-resolution, --fid-weights only apply with --data" in capsys.readouterr().err
    assert main(["eval", "--domain", "demo", "--data", str(tmp_path), "--set", "unseen"]) == 2
    assert "--set" in capsys.readouterr().err
