"""pyproject.toml declares what each part of the package imports, and nothing more.

The library (everything but ``demo/``, ``report/`` and ``cpu_rig/``) may import only the
``dependencies``; ``report/`` adds the ``report`` extra; ``demo/`` and the CPU rig it runs on add
the ``demo`` extra. Every import statement counts, also those inside functions.
"""

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_rollout_is"

# Imported module (longest dotted prefix wins) -> the distribution that provides it.
DISTRIBUTIONS = {
    "torch": "torch",
    "torch.utils.tensorboard": "tensorboard",
    "megatron": "megatron-core",
    "yaml": "pyyaml",
    "safetensors": "safetensors",
    "numpy": "numpy",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "vllm": "vllm",
}

# Parts of the package that may import more than the library, and the extras they may use.
PARTS_WITH_EXTRAS = {"demo": ("report", "demo"), "cpu_rig": ("demo",), "report": ("report",)}
# Imported lazily by vllm_adapter only, for the `vllm` extra's users.
LIBRARY_EXTRAS = ("vllm",)


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list) -> set:
    return {re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def _extra(name: str) -> set:
    """The distributions of an extra, with the package's own extras it names expanded."""
    names = set()
    for requirement in _project()["optional-dependencies"][name]:
        nested = re.fullmatch(r"megatron-rollout-is\[([\w,]+)\]", requirement)
        if nested:
            names |= set().union(*(_extra(extra) for extra in nested.group(1).split(",")))
        else:
            names |= _names([requirement])
    return names


def _distribution(module: str) -> str:
    parts = module.split(".")
    for length in range(len(parts), 0, -1):
        prefix = ".".join(parts[:length])
        if prefix in DISTRIBUTIONS:
            return DISTRIBUTIONS[prefix]
    if parts[0] in sys.stdlib_module_names or parts[0] == "megatron_rollout_is":
        return ""
    raise AssertionError(f"no distribution known for `import {module}`: add it to DISTRIBUTIONS")


def _imported_distributions(files) -> dict:
    """{distribution: [file, ...]} of the absolute imports in `files`."""
    found = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                distribution = _distribution(module)
                if distribution:
                    found.setdefault(distribution, []).append(str(path.relative_to(ROOT)))
    return found


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE).parts
    return relative[0] if len(relative) > 1 else ""


def test_the_library_imports_exactly_its_dependencies():
    library = [path for path in PACKAGE.rglob("*.py") if _part(path) not in PARTS_WITH_EXTRAS]
    imported = _imported_distributions(library)
    dependencies = _names(_project()["dependencies"])
    allowed = dependencies.union(*(_extra(extra) for extra in LIBRARY_EXTRAS))
    assert set(imported) <= allowed, {name: imported[name] for name in set(imported) - allowed}
    assert dependencies <= set(imported), f"declared but never imported: {dependencies - set(imported)}"


def test_demo_report_and_rig_import_only_their_extras():
    dependencies = _names(_project()["dependencies"])
    for part, extras in PARTS_WITH_EXTRAS.items():
        imported = _imported_distributions((PACKAGE / part).rglob("*.py"))
        allowed = dependencies.union(*(_extra(extra) for extra in extras))
        assert set(imported) <= allowed, (part, {name: imported[name] for name in set(imported) - allowed})


def test_megatron_core_is_a_tested_range_not_a_pin():
    (requirement,) = [r for r in _project()["dependencies"] if r.startswith("megatron-core")]
    assert "==" not in requirement and ">=0.16.1" in requirement and "<" in requirement, requirement


def test_the_test_extra_brings_the_demo_and_report_extras():
    assert _extra("demo") | _extra("report") | {"pytest"} <= _extra("test")
    # megatron-core's dist_checkpointing writer (the demo's --save) hangs without psutil.
    assert "psutil" in _extra("demo")
