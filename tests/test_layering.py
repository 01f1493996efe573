"""The layering rule (ARCHITECTURE.md), checked over every import: statements (function-level ones included) and
string imports (`importlib.import_module("m")`, `__import__("m")`; see `_string_imports`).

- The contract modules import only the contract.
- `filters/` and `captioners/` import only their own package and the contract; so does `trainer/`.
- `pipeline/` never imports `trainer/`; no package imports the demo, testing support, benchmarks or tests.
- `study/` (prx-study, the driver above the trainer) imports itself, the contract and `trainer/`; no package
  imports `study/`.
- No import cycles between modules.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "pipeline", "filters", "captioners", "trainer", "study")
OUTSIDE = ("demo", "testing", "bench", "tests")
# contract/ is the data contract, encoders/ included (VAE, text encoder, buckets, REPA teacher): it decides how
# latents and embeddings are made, and the sampler and evaluation must make them exactly as encode did.
CONTRACT = ("contract",)
OWN_AND_CONTRACT = ("filters", "captioners", "trainer")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES + ("demo", "testing") for p in (REPO / pkg).rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (`from contract import fs` is contract.fs), strings included."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in known else node.module)
        else:
            out.update(_string_imports(node, known))
    return {m for m in out if m.split(".")[0] in PACKAGES + OUTSIDE}


STRING_IMPORTERS = ("import_module", "__import__")


def _string_imports(node: ast.AST, known: set[str]) -> set[str]:
    """Modules a string names for import:

    - `importlib.import_module(ARG)` / `__import__(ARG)`: a literal ARG is that module; an f-string or a `+`
      concatenation counts as its literal prefix up to the last dot (`f"pipeline.stages.{name}"` is
      pipeline.stages, `"testing." + name` is testing), so a dynamic import into a forbidden package is caught;
    - any other string equal to a dotted project module (`["testing.tiny_models"]`, a list imported later).
    A name built wholly at run time (`import_module(name)`) is beyond a parser; the second rule covers lists."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value:
        return {node.value} if node.value in known else set()
    if not isinstance(node, ast.Call) or not node.args:
        return set()
    func = node.func
    if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) not in STRING_IMPORTERS:
        return set()
    text, whole = _literal_prefix(node.args[0])
    module = text if whole else text.rpartition(".")[0]
    return {module} if module else set()


def _literal_prefix(node: ast.AST) -> tuple[str, bool]:
    """(the text a string expression starts with, whether that is all of it)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value, True
    if isinstance(node, ast.JoinedStr):
        text = ""
        for part in node.values:
            if not isinstance(part, ast.Constant):
                return text, False
            text += part.value
        return text, True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, whole = _literal_prefix(node.left)
        if not whole:
            return left, False
        right, whole = _literal_prefix(node.right)
        return left + right, whole
    return "", False


@functools.lru_cache(maxsize=1)   # parsed once for every test here (read only)
def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(path, known) for name, path in mods.items()}


def _within(module: str, roots: tuple[str, ...] | set[str]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


def test_contract_modules_import_only_the_contract():
    bad = {m: sorted(i for i in deps if not _within(i, CONTRACT))
           for m, deps in _graph().items() if _within(m, CONTRACT)}
    assert not {m: d for m, d in bad.items() if d}, f"contract modules import beyond the contract: {bad}"


def test_filters_captioners_and_trainer_import_only_themselves_and_the_contract():
    bad = {}
    for m, deps in _graph().items():
        top = m.split(".")[0]
        if top in OWN_AND_CONTRACT:
            wrong = sorted(d for d in deps if not _within(d, (top,) + CONTRACT))
            if wrong:
                bad[m] = wrong
    assert not bad, f"imports outside the package and the contract: {bad}"


def test_pipeline_never_imports_the_trainer_and_no_package_imports_demo_or_tests():
    bad = {}
    for m, deps in _graph().items():
        if m.split(".")[0] not in PACKAGES:
            continue
        forbidden = OUTSIDE + (("trainer",) if m.startswith("pipeline") else ())
        wrong = sorted(d for d in deps if _within(d, forbidden))
        if wrong:
            bad[m] = wrong
    assert not bad, f"layering violations: {bad}"


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if d not in graph or d == m or _within(m, (d,)):  # a module may import its own package
                continue
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_rule_sees_violations():
    """The checks above would catch a violation: the parser finds function-level imports."""
    path = REPO / "pipeline" / "stages" / "audit.py"
    assert "pipeline.runner" in _imports(path, set(_modules()))  # imported inside a function there


def test_the_rule_sees_string_imports(tmp_path):
    """String imports count: a literal, the literal prefix of an f-string or a concatenation, a module in a list."""
    path = tmp_path / "strings.py"
    path.write_text("import importlib\n"
                    "MODULES = ['testing.docs']\n"
                    "def load(name):\n"
                    "    importlib.import_module('testing.tiny_models')\n"
                    "    __import__('demo.main')\n"
                    "    importlib.import_module(f'trainer.algorithms.{name}')\n"
                    "    importlib.import_module('bench.' + name)\n"
                    "    importlib.import_module(name)\n")
    found = _imports(path, set(_modules()))
    assert found == {"testing.docs", "testing.tiny_models", "demo.main", "trainer.algorithms", "bench"}


def test_every_stage_module_has_one_registry_line_naming_its_stage():
    """Adding a stage is a module in pipeline/stages/ and a line in its registry; neither goes without the other."""
    from pipeline.stages import REPORT, STAGES

    names = [e.name for e in STAGES]
    files = sorted(p.stem for p in (REPO / "pipeline" / "stages").glob("*.py") if p.stem != "__init__")
    assert sorted(names) == files and len(set(names)) == len(names), f"registry {names} vs modules {files}"
    for entry in STAGES:
        stage = getattr(entry.load(), "STAGE", None)
        assert (stage is None) == (entry.rank is REPORT), f"{entry.name}: a STAGE exactly when it is no REPORT"
        assert stage is None or stage.name == entry.name, f"{entry.name}: its STAGE is named {stage.name!r}"


def test_study_drives_the_trainer_and_nothing_imports_the_study():
    bad = {}
    for m, deps in _graph().items():
        top = m.split(".")[0]
        allowed = ("study", "trainer") + CONTRACT if top == "study" else None
        wrong = sorted(d for d in deps if (allowed and not _within(d, allowed)) or (top != "study" and
                                                                                    _within(d, ("study",))))
        if wrong:
            bad[m] = wrong
    assert not bad, f"study layering: {bad}"
