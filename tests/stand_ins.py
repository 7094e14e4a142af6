"""The real signatures behind the tests' stand-ins, so a stand-in refuses what the real package refuses.

    from stand_ins import bind
    call = bind("huggingface_hub", "HfApi.upload_folder", api, repo_id="me/x", folder_path="out")
    call["folder_path"], call["path_in_repo"]       # None: the default

Some tests replace what cannot run here (vLLM needs a CUDA GPU, the Hub needs the network, Liger's
layer kernels need Triton on a GPU) by stand-ins. A stand-in that takes `**kwargs` would accept a
misspelt or unknown argument the real package refuses (or, as Liger's `_apply_liger_kernel_to_instance`
does, silently drops). `bind` binds a call to the parameters recorded in tests/signatures.json
(`inspect.Signature.bind`): an unknown, misspelt, missing or doubled argument is a TypeError that names
the package and version. The record also holds the values vLLM validates that preftune passes (its
dtype names, the keywords `LLM(**kwargs)` hands on to EngineArgs, the ranges SamplingParams checks).

test_stand_ins.py checks the record against the installed packages (huggingface_hub, liger_kernel,
torch), so it cannot drift from them. vLLM is not installed here: its part was read from the source of
the vllm wheel the record names. To refresh the record (after an upgrade changed a signature):

    python tests/stand_ins.py                   # the installed packages' entries; vLLM's are kept
    pip download vllm==X --no-deps -d /tmp/vllm && unzip -q /tmp/vllm/vllm-*.whl 'vllm/*' -d /tmp/vllm/src
    python tests/stand_ins.py /tmp/vllm/src X   # vLLM's too (its hand-written "bounds" are kept)

and read vLLM's SamplingParams._verify_args for the "bounds" entries, which are written by hand.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import math
import sys
from pathlib import Path

RECORD = Path(__file__).with_name("signatures.json")


@functools.cache
def record() -> dict:
    return json.loads(RECORD.read_text())


@functools.cache
def signature(package: str, name: str) -> inspect.Signature:
    """The recorded signature of `name` (as "HfApi.create_repo": methods keep `self`)."""
    params = []
    for entry in record()[package]["callables"][name]:
        p_name, kind = entry[0], getattr(inspect.Parameter, entry[1])
        default = entry[2] if len(entry) > 2 else inspect.Parameter.empty  # the default's repr
        params.append(inspect.Parameter(p_name, kind, default=default))
    return inspect.Signature(params)


def bind(package: str, name: str, *args, **kwargs) -> dict:
    """The call's arguments by parameter name, as the recorded signature binds them, with the defaults
    that are literals (None, False, 1.0, 'auto') filled in; a `**kwargs` parameter holds its dict. A
    TypeError naming the package, version and callable where the call does not bind."""
    sig = signature(package, name)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{package} {record()[package]['version']} {name}: {e}") from None
    defaults = {}
    for p in sig.parameters.values():
        if p.default is not inspect.Parameter.empty:
            try:
                defaults[p.name] = ast.literal_eval(p.default)
            except (ValueError, SyntaxError):  # not a literal (an enum member, a factory): left out
                pass
    return {**defaults, **bound.arguments}


def check_bounds(package: str, values: dict) -> None:
    """Each value of `values` that the record bounds ("[0, 2]", "(0, 1]", "[1, inf)") within them."""
    bounds = record()[package]["bounds"]
    for key, value in values.items():
        if key not in bounds or value is None:
            continue
        low, high = (float(x) for x in bounds[key][1:-1].split(","))
        above = value > low if bounds[key][0] == "(" else value >= low
        below = value < high if bounds[key][-1] == ")" else value <= high
        if not (isinstance(value, (int, float)) and not math.isnan(value) and above and below):
            raise ValueError(f"{package} {record()[package]['version']}: {key} must be in {bounds[key]}, got {value!r}")


# --- writing the record -----------------------------------------------------------------------------

def entries(sig: inspect.Signature) -> list[list[str]]:
    """A signature as the record writes it: [name, kind(, repr of the default)] per parameter."""
    return [[p.name, p.kind.name] + ([] if p.default is inspect.Parameter.empty else [repr(p.default)])
            for p in sig.parameters.values()]


def installed() -> dict:
    """The record's entries for the installed packages (what test_stand_ins.py compares with)."""
    import huggingface_hub
    import liger_kernel.transformers
    import torch
    from importlib.metadata import version

    return {
        "huggingface_hub": {"version": huggingface_hub.__version__, "callables": {
            "HfApi.create_repo": entries(inspect.signature(huggingface_hub.HfApi.create_repo)),
            "HfApi.upload_folder": entries(inspect.signature(huggingface_hub.HfApi.upload_folder)),
            "snapshot_download": entries(inspect.signature(huggingface_hub.snapshot_download))}},
        "liger_kernel": {"version": version("liger_kernel"), "callables": {
            "_apply_liger_kernel_to_instance": entries(inspect.signature(
                liger_kernel.transformers._apply_liger_kernel_to_instance)),  # noqa: SLF001
            # what it hands the keywords on to for the tests' tiny Qwen2 model (it drops those this lacks)
            "apply_liger_kernel_to_qwen2": entries(inspect.signature(
                liger_kernel.transformers.apply_liger_kernel_to_qwen2))}},
        "torch": {"version": torch.__version__.split("+")[0], "callables": {
            "compile": entries(inspect.signature(torch.compile))}},  # what nn.Module.compile(**kwargs) calls
    }


def _ast_params(fn: ast.FunctionDef) -> list[list[str]]:
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + a.defaults
    out = [[x.arg, "POSITIONAL_ONLY" if x in a.posonlyargs else "POSITIONAL_OR_KEYWORD"]
           + ([ast.unparse(d)] if d is not None else []) for x, d in zip(positional, defaults)]
    if a.vararg:
        out.append([a.vararg.arg, "VAR_POSITIONAL"])
    out += [[x.arg, "KEYWORD_ONLY"] + ([ast.unparse(d)] if d is not None else [])
            for x, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append([a.kwarg.arg, "VAR_KEYWORD"])
    return out


def _ast_class(path: Path, name: str) -> ast.ClassDef:
    return next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == name)


def _fields(cls: ast.ClassDef) -> list[ast.AnnAssign]:
    return [s for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
            and not ast.unparse(s.annotation).startswith(("ClassVar", "InitVar"))]


def from_vllm_source(src: Path, version: str) -> dict:
    """vLLM's entries, read (not imported: it needs CUDA) from an unpacked wheel or checkout at `src`."""
    llm = _ast_class(src / "vllm/entrypoints/llm.py", "LLM")
    methods = {f.name: f for f in llm.body if isinstance(f, ast.FunctionDef)}
    sampling = _ast_class(src / "vllm/sampling_params.py", "SamplingParams")  # a msgspec Struct: its fields
    model_dtype = next(n for n in ast.parse((src / "vllm/config/model.py").read_text()).body
                       if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "ModelDType")
    return {"version": version, "from": f"the source of the vllm {version} wheel (vLLM needs CUDA: not installed)",
            "callables": {
                "LLM.__init__": _ast_params(methods["__init__"]),
                "LLM.generate": _ast_params(methods["generate"]),
                "SamplingParams": [[s.target.id, "POSITIONAL_OR_KEYWORD"] + ([ast.unparse(s.value)] if s.value else [])
                                   for s in _fields(sampling)]},
            # LLM(**kwargs) passes them to EngineArgs(...), a dataclass: any other keyword is a TypeError
            "engine_args": [s.target.id for s in _fields(_ast_class(src / "vllm/engine/arg_utils.py", "EngineArgs"))],
            # LLM(dtype=...): ModelDType's names, lower-cased by vLLM before the look-up (or a torch.dtype)
            "dtypes": [ast.literal_eval(e) for e in model_dtype.value.slice.elts]}


def _dump(obj, depth: int = 0) -> str:
    """JSON with one parameter ([name, kind, default]) per line, so that a diff shows what changed."""
    pad = " " * depth
    if isinstance(obj, dict) and obj:
        items = ",\n".join(f"{pad} {json.dumps(k)}: {_dump(v, depth + 1)}" for k, v in obj.items())
        return "{\n" + items + f"\n{pad}}}"
    if isinstance(obj, list) and obj and all(isinstance(x, list) for x in obj):
        return "[\n" + ",\n".join(f"{pad} {json.dumps(x)}" for x in obj) + f"\n{pad}]"
    return json.dumps(obj)


if __name__ == "__main__":  # python tests/stand_ins.py [VLLM_SOURCE VLLM_VERSION]
    old = record() if RECORD.exists() else {}
    new = {**installed(), "vllm": from_vllm_source(Path(sys.argv[1]), sys.argv[2]) if sys.argv[1:] else old["vllm"]}
    for key in ("bounds", "bounds_from"):  # written by hand: see the docstring
        new["vllm"][key] = old.get("vllm", {}).get(key)
    RECORD.write_text(_dump(new) + "\n")
    print(f"wrote {RECORD}")
