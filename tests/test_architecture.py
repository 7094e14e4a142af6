"""The package's shape, checked from its source: imports point one way, no module reaches into
another's private names, the loop stays a loop, and every objective offers the same interface."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "preftune"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")

# Building blocks that everything else is built on: they import nothing of preftune's.
LOW_LEVEL = {"errors", "files", "losses", "logps", "health"}  # optim imports only errors
# Layers, lowest first: a module may import modules of its own layer or below, never above.
LAYERS = [
    {"errors", "files", "losses", "logps", "health"},
    {"optim", "guard", "hub"},
    {"config", "config.names", "config.schema", "config.compat", "config.validation", "config.command_line",
     "config.load", "data", "adapters", "labels"},
    {"tokenization", "models", "checkpoints", "report", "sharding", "zero", "tracking"},
    {"cache", "batching", "demo"},
    {"evaluate", "generate", "rewards"},
    {"reference", "step", "runtime"},
    {"train"},
    {"commands.train", "commands.inspect", "commands.export", "commands.sample", "commands.label", "commands.cache", "commands",
     "__init__"},
    {"commands.eval"},
    {"commands.sft"},
    {"commands.demo"},
    {"cli"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts) if rel.name != "__init__" or len(rel.parts) == 1 else ".".join(rel.parts[:-1])


def preftune_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported preftune module, names taken from it) for every import in `path`, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "preftune":
            module = node.module.removeprefix("preftune").lstrip(".")
            if not module:  # from preftune import checkpoints
                found += [(alias.name, []) for alias in node.names]
            else:
                found.append((module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("preftune."), []) for a in node.names if a.name.startswith("preftune.")]
    return found


def layer(name: str) -> int:
    return next(i for i, members in enumerate(LAYERS) if name in members)


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_point_down_the_layers(path):
    name = module_name(path)
    for imported, _ in preftune_imports(path):
        assert layer(imported) <= layer(name), f"{name} (layer {layer(name)}) imports {imported} (layer {layer(imported)})"
        if name in LOW_LEVEL:
            pytest.fail(f"{name} is a building block and imports {imported}")


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_module_takes_another_modules_private_names(path):
    for imported, names in preftune_imports(path):
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{module_name(path)} imports {private} from {imported}"


def test_every_module_is_in_a_layer():
    assert {module_name(p) for p in MODULES} <= set().union(*LAYERS)


def test_the_training_loop_stays_a_loop():
    """train.py holds set-up and the loop: no scoring of pairs or mixing of losses of its own."""
    source = (PACKAGE / "train.py").read_text()
    assert len(source.splitlines()) < 250
    for name in ("get_batch_logps", "completion_kl", "LOSSES", "Objective", "chosen_nll", "is_kto", "kto"):
        assert name not in source, name


def test_objectives_share_one_interface():
    from preftune.step import OBJECTIVES

    for name, objective in OBJECTIVES.items():
        for member in ("tokenize", "collate", "length", "unit", "__call__", "state_dict", "load_state_dict"):
            assert member in vars(objective), (name, member)


def test_every_subpackage_is_packaged():
    """pip install . (not editable) ships only the packages pyproject.toml lists."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found == listed


def test_every_data_file_is_packaged():
    """Files the package reads at run time (label_page.html) ship only when package-data lists them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    data = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-data", {})
    listed = {f"{package.replace('.', '/')}/{name}" for package, names in data.items() for name in names}
    found = {p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*")
             if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert found == listed
