"""The import direction written in docs/architecture.md, checked on the source with ast: every import statement,
those inside functions included, against the table of layers; and no import cycles between modules."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = REPO_ROOT / "src"
PACKAGE = "ehr_diffusers"
ROW = re.compile(r"^\| (\w+) \| (`[\w.]+`(?:, `[\w.]+`)*) \| ([\w, ]+) \|$")


def _layers() -> tuple[dict[str, str], dict[str, set[str]]]:
    """(module prefix -> layer, layer -> layers it may import), read from the architecture table."""
    prefixes: dict[str, str] = {}
    allowed: dict[str, set[str]] = {}
    for line in (REPO_ROOT / "docs/architecture.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            layer = match[1]
            for prefix in re.findall(r"`([\w.]+)`", match[2]):
                prefixes[prefix] = layer
            allowed[layer] = {name.strip() for name in match[3].split(",")}
    return prefixes, allowed


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((PACKAGE_ROOT / PACKAGE).rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, resolved to the modules (or packages) that run."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from package import module`` imports the module; ``from module import name`` the module itself
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target.split(".")[0] == PACKAGE)
    return found


def _layer(module: str, prefixes: dict[str, str]) -> str:
    matches = [prefix for prefix in prefixes if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module}: no layer in docs/architecture.md names it")
    return prefixes[max(matches, key=len)]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_table_names_every_layer() -> None:
    prefixes, allowed = _layers()
    assert set(prefixes.values()) == set(allowed) >= {"leaf", "data", "text", "models", "pipelines", "training",
                                                      "evaluation", "commands"}
    for layer, targets in allowed.items():
        assert targets <= set(allowed), f"{layer} may import an unknown layer: {targets - set(allowed)}"


def test_imports_run_one_way() -> None:
    prefixes, allowed = _layers()
    wrong = []
    for module, targets in _graph().items():
        layer = _layer(module, prefixes)
        for target in sorted(targets):
            if _layer(target, prefixes) not in allowed[layer]:
                wrong.append(f"{module} ({layer}) imports {target} ({_layer(target, prefixes)})")
    assert not wrong, "imports against docs/architecture.md:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_checks_see_a_wrong_import_and_a_cycle(tmp_path) -> None:
    """The checks themselves: a cycle is found, and a data module importing a pipeline is a wrong import."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    prefixes, allowed = _layers()
    assert _layer("ehr_diffusers.pipelines.pipeline_ehr_latent_diffusion", prefixes) not in allowed[
        _layer("ehr_diffusers.data.ehr.cohort", prefixes)]
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from ..pipelines import x\n")
    modules = {"ehr_diffusers.pipelines": module}
    assert _imports("ehr_diffusers.data.probe", module, modules) == {"ehr_diffusers.pipelines"}


@pytest.mark.parametrize("module", ["ehr_diffusers.data", "ehr_diffusers.models", "ehr_diffusers.hub"])
def test_lower_layers_never_import_training_or_evaluation(module) -> None:
    prefixes, _ = _layers()
    for name, targets in _graph().items():
        if name == module or name.startswith(module + "."):
            assert not {t for t in targets if _layer(t, prefixes) in ("training", "evaluation", "commands")}, name
