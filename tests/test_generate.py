"""Batched generation (``ehr_diffusers.sampling``) and ``ehr-diffusers generate``."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from ehr_diffusers.cli import main
from ehr_diffusers.sampling import generate_records, record_generator
from test_pipeline import CONDITION_DIM, _tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return _tiny_pipeline()


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "model"
    pipe.save_pretrained(folder)
    return folder


def test_records_do_not_depend_on_the_batch_size(pipe) -> None:
    options = {"num_inference_steps": 4, "decode_mode": "sample", "show_progress": False, "seed": 3}
    small = generate_records(pipe, None, 7, batch_size=2, **options)
    large = generate_records(pipe, None, 7, batch_size=7, **options)
    np.testing.assert_allclose(small.vectors, large.vectors, atol=1e-6)
    assert small.records == large.records and small.prompts == [None] * 7
    other_seed = generate_records(pipe, None, 7, batch_size=7, **{**options, "seed": 4})
    assert not np.array_equal(other_seed.vectors, large.vectors)
    assert record_generator(0, 1).initial_seed() != record_generator(1, 0).initial_seed()


def test_prompted_records_follow_their_prompt(pipe, monkeypatch) -> None:
    embeds = {"a": torch.full((CONDITION_DIM,), 0.5), "b": torch.full((CONDITION_DIM,), -0.5)}
    monkeypatch.setattr(pipe, "_embed", lambda texts, argument: torch.stack([embeds[text] for text in texts]))
    result = generate_records(pipe, ["a", "b"], 3, batch_size=4, num_inference_steps=3, show_progress=False)
    assert result.prompts == ["a", "a", "a", "b", "b", "b"]
    alone = pipe(prompt_embeds=embeds["b"][None], num_inference_steps=3, output_type="np",
                 generator=[record_generator(0, 4)]).records
    np.testing.assert_allclose(result.vectors[4], alone[0], atol=1e-6)


def test_generate_command_writes_csv_parquet_and_mimic(saved, tmp_path, capsys) -> None:
    assert main(["generate", "--model", str(saved), "-n", "5", "--steps", "3", "--out", str(tmp_path / "r.csv"),
                 "-q"]) == 0
    frame = pl.read_csv(tmp_path / "r.csv")
    assert frame.columns[:2] == ["prompt", "sex"] and frame.height == 5
    assert main(["generate", "--model", str(saved), "-n", "5", "--steps", "3", "--out", str(tmp_path / "r.parquet"),
                 "-q"]) == 0
    parquet = pl.read_parquet(tmp_path / "r.parquet")
    assert parquet["icd10_categories"].dtype == pl.List(pl.String)
    assert frame["icd10_categories"].fill_null("").to_list() == \
        [";".join(codes) for codes in parquet["icd10_categories"].to_list()]
    assert main(["generate", "--model", str(saved), "-n", "5", "--steps", "3", "--out", str(tmp_path / "tables"),
                 "--format", "mimic", "-q"]) == 0
    assert (tmp_path / "tables" / "hosp" / "patients.csv.gz").is_file()
    assert "wrote 5 synthetic patients" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "{tmp}/r.txt"], "cannot tell the format from the suffix"),
        (["--out", "{tmp}/r.csv", "--prompt", "a man"], "saved without its text embedder"),
        (["--out", "{tmp}/r.csv", "--prompts-file", "{tmp}/missing.txt"], "--prompts-file .*: no such file"),
        (["--out", "{tmp}/r.csv", "--prompt", " "], "an empty prompt"),
    ],
)
def test_generate_command_errors(saved, tmp_path, capsys, extra, message) -> None:
    argv = ["generate", "--model", str(saved), "-n", "2", "-q"] + [arg.format(tmp=tmp_path) for arg in extra]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("ehr-diffusers generate: error:") and len(error.strip().splitlines()) == 1
    assert re.search(message, error)
    assert not (tmp_path / "r.csv").exists()


def test_generate_refuses_to_replace_without_overwrite(saved, tmp_path, capsys) -> None:
    (tmp_path / "r.csv").write_text("mine\n")
    assert main(["generate", "--model", str(saved), "-n", "2", "--out", str(tmp_path / "r.csv"), "-q"]) == 2
    assert (tmp_path / "r.csv").read_text() == "mine\n" and "--overwrite" in capsys.readouterr().err


def test_reserved_options_and_records_without_codes(pipe, tmp_path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="generate_records sets output_type itself"):
        generate_records(pipe, None, 2, output_type="np", show_progress=False)
    from ehr_diffusers.cli import write_records

    records = [{"sex": "F", "age": 40, "death": False, "num_admissions": 1, "marital_status": "MISSING",
                "race": "WHITE", "icd10_categories": []}]
    write_records(records, [None], tmp_path / "none.csv", "csv")
    write_records(records, [None], tmp_path / "none.parquet", "parquet")
    assert pl.read_parquet(tmp_path / "none.parquet")["icd10_categories"].dtype == pl.List(pl.String)
    assert pl.read_csv(tmp_path / "none.csv").height == 1
