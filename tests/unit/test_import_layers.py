"""The package's wings import one way only: each wing imports only itself and the wings below it, so no import
runs back up a layer and there is no cycle between wings; formats/ (the wire schema) imports nothing of the
package above it. The DEXTR bridges run without torch, and the core without TorchServe."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vision_attribution"
RANKS = {"formats": 0, "attribution": 1, "networks": 1, "adapters": 2, "serving": 3, "archives": 4, "training": 4, "clients": 5}
"""A wing may import a wing of lower rank; wings of the same rank are independent of each other."""


def imported_modules(path: Path, package_dir: Path = PACKAGE) -> set[str]:
    """Every vision_attribution module that `path` (a file under package_dir) imports, at any depth of the file
    (lazy imports too)."""
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    package = parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("vision_attribution"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("vision_attribution"):
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANKS else None


def test_every_module_belongs_to_a_wing():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside the wings: {loose}"
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(RANKS)


def arrows_up(package_dir: Path) -> list[str]:
    """The imports of the package in package_dir that run back up a layer or across to a wing of the same rank."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        source = wing_of(".".join(path.relative_to(package_dir.parent).with_suffix("").parts))
        for module in sorted(imported_modules(path, package_dir)):
            target = wing_of(module)
            if source is None or target is None or target == source:
                continue
            if RANKS[target] >= RANKS[source]:
                found.append(f"{path.relative_to(package_dir.parent)} ({source}) imports {module} ({target})")
    return found


def test_imports_run_one_way():
    assert arrows_up(PACKAGE) == [], "imports that run back up a layer or across a layer:\n" + "\n".join(arrows_up(PACKAGE))


def test_formats_import_nothing_above():
    above = [
        f"{path.relative_to(PACKAGE.parent)} imports {module}"
        for path in sorted((PACKAGE / "formats").rglob("*.py"))
        for module in imported_modules(path)
        if wing_of(module) not in (None, "formats")
    ]
    assert above == []


def test_the_layer_check_sees_arrows_up(tmp_path):
    """The checker itself finds a relative and an absolute import that run back up, and one across."""
    package = tmp_path / "vision_attribution"
    for wing, source in {
        "formats": "from ..attribution.engine import integrate_path\n",
        "adapters": "def lazy():\n    import vision_attribution.serving.service\n",
        "networks": "from vision_attribution.attribution import engine\n",
    }.items():
        (package / wing).mkdir(parents=True)
        (package / wing / "module.py").write_text(source)
    assert arrows_up(package) == [
        "vision_attribution/adapters/module.py (adapters) imports vision_attribution.serving.service (serving)",
        "vision_attribution/formats/module.py (formats) imports vision_attribution.attribution.engine (attribution)",
        "vision_attribution/formats/module.py (formats) imports vision_attribution.attribution.engine.integrate_path (attribution)",
        "vision_attribution/networks/module.py (networks) imports vision_attribution.attribution (attribution)",
        "vision_attribution/networks/module.py (networks) imports vision_attribution.attribution.engine (attribution)",
    ]


def _imports_in_fresh_python(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())


def test_dextr_bridges_and_gateway_run_without_torch():
    loaded = _imports_in_fresh_python(
        "import vision_attribution.clients.bridges.redis_channel, vision_attribution.clients.bridges.folder_poll, "
        "vision_attribution.formats.dextr, vision_attribution.clients.readiness"
    )
    assert "torch" not in loaded


@pytest.mark.parametrize("command", ["gateway", "dextr-redis", "dextr-poll"])
def test_the_commands_that_need_no_torch_start_without_it(command):
    """The command line itself: `vision-attribution gateway` loaded torch (700 MiB, 4 s) through dextr-train's
    parser until the soak measured the gateway's memory."""
    loaded = _imports_in_fresh_python(
        "import contextlib, io; from vision_attribution.clients import cli\n"
        f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): cli.main([{command!r}, '--help'])\n"
        "assert 'vision_attribution.clients.gateway.server' in sys.modules"
    )
    assert "torch" not in loaded


def test_core_imports_without_torchserve():
    loaded = _imports_in_fresh_python("import vision_attribution.archives, vision_attribution.serving.service")
    assert "ts" not in loaded and not any(name.startswith("ts.") for name in loaded)
