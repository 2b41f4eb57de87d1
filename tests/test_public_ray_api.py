"""vfx_ray uses Ray's public APIs only: no import or attribute chain reaches a private module.

Private means a dotted name under ``ray`` with a component that starts with an underscore
(``ray._private``, ``ray._raylet``, ``ray.train.v2._internal``, ...); dunders such as
``ray.__version__`` are public. Such modules change without notice between Ray releases.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vfx_ray"


def is_private(dotted: str) -> bool:
    """Whether a dotted name under ``ray`` goes through a private component."""
    parts = dotted.split(".")
    return parts[0] == "ray" and any(
        p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts[1:]
    )


def _bindings(tree: ast.AST) -> dict[str, str]:
    """Local name -> the ray module (or member) it is bound to by an import."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ray":  # `import ray.x` binds `ray`; `as y` binds the module
                    names[alias.asname or "ray"] = alias.name if alias.asname else "ray"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ray":
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr) -> tuple[str, list[str]] | None:
    """(root name, attributes) of an attribute chain such as ``ray._private.state.actors``."""
    attrs: list[str] = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return (node.id, attrs[::-1]) if isinstance(node, ast.Name) else None


def private_uses(source: str, filename: str = "<snippet>") -> list[str]:
    """``file:line name`` for each private Ray module imported, named in an attribute chain, or
    passed to importlib.import_module / __import__."""
    tree = ast.parse(source, filename)
    bound = _bindings(tree)
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # judge whole chains only
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if is_private(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if is_private(node.module) or is_private(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            chain = _dotted(node)
            if chain and chain[0] in bound and is_private(".".join([bound[chain[0]], *chain[1]])):
                found.append((node.lineno, ".".join([bound[chain[0]], *chain[1]])))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = _dotted(node.func)
            if func and (func[1][-1:] == ["import_module"] or func == ("__import__", [])):
                if isinstance(node.args[0].value, str) and is_private(node.args[0].value):
                    found.append((node.lineno, node.args[0].value))
    return sorted({f"{filename}:{line} {name}" for line, name in found})


OLD_TUNE = """
import ray
import ray.tune
from ray._raylet import PlacementGroupID
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.util.placement_group import PlacementGroup

def check(controller):
    return ray._private.state.actors(actor_id=controller).get("State"), ray.__version__
"""


def test_checker_flags_what_the_old_tune_module_did():
    hits = private_uses(OLD_TUNE)
    assert any("ray._raylet.PlacementGroupID" in h for h in hits)
    assert any("ray.train.v2._internal.execution.callback" in h for h in hits)
    assert any("ray._private.state.actors" in h for h in hits)
    assert len(hits) == 3, hits  # ray.util.placement_group and ray.__version__ are public


@pytest.mark.parametrize("snippet", [
    "import ray._private.worker",
    "import ray.train.v2._internal as internal",
    "from ray import _private",
    "from ray.data._internal.util import x",
    "import ray.train as rt\nrt.v2._internal.foo()",
    "from ray import train\ntrain.v2._internal.execution",
    "import importlib\nimportlib.import_module('ray._raylet')",
])
def test_checker_sees_every_form(snippet):
    assert private_uses(snippet), snippet


def test_checker_leaves_public_apis_alone():
    public = ("import ray\nimport ray.train\nfrom ray.util.state import get_actor\n"
              "ray.train.report({}); ray.util.placement_group_table(); ray.__version__\n"
              "ds = None\nds._private_attr\n")  # not a ray module: other objects' attributes are not judged
    assert private_uses(public) == []


def test_vfx_ray_uses_only_public_ray_apis():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    hits = [h for path in files for h in private_uses(path.read_text(), str(path.relative_to(PACKAGE.parent)))]
    assert not hits, "private Ray APIs used:\n" + "\n".join(hits)
