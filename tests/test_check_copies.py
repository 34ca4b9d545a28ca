"""utils/check_copies.py: a marked copy that equals its source passes, one that drifts fails with a diff, --fix
restores it, and a marker naming nothing is an error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_copies", REPO_ROOT / "utils/check_copies.py")
check_copies = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_copies)

SOURCE = '''class Mixer:
    @staticmethod
    def mix(first, second, weight=0.5):
        """Linear mix."""
        return (1 - weight) * first + weight * second
'''


def _tree(tmp_path: Path, copy: str) -> Path:
    package = tmp_path / "src/ehr_diffusers"
    package.mkdir(parents=True)
    (package / "mixing.py").write_text(SOURCE)
    script = tmp_path / "script.py"
    script.write_text(f"import os\n\n\n{copy}\n\nprint(os.sep)\n")
    return script


def test_equal_copy_with_renames_passes(tmp_path) -> None:
    copy = ('# Copied from ehr_diffusers.mixing.Mixer.mix with first->a, second->b\n'
            '@staticmethod\ndef mix(a, b, weight=0.5):\n'
            '    """Linear mix."""\n    return (1 - weight) * a + weight * b\n')
    script = _tree(tmp_path, copy)
    assert check_copies.check_file(script, root=tmp_path / "src") == []


def test_drifted_copy_fails_then_fix_restores_it(tmp_path) -> None:
    copy = ('# Copied from ehr_diffusers.mixing.Mixer.mix\n'
            '@staticmethod\ndef mix(first, second, weight=0.5):\n    """Linear mix."""\n'
            '    return (1 - weight) * first + weight * second + 1\n')
    script = _tree(tmp_path, copy)
    problems = check_copies.check_file(script, root=tmp_path / "src")
    assert len(problems) == 1 and "has drifted" in problems[0] and "+ weight * second + 1" in problems[0]
    check_copies.check_file(script, root=tmp_path / "src", fix=True)
    assert check_copies.check_file(script, root=tmp_path / "src") == []
    assert script.read_text().endswith("weight * second\n\n\nprint(os.sep)\n")


def test_marker_naming_nothing_is_an_error(tmp_path) -> None:
    script = _tree(tmp_path, "# Copied from ehr_diffusers.mixing.Mixer.blend\ndef blend():\n    return 0\n")
    (problem,) = check_copies.check_file(script, root=tmp_path / "src")
    assert "has no Mixer.blend" in problem


def test_the_repository_copies_are_equal() -> None:
    assert check_copies.main([]) == 0
