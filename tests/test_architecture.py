"""The rules of docs/architecture.md, checked on the source.

Every subpackage of ``vfx_ray`` states its rank in its ``__init__`` docstring ("rank N"); the
top-level modules are the foundations, rank 0. A module imports only modules of lower ranks or
of its own package (lazy imports included: an import inside a function is still a dependency),
so a new module is covered by the folder it lives in. Ray stays in ``runtime``, ``stages`` and
``pipeline.datasets``; the pipeline's, stages' and CLI's functions fit on a screen.
"""

from __future__ import annotations

import ast
import graphlib
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vfx_ray"
ROOT = "vfx_ray"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
SUBPACKAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))


def declared_rank(package: str) -> int | None:
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
    found = re.search(r"\brank (\d+)\b", doc)
    return int(found[1]) if found else None


RANKS = {ROOT: 0} | {p: declared_rank(p) for p in SUBPACKAGES}


def package_of(module: str) -> str:
    """The top-level folder a module lives in (``vfx_ray`` for the foundations)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in SUBPACKAGES) else ROOT


def imports(name: str, top_level_only: bool = False) -> set[str]:
    """Every module this module imports, at any depth of its code (or at its top level only)."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # ``from pkg import module``
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a package's __init__ is not a dependency
    edge: importing ``vfx_ray.pipeline.wire`` runs ``vfx_ray/pipeline/__init__.py`` anyway)."""
    inits = {ROOT} | {f"{ROOT}.{p}" for p in SUBPACKAGES}
    return {m: {d for d in imports(m) if d in MODULES and d != m and d not in inits} for m in MODULES}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def rank_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in graph.items():
        for d in deps:
            pm, pd = package_of(m), package_of(d)
            if pm != pd and RANKS[pd] >= RANKS[pm]:
                bad.append(f"{m} (rank {RANKS[pm]}) imports {d} (rank {RANKS[pd]})")
    return sorted(bad)


def test_every_subpackage_states_its_rank_and_its_rule():
    assert SUBPACKAGES, "no subpackages found"
    missing = [p for p in SUBPACKAGES if RANKS[p] is None]
    assert not missing, f"__init__ docstrings without 'rank N': {missing}"
    assert all(RANKS[p] > 0 for p in SUBPACKAGES), "rank 0 is the top level's foundations"
    for p in SUBPACKAGES:
        doc = ast.get_docstring(ast.parse((PACKAGE / p / "__init__.py").read_text()))
        assert "may import" in doc.lower(), f"{p}/__init__.py does not say what it may import"


def test_subpackage_inits_import_nothing_at_their_top_level():
    """No re-exports: importing a package (for --help, the scoring actor, a Tune callback) must not
    import torch, Ray or a sibling; ``cli.main`` is imported inside the entry point."""
    allowed = {"__future__", "__future__.annotations", "collections.abc", "collections.abc.Sequence"}
    for p in SUBPACKAGES:
        assert imports(f"{ROOT}.{p}", top_level_only=True) <= allowed, p


def test_imports_point_to_lower_ranks_only(graph):
    assert not rank_violations(graph)


def test_the_rank_check_can_fail(graph):
    assert rank_violations({**graph, "vfx_ray.storage": {"vfx_ray.imaging.dicom"}})
    assert rank_violations({**graph, "vfx_ray.imaging.dicom": {"vfx_ray.ml.model"}})  # same rank, two packages


def test_no_import_cycles_between_modules_or_packages(graph):
    packages = {p: set() for p in RANKS}
    for m, deps in graph.items():
        packages[package_of(m)] |= {package_of(d) for d in deps} - {package_of(m)}
    for g in (graph, packages):
        try:
            graphlib.TopologicalSorter(g).prepare()
        except graphlib.CycleError as exc:
            pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_the_cycle_check_can_fail(graph):
    with pytest.raises(graphlib.CycleError):
        cyclic = {**graph, "vfx_ray.storage": graph["vfx_ray.storage"] | {"vfx_ray.stages.crops"}}
        graphlib.TopologicalSorter(cyclic).prepare()


def external(name: str) -> set[str]:
    return {d.split(".")[0] for d in imports(name)}


def test_ray_only_in_runtime_stages_and_the_pipelines_datasets():
    for m in MODULES:
        if "ray" in external(m):
            assert package_of(m) in ("runtime", "stages") or m == "vfx_ray.pipeline.datasets", m


def test_imaging_and_evaluation_are_free_of_ray_and_torch_and_ml_of_ray_and_dicom():
    banned = {"imaging": {"ray", "torch", "torchvision"}, "evaluation": {"ray", "torch", "torchvision"},
              "ml": {"ray", "pydicom", "SimpleITK", "highdicom", "nibabel", "boto3"}}
    for m in MODULES:
        assert not external(m) & banned.get(package_of(m), set()), m


def test_the_pipeline_imports_no_stage_and_score_not_the_crops_stage(graph):
    for m in (m for m in MODULES if package_of(m) == "pipeline"):
        assert not {package_of(d) for d in reachable(graph, m)} & {"stages", "cli"}, m
    assert "vfx_ray.stages.crops" not in reachable(graph, "vfx_ray.stages.score")


def test_the_scoring_actor_stays_small(graph):
    heavy = {"vfx_ray.imaging.dicom", "vfx_ray.imaging.annotations", "vfx_ray.evaluation.metrics",
             "vfx_ray.pipeline.tasks", "vfx_ray.pipeline.passes"}
    assert not reachable(graph, "vfx_ray.stages.slice_scorer") & heavy


def private_uses(name: str) -> list[str]:
    """Names with a leading underscore that this module takes from another vfx_ray module."""
    tree, found, aliases = ast.parse(MODULES[name].read_text()), [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(ROOT):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_modules_use_only_each_others_public_names():
    used = {m: private_uses(m) for m in MODULES}
    assert not {m: u for m, u in used.items() if u}


def suffix_clashes(names: list[str]) -> list[tuple[str, str]]:
    """Pairs of modules whose names differ only by a suffix that does not say the difference:
    anywhere, a short one (``score``/``scorer``, ``tune``/``tuned``) or a vague word (``sr``/``sr_out``);
    in one folder, any ``_word`` (``score``/``score_parts``: name the part for what it is)."""
    vague = r"r|d|s|ed|er|_out|_parts|_common|_utils|_helpers|_misc"
    clashes = []
    for a in names:
        for b in names:
            (pa, _, sa), (pb, _, sb) = a.rpartition("."), b.rpartition(".")
            if sb != sa and sb.startswith(sa) and (re.fullmatch(vague, sb[len(sa):])
                                                   or (pa == pb and sb[len(sa)] == "_")):
                clashes.append((a, b))
    return clashes


def test_no_two_modules_differ_only_by_a_suffix():
    assert not suffix_clashes(sorted(MODULES))
    assert suffix_clashes(["vfx_ray.stages.tune", "vfx_ray.evaluation.tuned"])
    assert suffix_clashes(["vfx_ray.stages.score", "vfx_ray.stages.score_parts"])
    assert not suffix_clashes(["vfx_ray.stages.tune", "vfx_ray.evaluation.tuned_params"])


def test_pipeline_stage_and_cli_functions_fit_on_a_screen():
    long = []
    for m in sorted(m for m in MODULES if package_of(m) in ("pipeline", "stages", "cli")):
        for node in ast.walk(ast.parse(MODULES[m].read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                long.append(f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
