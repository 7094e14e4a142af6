"""The signatures the tests' stand-ins bind to (tests/signatures.json, tests/stand_ins.py) are the
installed packages' own, so a stand-in cannot accept a call the real package refuses; and the binding
does refuse what the real package refuses."""

import json

import pytest
import stand_ins
from stand_ins import bind, check_bounds, record


def test_the_record_is_the_installed_packages_signatures():
    """A changed signature fails here (refresh with `python tests/stand_ins.py`, then read the diff: a
    stand-in, or preftune's call, may need to follow). vLLM needs CUDA and is not installed: its entries
    were read from its source (the record says which version)."""
    for package, now in stand_ins.installed().items():
        for name, params in now["callables"].items():
            assert record()[package]["callables"][name] == params, \
                f"{package} {now['version']} (recorded from {record()[package]['version']}): {name} changed"
        assert set(record()[package]["callables"]) == set(now["callables"])
    assert set(record()) == {*stand_ins.installed(), "vllm"}


def test_the_record_file_is_as_the_writer_writes_it():
    """Hand edits would go unnoticed by the refresh; the vLLM part is complete."""
    assert stand_ins.RECORD.read_text() == stand_ins._dump(json.loads(stand_ins.RECORD.read_text())) + "\n"
    vllm = record()["vllm"]
    assert {"LLM.__init__", "LLM.generate", "SamplingParams"} == set(vllm["callables"])
    assert {"max_model_len", "dtype", "seed"} <= set(vllm["engine_args"])
    assert set(vllm["dtypes"]) == {"auto", "half", "float16", "bfloat16", "float", "float32"}


def test_a_misspelt_missing_or_doubled_argument_fails_naming_the_package():
    api = object()
    with pytest.raises(TypeError, match=r"^huggingface_hub \S+ HfApi.upload_folder: got an unexpected keyword "
                                        r"argument 'commit_msg'"):
        bind("huggingface_hub", "HfApi.upload_folder", api, repo_id="me/x", folder_path="out", commit_msg="m")
    with pytest.raises(TypeError, match="too many positional arguments"):  # upload_folder's are keyword-only
        bind("huggingface_hub", "HfApi.upload_folder", api, "me/x", "out")
    with pytest.raises(TypeError, match="missing a required argument: 'repo_id'"):
        bind("huggingface_hub", "HfApi.create_repo", api, private=True)
    with pytest.raises(TypeError, match="multiple values for argument 'repo_id'"):
        bind("huggingface_hub", "HfApi.create_repo", api, "me/x", repo_id="me/y")
    call = bind("huggingface_hub", "HfApi.create_repo", api, "me/x", exist_ok=True)
    assert call["repo_id"] == "me/x" and call["exist_ok"] is True and call["private"] is None  # a default


def test_bounds_are_checked_open_or_closed():
    check_bounds("vllm", {"temperature": 2.0, "top_p": 1.0, "top_k": -1, "gpu_memory_utilization": 0.7, "seed": -5})
    for key, value in (("temperature", 2.01), ("top_p", 0.0), ("top_k", -2), ("n", 0), ("max_tokens", 0),
                       ("temperature", float("nan")), ("gpu_memory_utilization", 0)):
        with pytest.raises(ValueError, match=f"^vllm 0.33.0: {key} must be in"):
            check_bounds("vllm", {key: value})
