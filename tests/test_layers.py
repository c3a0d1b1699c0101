"""The import graph of pipeline/, read from the source (ast): no circle, no import from a lower layer to a higher
one (the layering of docs/architecture.md), Ray and fsspec only where the map says, no module over 400 lines.

Every import counts, those inside functions too: a lazy import still makes the modules depend on each other.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# Layers from the bottom up (docs/architecture.md): a module may import its own layer's modules and lower ones.
# Within a layer the packages named apart may not import each other (output and models; extract and train;
# analyse and finetune).
LAYERS = (
    ("pipeline.errors",),
    ("pipeline.io",),
    ("pipeline.contract", "pipeline.sections", "pipeline.charts", "pipeline.data"),
    ("pipeline.config",),
    ("pipeline.output", "pipeline.models"),
    ("pipeline.ray_cluster", "pipeline.reaper", "pipeline.extract", "pipeline.train"),
    ("pipeline.analyse", "pipeline.finetune"),
    ("pipeline.tools",),
    ("pipeline.cli",),
)
SIBLINGS_MAY_IMPORT = {("pipeline.extract", "pipeline.ray_cluster")}  # the driver starts Ray through it

# Where the docs allow a third-party library (top-level name -> module prefixes).
CONFINED = {
    "fsspec": ("pipeline.io",),
    "s3fs": ("pipeline.io",),
    "gcsfs": ("pipeline.io",),
    "adlfs": ("pipeline.io",),
    "ray": ("pipeline.ray_cluster", "pipeline.extract.driver", "pipeline.extract.pool", "pipeline.extract.actor",
            "pipeline.analyse.knn_actors", "pipeline.finetune.workers"),
    "moto": (),  # test doubles live in tests/
}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Every module an import in `path` names (absolute; relative imports resolved), at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the pipeline modules it imports."""
    known = modules()
    return {name: {target for target in imported_names(path, name)
                   if target in known and target not in (name, "pipeline")}
            for name, path in known.items()}


def layer_of(name: str) -> tuple[int, str]:
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                return rank, prefix
    if name == "pipeline":
        return len(LAYERS), name
    raise AssertionError(f"{name} is in no layer: place it in LAYERS (and in docs/architecture.md)")


def test_the_import_graph_has_no_circle():
    try:
        tuple(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as error:
        pytest.fail("an import circle: " + " -> ".join(error.args[1]))


def test_imports_point_down_the_layers():
    upward = []
    edges = [(source, target) for source, targets in import_graph().items() for target in targets]
    for source, target in edges:
        (source_rank, source_group), (target_rank, target_group) = layer_of(source), layer_of(target)
        if target_rank > source_rank or (target_rank == source_rank and source_group != target_group
                                         and (source_group, target_group) not in SIBLINGS_MAY_IMPORT):
            upward.append(f"{source} -> {target}")
    assert not upward, "imports against the layers: " + ", ".join(sorted(upward))


@pytest.mark.parametrize("library", sorted(CONFINED))
def test_libraries_are_imported_only_where_the_map_says(library):
    offenders = []
    for name, path in modules().items():
        uses = {target.split(".")[0] for target in imported_names(path, name)}
        if library in uses and not name.startswith(CONFINED[library] or ("\0",)):
            offenders.append(name)
    assert not offenders, f"{library} imported in {offenders}; allowed only in {CONFINED[library]}"


def test_no_module_is_over_400_lines():
    long = {name: length for name, path in modules().items()
            if (length := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_tensorflow_and_keras_are_imported_inside_functions_only():
    """So that `featurize --help` and config errors stay fast (docs/architecture.md)."""
    offenders = []
    for name, path in modules().items():
        for node in ast.parse(path.read_text()).body:  # module level only
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [name for imported in names if imported.split(".")[0] in ("tensorflow", "keras")]
    assert not offenders, f"TensorFlow or Keras imported at module level in {offenders}"
