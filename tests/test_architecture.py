"""The rules of docs/architecture.md, checked on the source: imports point one way (lazy ones
included: an import inside a function is still a dependency), Ray stays in its modules, and
the pipeline's and jobs' functions fit on a screen."""

from __future__ import annotations

import ast
import graphlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vfx_ray"
JOBS = {"vfx_ray.stages.crops", "vfx_ray.stages.score", "vfx_ray.stages.score_parts", "vfx_ray.stages.cv",
        "vfx_ray.stages.tune", "vfx_ray.stages.train", "vfx_ray.stages.demo",
        "vfx_ray.cli.app", "vfx_ray.cli.train", "vfx_ray.cli.common", "vfx_ray.cli.weights"}
PIPELINE = {f"vfx_ray.pipeline.{m}" for m in ("wire", "tasks", "datasets", "passes")}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Every module this module imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
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
    return {m: {d for d in imports(m) if d in MODULES and d != m and d not in ("vfx_ray", "vfx_ray.pipeline",
                                                                               "vfx_ray.synth", "vfx_ray.report")}
            for m in MODULES}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_no_import_cycles(graph):
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_the_cycle_check_can_fail(graph):
    with pytest.raises(graphlib.CycleError):
        cyclic = {**graph, "vfx_ray.storage": graph["vfx_ray.storage"] | {"vfx_ray.stages.crops"}}
        graphlib.TopologicalSorter(cyclic).prepare()


def test_the_pipeline_imports_no_job_and_only_datasets_imports_ray(graph):
    assert PIPELINE <= set(MODULES)
    for m in PIPELINE:
        assert not reachable(graph, m) & JOBS, m
        ray = {d for d in imports(m) if d.split(".")[0] == "ray"}
        assert bool(ray) == (m == "vfx_ray.pipeline.datasets"), (m, ray)


def test_score_does_not_import_the_crops_job_and_the_scoring_actor_stays_small(graph):
    assert "vfx_ray.stages.crops" not in reachable(graph, "vfx_ray.stages.score")
    heavy = {"vfx_ray.imaging.dicom", "vfx_ray.imaging.annotations", "vfx_ray.evaluation.metrics",
             "vfx_ray.pipeline.tasks", "vfx_ray.pipeline.passes"}
    assert not reachable(graph, "vfx_ray.stages.scorer") & heavy


def test_pure_modules_import_no_job_and_no_pipeline(graph):
    pure = ["vfx_ray.imaging.dicom", "vfx_ray.imaging.geometry", "vfx_ray.imaging.roi", "vfx_ray.imaging.annotations",
            "vfx_ray.evaluation.folds", "vfx_ray.evaluation.metrics", "vfx_ray.storage", "vfx_ray.layout",
            "vfx_ray.paper", "vfx_ray.config"]
    for m in pure:
        assert not reachable(graph, m) & (JOBS | PIPELINE), m


def test_pipeline_and_job_functions_fit_on_a_screen():
    long = []
    for m in sorted(PIPELINE | JOBS):
        for node in ast.walk(ast.parse(MODULES[m].read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                long.append(f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, long
