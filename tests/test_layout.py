"""The package layout: every public name imports, the core needs no notebook packages, no module imports cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ccatoolkit as cc

PACKAGE = Path(cc.__file__).parent

# cc.__all__ of release 0.1.0 (before the layout by concept): every name must keep working.
NAMES_0_1 = {
    "ActivationCache", "CacheError", "Curve", "CurveResult", "DATASET_NAMES", "Ensemble", "GraphError",
    "InterpolationResult", "JointStats", "METHODS", "MLP", "MergeGraph", "ParamRef", "PlaneResult", "ResNet20",
    "Space", "StatisticsCollector", "VGG11", "align_to", "alignment_transforms", "apply_permutations",
    "apply_transforms", "barrier", "build_model", "canonical_correlations", "canonical_correlations_from_cov",
    "capturable_layers", "capture", "check_same_architecture", "collect_statistics", "compare_paths",
    "correlation_matrix", "dataset_info", "default_device", "ensemble", "evaluate", "get_loaders", "interpolate",
    "load_dataset", "load_or_create", "loss_plane", "make_loader", "merge", "merge_graph", "repair",
    "reset_bn_stats", "resolve_device", "simplex", "split_indices", "train", "train_curve", "train_val_split",
    "trained_model", "trained_models", "__version__",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in its code (module level or inside functions)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules}


def test_every_public_name_of_0_1_still_imports() -> None:
    assert NAMES_0_1 <= set(cc.__all__)
    for name in cc.__all__:
        assert getattr(cc, name) is not None


def test_public_names_are_not_shadowed_by_subpackages() -> None:
    """Importing a subpackage binds it on ``ccatoolkit``: none may share a public name (``cc.merge`` is a function)."""
    import importlib
    import types

    for path in PACKAGE.rglob("*.py"):
        importlib.import_module(_module_name(path))
    for name in cc.__all__:
        assert not isinstance(getattr(cc, name), types.ModuleType), f"cc.{name} is a module"


def test_no_import_cycles_and_no_private_imports_across_modules() -> None:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {name: _imports(path, modules) - {name} for name, path in files.items()}
    # a package's __init__ may import its own submodules; a submodule importing its parent package is
    # importing a sibling through the back door
    for name, deps in graph.items():
        for dep in deps:
            assert not (files[name].name != "__init__.py" and name.startswith(dep + ".")), (name, dep)
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ccatoolkit"):
                private = [a.name for a in node.names if a.name.startswith("_") and node.module != "ccatoolkit._utils"]
                assert not private, f"{name} imports private {private} from {node.module}"


def test_core_imports_with_torch_numpy_scipy_only() -> None:
    """The merge, analysis and landscape core must import on a GPU image without tqdm, matplotlib or Jupyter."""
    code = (
        "import sys\n"
        "for blocked in ('matplotlib', 'ipywidgets', 'IPython', 'pandas', 'seaborn', 'sklearn', 'tqdm'):\n"
        "    sys.modules[blocked] = None\n"
        "import ccatoolkit as cc\n"
        "import ccatoolkit.merging, ccatoolkit.analysis, ccatoolkit.landscape, ccatoolkit.zoo, ccatoolkit.data\n"
        "print(len(cc.__all__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
