"""The shape of the code, as the next engineer relies on it: one package layered low to high, no import
cycles (imports inside functions included), tools that are entry points only, short functions."""

import ast
from pathlib import Path

from conftest import ROOT

# qlora's layers, low to high: a module imports only from its own layer or a lower one.
LAYERS = ["qlora.core", "quantization_utils", "qlora.data", "qlora.model", "qlora.train", "qlora.merge",
          "qlora.checks", "qlora.outputs", "qlora.planner", "qlora.config",
          ("qlora.evaluation", "qlora.demo", "qlora.bench")]  # code the tools share: on top
MAX_FUNCTION_LINES, MAX_MAIN_LINES, MAX_INNER_PROJECT_IMPORTS = 80, 70, 5


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [*ROOT.glob("qlora/**/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("Fine-tuning/*.py"), *ROOT.glob("*.py")]
    return {_module_name(path): path for path in files}


MODULES = _sources()


def _project_module(name: str) -> str | None:
    """The project module an imported name belongs to (`qlora.core.errors.UserError` -> `qlora.core.errors`)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return None


def _imports(module: str) -> list[tuple[str, bool, int]]:
    """(imported project module, inside a function?, line) for every import statement of `module`."""
    tree = ast.parse(MODULES[module].read_text())
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                names = [f"{child.module}.{alias.name}" for alias in child.names]
            for name in names:
                target = _project_module(name)
                if target and target != module:
                    found.append((target, in_function, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> int | None:
    for rank, layer in enumerate(LAYERS):
        for prefix in (layer if isinstance(layer, tuple) else (layer,)):
            if module == prefix or module.startswith(prefix + "."):
                return rank
    return None


def test_the_only_library_module_at_the_root_is_the_seeds_quantization_utils():
    assert sorted(path.name for path in ROOT.glob("*.py")) == ["quantization_utils.py"]


def test_the_import_graph_has_no_cycle():
    state: dict[str, str] = {}

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target, _, _ in GRAPH[module]:
            assert state.get(target) != "open", "import cycle: " + " -> ".join(path + [target])
            if target not in state:
                walk(target, path + [target])
        state[module] = "done"

    for module in GRAPH:
        if module not in state:
            walk(module, [module])


def test_every_package_module_imports_only_its_layer_or_lower():
    upward = [f"{module}:{line} imports {target}" for module, imports in GRAPH.items() if _layer(module) is not None
              for target, _, line in imports if _layer(target) is None or _layer(target) > _layer(module)]
    assert upward == []


def test_project_imports_sit_at_module_top():
    inner = [f"{module}:{line} {target}" for module, imports in GRAPH.items() if _layer(module) is not None
             for target, in_function, line in imports if in_function]
    assert len(inner) <= MAX_INNER_PROJECT_IMPORTS, inner


def test_tools_are_entry_points_only():
    tool_imports = [f"{module} imports {target}" for module, imports in GRAPH.items()
                    for target, _, _ in imports if target.startswith("tools")]
    assert tool_imports == []


def test_no_file_edits_sys_path():
    files = [*ROOT.glob("qlora/**/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("Fine-tuning/*.py"),
             *ROOT.glob("tests/*.py"), *ROOT.glob("gpu/*"), *ROOT.glob("*.py")]
    assert [str(f) for f in files if f.is_file() and "sys.path.insert" in f.read_text() and f != Path(__file__)] == []


def test_functions_are_short_and_main_reads_as_the_flow():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                limit = MAX_MAIN_LINES if module == "Fine-tuning.01_Train" and node.name == "main" else MAX_FUNCTION_LINES
                if lines > limit:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert long == []
