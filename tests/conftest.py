"""Shared fixtures: a tiny hand-written MIMIC-IV folder whose every figure is known, and a fresh accelerate state for
the tests that run training scripts in process."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

PATIENTS = """subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod
10000001,F,60,2150,2008 - 2010,2152-03-01
10000002,M,45,2160,2017 - 2019,
10000003,F,91,2170,2014 - 2016,
10000004,M,30,2140,2011 - 2013,
10000005,F,70,2155,2017 - 2019,
10000006,M,80,2180,2011 - 2013,2181-01-01
10000007,F,25,2190,2020 - 2022,
10000008,M,55,2130,2014 - 2016,
10000009,F,65,2120,2008 - 2010,
10000010,M,40,2110,2017 - 2019,
"""

ADMISSIONS = """subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,admit_provider_id,admission_location,discharge_location,insurance,language,marital_status,race,edregtime,edouttime,hospital_expire_flag
10000001,20000001,2150-01-01 10:00:00,2150-01-05 12:00:00,,EW EMER.,P1,EMERGENCY ROOM,HOME,Medicare,ENGLISH,MARRIED,WHITE,,,0
10000001,20000002,2152-02-20 08:00:00,2152-03-01 09:00:00,2152-03-01 09:00:00,URGENT,P1,EMERGENCY ROOM,DIED,Medicare,ENGLISH,WIDOWED,UNKNOWN,,,1
10000002,20000003,2161-05-05 10:00:00,2161-05-06 10:00:00,,ELECTIVE,P2,PHYSICIAN REFERRAL,HOME,Private,ENGLISH,,BLACK/AFRICAN AMERICAN,,,0
10000003,20000004,2172-07-07 10:00:00,2172-07-10 10:00:00,,EW EMER.,P3,EMERGENCY ROOM,SKILLED NURSING FACILITY,Medicare,ENGLISH,SINGLE,ASIAN - CHINESE,,,0
10000005,20000005,2155-01-01 10:00:00,2155-01-03 10:00:00,,EW EMER.,P4,EMERGENCY ROOM,HOME,Medicare,ENGLISH,DIVORCED,HISPANIC/LATINO - PUERTO RICAN,,,0
10000006,20000006,2180-06-01 10:00:00,2180-06-04 10:00:00,,URGENT,P5,TRANSFER FROM HOSPITAL,HOME,Medicare,ENGLISH,MARRIED,PATIENT DECLINED TO ANSWER,,,0
10000007,20000007,2190-03-03 10:00:00,2190-03-04 10:00:00,,SURGICAL SAME DAY ADMISSION,P6,PHYSICIAN REFERRAL,HOME,Private,ENGLISH,SINGLE,WHITE - RUSSIAN,,,0
10000008,20000008,2131-01-01 10:00:00,2131-01-02 10:00:00,,ELECTIVE,P7,PHYSICIAN REFERRAL,HOME,Private,ENGLISH,MARRIED,WHITE,,,0
10000009,20000009,2121-01-01 10:00:00,2121-01-02 10:00:00,,EW EMER.,P8,EMERGENCY ROOM,HOME,Medicare,ENGLISH,WIDOWED,WHITE,,,0
"""

# ICD-9: 25000 -> E11, 4019 -> I10, 4280 -> I50, 41401 -> I25, 36570 is a GEM "no map" row.
DIAGNOSES = """subject_id,hadm_id,seq_num,icd_code,icd_version
10000001,20000001,1,25000,9
10000001,20000001,2,4019,9
10000001,20000001,3,36570,9
10000001,20000002,1,I509,10
10000001,20000002,2,N179,10
10000002,20000003,1,I10,10
10000002,20000003,2,E119,10
10000003,20000004,1,4280,9
10000003,20000004,2,41401,9
10000005,20000005,1,O80,10
10000006,20000006,1,N400,10
10000006,20000006,2,I10,10
10000007,20000007,1,J45909,10
10000008,20000008,1,4019,9
10000009,20000009,1,I10,10
10000009,20000009,2,I2510,10
"""

D_ICD = """icd_code,icd_version,long_title
25000,9,Diabetes mellitus without mention of complication
4019,9,Unspecified essential hypertension
"""


def prepare_demo_cxr(root: Path, subjects: int, image_size: int | None = None) -> Path:
    """``root/data``: a synthetic X-ray cohort of ``subjects`` patients prepared with MiniLM event embeddings (and
    ``image_size`` px copies)."""
    from ehr_diffusers.data.cxr.dataset import CXRDatasetOptions, EventEmbeddingOptions, prepare_cxr
    from ehr_diffusers.data.cxr.demo import write_demo_cxr
    from ehr_diffusers.text.event_embeddings import EventEmbedder

    write_demo_cxr(root / "cohort", n_subjects=subjects, seed=0, show_progress=False)
    prepare_cxr(root / "cohort" / "mimic-cxr-jpg", root / "cohort" / "mimic-iv", root / "data", CXRDatasetOptions(),
                show_progress=False, synthetic=True,
                embed_events=EventEmbedder(EventEmbeddingOptions(embedder="minilm")), image_size=image_size)
    return root / "data"


def write_tiny_mimic(root: Path, **overrides: str) -> Path:
    """Writes the tiny cohort as PhysioNet lays it out; ``overrides`` replace a table's CSV text."""
    hosp = root / "hosp"
    hosp.mkdir(parents=True, exist_ok=True)
    tables = {"patients": PATIENTS, "admissions": ADMISSIONS, "diagnoses_icd": DIAGNOSES, "d_icd_diagnoses": D_ICD}
    tables.update(overrides)
    for name, text in tables.items():
        if text is not None:
            (hosp / f"{name}.csv").write_text(text)
    return root


@pytest.fixture
def tiny_mimic(tmp_path: Path) -> Path:
    return write_tiny_mimic(tmp_path / "mimic-iv")


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """A prepared dataset of 1,000 synthetic demo patients (read-only: copy it before labelling, which rewrites it)."""
    from ehr_diffusers.data.ehr.cohort import prepare
    from ehr_diffusers.data.ehr.demo import write_demo_mimic

    root = tmp_path_factory.mktemp("demo")
    write_demo_mimic(root / "mimic", n_patients=1000, seed=3, show_progress=False)
    prepare(root / "mimic", root / "dataset", show_progress=False, synthetic=True)
    return root / "dataset"


@pytest.fixture(scope="session")
def labelled_demo_dataset(demo_dataset, tmp_path_factory) -> Path:
    """A copy of ``demo_dataset`` labelled as the demo does (template summaries, rules judge, MiniLM embeddings);
    read-only: copy it before changing it."""
    import shutil

    from ehr_diffusers.text.embed import load_embedder
    from ehr_diffusers.text.judge import load_judge
    from ehr_diffusers.text.label import label_dataset
    from ehr_diffusers.text.summarize import load_summarizer

    target = tmp_path_factory.mktemp("labelled") / "dataset"
    shutil.copytree(demo_dataset, target)
    label_dataset(target, load_summarizer("template"), load_judge("rules"), load_embedder("minilm"),
                  show_progress=False, embedder_spec="minilm")
    return target


def reset_accelerate_state() -> None:
    """Each in-process training run builds its own Accelerator; accelerate keeps process-wide singletons between them
    (the partial state included)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def run_interrupted(run, folder: Path, step: int):
    """``run(out, *extra)`` twice: uninterrupted in ``folder/whole``, then stopped after its checkpoint at ``step``
    (that checkpoint alone copied to ``folder/stopped``) and resumed from it. Returns (whole, resumed)."""
    import shutil

    whole = run(folder / "whole")
    reset_accelerate_state()
    shutil.copytree(whole.output_dir / f"checkpoint-{step}", folder / "stopped" / f"checkpoint-{step}")
    return whole, run(folder / "stopped", "--resume_from_checkpoint", "latest")
