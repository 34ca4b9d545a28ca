"""The bad-input table: one malformed input or fault per row, across every command of both pipelines.

Each row runs ``ehr-diffusers`` in process and asserts the exit status, that the message names the file, column, row
or argument at fault (in one or two lines, no traceback), that no model was loaded before a validation error, and
that no output was left behind: neither the output nor a temporary sibling, and an earlier output untouched.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from conftest import ADMISSIONS, DIAGNOSES, PATIENTS, write_tiny_mimic
from ehr_diffusers.cli import main

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ---------------------------------------------------------------------------------------------------- the inputs
@pytest.fixture(scope="module")
def world(tmp_path_factory, labelled_demo_dataset) -> dict[str, Path]:
    return build_world(tmp_path_factory.mktemp("bad-input"), labelled_demo_dataset)


def build_world(root: Path, labelled: Path) -> dict[str, Path]:
    """Valid inputs of every command under ``root``, built once and never changed (cases copy what they corrupt);
    ``labelled`` is a labelled demo dataset (also used by benchmarks/bench_bad_input.py)."""
    from ehr_diffusers import EHRXDiffPipeline
    from ehr_diffusers.data.cxr.dataset import EventEmbeddingOptions, prepare_cxr
    from ehr_diffusers.data.cxr.demo import SMALL_SUBJECTS, write_demo_cxr
    from ehr_diffusers.data.ehr.cohort import prepare
    from ehr_diffusers.text.event_embeddings import EventEmbedder
    from test_ehrxdiff_pipeline import _tiny_components
    from test_pipeline import _tiny_pipeline

    mimic = write_tiny_mimic(root / "mimic")
    prepare(mimic, root / "prepared", show_progress=False)
    _tiny_pipeline().save_pretrained(root / "ehr-model")
    write_demo_cxr(root / "cxr", SMALL_SUBJECTS, seed=1, show_progress=False, workers=1)
    prepare_cxr(root / "cxr" / "mimic-cxr-jpg", root / "cxr" / "mimic-iv", root / "triplets", show_progress=False,
                synthetic=True, embed_events=EventEmbedder(EventEmbeddingOptions("minilm")), image_size=32)
    EHRXDiffPipeline(**_tiny_components()).save_pretrained(root / "cxr-model")
    prev = root / "prev.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(prev)
    (root / "events.txt").write_text("furosemide 40 mg IV, time -20.0 h\n", encoding="utf-8")
    (root / "user-folder").mkdir()
    (root / "user-folder" / "notes.txt").write_text("mine\n")
    return {"root": root, "mimic": mimic, "prepared": root / "prepared", "labelled": labelled,
            "ehr_model": root / "ehr-model", "cxr": root / "cxr" / "mimic-cxr-jpg",
            "cxr_mimic": root / "cxr" / "mimic-iv",
            "triplets": root / "triplets", "cxr_model": root / "cxr-model", "prev": prev,
            "events": root / "events.txt", "user_folder": root / "user-folder"}


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _mimic(tmp: Path, **tables: str) -> Path:
    return write_tiny_mimic(tmp / "mimic", **tables)


def _replace_row(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


def _tampered_schema(w: dict, tmp: Path, source: str = "prepared") -> Path:
    """A copy of a prepared dataset whose schema.json lost one ICD-10 category (its vectors would shift)."""
    folder = _copy(w[source], tmp / "dataset")
    schema = json.loads((folder / "schema.json").read_text())
    group = next(group for group in schema["groups"] if group["name"] == "icd10_categories")
    group["categories"] = group["categories"][1:]
    schema["dim"] -= 1
    (folder / "schema.json").write_text(json.dumps(schema))
    return folder


def _cxr_copy(w: dict, tmp: Path) -> Path:
    """A copy of the X-ray cohort's MIMIC-CXR-JPG folder, to corrupt."""
    return _copy(w["cxr"], tmp / "cxr")


def _first_image(cxr: Path) -> Path:
    return sorted(cxr.rglob("*.jpg"))[0]


def _write_gz(path: Path, text: str) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(text)


def _metadata_without(cxr: Path, column: str) -> None:
    import polars as pl

    path = cxr / "mimic-cxr-2.0.0-metadata.csv.gz"
    frame = pl.read_csv(path, infer_schema=False).drop(column)
    _write_gz(path, frame.write_csv())


def _chexpert_value(cxr: Path, value: str) -> None:
    import polars as pl

    path = cxr / "mimic-cxr-2.0.0-chexpert.csv.gz"
    frame = pl.read_csv(path, infer_schema=False)
    frame = frame.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(value)).otherwise(pl.col("Edema"))
                               .alias("Edema"))
    _write_gz(path, frame.write_csv())


# ---------------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    """One row: ``argv(w, tmp)`` gives the command line; ``message`` lists what the error line must name."""

    name: str
    argv: Callable[[dict, Path], list[str]]
    message: tuple[str, ...]
    status: int = 2
    out: str | None = "out"  # the output path, relative to tmp, that must not be left behind
    existing: bool = False  # an earlier output at ``out`` that must be left untouched
    loads_model: bool = False  # the error comes from loading a model (a missing or wrong one)
    stdout: tuple[str, ...] = field(default_factory=tuple)


def _prepare(mimic: Callable[[dict, Path], Path], *extra: str) -> Callable[[dict, Path], list[str]]:
    return lambda w, tmp: ["prepare", "--mimic-dir", str(mimic(w, tmp)), "--out", str(tmp / "out"), *extra]


def _tiny(**tables: str) -> Callable[[dict, Path], Path]:
    return lambda w, tmp: _mimic(tmp, **tables)


def _label(dataset: Callable[[dict, Path], Path], *extra: str) -> Callable[[dict, Path], list[str]]:
    return lambda w, tmp: ["label", "--dataset", str(dataset(w, tmp)), *extra]


def _train_ehr(*extra: str, dataset: str | Callable = "labelled") -> Callable[[dict, Path], list[str]]:
    def argv(w: dict, tmp: Path) -> list[str]:
        folder = dataset(w, tmp) if callable(dataset) else w[dataset]
        return ["train-ehr", "--dataset", str(folder), "--output-dir", str(tmp / "out"), "--preset", "demo", *extra]
    return argv


def _checkpoint_of(folder: Path, processes: int) -> Path:
    """A checkpoint folder as ``processes`` processes leave it (one RNG state each, and the batch layout)."""
    folder.mkdir(parents=True)
    for rank in range(processes):
        (folder / f"random_states_{rank}.pkl").write_bytes(b"")
    (folder / "training_state.json").write_text(json.dumps({"step": 2, "num_processes": processes}))
    return folder


def _generate(*extra: str, out: str = "out.csv", model: str = "ehr_model") -> Callable[[dict, Path], list[str]]:
    return lambda w, tmp: ["generate", "--model", str(w.get(model, model)), "--out", str(tmp / out), "-n", "4",
                           *[arg.format(tmp=tmp, **w) for arg in extra]]


def _evaluate(*extra: str, dataset: str = "labelled") -> Callable[[dict, Path], list[str]]:
    return lambda w, tmp: ["evaluate", "--model", str(w["ehr_model"]), "--dataset", str(w[dataset]), "--out",
                           str(tmp / "out"), *[arg.format(tmp=tmp, **w) for arg in extra]]


def _prepare_cxr(*extra: str, cxr: Callable | None = None) -> Callable[[dict, Path], list[str]]:
    def argv(w: dict, tmp: Path) -> list[str]:
        folder = cxr(w, tmp) if cxr else w["cxr"]
        return ["prepare-cxr", "--cxr-dir", str(folder), "--mimic-dir", str(w["cxr_mimic"]), "--out",
                str(tmp / "out"), "--embedder", "none", *[arg.format(tmp=tmp, **w) for arg in extra]]
    return argv


def _train_cxr(*extra: str) -> Callable[[dict, Path], list[str]]:
    return lambda w, tmp: ["train-cxr", "--dataset", str(w["triplets"]), "--output-dir", str(tmp / "out"),
                           *[arg.format(tmp=tmp, **w) for arg in extra]]


def _predict(*extra: str, prev: Callable | None = None, events: Callable | None = None,
             out: str = "out.png") -> Callable[[dict, Path], list[str]]:
    def argv(w: dict, tmp: Path) -> list[str]:
        return ["predict-cxr", "--model", str(w["cxr_model"]), "--prev", str(prev(w, tmp) if prev else w["prev"]),
                "--events", str(events(w, tmp) if events else w["events"]), "--out", str(tmp / out), "--steps", "2",
                *[arg.format(tmp=tmp, **w) for arg in extra]]
    return argv


def _evaluate_cxr(*extra: str) -> Callable[[dict, Path], list[str]]:
    return lambda w, tmp: ["evaluate-cxr", "--model", str(w["cxr_model"]), "--dataset", str(w["triplets"]), "--out",
                           str(tmp / "out"), *[arg.format(tmp=tmp, **w) for arg in extra]]


def _file(name: str, content: bytes) -> Callable[[dict, Path], Path]:
    def make(w: dict, tmp: Path) -> Path:
        (tmp / name).write_bytes(content)
        return tmp / name
    return make


def _npy(name: str, array: np.ndarray) -> Callable[[dict, Path], Path]:
    def make(w: dict, tmp: Path) -> Path:
        np.save(tmp / name, array)
        return tmp / name
    return make


def _convert(checkpoint: Callable[[dict, Path], Path], config: Callable[[dict, Path], Path]):
    return lambda w, tmp: ["convert-ehrxdiff", "--checkpoint", str(checkpoint(w, tmp)), "--config",
                           str(config(w, tmp)), "--out", str(tmp / "out")]


def _pickle_checkpoint(w: dict, tmp: Path) -> Path:
    """A .ckpt whose pickle would run code (os.system) if it were loaded without weights_only."""
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp / 'pwned'}",)

    path = tmp / "model.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Payload()}))
    return path


def _yml(text: str) -> Callable[[dict, Path], Path]:
    return _file("EHRXDiff.yml", text.encode())


def _tiny_yml(w: dict, tmp: Path) -> Path:
    from test_convert_ehrxdiff import TINY_YML

    return _yml(TINY_YML)(w, tmp)


def _tiny_checkpoint(w: dict, tmp: Path) -> Path:
    """The original layout's weights at tiny widths, as safetensors."""
    from safetensors.torch import save_file

    from test_convert_ehrxdiff import tiny_original

    save_file(tiny_original(), tmp / "model.safetensors")
    return tmp / "model.safetensors"


def _cxr_image_corrupt(w: dict, tmp: Path) -> Path:
    cxr = _cxr_copy(w, tmp)
    _first_image(cxr).write_bytes(b"\xff\xd8\xff not really a jpeg")
    return cxr


def _cxr_image_blank(w: dict, tmp: Path) -> Path:
    cxr = _cxr_copy(w, tmp)
    PIL.Image.new("L", (1, 1)).save(_first_image(cxr), format="JPEG")
    return cxr


def _cxr_metadata_garbage(w: dict, tmp: Path) -> Path:
    cxr = _cxr_copy(w, tmp)
    (cxr / "mimic-cxr-2.0.0-metadata.csv.gz").write_bytes(np.random.default_rng(0).bytes(2000))
    return cxr


def _cxr_metadata_missing_column(w: dict, tmp: Path) -> Path:
    cxr = _cxr_copy(w, tmp)
    _metadata_without(cxr, "ViewPosition")
    return cxr


def _cxr_chexpert(value: str) -> Callable[[dict, Path], Path]:
    def make(w: dict, tmp: Path) -> Path:
        cxr = _cxr_copy(w, tmp)
        _chexpert_value(cxr, value)
        return cxr
    return make


def _gzip_garbage(w: dict, tmp: Path) -> Path:
    root = _mimic(tmp)
    (root / "hosp" / "patients.csv").unlink()
    (root / "hosp" / "patients.csv.gz").write_bytes(np.random.default_rng(0).bytes(4000))
    return root


def _latin1_patients(w: dict, tmp: Path) -> Path:
    root = _mimic(tmp)
    text = PATIENTS.replace("2008 - 2010,2152-03-01", "2008 - 2010 \u00e9t\u00e9,2152-03-01")
    (root / "hosp" / "patients.csv").write_bytes(text.encode("latin-1"))
    return root


def _truncated_gzip(w: dict, tmp: Path) -> Path:
    root = _mimic(tmp)
    (root / "hosp" / "diagnoses_icd.csv").unlink()
    whole = gzip.compress((DIAGNOSES * 200).encode())
    (root / "hosp" / "diagnoses_icd.csv.gz").write_bytes(whole[: len(whole) // 2])
    return root


def _nested(w: dict, tmp: Path) -> list[str]:
    mimic = _mimic(tmp)
    return ["prepare", "--mimic-dir", str(mimic), "--out", str(mimic / "hosp" / "dataset")]


def _existing_out(argv: Callable[[dict, Path], list[str]]) -> Callable[[dict, Path], list[str]]:
    """The command with an earlier output at tmp/out (written by ehr-diffusers, so --overwrite could replace it)."""
    def make(w: dict, tmp: Path) -> list[str]:
        (tmp / "out").mkdir()
        (tmp / "out" / ".ehr-diffusers-output").write_text("earlier\n")
        (tmp / "out" / "earlier.txt").write_text("earlier output\n")
        return argv(w, tmp)
    return make


def _with_file(name: str, content: bytes, command: Callable[[Path], Callable]) -> Callable[[dict, Path], list[str]]:
    """``command(path)``'s command line, with ``content`` written to tmp/``name`` first."""
    return lambda w, tmp: command(_file(name, content)(w, tmp))(w, tmp)


def _prompts(content: bytes) -> Callable[[dict, Path], list[str]]:
    return _with_file("prompts.txt", content, lambda path: _generate("--prompts-file", str(path)))


def _knowledge(content: bytes, name: str = "knowledge.txt") -> Callable[[dict, Path], list[str]]:
    return _with_file(name, content,
                      lambda path: _prepare_cxr("--embedder", "minilm", "--retrieval", "--knowledge", str(path)))


def _diagnosis(code: str, version: str) -> str:
    return DIAGNOSES + f"10000004,20000099,1,{code},{version}\n"


def _admission_for(subject: str, hadm: str) -> str:
    return ADMISSIONS + (f"{subject},{hadm},2141-01-01 10:00:00,2141-01-02 10:00:00,,EW EMER.,P9,EMERGENCY ROOM,HOME,"
                         "Medicare,ENGLISH,SINGLE,WHITE,,,0\n")


_WITH_ADMISSION = _admission_for("10000004", "20000099")

CASES = [
    # ------------------------------------------------------------------ demo-data / demo
    Case("demo-data: --patients 0", lambda w, t: ["demo-data", "--patients", "0", "--out", str(t / "out")],
         ("--patients", "positive integer")),
    Case("demo-data: --seed -1", lambda w, t: ["demo-data", "--seed", "-1", "--out", str(t / "out")],
         ("--seed", "non-negative")),
    Case("demo-data: --out a user's folder, --overwrite",
         lambda w, t: ["demo-data", "--patients", "5", "--out", str(w["user_folder"]), "--overwrite"],
         ("user-folder", "not written by ehr-diffusers"), out=None),
    Case("demo-data: --out exists", _existing_out(lambda w, t: ["demo-data", "--patients", "5", "--out",
                                                                str(t / "out")]),
         ("--overwrite",), existing=True),
    Case("demo-cxr-data: --subjects 0", lambda w, t: ["demo-cxr-data", "--subjects", "0", "--out", str(t / "out")],
         ("--subjects",)),
    Case("demo: --out a user's folder", lambda w, t: ["demo", "--out", str(w["user_folder"]), "--overwrite"],
         ("user-folder", "not written by ehr-diffusers"), out=None),
    Case("demo: --judge-threshold nan", lambda w, t: ["demo", "--out", str(t / "out"), "--judge-threshold", "nan"],
         ("--judge-threshold", "finite")),
    # ------------------------------------------------------------------ prepare
    Case("prepare: --mimic-dir missing", lambda w, t: ["prepare", "--mimic-dir", str(t / "nope"), "--out",
                                                       str(t / "out")], ("nope", "not found")),
    Case("prepare: patients table missing", _prepare(_tiny(patients=None)), ("patients.csv.gz", "not found")),
    Case("prepare: column missing", _prepare(_tiny(patients=PATIENTS.replace("anchor_age", "age"))),
         ("patients.csv", "anchor_age")),
    Case("prepare: anchor_age not a number",
         _prepare(_tiny(patients=_replace_row(PATIENTS, "10000002,M,45", "10000002,M,forty"))),
         ("patients.csv", "anchor_age")),
    Case("prepare: negative anchor_age",
         _prepare(_tiny(patients=_replace_row(PATIENTS, "10000002,M,45", "10000002,M,-5"))),
         ("patients.csv", "anchor_age", "0 to 120", "row 2", "-5")),
    Case("prepare: anchor_age over 120",
         _prepare(_tiny(patients=_replace_row(PATIENTS, "10000002,M,45", "10000002,M,150"))),
         ("patients.csv", "anchor_age", "0 to 120", "150")),
    Case("prepare: unknown gender", _prepare(_tiny(patients=_replace_row(PATIENTS, "10000002,M,", "10000002,X,"))),
         ("patients.csv", "gender", "'X'")),
    Case("prepare: duplicate subject_id",
         _prepare(_tiny(patients=PATIENTS + "10000002,M,45,2160,2017 - 2019,\n")),
         ("patients.csv", "subject_id", "unique", "10000002")),
    Case("prepare: duplicate hadm_id", _prepare(_tiny(admissions=_admission_for("10000004", "20000001"))),
         ("admissions.csv", "hadm_id", "20000001")),
    Case("prepare: bad admittime",
         _prepare(_tiny(admissions=_replace_row(ADMISSIONS, "2161-05-05 10:00:00", "yesterday"))),
         ("admissions.csv", "admittime")),
    Case("prepare: icd_version 11", _prepare(_tiny(diagnoses_icd=_diagnosis("I10", "11"), admissions=_WITH_ADMISSION)),
         ("diagnoses_icd.csv", "icd_version", "11")),
    Case("prepare --strict: garbage ICD-10 code",
         _prepare(_tiny(diagnoses_icd=_diagnosis("!!#", "10"), admissions=_WITH_ADMISSION), "--strict"),
         ("diagnoses_icd.csv", "row 17", "'!!#'", "ICD-10", "--strict")),
    Case("prepare --strict: unknown ICD-10 code ZZZ",
         _prepare(_tiny(diagnoses_icd=_diagnosis("ZZZ", "10"), admissions=_WITH_ADMISSION), "--strict"),
         ("diagnoses_icd.csv", "'ZZZ'")),
    Case("prepare --strict: blank ICD code",
         _prepare(_tiny(diagnoses_icd=_diagnosis('" "', "10"), admissions=_WITH_ADMISSION), "--strict"),
         ("diagnoses_icd.csv", "row 17", "empty ICD code")),
    Case("prepare --strict: ICD-9 code labelled version 10",
         _prepare(_tiny(diagnoses_icd=_diagnosis("4280", "10"), admissions=_WITH_ADMISSION), "--strict"),
         ("diagnoses_icd.csv", "'4280'", "ICD-9-CM code labelled icd_version 10")),
    Case("prepare --strict: ICD-10 code labelled version 9",
         _prepare(_tiny(diagnoses_icd=_diagnosis("I509", "9"), admissions=_WITH_ADMISSION), "--strict"),
         ("diagnoses_icd.csv", "'I509'", "ICD-10-CM code labelled icd_version 9")),
    Case("prepare: gzip of random bytes", _prepare(_gzip_garbage), ("patients.csv.gz", "not a gzip")),
    Case("prepare: truncated .csv.gz", _prepare(_truncated_gzip), ("diagnoses_icd.csv.gz", "cannot be read")),
    Case("prepare: empty patients file", _prepare(_tiny(patients="")), ("patients.csv", "empty")),
    Case("prepare: non-UTF-8 patients file", _prepare(_latin1_patients), ("patients.csv", "UTF-8")),
    Case("prepare: --holdout-fraction 1.5", _prepare(_tiny(), "--holdout-fraction", "1.5"), ("--holdout-fraction",)),
    Case("prepare: --holdout-fraction nan", _prepare(_tiny(), "--holdout-fraction", "nan"), ("--holdout-fraction",)),
    Case("prepare: --seed -3", _prepare(_tiny(), "--seed", "-3"), ("--seed", "non-negative")),
    Case("prepare: --out inside --mimic-dir", _nested, ("--out", "inside the input", "--mimic-dir"), out=None),
    Case("prepare: --out is --mimic-dir", lambda w, t: ["prepare", "--mimic-dir", str(_mimic(t)), "--out",
                                                        str(t / "mimic")], ("--out", "--mimic-dir"), out=None),
    Case("prepare: --out exists", _existing_out(_prepare(_tiny())), ("--overwrite",), existing=True),
    # ------------------------------------------------------------------ label
    Case("label: --dataset missing", _label(lambda w, t: t / "nope"), ("--dataset", "nope")),
    Case("label: --dataset is not a prepared dataset", _label(lambda w, t: w["user_folder"]),
         ("--dataset", "user-folder", "prepare"), out=None),
    Case("label: tampered schema.json", _label(_tampered_schema), ("schema.json", "sha256", "prepare")),
    Case("label: schema.json not JSON",
         _label(lambda w, t: (_copy(w["prepared"], t / "d") / "schema.json").write_text("{oops") and t / "d"),
         ("schema.json",)),
    Case("label: --threshold nan", _label(lambda w, t: _copy(w["prepared"], t / "d"), "--threshold", "nan"),
         ("--threshold", "finite")),
    Case("label: --batch-size 0", _label(lambda w, t: w["prepared"], "--batch-size", "0"), ("--batch-size",)),
    Case("label: --device banana", _label(lambda w, t: _copy(w["prepared"], t / "d"), "--device", "banana"),
         ("--device", "banana")),
    Case("label: --embedder missing folder",
         _label(lambda w, t: _copy(w["prepared"], t / "d"), "--embedder", "./no/such/embedder"),
         ("--embedder", "no/such/embedder", "no such folder")),
    Case("label: --summarizer missing folder",
         _label(lambda w, t: _copy(w["prepared"], t / "d"), "--summarizer", "./no/such/llm"),
         ("--summarizer", "no/such/llm", "no such folder")),
    # ------------------------------------------------------------------ train-ehr
    Case("train-ehr: --dataset not labelled", _train_ehr(dataset="prepared"), ("embedding", "label")),
    Case("train-ehr: --dataset missing", _train_ehr(dataset=lambda w, t: t / "nope"), ("--dataset", "nope")),
    Case("train-ehr: tampered schema", _train_ehr(dataset=lambda w, t: _tampered_schema(w, t, "labelled")),
         ("schema.json", "sha256")),
    Case("train-ehr: --output-dir is a file",
         lambda w, t: (t / "out").write_text("x") and _train_ehr()(w, t), ("--output-dir", "not a folder"),
         out=None),
    Case("train-ehr: --output-dir inside --dataset",
         lambda w, t: ["train-ehr", "--dataset", str(_copy(w["labelled"], t / "d")), "--output-dir",
                       str(t / "d" / "run")], ("--output-dir", "--dataset"), out="d/run"),
    Case("train-ehr: --judge-threshold nan", _train_ehr("--judge-threshold", "nan"), ("--judge-threshold",)),
    Case("train-ehr: --checkpointing-steps 0", _train_ehr("--checkpointing-steps", "0"), ("--checkpointing-steps",)),
    Case("train-ehr: --resume-from-checkpoint nonsense", _train_ehr("--resume-from-checkpoint", "checkpoint-x"),
         ("--resume-from-checkpoint", "checkpoint-x")),
    Case("train-ehr: --num-processes 0", _train_ehr("--num-processes", "0"), ("--num-processes",)),
    Case("train-ehr: --num-machines 2 alone", _train_ehr("--num-processes", "2", "--num-machines", "2"),
         ("--num-machines 2", "--machine-rank", "--main-process-ip")),
    Case("train-ehr: --machine-rank on one machine", _train_ehr("--machine-rank", "1"),
         ("--machine-rank", "--num-machines")),
    Case("train-ehr: --machine-rank 2 of 2 machines",
         _train_ehr("--num-processes", "2", "--num-machines", "2", "--machine-rank", "2", "--main-process-ip",
                    "10.0.0.1"), ("--machine-rank 2", "0 to 1")),
    Case("train-ehr: --num-processes 3 over 2 machines",
         _train_ehr("--num-processes", "3", "--num-machines", "2", "--machine-rank", "0", "--main-process-ip",
                    "10.0.0.1"), ("--num-machines 2", "multiple of 2", "got 3")),
    Case("train-ehr: --main-process-port 70000", _train_ehr("--main-process-port", "70000"),
         ("--main-process-port", "70000")),
    Case("train-ehr: --accelerate-config missing", _train_ehr("--accelerate-config", "no-such.yaml"),
         ("--accelerate-config", "no-such.yaml")),
    Case("train-ehr: --mixed-precision fp16 on CPUs", _train_ehr("--mixed-precision", "fp16"),
         ("--mixed-precision fp16", "GPU")),
    Case("train-ehr: resume at another process count",
         lambda w, t: _checkpoint_of(t / "out" / "model" / "checkpoint-2", processes=2)
         and _train_ehr("--resume")(w, t), ("--resume-from-checkpoint", "checkpoint-2", "--num-processes 2"),
         out=None),
    Case("train-ehr: --judge-threshold no row passes", _train_ehr("--judge-threshold", "6"),
         ("--judge_threshold 6", "no training row passes")),
    # ------------------------------------------------------------------ generate
    Case("generate: --model missing", _generate(model="./no/such/model"), ("--model", "no/such/model")),
    Case("generate: --model is a dataset", _generate(model="prepared"), ("--model", "prepared"), loads_model=True),
    Case("generate: --guidance-scale nan", _generate("--guidance-scale", "nan"), ("--guidance-scale", "finite")),
    Case("generate: --guidance-scale -1", _generate("--guidance-scale", "-1"), ("--guidance-scale",)),
    Case("generate: --steps 0", _generate("--steps", "0"), ("--steps",)),
    Case("generate: -n 1e9", _generate("-n", "1e9"), ("--num-records",)),
    Case("generate: --seed -1", _generate("--seed", "-1"), ("--seed", "non-negative")),
    Case("generate: --prompts-file not UTF-8", _prompts("caf\xe9 patient\n".encode("latin-1")),
         ("--prompts-file", "prompts.txt", "UTF-8")),
    Case("generate: --prompts-file empty", _prompts(b"\n\n"), ("--prompts-file", "no prompt")),
    Case("generate: --prompts-file missing", _generate("--prompts-file", "{tmp}/nope.txt"),
         ("--prompts-file", "nope.txt")),
    Case("generate: --out of unknown suffix", _generate(out="out.txt"), ("--out", "--format"), out="out.txt"),
    Case("generate: --out exists", lambda w, t: (t / "out.csv").write_text("earlier\n") and _generate()(w, t),
         ("--out", "--overwrite"), out="out.csv", existing=True),
    Case("generate --format mimic: --out inside --model",
         lambda w, t: _generate("--format", "mimic", out="m/tables", model=str(_copy(w["ehr_model"], t / "m")))(w, t),
         ("--out", "inside the input", "--model"), out="m/tables"),
    Case("generate: --text-embedder missing", _generate("--text-embedder", "./no/such/embedder"),
         ("--text-embedder", "no such folder")),
    Case("generate: --model of the other pipeline", _generate(model="cxr_model"),
         ("--model", "cannot be loaded from this folder"), loads_model=True),
    Case("generate: --out inside --model, --overwrite",
         lambda w, t: _generate("--overwrite", out="m/records.csv", model=str(_copy(w["ehr_model"], t / "m")))(w, t),
         ("--out", "lies inside, the input --model"), out="m/records.csv"),
    # ------------------------------------------------------------------ evaluate
    Case("evaluate: --dataset missing", lambda w, t: ["evaluate", "--model", str(w["ehr_model"]), "--dataset",
                                                      str(t / "nope"), "--out", str(t / "out")], ("--dataset", "nope")),
    Case("evaluate: --n-prompts -1", _evaluate("--n-prompts", "-1"), ("--n-prompts",)),
    Case("evaluate: --baselines unknown", _evaluate("--baselines", "gan"), ("--baselines", "gan")),
    Case("evaluate: --guidance-scale inf", _evaluate("--guidance-scale", "inf"), ("--guidance-scale",)),
    Case("evaluate: --out is --dataset", lambda w, t: ["evaluate", "--model", str(w["ehr_model"]), "--dataset",
                                                       str(w["labelled"]), "--out", str(w["labelled"])],
         ("--out", "--dataset"), out=None),
    Case("evaluate: model schema differs from the dataset's", _evaluate(), ("--model", "schema", "--dataset"),
         loads_model=True),
    # ------------------------------------------------------------------ prepare-cxr
    Case("prepare-cxr: --cxr-dir missing", lambda w, t: ["prepare-cxr", "--cxr-dir", str(t / "nope"), "--mimic-dir",
                                                         str(w["cxr_mimic"]), "--out", str(t / "out")],
         ("nope",)),
    Case("prepare-cxr: metadata of random bytes", _prepare_cxr(cxr=_cxr_metadata_garbage),
         ("mimic-cxr-2.0.0-metadata.csv.gz", "not a gzip")),
    Case("prepare-cxr: metadata column missing", _prepare_cxr(cxr=_cxr_metadata_missing_column),
         ("mimic-cxr-2.0.0-metadata.csv.gz", "ViewPosition")),
    Case("prepare-cxr --strict: corrupt image", _prepare_cxr("--strict", cxr=_cxr_image_corrupt),
         (".jpg", "not a readable image", "--strict")),
    Case("prepare-cxr --strict: 1 x 1 image", _prepare_cxr("--strict", cxr=_cxr_image_blank), (".jpg", "1 x 1")),
    Case("prepare-cxr: CheXpert value 2", _prepare_cxr(cxr=_cxr_chexpert("2.0")),
         ("mimic-cxr-2.0.0-chexpert.csv.gz", "Edema", "2.0")),
    Case("prepare-cxr: --window-hours -1", _prepare_cxr("--window-hours", "-1"), ("--window-hours",)),
    Case("prepare-cxr: --window-hours nan", _prepare_cxr("--window-hours", "nan"), ("--window-hours",)),
    Case("prepare-cxr: --image-size 8", _prepare_cxr("--image-size", "8"), ("--image-size",)),
    Case("prepare-cxr: fractions leave no train split",
         _prepare_cxr("--validation-fraction", "0.6", "--test-fraction", "0.5"), ("--validation-fraction",)),
    Case("prepare-cxr: --knowledge not UTF-8", _knowledge("r\xe2les\n".encode("latin-1")),
         ("knowledge.txt", "UTF-8")),
    Case("prepare-cxr: --knowledge without --retrieval", _prepare_cxr("--knowledge", "{events}"),
         ("--knowledge", "--retrieval")),
    Case("prepare-cxr: --knowledge invalid JSONL", _knowledge(b'{"text": "rales"}\n{oops\n', "knowledge.jsonl"),
         ("--knowledge", "knowledge.jsonl:2", "invalid JSON")),
    Case("prepare-cxr: --items folder missing", _prepare_cxr("--items", "{tmp}/no-items"), ("--items", "no-items")),
    Case("prepare-cxr: --out inside --cxr-dir",
         lambda w, t: ["prepare-cxr", "--cxr-dir", str(_cxr_copy(w, t)), "--mimic-dir", str(w["cxr_mimic"]), "--out",
                       str(t / "cxr" / "triplets")], ("--out", "inside the input", "--cxr-dir"), out="cxr/triplets"),
    Case("prepare-cxr: --retrieval-weight 2", _prepare_cxr("--embedder", "minilm", "--retrieval",
                                                           "--retrieval-weight", "2"), ("--retrieval-weight",)),
    Case("prepare-cxr: --cache-latents without --vae", _prepare_cxr("--cache-latents"), ("--cache-latents", "--vae")),
    Case("prepare-cxr: --num-processes without --cache-latents", _prepare_cxr("--num-processes", "2"),
         ("--num-processes", "--cache-latents")),
    # ------------------------------------------------------------------ cache-latents
    Case("cache-latents: --dataset missing",
         lambda w, t: ["cache-latents", "--dataset", str(t / "nope"), "--vae", str(t)], ("--dataset", "nope"),
         out=None),
    Case("cache-latents: --vae missing",
         lambda w, t: ["cache-latents", "--dataset", str(w["triplets"]), "--vae", str(t / "no-vae")],
         ("--vae", "no-vae"), out=None),
    Case("cache-latents: --shard-size 0",
         lambda w, t: ["cache-latents", "--dataset", str(w["triplets"]), "--vae", str(t), "--shard-size", "0"],
         ("--shard-size",), out=None),
    # ------------------------------------------------------------------ train-cxr
    Case("train-cxr: --dataset without event embeddings",
         lambda w, t: ["train-cxr", "--dataset", str(w["prepared"]), "--output-dir", str(t / "out")],
         ("--dataset", "prepared")),
    Case("train-cxr: --dataset missing",
         lambda w, t: ["train-cxr", "--dataset", str(t / "nope"), "--output-dir", str(t / "out")],
         ("--dataset", "nope")),
    Case("train-cxr: --vae missing", _train_cxr("--vae", "{tmp}/no-vae"), ("--vae", "no-vae")),
    Case("train-cxr: --event-clip missing", _train_cxr("--event-clip", "{tmp}/no-clip"), ("--event-clip", "no-clip")),
    Case("train-cxr: --output-dir inside --dataset",
         lambda w, t: ["train-cxr", "--dataset", str(w["triplets"]), "--output-dir", str(w["triplets"] / "run")],
         ("--output-dir", "--dataset"), out=None),
    Case("train-cxr: --checkpointing-steps -5", _train_cxr("--checkpointing-steps", "-5"),
         ("--checkpointing-steps",)),
    Case("train-cxr: --num-machines 2 without --machine-rank",
         _train_cxr("--num-processes", "2", "--num-machines", "2", "--main-process-ip", "10.0.0.1"),
         ("--num-machines 2", "--machine-rank")),
    Case("train-cxr: resume at another process count",
         lambda w, t: _checkpoint_of(t / "out" / "vae" / "checkpoint-4", processes=1)
         and _train_cxr("--resume", "--num-processes", "2")(w, t),
         ("--resume-from-checkpoint", "checkpoint-4", "--num-processes 1"), out=None),
    Case("train-cxr: --resume-from-checkpoint missing folder", _train_cxr("--resume-from-checkpoint", "{tmp}/ckpt"),
         ("--resume-from-checkpoint", "ckpt")),
    # ------------------------------------------------------------------ predict-cxr
    Case("predict-cxr: --prev missing", _predict(prev=lambda w, t: t / "nope.png"), ("--prev", "nope.png"),
         out="out.png"),
    Case("predict-cxr: --prev not an image", _predict(prev=_file("prev.png", b"GIF89a garbage")),
         ("--prev", "prev.png", "not a readable image"), out="out.png"),
    Case("predict-cxr: --prev 1 x 1", _predict(prev=lambda w, t: PIL.Image.new("L", (1, 1)).save(t / "p.png")
                                               or t / "p.png"), ("--prev", "p.png", "1 x 1"), out="out.png"),
    Case("predict-cxr: --events not UTF-8", _predict(events=_file("events.txt", "r\xe2les".encode("latin-1"))),
         ("--events", "events.txt", "UTF-8"), out="out.png"),
    Case("predict-cxr: --events .npy of another width", _predict(events=_npy("e.npy", np.zeros((2, 5), np.float32))),
         ("--events", "e.npy", "5-d"), out="out.png"),
    Case("predict-cxr: --events .npy with NaN",
         _predict(events=_npy("e.npy", np.full((2, 12), np.nan, np.float32))), ("--events", "e.npy", "finite"),
         out="out.png"),
    Case("predict-cxr: --events .npz without embeddings",
         _predict(events=lambda w, t: np.savez(t / "e.npz", hours=np.zeros(2)) or t / "e.npz"),
         ("--events", "e.npz", "event_embeddings"), out="out.png"),
    Case("predict-cxr: --out .gif", _predict(out="out.gif"), ("--out", ".png"), out="out.gif"),
    Case("predict-cxr: --guidance-scale nan", _predict("--guidance-scale", "nan"), ("--guidance-scale",),
         out="out.png"),
    Case("predict-cxr: --eta nan", _predict("--eta", "nan"), ("--eta",), out="out.png"),
    Case("predict-cxr: --out is --prev",
         _predict("--overwrite", out="p.png", prev=lambda w, t: shutil.copy(w["prev"], t / "p.png")),
         ("--out", "the input --prev"), out=None),
    Case("predict-cxr: --device banana", _predict("--device", "banana"), ("--device", "banana"), out="out.png"),
    Case("predict-cxr: --events empty .npy", _predict(events=_file("e.npy", b"")), ("--events", "e.npy"),
         out="out.png"),
    Case("predict-cxr: --events truncated .npz", _predict(events=_file("e.npz", b"PK\x03\x04 truncated")),
         ("--events", "e.npz"), out="out.png"),
    Case("predict-cxr: --model missing", lambda w, t: _predict()(w, t)[:1] + ["--model", str(t / "nope")] +
         _predict()(w, t)[3:], ("--model", "nope"), out="out.png"),
    # ------------------------------------------------------------------ evaluate-cxr
    Case("evaluate-cxr: --split train", _evaluate_cxr("--split", "train"), ("--split train",)),
    Case("evaluate-cxr: --split unknown", _evaluate_cxr("--split", "dev"), ("--split dev",)),
    Case("evaluate-cxr: --extractor unknown", _evaluate_cxr("--extractor", "resnet"), ("--extractor", "resnet")),
    Case("evaluate-cxr: --eta -1", _evaluate_cxr("--eta", "-1"), ("--eta",)),
    Case("evaluate-cxr: --out is --dataset", lambda w, t: _evaluate_cxr()(w, t)[:-2] + ["--out", str(w["triplets"])],
         ("--out", "--dataset"), out=None),
    Case("evaluate-cxr: --seed -1", _evaluate_cxr("--seed", "-1"), ("--seed",)),
    # ------------------------------------------------------------------ convert-ehrxdiff
    Case("convert-ehrxdiff: checkpoint of random bytes",
         _convert(_file("model.ckpt", np.random.default_rng(0).bytes(500)), _tiny_yml),
         ("model.ckpt",)),
    Case("convert-ehrxdiff: pickle payload is not run", _convert(_pickle_checkpoint, _tiny_yml),
         ("model.ckpt",)),
    Case("convert-ehrxdiff: --config missing",
         _convert(_file("model.safetensors", b""), lambda w, t: t / "nope.yml"), ("--config", "nope.yml")),
    Case("convert-ehrxdiff: --config not YAML", _convert(_file("model.ckpt", b""), _yml("model: [unclosed\n")),
         ("EHRXDiff.yml",)),
    Case("convert-ehrxdiff: --config not UTF-8", _convert(_file("model.ckpt", b""), _file("c.yml", b"a: \xe9\n")),
         ("--config", "c.yml", "UTF-8")),
    Case("convert-ehrxdiff: corrupt .safetensors", _convert(_file("model.safetensors", b"\x08" + b"\x00" * 20),
                                                            _tiny_yml), ("--checkpoint", "model.safetensors")),
    Case("convert-ehrxdiff: config entry missing",
         _convert(_tiny_checkpoint, _yml("model:\n  params:\n    unet_config: {}\n"
                                                        "    first_stage_config: {}\n    cond_stage_config: {}\n")),
         ("EHRXDiff.yml",)),
]


def test_the_table_covers_every_command_and_has_60_rows() -> None:
    import argparse

    from ehr_diffusers.cli import build_parser

    commands = {case.name.split(":")[0].split(" ")[0] for case in CASES}
    (subcommands,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    assert len(CASES) >= 60
    assert commands == set(subcommands.choices) and "cache-latents" in commands


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if ".tmp-" in path.name or ".old-" in path.name) \
        if folder.is_dir() else []


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any pretrained model loaded fails the case: validation errors come before models load."""
    import diffusers
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    monkeypatch.setattr("ehr_diffusers.text.embed.load_embedder", refuse)
    for module in ("cxr_data", "launch", "train"):  # the launch rows are about a machine without GPUs
        monkeypatch.setattr(f"ehr_diffusers.commands.{module}.cuda_device_count", lambda: 0)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, world, tmp_path, capsys, request) -> None:
    if not case.loads_model:
        request.getfixturevalue("no_model_loads")
    argv = case.argv(world, tmp_path)
    capsys.readouterr()
    status = main(argv)
    captured = capsys.readouterr()
    assert status == case.status, captured.err
    lines = [line for line in captured.err.splitlines() if line.startswith("ehr-diffusers") or "error" in line]
    message = "\n".join(lines)
    assert lines and len(lines) <= 2, captured.err
    assert "Traceback" not in captured.err
    for part in case.message:
        assert part in message, f"{part!r} not in {message!r}"
    if case.out is not None:
        out = tmp_path / case.out
        if case.existing:
            assert out.exists() and "earlier" in (out / "earlier.txt" if out.is_dir() else out).read_text()
        else:
            assert not out.exists(), f"{out} was left behind"
        assert not _leftovers(out.parent)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------------- beyond the table
def test_unknown_codes_are_dropped_and_counted_without_strict(tmp_path, capsys, caplog) -> None:
    """No bogus category: a garbage ICD-10 code and an ICD-9 code labelled 10 are dropped, counted by file and row."""
    from ehr_diffusers.data.ehr.schema import EHRSchema

    diagnoses = DIAGNOSES + "10000004,20000099,1,!!#,10\n10000004,20000099,2,4280,10\n"
    mimic = _mimic(tmp_path, diagnoses_icd=diagnoses, admissions=_WITH_ADMISSION)
    assert main(["prepare", "--mimic-dir", str(mimic), "--out", str(tmp_path / "out")]) == 0
    assert "unknown ICD codes   2 codes in 2 rows, dropped" in capsys.readouterr().out
    assert "row 17: '!!#' (icd_version 10) is not an ICD-10-CM code" in caplog.text
    codes = EHRSchema.load(tmp_path / "out").codes
    assert "!!#" not in codes and "428" not in codes and {"I50", "E11"} <= set(codes)
    summary = json.loads((tmp_path / "out" / "cohort_summary.json").read_text())
    assert summary["unknown_codes"] == 2 and summary["diagnosis_rows_unknown_code"] == 2
    assert {entry["reason"] for entry in summary["unknown_codes_top"]} == {
        "not an ICD-10-CM code", "an ICD-9-CM code labelled icd_version 10"}


def test_unusable_images_are_left_out_without_strict(world, tmp_path, caplog) -> None:
    cxr = _cxr_image_corrupt(world, tmp_path)
    assert main(["prepare-cxr", "--cxr-dir", str(cxr), "--mimic-dir", str(world["cxr_mimic"]), "--out",
                 str(tmp_path / "out"), "--embedder", "none", "-q"]) == 0
    summary = json.loads((tmp_path / "out" / "cxr_summary.json").read_text())
    assert summary["images_unreadable"] == 1
    assert "unusable, their pairs left out" in caplog.text and "--strict refuses them" in caplog.text


def test_the_schema_fingerprint_is_recorded_and_an_unrecorded_one_is_read(world, tmp_path) -> None:
    from ehr_diffusers.data.ehr.schema import EHRSchema

    recorded = json.loads((world["prepared"] / "schema.json").read_text())
    schema = EHRSchema.from_dict(recorded)
    assert recorded["sha256"] == schema.fingerprint() and len(schema.fingerprint()) == 64
    older = {key: value for key, value in recorded.items() if key != "sha256"}  # written before it was recorded
    assert EHRSchema.from_dict(older).fingerprint() == schema.fingerprint()


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt, also where the test run started with it ignored (a shell's background job)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_signal_during_the_output_swap_waits_for_it(tmp_path, ctrl_c) -> None:
    """SIGINT arriving while the old output is swapped for the new one is delivered after the swap: the new output is
    in place, no .old- folder is left, and completed_outputs says it was written."""
    import os
    import signal

    from ehr_diffusers.io import atomic_directory, completed_outputs, deferred_signals

    out = tmp_path / "out"
    with atomic_directory(out) as staging:
        (staging / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, overwrite=True) as staging:
            (staging / "new.txt").write_text("new")
            with deferred_signals():  # the swap below runs inside the same kind of block
                os.kill(os.getpid(), signal.SIGINT)
                assert not (out / "new.txt").exists()  # held: not delivered yet
    assert (out / "old.txt").exists() and not (out / "new.txt").exists()  # interrupted before the swap: old kept
    assert not _leftovers(tmp_path)

    original = os.replace

    def replace_then_interrupt(source, target):
        original(source, target)
        if Path(target) == out:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-swap

    import ehr_diffusers.io as io_module

    io_module.os.replace = replace_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic_directory(out, overwrite=True) as staging:
                (staging / "new.txt").write_text("new")
    finally:
        io_module.os.replace = original
    assert (out / "new.txt").exists() and not (out / "old.txt").exists()  # the swap finished, then the interrupt
    assert not _leftovers(tmp_path) and completed_outputs()[-1] == out.absolute()


def test_an_interrupted_command_says_what_it_wrote(tmp_path, capsys, monkeypatch) -> None:
    """Ctrl-C before any output: "no output written"; after one was put in place: it is named."""
    import ehr_diffusers.data.ehr.cohort as cohort

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cohort, "build_cohort", interrupt)
    mimic = _mimic(tmp_path)
    assert main(["prepare", "--mimic-dir", str(mimic), "--out", str(tmp_path / "out")]) == 130
    assert "interrupted; no output written" in capsys.readouterr().err and not (tmp_path / "out").exists()

    from ehr_diffusers.commands import ehr_data

    def print_then_interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.undo()
    monkeypatch.setattr(ehr_data, "print_demo_summary", print_then_interrupt)
    assert main(["demo-data", "--patients", "5", "--out", str(tmp_path / "demo")]) == 130
    err = capsys.readouterr().err
    assert "interrupted after writing 1 output(s)" in err and str(tmp_path / "demo") in err


def test_a_large_record_count_is_announced_before_any_work(world, tmp_path, caplog) -> None:
    assert main(["generate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r.csv"), "-n",
                 "1000000000"]) == 2
    assert "--num-records 1,000,000,000" in caplog.text and "hours" in caplog.text


@pytest.mark.slow
def test_train_ehr_resumed_after_a_kill_gives_the_same_weights(world, tmp_path) -> None:
    """train-ehr stopped after the diffusion run's mid-epoch checkpoint-2 (its later checkpoints and model gone, as a
    kill leaves them) and run again with --resume-from-checkpoint latest: the weights of the run never stopped."""
    from safetensors.torch import load_file

    arguments = ["--dataset", str(world["labelled"]), "--preset", "demo", "--autoencoder-epochs", "1",
                 "--diffusion-steps", "6", "--checkpointing-steps", "2", "-q"]  # 4 batches an epoch: 2 is mid-epoch
    assert main(["train-ehr", "--output-dir", str(tmp_path / "whole"), *arguments]) == 0
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "whole" / "autoencoder-training", stopped / "autoencoder-training")
    shutil.copytree(tmp_path / "whole" / "model" / "checkpoint-2", stopped / "model" / "checkpoint-2")
    assert main(["train-ehr", "--output-dir", str(stopped), *arguments, "--resume-from-checkpoint", "latest"]) == 0
    for part in ("denoiser", "autoencoder"):
        (whole,) = (tmp_path / "whole" / "model" / part).glob("*.safetensors")
        (resumed,) = (stopped / "model" / part).glob("*.safetensors")
        first, second = load_file(whole), load_file(resumed)
        assert first.keys() == second.keys() and all((first[key] == second[key]).all() for key in first)


def test_train_ehr_passes_checkpointing_and_resume_to_both_runs(world, tmp_path, monkeypatch) -> None:
    from ehr_diffusers.commands import train

    launched = []
    monkeypatch.setattr(train, "accelerate_launch", lambda module, arguments, *rest: launched.append(arguments))
    assert main(["train-ehr", "--dataset", str(world["labelled"]), "--output-dir", str(tmp_path / "run"),
                 "--checkpointing-steps", "7", "--resume-from-checkpoint", "latest"]) == 0
    assert len(launched) == 2  # the autoencoder, then the diffusion model
    for arguments in launched:
        text = " ".join(arguments)
        assert "--checkpointing_steps 7" in text and "--resume_from_checkpoint latest" in text


def test_train_cxr_passes_checkpointing_and_resume_to_every_run(world, tmp_path, monkeypatch) -> None:
    from ehr_diffusers.commands import train

    launched = []
    monkeypatch.setattr(train, "accelerate_launch", lambda module, arguments, *rest: launched.append(arguments))
    assert main(["train-cxr", "--dataset", str(world["triplets"]), "--output-dir", str(tmp_path / "run"),
                 "--checkpointing-steps", "7", "--resume-from-checkpoint", "latest"]) == 0
    assert len(launched) == 2  # the VAE, then the diffusion model (the demo preset skips the CLIP pretraining)
    for arguments in launched:
        text = " ".join(arguments)
        assert "--checkpointing_steps 7" in text and "--resume_from_checkpoint latest" in text


@pytest.mark.parametrize("interrupt, forwarded", [("KeyboardInterrupt", "SIGINT"), ("Terminated", "SIGTERM")])
def test_an_interrupted_training_run_is_stopped_not_orphaned(monkeypatch, interrupt, forwarded) -> None:
    """Ctrl-C or SIGTERM while accelerate launch runs a script: the signal is passed on and the launcher waited for,
    so that no training process is left writing checkpoints behind the command's back."""
    import signal

    from ehr_diffusers import cli
    from ehr_diffusers.commands.launch import LaunchOptions, accelerate_launch

    sent = []

    class Launcher:
        returncode = None

        def __init__(self, *args, **kwargs) -> None:
            pass

        def communicate(self):
            raise KeyboardInterrupt if interrupt == "KeyboardInterrupt" else cli.Terminated

        def send_signal(self, number: int) -> None:
            sent.append(signal.Signals(number).name)

        def wait(self, timeout: float | None = None) -> int:
            sent.append("waited")
            return 0

    monkeypatch.setattr("subprocess.Popen", Launcher)
    with pytest.raises(KeyboardInterrupt):
        accelerate_launch("ehr_diffusers.training.train_ehr_diffusion", [], LaunchOptions())
    assert sent == [forwarded, "waited"]
