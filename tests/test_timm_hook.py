"""The start-up hook: its ``.pth`` line, lazy registration when a program imports ``timm.scheduler``,
the explicit ``register()`` instead of registration on import, and imports that run one way from it.

These tests start fresh interpreters and import no timm_autodecay module themselves."""
import ast
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = "__timm_autodecay_original__"


def setup_constants():
    """PTH_NAME and PTH_LINE, as setup.py ships them."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    return {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)}


def test_only_the_factory_is_imported_by_the_hook_and_nothing_imports_the_hook():
    """The hook stays cheap at start-up (it imports the factory only inside a function, when timm's
    scheduler is imported), and importing any other module never registers anything through it."""
    package = ROOT / "timm_autodecay"
    imports = {}
    for path in package.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        imports[path.stem] = found
    assert imports["timm_hook"] == {"timm_factory"}
    assert [name for name, found in imports.items() if "timm_hook" in found] == []
    top_level = {node.module for node in ast.parse((package / "timm_hook.py").read_text()).body
                 if isinstance(node, ast.ImportFrom)}
    assert top_level <= {"__future__"}


def run_python(*args, env=None, python=sys.executable, cwd=None):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop("PYTHONPATH", None)
    return subprocess.run([str(python), *args], env=environment, capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_the_pth_line_is_silent_once_the_checkout_is_gone(tmp_path):
    """``pip install -e CHECKOUT``, then the checkout moved or deleted: every interpreter start must
    stay silent. A fresh virtual environment holds the hook's .pth and a path entry to a copy of
    the package, as an install does; then the copy is deleted."""
    constants = setup_constants()
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site_packages = Path(run_python("-c", "import site; print(site.getsitepackages()[0])",
                                    python=python).stdout.strip())
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "timm_autodecay", checkout / "timm_autodecay",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (site_packages / "checkout.pth").write_text(f"{checkout}\n")
    (site_packages / constants["PTH_NAME"]).write_text(constants["PTH_LINE"])
    armed = "import sys; print(any(type(f).__name__ == '_TimmSchedulerFinder' for f in sys.meta_path))"

    installed = run_python("-c", armed, python=python, cwd=tmp_path)
    assert (installed.returncode, installed.stdout.strip(), installed.stderr) == (0, "True", "")
    shutil.rmtree(checkout)
    for code in ("pass", armed):
        gone = run_python("-c", code, python=python, cwd=tmp_path)
        assert gone.returncode == 0 and gone.stderr == "", gone.stderr
    assert gone.stdout.strip() == "False"


@pytest.mark.slow
def test_startup_hook_is_lazy_and_registers_on_timm_import_and_only_there(tmp_path):
    """What the installed .pth does: no torch/timm at start-up, registration when timm's scheduler package
    is imported (also through our own module); without the hook, importing the package registers nothing
    until ``register()``. Interpreters start without site (``-S``) so that only this test's .pth runs,
    with the packages on sys.path."""
    constants = setup_constants()
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / constants["PTH_NAME"]).write_text(constants["PTH_LINE"])
    paths = [str(ROOT), *(p for p in sys.path if p.endswith("site-packages"))]
    prelude = f"import site, sys; sys.path[:0] = {paths!r}; "
    probe = ("import timm.scheduler as s; "
             f"print(hasattr(s.create_scheduler_v2, {ORIGINAL!r}), hasattr(s.scheduler_kwargs, {ORIGINAL!r}))")
    # the hook armed at start-up without importing torch or timm; our scheduler module imported first
    # imports timm's scheduler package, which the hook registers in (train.py's order, timm first, is
    # the one every in-process test runs in)
    hooked = run_python("-W", "error::RuntimeWarning", "-S", "-c", prelude + (
        f"site.addsitedir({str(site_dir)!r}); "
        "print(any(type(f).__name__ == '_TimmSchedulerFinder' for f in sys.meta_path), "
        "'torch' in sys.modules, 'timm' in sys.modules); import timm_autodecay.timm_scheduler; " + probe))
    assert hooked.returncode == 0, hooked.stderr
    assert hooked.stdout.split() == ["True", "False", "False", "True", "True"]

    explicit = run_python("-S", "-c", prelude + (
        "import timm_autodecay.timm_scheduler, timm_autodecay.timm_factory as f; " + probe + "; "
        "f.register(); " + probe))
    assert explicit.returncode == 0, explicit.stderr
    assert explicit.stdout.split() == ["False", "False", "True", "True"]

    off = run_python("-S", "-c", prelude + f"site.addsitedir({str(site_dir)!r}); "
                     "print(any(type(f).__name__ == '_TimmSchedulerFinder' for f in sys.meta_path))",
                     env={"TIMM_AUTODECAY_HOOK": "0"})
    assert off.returncode == 0 and off.stdout.split() == ["False"], off.stderr
