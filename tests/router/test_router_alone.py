"""The router runs without the controller: no import of `stack` or `deploys`, anywhere in
`router/`, and its CLI errors keep the controller's `error:` / `hint:` shape."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROUTER_DIR = Path(__file__).resolve().parents[2] / "router"
CONTROLLER_PACKAGES = {"stack", "deploys"}


def _imported_packages(path: Path) -> set[str]:
    """Top-level package of every import in the file, including ones inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
    return found


def test_no_router_module_imports_the_controller_even_lazily() -> None:
    offenders = {path.name: sorted(_imported_packages(path) & CONTROLLER_PACKAGES)
                 for path in sorted(ROUTER_DIR.glob("*.py"))}
    assert {name: pkgs for name, pkgs in offenders.items() if pkgs} == {}


def test_a_bad_config_is_reported_with_the_controller_packages_unimportable(
        tmp_path: Path) -> None:
    path = tmp_path / "router.json"
    path.write_text('{"listen": "0.0.0.0:8080"}')
    script = ("import sys\n"
              "sys.modules['stack'] = sys.modules['deploys'] = None  # import fails\n"
              "from router.main import main\n"
              f"raise SystemExit(main(['--config', {str(path)!r}]))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, cwd=ROUTER_DIR.parent)
    assert out.returncode == 1
    assert out.stderr == (
        f"error: `keys` in `{path}` is empty but `listen` is '0.0.0.0:8080', which is not "
        "loopback\nhint: create a key with `stack keys create NAME`, or listen on 127.0.0.1.\n")
