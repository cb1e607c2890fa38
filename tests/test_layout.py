"""The house's arrows: models know no files, sampling or VLMs; the sampler is handed models and hooks;
methods are built on the sampler, the proposers and the loaded pipeline, and the command lines on the
methods; nothing imports upward, and there are no import cycles. Read from the source with ast,
imports inside functions included."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower layers never import higher ones. Within a layer, only the same package's own modules.
LAYERS = {
    "files": 0, "leaves": 0, "png": 1, "model": 1, "png_reader": 2, "sampler": 2, "checkpoint": 3, "vlm": 4,
    "weights": 4, "methods": 5, "cli": 6, "evaluation": 7, "distillation": 8, "generate": 9, "evaluate": 9,
    "distill": 9,
}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's code (not tests or benchmarks)."""
    files = [p for top in LAYERS for p in [ROOT / f"{top}.py", *sorted((ROOT / top).glob("*.py"))] if p.is_file()]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def imports_of(path: Path, modules) -> set[str]:
    """The project modules that `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


@pytest.fixture(scope="module")
def graph():
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_every_top_level_part_has_a_layer():
    code = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert code - {"tests", "benchmarks", "docs"} <= set(LAYERS), "give new top-level code a layer"


def test_nothing_imports_upward(graph):
    top = lambda module: module.split(".")[0]
    upward = [f"{a} imports {b}" for a, deps in graph.items() for b in deps
              if LAYERS[top(b)] > LAYERS[top(a)] or (LAYERS[top(b)] == LAYERS[top(a)] and top(b) != top(a))]
    assert upward == []


def test_no_import_cycles(graph):
    state = {}  # module -> "visiting" or "done"

    def visit(module, path):
        if state.get(module) == "visiting":
            raise AssertionError(" -> ".join(path[path.index(module):] + [module]))
        if state.get(module) != "done":
            state[module] = "visiting"
            for dep in sorted(graph[module]):
                if dep != module and dep not in {module.rsplit(".", 1)[0]}:  # a package's own __init__
                    visit(dep, path + [module])
            state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_the_layer_check_can_fail():
    modules = {"model.unet": None, "sampler.loop": None}
    tree = ast.parse("from sampler.loop import generate\n")
    found = {n for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for n in [node.module] if n in modules}
    assert found == {"sampler.loop"} and LAYERS["sampler"] > LAYERS["model"]


def test_no_two_classes_share_a_name():
    """One meaning per name: a class name is defined once in the project's code, so a reader who finds
    `MidBlock` in a traceback or a grep knows which one it is."""
    where = {}
    for name, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, []).append(name)
    assert {cls: mods for cls, mods in where.items() if len(mods) > 1} == {}
