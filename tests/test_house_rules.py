"""The house rules of the code base, kept from coming back: short files, short functions, imports
that run one way (a cycle, even through an import inside a function, fails), test modules that import no
framework until a test needs it."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("timm_autodecay", "hf_integration", "recipes")
MAX_FILE_LINES = 450  # a file reads in one sitting
MAX_FUNCTION_LINES = 70  # a function fits on a screen, docstring included


def sources():
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_files_and_functions_are_short(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{path.name}: over {MAX_FILE_LINES} lines"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path, known):
    """The project's modules that ``path`` imports anywhere in its body."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` imports the module; `from module import name` the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_import_cycles_between_the_projects_modules():
    paths = {module_name(p): p for p in sources()}
    graph = {name: imported_modules(path, set(paths)) for name, path in paths.items()}
    state, cycles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


def test_the_detector_imports_no_framework():
    for name in ("detector", "settings", "state", "trend"):
        tree = ast.parse((ROOT / "timm_autodecay" / f"{name}.py").read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and not node.level}
        assert not imported & {"torch", "timm", "transformers", "accelerate", "numpy"}, name


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_collecting_the_tests_imports_neither_timm_nor_transformers():
    """The fast layer's speed rests on it (see conftest.py): a test module importing a framework at its top
    makes every pytest-xdist worker pay seconds for it."""
    modules = sorted(path.stem for path in (ROOT / "tests").glob("test_*.py"))
    probe = (f"import sys; import {', '.join(modules)}; "
             "print(sorted({'timm', 'transformers', 'accelerate'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT / "tests", capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"imported while collecting: {result.stdout.strip()}"


# A rule lives once: these facts have one definition, and every face asks it.
DEFINED_ONCE = {
    "the cooldown's end": ("cooldown_start + ", "timm_autodecay/detector.py"),
    "the unknown-setting check": ("- set(known)", "timm_autodecay/settings.py"),
    "the state version check": ("<= STATE_VERSION", "timm_autodecay/state.py"),
    "a stage's budget boundary": ("stage_budget - ROUNDING", "timm_autodecay/detector.py"),
    "the cooldown's curve": ("math.cos(math.pi", "timm_autodecay/lr_rules.py"),
    "no floor raises an LR": ("min(floor, ", "timm_autodecay/lr_rules.py"),
    "min_lr against each group": ("min_lr / highest", "timm_autodecay/lr_rules.py"),
}


@pytest.mark.parametrize("fact", DEFINED_ONCE)
def test_a_rule_is_defined_once(fact):
    pattern, home = DEFINED_ONCE[fact]
    found = [str(path.relative_to(ROOT)) for path in sources() if pattern in path.read_text()]
    assert found == [home], f"{fact} ({pattern!r}) is written in {found}; ask {home} instead"
