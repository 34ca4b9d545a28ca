"""X-ray evaluation: FID/KID, AUROC per subset, direction of change, SSIM, the cluster bootstrap, the shuffled-events
control, the finding classifier, the events-only baseline, the report, and ``evaluate-cxr`` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import prepare_demo_cxr, reset_accelerate_state
from ehr_diffusers.data.cxr.split import CXRSplit
from ehr_diffusers.evaluation.cxr.baselines import events_only_scores
from ehr_diffusers.evaluation.cxr.classifier import binary_findings, train_finding_classifier
from ehr_diffusers.evaluation.cxr.metrics import (
    direction_accuracy,
    finding_auroc,
    frechet_distance,
    kernel_inception_distance,
    ssim,
    subject_resamples,
    subset_masks,
)
from ehr_diffusers.evaluation.cxr.report import grid_strip, render_cxr_html
from ehr_diffusers.evaluation.cxr.suite import METHODS, predict_images, score_methods


# ---------------------------------------------------------------------------------------------------- distances
def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise() -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    noisy = [features + sigma * rng.standard_normal(features.shape) for sigma in (0.25, 0.5, 1.0, 2.0)]
    fids = [frechet_distance(features, other) for other in noisy]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    # KID is unbiased, so it scatters around 0 at small distances: its growth shows at larger steps of noise
    base = rng.standard_normal((400, 16))
    kids = [kernel_inception_distance(base, base + sigma * rng.standard_normal(base.shape)) for sigma in (1, 2, 4)]
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    # a shift of the mean by m adds |m|^2 exactly
    assert frechet_distance(features, features + 3.0) == pytest.approx(16 * 9.0, rel=1e-6)


def test_kid_is_about_zero_for_two_samples_of_one_distribution() -> None:
    rng = np.random.default_rng(1)
    first, second = rng.standard_normal((300, 8)), rng.standard_normal((300, 8))
    assert abs(kernel_inception_distance(first, second)) < 0.02
    assert kernel_inception_distance(first, second + 1.0) > 0.5
    with pytest.raises(ValueError, match="one width"):
        kernel_inception_distance(first, second[:, :4])


def test_kid_leaves_out_pairs_of_one_subject() -> None:
    """Chained films: triplet i's target is triplet i+1's previous image. Without the subjects the shared images
    pull KID below 0; leaving out same-subject pairs brings it back to about 0."""
    rng = np.random.default_rng(2)
    subjects = np.repeat(np.arange(100), 6)
    films = rng.standard_normal((len(subjects) + 1, 8))
    previous, target = films[:-1], films[1:]
    chained = kernel_inception_distance(previous, target)
    grouped = kernel_inception_distance(previous, target, subjects)
    assert chained < -0.02 and abs(grouped) < 0.02
    with pytest.raises(ValueError, match="labels"):
        kernel_inception_distance(previous, target, subjects[:5])


# ---------------------------------------------------------------------------------------------------- findings
def _labels() -> tuple[np.ndarray, np.ndarray]:
    """8 triplets x 2 findings: finding 0 changes in rows 0-3 (onsets in 0-1, resolutions in 2-3), finding 1 never."""
    previous = np.array([[0, 1], [0, 0], [1, 1], [1, 0], [0, 1], [1, 0], [0, 1], [1, 0]], dtype=bool)
    target = previous.copy()
    target[:4, 0] = ~previous[:4, 0]
    return previous, target


def test_auroc_per_subset_on_cases_with_a_known_split() -> None:
    previous, target = _labels()
    masks = subset_masks(previous, target)
    assert masks["diff"].sum() == 4 and masks["diff"][:4, 0].all() and not masks["diff"][:, 1].any()
    perfect = finding_auroc(target.astype(float), target, masks["diff"])
    assert perfect["micro"] == 1.0 and perfect["per_finding"] == [1.0, None] and perfect["macro"] == 1.0
    copied = {subset: finding_auroc(previous.astype(float), target, masks[subset]) for subset in masks}
    assert copied["diff"]["micro"] == 0.0  # on Diff the previous label is always wrong
    assert copied["same"]["micro"] == 1.0 and copied["same"]["per_finding"] == [1.0, 1.0]
    assert 0.0 < copied["all"]["micro"] < 1.0


def test_direction_of_change_counts_ties_as_half() -> None:
    previous, target = _labels()
    before = np.full(previous.shape, 0.5)
    right = before + np.where(target & ~previous, 0.3, np.where(previous & ~target, -0.3, 0.0))
    assert direction_accuracy(right, before, previous, target) == 1.0
    assert direction_accuracy(before, before, previous, target) == 0.5
    assert direction_accuracy(2 * before - right, before, previous, target) == 0.0
    assert direction_accuracy(before, before, previous, previous) is None
    # pushing every score up is right on every onset and wrong on every resolution: balanced, that is chance
    assert direction_accuracy(before + 0.2, before, previous, target) == 0.5


def test_ssim_is_one_for_identical_images_and_falls_with_noise() -> None:
    rng = np.random.default_rng(0)
    images = (rng.random((3, 32, 32)) * 255).astype(np.uint8)
    assert np.allclose(ssim(images, images), 1.0)
    noisy = np.clip(images + rng.normal(0, 40, images.shape), 0, 255).astype(np.uint8)
    noisier = np.clip(images + rng.normal(0, 90, images.shape), 0, 255).astype(np.uint8)
    assert (ssim(images, noisier) < ssim(images, noisy)).all() and (ssim(images, noisy) < 1).all()
    with pytest.raises(ValueError, match="one shape"):
        ssim(images, images[:, :16])


def test_cluster_bootstrap_keeps_subjects_whole() -> None:
    subjects = np.array([7, 7, 7, 3, 3, 9])
    for rows in subject_resamples(subjects, reps=20, seed=0):
        counts = {s: int((subjects[rows] == s).sum()) for s in (7, 3, 9)}
        assert counts[7] % 3 == 0 and counts[3] % 2 == 0 and len(rows) == sum(counts.values())
    assert all((a == b).all() for a, b in zip(subject_resamples(subjects, 5, 1), subject_resamples(subjects, 5, 1)))


def test_uncertain_labels_count_as_present() -> None:
    assert binary_findings(np.array([1, 0, -1, -128])).tolist() == [True, False, True, False]


# ---------------------------------------------------------------------------------------------------- the control
class _RecordingPipe:
    """Stands in for EHRXDiffPipeline: returns the previous image brightened by the first event value and records
    the events and noise seeds it was given."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, images, event_embeddings, event_hours, generator, **kwargs):
        self.calls.append({"events": [e.copy() for e in event_embeddings],
                           "seeds": [g.initial_seed() for g in generator]})
        out = [np.asarray(image, np.float32)[..., None] / 255.0 for image in images]
        return SimpleNamespace(images=np.stack(out))


def _split(n: int = 10, size: int = 8, dim: int = 3) -> CXRSplit:
    rng = np.random.default_rng(0)
    images = torch.from_numpy((rng.random((n, size, size)) * 255).astype(np.uint8))
    return CXRSplit(previous=images, target=images.flip(0), triplet_id=np.arange(n),
                    event_embeddings=[np.full((i % 3 + 1, dim), i, np.float32) for i in range(n)],
                    event_hours=[np.full(i % 3 + 1, -1.0, np.float32) for i in range(n)],
                    subject_id=np.arange(n) // 2)


def test_the_shuffled_control_permutes_events_across_triplets_with_the_same_noise() -> None:
    from ehr_diffusers.evaluation.cxr.controls import derangement

    split = _split()
    permutation = derangement(len(split), seed=3)
    assert (permutation != np.arange(len(split))).all()
    assert (permutation == derangement(len(split), seed=3)).all() and (permutation != derangement(len(split), 4)).any()
    seen = {}
    for events in ("true", "shuffled", "none"):
        pipe = _RecordingPipe()
        predict_images(pipe, split, events, permutation=permutation, batch_size=4, seed=11, show_progress=False)
        seen[events] = pipe
        assert [seed for call in pipe.calls for seed in call["seeds"]] == [11 + i for i in range(len(split))]
    true = [e for call in seen["true"].calls for e in call["events"]]
    shuffled = [e for call in seen["shuffled"].calls for e in call["events"]]
    none = [e for call in seen["none"].calls for e in call["events"]]
    for i in range(len(split)):
        assert np.array_equal(true[i], split.event_embeddings[i])
        # another triplet's events, whole: never the triplet's own, never mixed within one
        assert np.array_equal(shuffled[i], split.event_embeddings[permutation[i]]) and permutation[i] != i
        assert none[i].shape == (0, 3)
    with pytest.raises(ValueError, match="permutation"):
        predict_images(_RecordingPipe(), split, "shuffled", show_progress=False)


def test_the_shuffle_never_gives_a_triplet_events_of_its_own_subject() -> None:
    from ehr_diffusers.evaluation.cxr.controls import derangement

    subjects = np.repeat(np.arange(12), [1, 2, 3, 4, 1, 1, 2, 5, 3, 1, 2, 2])
    for seed in range(5):
        permutation = derangement(len(subjects), seed, subjects)
        assert sorted(permutation) == list(range(len(subjects))) and (subjects[permutation] != subjects).all()
    with pytest.raises(ValueError, match="across subjects"):
        derangement(4, 0, np.array([1, 1, 1, 2]))


def _score_methods(split: CXRSplit, reps: int = 30) -> dict:
    """Scores with an oracle 'scorer' that reads the finding from the mean brightness of the image."""
    def encode(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        brightness = images.float().mean(dim=(1, 2)).numpy()[:, None] / 255.0
        return np.concatenate([brightness, brightness**2], axis=1), brightness

    predictions = {method: split.target if method == "model" else split.previous
                   for method in ("model", "shuffled_events", "no_events")}
    return score_methods(split, ["Edema"], [3], encode, predictions, np.zeros((len(split), 1)), reps=reps, seed=0,
                         show_progress=False)


def test_a_model_that_predicts_the_target_beats_its_controls() -> None:
    n = 60
    rng = np.random.default_rng(0)
    previous_labels = rng.random(n) < 0.5
    target_labels = previous_labels.copy()
    target_labels[:30] = ~target_labels[:30]
    def image(present: bool) -> np.ndarray:
        return np.full((8, 8), 200 if present else 60, np.uint8) + rng.integers(0, 20, (8, 8)).astype(np.uint8)
    labels = np.full((n, 14), -128, np.int8)
    previous = labels.copy()
    previous[:, 3] = previous_labels
    target = labels.copy()
    target[:, 3] = target_labels
    split = CXRSplit(previous=torch.from_numpy(np.stack([image(p) for p in previous_labels])),
                     target=torch.from_numpy(np.stack([image(t) for t in target_labels])),
                     event_embeddings=[np.zeros((1, 2), np.float32)] * n, event_hours=[np.zeros(1, np.float32)] * n,
                     triplet_id=np.arange(n), subject_id=np.arange(n) // 2, chexpert_previous=previous,
                     chexpert_target=target)
    result = _score_methods(split)
    figures = result["figures"]
    assert set(figures["auroc_micro_diff"]) == set(METHODS)
    assert figures["auroc_micro_diff"]["model"]["value"] == 1.0
    assert figures["auroc_micro_diff"]["shuffled_events"]["value"] == 0.0
    assert figures["auroc_micro_diff"]["previous_labels"]["value"] == 0.0
    assert figures["direction_diff"]["model"]["value"] == 1.0
    assert figures["direction_diff"]["previous_image"]["value"] == 0.5
    assert figures["fid"]["model"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert figures["fid"]["previous_image"]["value"] > 0.01
    assert "percentile cluster bootstrap over 30 subjects" in figures["auroc_micro_all"]["model"]["ci_method"]
    contrast = result["contrasts"]["auroc_micro_diff: model - shuffled_events"]
    assert contrast["value"] == 1.0 and contrast["ci95"][0] > 0
    assert result["pairs"]["diff"] == [30] and result["onsets"][0] + result["resolutions"][0] == 30


# ---------------------------------------------------------------------------------------------------- models
def test_the_finding_classifier_learns_a_visible_finding() -> None:
    rng = np.random.default_rng(0)
    present = rng.random((160, 1)) < 0.4
    images = (rng.random((160, 16, 16)) * 80).astype(np.uint8)
    images[present[:, 0], 4:12, 4:12] += 120  # the finding: a bright square
    tensor = torch.from_numpy(images)
    model, figures = train_finding_classifier(tensor[:120], present[:120], ["Pleural Effusion"], tensor[120:],
                                              present[120:], epochs=6, batch_size=16, seed=0, show_progress=False)
    assert figures["validation_auroc"]["Pleural Effusion"] > 0.9
    assert model.config.finding_names == ["Pleural Effusion"] and model.feature_dim == 128


def test_events_only_baseline_reads_a_decisive_event() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.5
    embeddings = [rng.normal(0, 0.1, (rng.integers(1, 6), 4)).astype(np.float32) for _ in range(200)]
    for events, label in zip(embeddings, labels):
        if label:
            events[-1, 0] = 2.0  # one event among several says the finding comes
    scores = events_only_scores(embeddings[:150], labels[:150, None], embeddings[150:], dim=4)
    from ehr_diffusers.evaluation.stats import roc_auc

    test = labels[150:]
    assert roc_auc(scores[test, 0], scores[~test, 0]) > 0.95


# ---------------------------------------------------------------------------------------------------- report
def test_the_report_renders_offline_with_images_embedded() -> None:
    split = _split()
    result = _score_methods_report(split)
    strip = grid_strip(split.previous[0].numpy(), split.target[0].numpy(), split.target[0].numpy(), panel=16)
    assert strip.shape == (16, 4 * 16 + 3 * 4) and strip.dtype == np.uint8
    from ehr_diffusers.evaluation.cxr.report import grid_entries

    entries = grid_entries([0, 1], split, split.target.numpy(), *result["labels"], ["Edema"],
                           [["furosemide 40 mg IV, time -3.0 h", "Heart Rate 80, time -2 h"], []],
                           [["prescriptions", "chartevents"], []])
    assert entries[0]["events"] == ["furosemide 40 mg IV, time -3.0 h"] and entries[0]["routine_events"] == 1
    page = render_cxr_html(result["metrics"], entries)
    assert page.count("data:image/png;base64,") == 3  # two grid rows and the per-finding plot
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "model, shuffled events" in page and "furosemide 40 mg IV" in page


def _score_methods_report(split: CXRSplit) -> dict:
    labels = np.full((len(split), 14), 0, np.int8)
    target = labels.copy()
    target[::2, 3] = 1
    split.chexpert_previous, split.chexpert_target = labels, target
    result = _score_methods(split, reps=5)
    result.pop("_scores")
    result.pop("_labels")
    from ehr_diffusers.evaluation.cxr.suite import goals

    result.update(goals=goals(result["figures"], result["contrasts"]), sampling={"num_inference_steps": 2},
                  shuffle={"kind": "derangement", "seed": 0},
                  run={"model": "m", "dataset": "d", "split": "test", "scorer": "oracle", "synthetic_data": True,
                       "ehr_diffusers_version": "0"})
    return {"metrics": result, "labels": (binary_findings(labels)[:, [3]], binary_findings(target)[:, [3]])}


# ---------------------------------------------------------------------------------------------------- command
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A 24-subject cohort prepared at 32 px with MiniLM events, and a 4-step tiny model trained on its train split."""
    from diffusers import AutoencoderKL

    from ehr_diffusers.training.train_ehrxdiff import main as train

    root = tmp_path_factory.mktemp("evaluate-cxr")
    prepare_demo_cxr(root, 24, image_size=32)
    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=32).save_pretrained(root / "vae")
    try:
        train(["--train_data_dir", str(root / "data"), "--vae_path", str(root / "vae"), "--output_dir",
               str(root / "model"), "--resolution", "32", "--block_out_channels", "16,16,32", "--event_hidden_dim",
               "32", "--num_latents", "4", "--train_batch_size", "8", "--validation_triplets", "8",
               "--validation_draws", "1", "--validation_images", "1", "--validation_inference_steps", "2",
               "--report_to", "none", "--seed", "0", "--max_events", "32", "--max_train_steps", "4",
               "--validation_steps", "4"])
    finally:
        reset_accelerate_state()
    return {"data": root / "data", "model": root / "model", "root": root}


def _evaluate(trained: dict[str, Path], model: Path, out: Path, *extra: str) -> int:
    from ehr_diffusers.cli import main

    return main(["evaluate-cxr", "--model", str(model), "--dataset", str(trained["data"]), "--out", str(out),
                 "--steps", "2", "--bootstrap", "10", "-q", *extra])


@pytest.mark.slow
def test_evaluate_cxr_writes_the_report_and_the_card(trained, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("EHR_DIFFUSERS_CACHE", str(tmp_path / "cache"))
    assert (trained["model"] / "training_data.json").is_file()
    out = tmp_path / "evaluation"
    assert _evaluate(trained, trained["model"], out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["split"] == "test" and metrics["run"]["training_subjects_checked"] is True
    assert metrics["run"]["scorer_name"] == "classifier" and "trained now" in metrics["run"]["scorer_source"]
    assert metrics["run"]["scorer_training_subjects_checked"] is True
    assert set(metrics["figures"]["auroc_micro_all"]) == set(METHODS)
    assert metrics["figures"]["fid"]["model"]["split"] == "test"
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "https://" not in page
    card = (trained["model"] / "README.md").read_text()
    assert "<!-- metrics:start -->" in card and "evaluate-cxr" in card and "model, shuffled events" in card
    printed = capsys.readouterr().out
    assert "report written to" in printed
    # the classifier is cached and reused: a second run trains nothing and gives the same figures
    again = tmp_path / "again"
    assert _evaluate(trained, trained["model"], again, "--no-model-card") == 0
    second = json.loads((again / "metrics.json").read_text())
    assert "cached in" in second["run"]["scorer_source"]
    assert second["figures"]["auroc_micro_all"] == metrics["figures"]["auroc_micro_all"]


def test_evaluate_cxr_refuses_a_split_that_shares_training_subjects(trained, tmp_path, capsys) -> None:
    from datasets import load_from_disk

    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    record = json.loads((model / "training_data.json").read_text())
    leaked = int(load_from_disk(str(trained["data"]))["test"]["subject_id"][0])
    record["subjects"].append(leaked)
    (model / "training_data.json").write_text(json.dumps(record))
    out = tmp_path / "evaluation"
    assert _evaluate(trained, model, out) == 2
    error = capsys.readouterr().err
    assert f"subject_id {leaked}" in error and "'test' split" in error and not out.exists()


@pytest.mark.parametrize("extra, message", [
    (("--split", "train"), "--split train"),
    (("--split", "nope"), "--split nope"),
    (("--extractor", "no-such-scorer"), "--extractor no-such-scorer"),
    (("--guidance-scale", "nan"), "--guidance-scale"),
    (("--eta", "nan"), "--eta"),
    (("--seed", "-1"), "--seed"),
])
def test_evaluate_cxr_bad_input_names_the_argument(trained, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "evaluation"
    assert _evaluate(trained, trained["model"], out, *extra) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_the_demo_trains_the_classifier_beside_train_cxr_and_passes_on_errors() -> None:
    from ehr_diffusers.commands.demo import _while_training

    threads = torch.get_num_threads()
    seen = []
    assert _while_training(lambda: torch.get_num_threads(), lambda: seen.append("trained")) == 1
    assert seen == ["trained"] and torch.get_num_threads() == threads

    def broken() -> None:
        raise ValueError("classifier failed")

    with pytest.raises(ValueError, match="classifier failed"):
        _while_training(broken, lambda: None)

    def failed_training() -> None:
        raise RuntimeError("train-cxr failed")

    with pytest.raises(RuntimeError, match="train-cxr failed"):
        _while_training(lambda: 1, failed_training)
    assert torch.get_num_threads() == threads
