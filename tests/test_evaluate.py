"""The evaluation run as a whole: every figure carries its split and interval, copies are caught, the headline
figures lead the table, the report has every section, prompts never come from the holdout, `ehr-diffusers evaluate`
writes the folder and the model card with its defaults, and bad input fails clearly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ehr_diffusers import EHRAutoencoderModel, EHRDenoiserModel, EHRLatentDiffusionPipeline, LogSNRCosineScheduler
from ehr_diffusers.cli import main
from ehr_diffusers.data.ehr.schema import ColumnGroup, EHRSchema
from ehr_diffusers.evaluation.ehr.baselines import baseline_vectors
from ehr_diffusers.evaluation.ehr.data import RealData, check_same_schema, load_real_data
from ehr_diffusers.evaluation.ehr.figures import figure_support
from ehr_diffusers.evaluation.ehr.presentation import COMPARISON
from ehr_diffusers.evaluation.ehr.suite import build_metrics, score_set, score_sets
from ehr_diffusers.evaluation.report import SECTIONS, model_card_markdown, render_html, write_metrics
from ehr_diffusers.hub import METRICS_END, METRICS_START

CODES = [f"{letter}{number:02d}" for letter in "EIJKN" for number in range(10, 22)]


def _schema() -> EHRSchema:
    return EHRSchema([
        ColumnGroup("sex", "binary", ["M", "F"]),
        ColumnGroup("age", "continuous", minimum=18, maximum=91),
        ColumnGroup("death", "binary", [False, True]),
        ColumnGroup("num_admissions", "count", minimum=0, maximum=20),
        ColumnGroup("marital_status", "one_hot", ["MARRIED", "SINGLE", "MISSING"]),
        ColumnGroup("race", "one_hot", ["WHITE", "BLACK", "MISSING"]),
        ColumnGroup("icd10_categories", "multi_hot", CODES),
    ])


def _population(schema: EHRSchema, n: int, seed: int) -> np.ndarray:
    """Records whose codes depend on a hidden risk and on age, so that every figure has structure to find."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, schema.dim), dtype=np.float32)
    out[:, 0] = rng.random(n) < 0.5
    out[:, 1] = rng.random(n)
    out[:, 2] = rng.random(n) < 0.2
    out[:, 3] = np.log1p(rng.integers(1, 6, n)) / np.log1p(20)
    out[np.arange(n), 4 + rng.integers(0, 3, n)] = 1
    out[np.arange(n), 7 + rng.integers(0, 3, n)] = 1
    risk = rng.random(n)[:, None] + out[:, 1:2]
    prevalence = np.linspace(0.05, 0.45, len(CODES))[None, :]
    out[:, schema.slices["icd10_categories"]] = rng.random((n, len(CODES))) < prevalence * risk
    return out


def _real(n: int = 150) -> RealData:
    """Train and holdout of 2n rows each (so the DCR's train sample is all of train), the halves n rows."""
    schema = _schema()
    train, holdout = _population(schema, 2 * n, 1), _population(schema, 2 * n, 2)
    return RealData(schema=schema, train_all=train, train=train[:n], holdout=holdout, holdout_eval=holdout[:n],
                    train_rows=2 * n, holdout_rows=2 * n, synthetic_data=True,
                    holdout_summaries=frozenset({"a holdout patient's summary"}))


def _figures(scored: dict) -> list[tuple[str, dict]]:
    return [(key, value) for section in scored["figures"].values() for key, value in section.items()]


def test_every_figure_has_a_split_and_an_interval_around_it() -> None:
    real = _real()
    scored = score_set(real, _population(real.schema, 150, 4), bootstrap_reps=40, fidelity_bootstrap_reps=20,
                       known_codes=20)
    figures = _figures(scored)
    assert len(figures) > 25
    for key, value in figures:
        assert "split" in value, key
        if value["value"] is None:
            assert value["reason"], key
            continue
        assert np.isfinite(value["value"]), key
        if key == "codes_never_generated" or key.endswith("_max"):  # a count or maximum, not an estimate
            assert value["ci95"] is None and ("count" in value["ci_method"] or "maximum" in value["ci_method"])
            continue
        low, high = value["ci95"]
        assert low <= value["value"] + 1e-9 and value["value"] - 1e-9 <= high, (key, value)
        assert value["ci_method"], key
    by_key = dict(figures)
    for key in ("pairs_pearson", "pairs_pearson_all", "codes_per_patient_wasserstein", "prevalence_spearman",
                "age_wasserstein", "num_admissions_wasserstein", "cmd_yan"):
        assert by_key[key]["split"] == "holdout", key
    assert by_key["tstr_auroc"]["split"] == "synthetic->holdout"
    assert by_key["trtr_auroc"]["split"] == "train->holdout"
    assert by_key["mia_auc"]["split"] == "train (members) vs holdout_eval (non-members)"
    assert by_key["dcr_share"]["split"] == "train sample vs holdout (equal sizes)"
    assert by_key["exact_copy_rate"]["ci_method"] == "Wilson"


def test_fidelity_is_scored_against_the_whole_holdout() -> None:
    """The holdout itself as the synthetic set gives perfect fidelity figures: the reference is every holdout row
    (not a half), and TRTR trains on as many real train rows as the set has records."""
    real = _real()
    scored = score_set(real, real.holdout.copy(), bootstrap_reps=10, fidelity_bootstrap_reps=5, known_codes=20)
    fidelity = scored["figures"]["fidelity"]
    assert fidelity["pairs_pearson"]["value"] == pytest.approx(1.0)
    assert fidelity["pairs_pearson_all"]["value"] == pytest.approx(1.0)
    assert fidelity["codes_per_patient_wasserstein"]["value"] == 0.0
    assert fidelity["age_wasserstein"]["value"] == 0.0
    assert (fidelity["codes_per_patient_synthetic_max"]["value"]
            == fidelity["codes_per_patient_real_max"]["value"])
    assert scored["raw"]["fidelity"]["dimension_wise"]["model"]["trtr"]["rows"] == len(real.holdout)


def test_copies_of_train_are_caught_and_fresh_records_are_not() -> None:
    real = _real()
    sets = {"copies": real.train.copy(), "fresh": _population(real.schema, 300, 5)}
    scored = score_sets(real, sets, bootstrap_reps=30, fidelity_bootstrap_reps=10, known_codes=20,
                        show_progress=False)
    copies, fresh = (dict(_figures(scored[name])) for name in ("copies", "fresh"))
    assert copies["mia_auc"]["value"] > 0.95
    assert copies["dcr_share"]["value"] > 0.95
    assert copies["exact_copy_rate"]["value"] == 1.0
    assert abs(fresh["mia_auc"]["value"] - 0.5) < 0.1
    assert abs(fresh["dcr_share"]["value"] - 0.5) < 0.1
    assert fresh["exact_copy_rate"]["value"] < 0.2
    assert fresh["holdout_copy_rate"]["value"] == copies["holdout_copy_rate"]["value"]  # the reference, per run
    assert copies["aia_f1"]["value"] == pytest.approx(1.0)
    assert fresh["aia_f1"]["value"] < 0.9


def test_metrics_report_and_model_card(tmp_path: Path) -> None:
    real = _real()
    sets = {"model": _population(real.schema, 300, 6), **baseline_vectors(["bernoulli", "train"], real, 300, 0)}
    scored = dict(score_sets(real, sets, bootstrap_reps=20, fidelity_bootstrap_reps=5, show_progress=False))
    scored["model"]["vectors"] = sets["model"]
    run = {"model": "m", "dataset": "d", "seed": 0, "synthetic_data": True, "train_rows": 300,
           "train_rows_used": 150, "holdout_rows": 300, "holdout_eval_rows": 150, "synthetic_rows": 300,
           "generation": {"steps": 10, "decode_mode": "sample"}, "ehr_diffusers_version": "test"}
    metrics, plots = build_metrics(run, real, scored, {"reason": "no prompts in this test"})
    rows = metrics["comparison"]["rows"]
    assert [row["key"] for row in rows] == [key for _, key, _, _ in COMPARISON]
    # the headline figures lead, then dimension-wise prediction, CMD and privacy
    assert [row["key"] for row in rows[:9]] == [
        "pairs_pearson", "pairs_pearson_all", "codes_per_patient_wasserstein", "codes_per_patient_synthetic_mean",
        "codes_per_patient_synthetic_max", "prevalence_pearson", "prevalence_spearman", "age_wasserstein",
        "num_admissions_wasserstein"]
    by_key = {row["key"]: row for row in rows}
    real_mean = metrics["fidelity"]["figures"]["codes_per_patient_real_mean"]["value"]
    assert by_key["codes_per_patient_synthetic_mean"]["real"]["value"] == real_mean
    assert by_key["codes_per_patient_synthetic_mean"]["better"] == f"close to real; holdout {real_mean:,.2f}"
    assert by_key["exact_copy_rate"]["values"]["train"]["value"] == 1.0
    path = write_metrics(metrics, tmp_path / "metrics.json")
    loaded = json.loads(path.read_text())
    assert loaded["comparison"]["methods"] == ["model", "bernoulli", "train"]
    page = render_html(metrics, plots)
    for section in SECTIONS:
        assert f'id="{section}"' in page
    assert page.count("data:image/png;base64,") >= 5  # prevalence, heatmap, two histograms, ROC
    assert "no prompts in this test" in page and "synthetic demo cohort" in page
    assert page.index("Pair rate r") < page.index("Dimension-wise TSTR AUROC") < page.index("CMD (Yan")
    card = model_card_markdown(metrics)
    assert card.count("\n|") == len(COMPARISON) + 2  # the header, its rule and one row per figure
    assert "real train rows (reference)" in card and "independent marginals" in card
    assert "against the real holdout split (300 patients" in card and "(sample decoding)" in card
    assert card.index("Pair rate r (holdout's top-100 pairs)") < card.index("Codes per patient, max") < card.index(
        "Membership inference AUC")


def test_intervals_stay_in_the_figures_range() -> None:
    """Fresh real records against the holdout: total variations near 0 get normal intervals that would go below 0."""
    real = _real(400)
    figures = dict(_figures(score_set(real, _population(real.schema, 800, 7), bootstrap_reps=20,
                                      fidelity_bootstrap_reps=20, known_codes=20)))
    for key, value in figures.items():
        low, high = figure_support(key)
        if value.get("ci95") is not None:
            assert low <= value["ci95"][0] and value["ci95"][1] <= high, (key, value)
    assert figures["sex_total_variation"]["ci95"][0] >= 0.0
    assert figure_support("sex_total_variation") == (0.0, 1.0)
    assert figure_support("prevalence_pearson") == (-1.0, 1.0)


def test_report_states_why_when_prediction_and_membership_inference_are_skipped() -> None:
    """One train row: dimension-wise prediction and membership inference cannot run; the report says why."""
    real = _real()
    real.train, real.train_all = real.train[:1], real.train_all[:1]
    sets = {"model": _population(real.schema, 150, 6)}
    scored = dict(score_sets(real, sets, bootstrap_reps=10, fidelity_bootstrap_reps=5, known_codes=20,
                             show_progress=False))
    scored["model"]["vectors"] = sets["model"]
    run = {"model": "m", "dataset": "d", "seed": 0, "synthetic_data": False, "train_rows": 300,
           "train_rows_used": 1, "holdout_rows": 300, "holdout_eval_rows": 150, "synthetic_rows": 150,
           "generation": {}, "ehr_diffusers_version": "test"}
    metrics, plots = build_metrics(run, real, scored, {"reason": "none"})
    assert metrics["utility"]["note"].startswith("Not computed:")
    assert metrics["privacy"]["figures"]["mia_auc"]["value"] is None
    page = render_html(metrics, plots)
    assert "No ROC:" in page


def test_report_flags_an_autoencoder_behind_independent_marginals() -> None:
    """The training's holdout reconstruction figures appear in the report, flagged when behind the marginals."""
    real = _real()
    sets = {"model": _population(real.schema, 150, 6)}
    scored = dict(score_sets(real, sets, bootstrap_reps=10, fidelity_bootstrap_reps=5, known_codes=20,
                             show_progress=False))
    scored["model"]["vectors"] = sets["model"]
    run = {"model": "m", "dataset": "d", "seed": 0, "synthetic_data": False, "train_rows": 300,
           "train_rows_used": 150, "holdout_rows": 300, "holdout_eval_rows": 150, "synthetic_rows": 150,
           "generation": {}, "ehr_diffusers_version": "test"}
    block = {"split": "holdout", "decode_mode": "sample", "seed": 0,
             "reconstruction": {"pairs_pearson": 0.71, "codes_per_patient_wasserstein": 5.0},
             "independent_marginals": {"pairs_pearson": 0.84, "codes_per_patient_wasserstein": 4.3},
             "behind_marginals": ["pairs_pearson", "codes_per_patient_wasserstein"]}
    metrics, plots = build_metrics(run, real, scored, {"reason": "none"}, autoencoder=block)
    assert metrics["autoencoder_reconstruction"] == block
    page = render_html(metrics, plots)
    section = page[page.index('id="autoencoder"'):]
    assert "behind independent marginals on pairs_pearson, codes_per_patient_wasserstein" in section
    assert "0.710" in section and "0.840" in section
    block["behind_marginals"] = []
    assert "ahead of independent marginals" in render_html(build_metrics(run, real, scored, {"reason": "none"},
                                                                         autoencoder=block)[0], plots)
    assert "Not available" in render_html(*build_metrics(run, real, scored, {"reason": "none"}))


def test_train_reference_is_a_sample_of_train_rows_at_the_others_size(caplog) -> None:
    real = _real()
    sets = baseline_vectors(["train", "bernoulli"], real, 100, seed=0)
    assert sets["train"].shape == sets["bernoulli"].shape == (100, real.schema.dim)
    rows = [tuple(row) for row in real.train_all]
    positions = [rows.index(tuple(row)) for row in sets["train"]]
    assert len(set(positions)) == 100 and positions == sorted(positions)  # without replacement, in train order
    np.testing.assert_array_equal(sets["train"], real.train_sample(100, 0))
    with caplog.at_level("WARNING"):
        larger = baseline_vectors(["train"], real, 10_000, seed=0)["train"]
    assert len(larger) == len(real.train_all) and "fewer than the 10000 records" in caplog.text
    with pytest.raises(ValueError, match="'holdout' is no longer a baseline"):
        baseline_vectors(["holdout"], real, 100, seed=0)


def test_write_metrics_refuses_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        write_metrics({"figure": float("nan")}, tmp_path / "metrics.json")
    assert not (tmp_path / "metrics.json").exists()


def test_different_schemas_are_named() -> None:
    schema = _schema()
    other = EHRSchema([*schema.groups[:-1], ColumnGroup("icd10_categories", "multi_hot", CODES[:-1])])
    with pytest.raises(ValueError, match="'icd10_categories' differs in categories"):
        check_same_schema(schema, other, "--dataset D", "--model M")
    check_same_schema(schema, _schema(), "--dataset D", "--model M")


def test_names_that_moved_stay_importable_from_their_old_modules() -> None:
    from ehr_diffusers.data.ehr import dataset
    from ehr_diffusers.evaluation import stats
    from ehr_diffusers.evaluation.ehr import baselines, figures, presentation
    from ehr_diffusers.evaluation.fidelity import roc_auc as fidelity_roc_auc
    from ehr_diffusers.evaluation.privacy import roc_auc as privacy_roc_auc
    from ehr_diffusers.evaluation.privacy import tpr_at_fpr
    from ehr_diffusers.evaluation.suite import (
        DEFINITIONS,
        FIDELITY_FIGURES,
        LABELS,
        METHOD_LABELS,
        figure,
        figure_support,
    )
    from ehr_diffusers.evaluation.suite import baseline_vectors as suite_baseline_vectors
    from ehr_diffusers.training import data as training_data

    assert fidelity_roc_auc is privacy_roc_auc is stats.roc_auc and tpr_at_fpr is stats.tpr_at_fpr
    assert suite_baseline_vectors is baselines.baseline_vectors
    assert (figure, figure_support, FIDELITY_FIGURES) == (figures.figure, figures.figure_support,
                                                          figures.FIDELITY_FIGURES)
    assert (DEFINITIONS, LABELS, METHOD_LABELS) == (presentation.DEFINITIONS, presentation.LABELS,
                                                    presentation.METHOD_LABELS)
    for name in ("HOLDOUT_SPLIT", "TRAIN_SPLIT", "iter_vectors", "load_training_dataset", "record_columns",
                 "vector_dataset"):
        assert getattr(training_data, name) is getattr(dataset, name), name


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def model_dir(labelled_demo_dataset, tmp_path_factory) -> Path:
    """An untrained pipeline on the labelled demo dataset's schema, with the MiniLM embedder and a model card."""
    from ehr_diffusers.text.embed import load_embedder

    schema = EHRSchema.load(labelled_demo_dataset)
    torch.manual_seed(0)
    autoencoder = EHRAutoencoderModel.from_schema(schema, latent_dim=8, hidden_dim=16, num_layers=1)
    denoiser = EHRDenoiserModel(latent_dim=8, num_tokens=2, hidden_dim=16, num_layers=1, num_heads=2,
                                condition_dim=384, fourier_dim=8)
    pipe = EHRLatentDiffusionPipeline(autoencoder, denoiser, LogSNRCosineScheduler(), load_embedder("minilm"),
                                      schema=schema.to_dict())
    folder = tmp_path_factory.mktemp("model") / "model"
    pipe.save_pretrained(folder)
    (folder / "README.md").write_text(f"# model\n\n## Evaluation\n\n{METRICS_START}\nnot yet\n{METRICS_END}\n")
    return folder


def test_evaluate_defaults() -> None:
    """4,000 records and the marginals and real train rows beside the model, unless told otherwise; the decode mode
    is the pipeline's own."""
    import inspect

    from ehr_diffusers.cli import build_parser
    from ehr_diffusers.evaluation.ehr.suite import evaluate_pipeline

    args = build_parser().parse_args(["evaluate", "--model", "m", "--dataset", "d", "--out", "o"])
    assert (args.n_records, args.baselines, args.decode_mode) == (4000, "bernoulli,train", None)
    defaults = inspect.signature(evaluate_pipeline).parameters
    assert defaults["n_records"].default == 4000 and defaults["baselines"].default == ("bernoulli", "train")
    assert build_parser().parse_args(["evaluate", "--model", "m", "--dataset", "d", "--out", "o", "--decode-mode",
                                      "threshold"]).decode_mode == "threshold"


def test_prompts_come_from_train_and_holdout_prompts_are_refused(model_dir, labelled_demo_dataset) -> None:
    from datasets import load_from_disk

    from ehr_diffusers.evaluation.ehr.suite import evaluate_pipeline

    real = load_real_data(labelled_demo_dataset, show_progress=False, prompt_rows=50)
    dataset = load_from_disk(str(labelled_demo_dataset))
    train, holdout = set(dataset["train"]["summary"]), set(dataset["holdout"]["summary"])
    assert len(real.prompts) == 50 and set(real.prompts) <= train and not set(real.prompts) & holdout
    assert real.holdout_summaries == holdout
    # each prompt is the summary of the train patient whose record sits beside it
    by_summary = dict(zip(dataset["train"]["summary"], dataset["train"]["subject_id"]))
    subjects = dict(zip(dataset["train"]["subject_id"], dataset["train"]["age"]))
    assert [subjects[by_summary[prompt]] for prompt in real.prompts] == [r["age"] for r in real.prompt_records]
    pipe = EHRLatentDiffusionPipeline.from_pretrained(model_dir)
    leaked = [real.prompts[0], sorted(holdout)[0]]
    with pytest.raises(ValueError, match="1 of the 2 prompts are summaries of holdout patients"):
        evaluate_pipeline(pipe, real, model_name="m", dataset_name="d", prompts=leaked)


def test_evaluate_command_writes_the_report_and_the_card(model_dir, labelled_demo_dataset, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    code = main(["evaluate", "--model", str(model_dir), "--dataset", str(labelled_demo_dataset), "--out", str(out),
                 "-q", "--n-prompts", "8", "--bootstrap", "20", "--fidelity-bootstrap", "5", "--steps", "2",
                 "--n-records", "300"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["metrics.json", "report.html"]
    metrics = json.loads((out / "metrics.json").read_text())
    real = load_real_data(labelled_demo_dataset, show_progress=False)
    run = metrics["run"]
    assert run["synthetic_rows"] == 300 and run["holdout_rows"] == len(real.holdout) == real.holdout_rows
    assert run["baselines"] == ["bernoulli", "train"] and set(metrics["methods"]) == {"model", "bernoulli", "train"}
    assert metrics["methods"]["train"]["rows"] == 300
    assert run["generation"]["decode_mode"] == EHRLatentDiffusionPipeline.from_pretrained(model_dir).config.decode_mode
    assert run["splits"]["prompts"].startswith("train") and run["generation"]["prompted"]["split"].startswith("train")
    prompts = metrics["prompt_faithfulness"]
    assert prompts["detail"]["prompts"] == 8 and prompts["detail"]["records"] == 16
    assert prompts["figures"]["extractor_agreement"]["value"] > 0.95
    assert prompts["figures"]["overall"]["split"].startswith("train")
    page = (out / "report.html").read_text()
    assert all(f'id="{section}"' in page for section in SECTIONS)
    card = (model_dir / "README.md").read_text()
    assert "not yet" not in card and "Prevalence Pearson r" in card
    assert re.search(r"report written to .*report\.html", capsys.readouterr().out)


@pytest.mark.parametrize("extra, message", [
    (["--baselines", "bernoulli,gan"], "--baselines: unknown baseline"),
    (["--baselines", "bernoulli,holdout"], "'holdout' is no longer a baseline"),
    (["--dataset", "/nonexistent"], "--dataset /nonexistent: no such folder"),
    (["--n-records", "1"], "--n-records must be at least 2"),
])
def test_evaluate_command_errors(model_dir, labelled_demo_dataset, tmp_path, capsys, extra, message) -> None:
    arguments = ["evaluate", "--model", str(model_dir), "--dataset", str(labelled_demo_dataset),
                 "--out", str(tmp_path / "report"), "-q", *extra]
    assert main(arguments) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_evaluate_command_names_a_schema_mismatch(model_dir, demo_dataset, tmp_path, capsys) -> None:
    """A model evaluated against another dataset (here: its age scaling differs)."""
    import shutil

    dataset = tmp_path / "dataset"
    shutil.copytree(demo_dataset, dataset)
    schema = json.loads((dataset / "schema.json").read_text())
    age = next(group for group in schema["groups"] if group["name"] == "age")
    age["maximum"] = age["maximum"] + 1
    EHRSchema.from_dict({key: value for key, value in schema.items() if key != "sha256"}).save(dataset)
    assert main(["evaluate", "--model", str(model_dir), "--dataset", str(dataset), "--out", str(tmp_path / "r"),
                 "-q", "--n-prompts", "0"]) == 2
    assert "use different schemas: group 'age' differs in maximum" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_evaluate_names_a_model_without_a_schema(model_dir, labelled_demo_dataset, tmp_path, capsys) -> None:
    """A pipeline saved from bare group sizes (no categories, no scaling) cannot be compared with records."""
    from ehr_diffusers.text.embed import load_embedder

    schema = EHRSchema.load(labelled_demo_dataset)
    groups = [{"name": g.name, "kind": g.kind, "width": g.width} for g in schema.groups]
    autoencoder = EHRAutoencoderModel(groups=groups, latent_dim=8, hidden_dim=16, num_layers=1)
    denoiser = EHRDenoiserModel(latent_dim=8, num_tokens=2, hidden_dim=16, num_layers=1, num_heads=2,
                                condition_dim=384, fourier_dim=8)
    folder = tmp_path / "bare"
    pipe = EHRLatentDiffusionPipeline(autoencoder, denoiser, LogSNRCosineScheduler(), load_embedder("minilm"))
    pipe.save_pretrained(folder)
    assert main(["evaluate", "--model", str(folder), "--dataset", str(labelled_demo_dataset), "--out",
                 str(tmp_path / "r"), "-q"]) == 2
    assert f"--model {folder}: this pipeline has no schema" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
