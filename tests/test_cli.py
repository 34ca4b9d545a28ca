import shutil
import subprocess
import sys

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
    script = shutil.which("ehr-diffusers") or str((__import__("pathlib").Path(sys.executable).parent / "ehr-diffusers"))
    finished = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert finished.stdout.startswith("ehr-diffusers ")
