"""Checks that code marked ``# Copied from ehr_diffusers.<module>.<name>`` still equals its source.

Some code is copied on purpose, so that a file reads on its own (a training script, as diffusers' examples are). The
marker goes on the line above the copied ``def`` or ``class``; ``with Old->New`` (comma-separated pairs) names the
renames the copy makes. A copy that drifts from its source fails this check (exit status 1) with a diff;
``--fix`` rewrites every drifted copy from its source instead. Run from anywhere:

    python utils/check_copies.py [--fix]
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOT = REPO_ROOT / "src"
SEARCHED = ("src", "training_scripts", "benchmarks")
MARKER = re.compile(r"^(?P<indent>\s*)# Copied from (?P<target>ehr_diffusers(?:\.\w+)+)(?:\s+with\s+(?P<renames>.+))?$")


def _definition(tree: ast.Module, qualified: list[str]) -> ast.AST | None:
    """The ``def`` or ``class`` named by ``qualified`` (``["Class", "method"]``) in ``tree``."""
    body: list[ast.stmt] = tree.body
    node = None
    for name in qualified:
        node = next((item for item in body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and item.name == name), None)
        if node is None:
            return None
        body = getattr(node, "body", [])
    return node


def _source_of(target: str, root: Path) -> str:
    """The dedented source (decorators included) of ``ehr_diffusers.module.path.Name[.member]``."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        stem = root.joinpath(*parts[:cut])
        for path in (stem.with_suffix(".py"), stem / "__init__.py"):
            if path.is_file():
                text = path.read_text()
                node = _definition(ast.parse(text), parts[cut:])
                if node is None:
                    raise LookupError(f"{target}: {path} has no {'.'.join(parts[cut:])}")
                return _lines(text, node)
    raise LookupError(f"{target}: no such module under {root}")


def _lines(text: str, node: ast.AST) -> str:
    lines = text.splitlines(keepends=True)
    start = min([node.lineno, *(decorator.lineno for decorator in getattr(node, "decorator_list", []))])
    return textwrap.dedent("".join(lines[start - 1:node.end_lineno]))


def _renamed(source: str, renames: str | None) -> str:
    for pair in (renames or "").split(","):
        if pair.strip():
            old, _, new = pair.strip().partition("->")
            source = re.sub(rf"\b{re.escape(old.strip())}\b", new.strip(), source)
    return source


def check_file(path: Path, root: Path = SOURCE_ROOT, fix: bool = False) -> list[str]:
    """The drift messages (with diffs) of every marked copy in ``path``; with ``fix``, rewrites the copies."""
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text, str(path))
    nodes = {node.lineno: node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef,
                                                                               ast.AsyncFunctionDef, ast.ClassDef))}
    problems: list[str] = []
    replacements: list[tuple[int, int, str]] = []
    for number, line in enumerate(lines, start=1):
        match = MARKER.match(line.rstrip("\n"))
        if not match:
            continue
        node = next((nodes[n] for n in range(number + 1, number + 3) if n in nodes), None)
        decorated = node is not None and min([node.lineno, *(d.lineno for d in node.decorator_list)]) == number + 1
        if node is None or not decorated:
            problems.append(f"{path}:{number}: '# Copied from' is not directly above a def or class")
            continue
        try:
            expected = _renamed(_source_of(match["target"], root), match["renames"])
        except LookupError as error:
            problems.append(f"{path}:{number}: {error}")
            continue
        current = _lines(text, node)
        if current != expected:
            diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), current.splitlines(keepends=True),
                                                f"{match['target']} (source)", f"{path}:{number + 1} (copy)"))
            problems.append(f"{path}:{number}: copy of {match['target']} has drifted\n{diff}")
            replacements.append((number + 1, node.end_lineno, textwrap.indent(expected, match["indent"])))
    if fix and replacements:
        for start, end, new in sorted(replacements, reverse=True):
            lines[start - 1:end] = [new]
        path.write_text("".join(lines))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fix", action="store_true", help="rewrite drifted copies from their sources")
    args = parser.parse_args(argv)
    problems: list[str] = []
    copies = 0
    for folder in SEARCHED:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            copies += sum(1 for line in path.read_text().splitlines() if MARKER.match(line))
            problems += check_file(path, fix=args.fix)
    unfixable = [problem for problem in problems if "has drifted" not in problem]
    for problem in problems:
        print(problem, file=sys.stderr)
    if unfixable or (problems and not args.fix):
        print(f"check_copies: {len(problems)} of {copies} marked copies are wrong"
              + ("" if args.fix else "; python utils/check_copies.py --fix rewrites drifted ones"), file=sys.stderr)
        return 1
    print(f"check_copies: {copies} marked copies, " + (f"{len(problems)} rewritten" if problems else "all equal"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
