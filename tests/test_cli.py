import json
import shutil
import subprocess
import sys

import pytest
from datasets import load_from_disk

from conftest import PATIENTS, write_tiny_mimic
from ehr_diffusers.cli import main


def test_prepare_command_prints_summary(tiny_mimic, tmp_path, capsys):
    out = tmp_path / "prepared"
    code = main(["-q", "prepare", "--mimic-dir", str(tiny_mimic), "--out", str(out), "--holdout-fraction", "0.3",
                 "--seed", "2", "--gem-combination", "skip"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "patients            10" in printed and "unmapped ICD-9      1 codes in 1 rows" in printed
    assert "train 7 / holdout 3 (seed 2" in printed
    assert load_from_disk(str(out))["holdout"].num_rows == 3


def test_errors_are_one_line_with_exit_2(tmp_path, capsys):
    bad = write_tiny_mimic(tmp_path / "bad", patients=PATIENTS.replace("anchor_age", "age_anchor"))
    code = main(["-q", "prepare", "--mimic-dir", str(bad), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert "patients.csv: missing required column(s) anchor_age" in error
    assert not (tmp_path / "out").exists()

    good = write_tiny_mimic(tmp_path / "good")
    (tmp_path / "exists").mkdir()
    code = main(["-q", "prepare", "--mimic-dir", str(good), "--out", str(tmp_path / "exists")])
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err

    code = main(["-q", "prepare", "--mimic-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert code == 2 and "MIMIC-IV folder not found" in capsys.readouterr().err


def test_console_script_is_installed():
    script = shutil.which("ehr-diffusers") or str(__import__("pathlib").Path(sys.executable).parent / "ehr-diffusers")
    finished = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert finished.stdout.startswith("ehr-diffusers ")


def test_readme_opens_with_the_demo_and_test_commands():
    readme = (__import__("pathlib").Path(__file__).parents[1] / "README.md").read_text()
    blocks = readme.split("```bash\n")[1:3]
    demo, tests = (block.split("```")[0].strip() for block in blocks)
    assert readme.index("```bash") < readme.index("\n## "), "the two commands come first"
    assert demo.endswith("ehr-diffusers demo --out ehr-diffusers-demo --overwrite")
    assert tests.endswith("python -m pytest")
    assert demo.startswith("pip install torch==2.13.0") and tests.startswith("pip install torch==2.13.0")


@pytest.mark.slow
def test_demo_runs_the_whole_chain(tmp_path, capsys):
    """demo cohort -> prepare -> label -> train both models under accelerate launch -> generate (short training)."""
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--patients", "300", "--seed", "1", "--autoencoder-epochs", "1",
                 "--diffusion-steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "synthetic" in printed and "train 240 / holdout 60" in printed
    assert (out / "mimic-iv-demo" / "hosp" / "diagnoses_icd.csv.gz").is_file()
    card = (out / "dataset" / "README.md").read_text()
    assert "Synthetic data" in card and "not MIMIC-IV" in card
    assert load_from_disk(str(out / "dataset"))["train"].num_rows == 240
    assert (out / "model" / "model_index.json").is_file() and (out / "model" / "README.md").is_file()
    # the demo preset: a regularised autoencoder, Bernoulli decoding saved as the default, holdout reconstruction
    # scored beside independent marginals
    assert json.loads((out / "model" / "model_index.json").read_text())["decode_mode"] == "sample"
    autoencoder = json.loads((out / "model" / "autoencoder" / "config.json").read_text())
    assert autoencoder["latent_regularization"] == "noise" and autoencoder["latent_noise"] > 0
    figures = json.loads((out / "model" / "autoencoder_metrics.json").read_text())["holdout_figures"]
    assert figures["split"] == "holdout" and "pairs_pearson" in figures["independent_marginals"]
    assert 0 <= figures["reconstruction"]["codes_per_patient_wasserstein"]
    samples = printed[printed.index("synthetic records"):]
    assert samples.count("  prompt: ") == 4 and samples.count("    -> ") == 12
    assert "prompt: 65 year old woman with heart failure and chronic kidney disease" in samples
    assert main(["-q", "demo", "--out", str(out), "--patients", "300"]) == 2, "an existing folder needs --overwrite"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


@pytest.mark.slow
def test_demo_cxr_runs_the_whole_chain(tmp_path, capsys, monkeypatch):
    """synthetic X-ray cohort -> prepare-cxr -> train-cxr under accelerate launch -> finding classifier ->
    evaluate-cxr (short training); the classifier is saved in the demo folder, not in the user's cache."""
    monkeypatch.setenv("EHR_DIFFUSERS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--cxr", "--out", str(out), "--subjects", "24", "--diffusion-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "triplet dataset written to" in printed and "model, shuffled events" in printed
    assert "Diff micro AUROC above every baseline" in printed and "X-ray demo finished in" in printed
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "cohort", "dataset", "evaluation", "finding-classifier", "model", "vae"]
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["run"]["model"] == str(out / "model") and metrics["run"]["synthetic_data"] is True
    assert str(out / "finding-classifier") in metrics["run"]["scorer_source"]
    assert metrics["sampling"]["num_inference_steps"] == 10
    assert "<!-- metrics:start -->" in (out / "model" / "README.md").read_text()
    assert (out / "finding-classifier" / "README.md").is_file() and not (tmp_path / "cache").exists()


def test_demo_takes_one_modality_or_all() -> None:
    from ehr_diffusers.cli import build_parser

    args = build_parser().parse_args(["demo", "--all"])
    assert args.all and not args.cxr
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--cxr", "--all"])


def test_prepare_on_demo_data_is_marked_synthetic_and_counts_unmapped_codes(tmp_path, capsys):
    mimic, out = tmp_path / "mimic", tmp_path / "prepared"
    assert main(["-q", "demo-data", "--patients", "1500", "--seed", "3", "--out", str(mimic)]) == 0
    assert main(["-q", "prepare", "--mimic-dir", str(mimic), "--out", str(out), "--min-code-count", "5"]) == 0
    printed = capsys.readouterr().out
    assert "(from the synthetic demo cohort)" in printed
    summary = json.loads((out / "cohort_summary.json").read_text())
    assert summary["synthetic"] is True and "Synthetic data" in (out / "README.md").read_text()
    assert summary["icd9_unmapped_by_reason"]["no_map"]["rows"] > 0
    assert summary["vocabulary_size"] < summary["icd10_categories_in_cohort"]


def test_train_ehr_checks_its_inputs_before_launching(tmp_path, capsys, demo_dataset):
    assert main(["-q", "train-ehr", "--dataset", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "run")]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert main(["-q", "train-ehr", "--dataset", str(demo_dataset), "--output-dir", str(tmp_path / "run")]) == 2
    assert "no 'embedding' column" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
