"""The package's shape, checked from its source: imports point one way, no module reaches into
another's private names, the loop names no engine and calls only what every engine offers, the building
blocks know no engine, no flags ride on models, and every objective offers the same interface."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "preftune"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")

# Building blocks that everything else is built on: they import nothing of preftune's.
LOW_LEVEL = {"errors", "files", "losses", "logps", "health", "reward_model"}  # optim imports only errors
# Layers, lowest first: a module may import modules of its own layer or below, never above.
LAYERS = [
    {"errors", "files", "losses", "logps", "health", "offload", "reward_model"},
    {"optim", "guard", "hub"},
    {"config", "config.names", "config.schema", "config.compat", "config.validation", "config.command_line",
     "config.load", "data.readers", "data.images", "data.records", "data.registry", "data.load", "data", "adapters",
     "labels"},
    {"tokenization", "models", "saved", "checkpoints.folders", "report", "tracking"},
    {"checkpoints.weights", "checkpoints.save", "checkpoints.resume", "checkpoints", "best", "final", "cache",
     "batching", "vision", "demo", "demo_vision"},
    {"engines.single", "engines.ddp", "engines.fsdp", "engines.zero", "engines", "evaluate", "generate", "rewards"},
    {"reference", "step", "runtime"},
    {"train"},
    {"commands.train", "commands.inspect", "commands.export", "commands.sample", "commands.label", "commands.cache", "commands",
     "__init__"},
    {"commands.eval"},
    {"commands.sft", "commands.rm", "commands.iterate"},
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


# The ways of running (engines/) and what only they may know: their names, their packages, ranks and partitions.
ENGINE_WORDS = re.compile(r"\b(ddp|fsdp\w*|zero|zero_\w+|zero3|deepspeed|dataparallel|oneprocess|fully_shard|ds_id|get_rank"
                          r"|is_sharded|torch\.distributed)\b", re.IGNORECASE)
# Building blocks a new way of running must not touch: they are handed what they need of an engine.
ENGINE_FREE = ("losses", "logps", "step", "evaluate", "models", "batching", "tokenization", "reward_model")


def code_of(path: Path) -> str:
    """The module's code without its docstrings and comments (which may explain an engine)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body[0].value.value = ""
    return ast.unparse(tree)


def test_the_loop_never_names_an_engine():
    """train.py runs the same loop under every engine: it asks the engine, never which one it is."""
    source = (PACKAGE / "train.py").read_text()
    assert not ENGINE_WORDS.findall(source)
    imported = {name for module, names in preftune_imports(PACKAGE / "train.py") if module.startswith("engines")
                for name in names}
    assert imported <= {"make_engine", "check_hardware"}, imported
    assert "isinstance(engine" not in source and "type(engine" not in source


def test_the_loop_calls_only_the_engine_surface():
    """Every `engine.<member>` the loop, the reference, the evaluator and the checkpoints use is one that
    every engine has: defined on the base all of them extend."""
    from preftune.engines import DataParallel, FSDP2, OneProcess, ZeRO

    for engine in (DataParallel, FSDP2, ZeRO):
        assert issubclass(engine, OneProcess)
    surface = set(dir(OneProcess(cfg=None, accelerator=None)))  # (its attributes set in __init__ included)
    for name in ("train", "reference", "evaluate", "step", "best", "checkpoints/save", "checkpoints/resume"):
        used = set(re.findall(r"\bengine\.(\w+)", (PACKAGE / f"{name}.py").read_text()))
        assert used and used <= surface, (name, used - surface)


@pytest.mark.parametrize("name", ENGINE_FREE)
def test_building_blocks_know_no_engine(name):
    """The losses, the log-prob pass, the step, the evaluator, the model loader: no engine import, no engine
    name, no process ranks or weight partitions in their code."""
    path = PACKAGE / f"{name}.py"
    assert not [m for m, _ in preftune_imports(path) if m.startswith("engines")]
    assert not ENGINE_WORDS.findall(code_of(path)), ENGINE_WORDS.findall(code_of(path))


def test_no_flags_ride_on_model_objects():
    """What an engine needs to remember about a model it keeps itself: no module sets or reads preftune's own
    attributes on a model (`model.preftune_x`, `setattr(model, NAME, ...)`, `hasattr`); the one mark is on parameters,
    models.LOADED_DTYPE (the dtype a trainable weight was loaded in)."""
    for path in MODULES:
        code = code_of(path)
        attributes = re.findall(r"(?<=[\w)\]])\.preftune_\w+", code)
        named = set(re.findall(r"\b(?:setattr|hasattr)\(\s*[\w.]+\s*,\s*('preftune_\w+'|[A-Z_]+)", code))
        assert not attributes and named <= {"LOADED_DTYPE"}, (module_name(path), attributes, named)


def test_the_training_loop_stays_a_loop():
    """train.py holds set-up and the loop: it scores no pairs and mixes no losses of its own."""
    source = (PACKAGE / "train.py").read_text()
    for name in ("get_batch_logps", "completion_kl", "LOSSES", "CombinedLoss", "chosen_nll", "is_kto", "kto"):
        assert name not in source, name


def test_objectives_share_one_interface():
    from preftune.step import STEPS

    for name, objective in STEPS.items():
        for member in ("tokenize", "collate", "length", "unit", "module", "__call__", "state_dict", "load_state_dict"):
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


def test_importing_the_loop_imports_no_engine_tracker_or_kernel_package():
    """A plain run pays for what it uses: importing the training loop (and with it every module a one-process
    run calls) imports no sharding engine, no experiment tracker, no kernel package and no peft, which
    only a LoRA run needs (checked in a fresh interpreter: the test session has imported them all)."""
    unwanted = ["deepspeed", "liger_kernel", "bitsandbytes", "torchao", "peft", "tensorboard", "wandb", "mlflow",
                "trackio", "torch.distributed.fsdp._fully_shard"]
    code = (f"import sys; import preftune.train, preftune.cli; "
            f"print([m for m in {unwanted!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]
