"""Shared fixtures: tiny local models and tokenizers, no network."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from preftune.demo import build_model, build_tokenizer, make_pairs  # noqa: E402


def pytest_collection_modifyitems(items):
    """`make test` runs the suite on two pytest-xdist workers (`--dist loadgroup`): the slow tests that run
    2 to 4 processes all go to one worker, one at a time, so at most one multi-process run shares the cores
    with the other worker's single-process tests. A slow test marked `one_process` (one training process at
    a time: the demo flow, a compiled run, a killed-and-resumed CLI run) is spread like any other test, so
    the multi-process group stays the shorter share of the suite. Without xdist the marks do nothing."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("one_process"):
            item.add_marker(pytest.mark.xdist_group("processes"))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests that compare with a 2-process run set one thread per process; the next test gets the count back
    (a thread count changes float reduction order, and so borderline results of the tests after it)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_pairs():
    return make_pairs(64, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(demo_pairs):
    """Byte-level BPE, ChatML template, no BOS (Qwen2-like)."""
    return build_tokenizer([p[k] for p in demo_pairs for k in ("prompt", "chosen", "rejected")], vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved random-init Qwen2 model + tokenizer folder (what a user's local checkpoint looks like)."""
    folder = tmp_path_factory.mktemp("tiny_model")
    build_model(len(tiny_tokenizer), seed=0, hidden=32, layers=2).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
