"""push_to_hub without network: huggingface_hub's HfApi.create_repo and upload_folder are replaced by
recorders bound to their real signatures (tests/stand_ins.py), which also note what the uploaded
folder held (as its patterns select it) at that moment. Each hub_strategy uploads what
TrainingArguments' does; the repo is created before training, so a refused login stops the run with
one line before anything trains; only preftune's own files stay home."""

import fnmatch
import json
from pathlib import Path

import huggingface_hub
import pytest
from stand_ins import bind

from preftune import train as train_mod
from preftune.config import from_dict
from preftune.demo import make_pairs
from preftune.errors import ConfigError


class Hub:
    def __init__(self, monkeypatch, fail_create=False):
        self.repos, self.uploads = [], []
        hub = self

        def create_repo(*args, **kwargs):  # bound to huggingface_hub's signature: a wrong keyword fails
            call = bind("huggingface_hub", "HfApi.create_repo", *args, **kwargs)
            if fail_create:
                raise OSError("401 Client Error: Unauthorized for url")
            repo_id = call["repo_id"]
            hub.repos.append({"repo_id": repo_id, "private": call["private"], "exist_ok": call["exist_ok"],
                              "token": call["self"].token})
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

        def upload_folder(*args, **kwargs):
            call = bind("huggingface_hub", "HfApi.upload_folder", *args, **kwargs)
            root = Path(call["folder_path"])
            files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            if call["allow_patterns"]:
                files = [f for f in files if any(fnmatch.fnmatch(f, p) for p in call["allow_patterns"])]
            files = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in call["ignore_patterns"] or [])]
            hub.uploads.append({"repo_id": call["repo_id"], "folder": root.name, "path_in_repo": call["path_in_repo"],
                                "message": call["commit_message"], "files": files})

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)


@pytest.fixture
def raw(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(24, 0)))
    return {"model_name_or_path": str(tiny_model_dir), "dataset": str(data), "val_size": 8, "max_steps": 4,
            "save_steps": 2, "per_device_train_batch_size": 4, "cutoff_len": 64, "torch_dtype": "float32",
            "progress_bar": False, "plot_loss": False, "output_dir": str(tmp_path / "run-1"), "push_to_hub": True}


def test_end_pushes_the_model_and_metrics_once_without_checkpoints(raw, monkeypatch):
    hub = Hub(monkeypatch)
    train_mod.train(from_dict({**raw, "hub_strategy": "end", "hub_model_id": "me/tiny-dpo", "hub_private_repo": True,
                               "hub_token": "hf_test"}))
    assert hub.repos == [{"repo_id": "me/tiny-dpo", "private": True, "exist_ok": True, "token": "hf_test"}]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/tiny-dpo" and upload["folder"] == "run-1" and upload["path_in_repo"] == "."
    files = upload["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "preftune_config.yaml",
            "dpo_metrics/summary.json", "dpo_metrics/log_history.json"} <= set(files)
    assert not [f for f in files if f.startswith(("checkpoint-", "best_model")) or ".preftune" in f], files
    written = [p for p in Path(raw["output_dir"]).rglob("*") if p.is_file() and p.suffix in (".json", ".yaml")]
    assert written and not [p for p in written if "hf_test" in p.read_text()]  # the token is written nowhere


def test_every_save_and_checkpoint_push_as_each_checkpoint_is_written(raw, monkeypatch):
    hub = Hub(monkeypatch)
    train_mod.train(from_dict({**raw, "hub_strategy": "checkpoint"}))
    assert hub.repos[0]["repo_id"] == "run-1" and hub.repos[0]["private"] is None  # output_dir's name by default
    assert {u["repo_id"] for u in hub.uploads} == {"me/run-1"}  # into the repo create_repo resolved
    where = [(u["folder"], u["path_in_repo"]) for u in hub.uploads]
    assert where == [("checkpoint-2", "."), ("checkpoint-2", "last-checkpoint"), ("checkpoint-4", "."),
                     ("checkpoint-4", "last-checkpoint"), ("run-1", ".")]
    model_only, whole = hub.uploads[0]["files"], hub.uploads[1]["files"]
    assert "model.safetensors" in model_only and "optimizer.pt" not in model_only  # the model to the root
    assert {"optimizer.pt", "trainer_state.json", "model.safetensors"} <= set(whole)  # a resumable checkpoint

    hub.uploads.clear()
    train_mod.train(from_dict({**raw, "output_dir": raw["output_dir"] + "-all", "hub_strategy": "all_checkpoints"}))
    where = [(u["folder"], u["path_in_repo"]) for u in hub.uploads]
    assert where == [("checkpoint-2", "checkpoint-2"), ("checkpoint-4", "checkpoint-4"), ("run-1-all", ".")]
    assert any(f.startswith("checkpoint-4/") for f in hub.uploads[-1]["files"])


def test_a_refused_login_stops_the_run_before_it_trains(raw, monkeypatch):
    hub = Hub(monkeypatch, fail_create=True)
    with pytest.raises(ConfigError, match=r"^push_to_hub: creating the repo 'run-1' failed: 401 Client Error.*"
                                          r"log in with `hf auth login`"):
        train_mod.train(from_dict(raw))
    assert hub.uploads == [] and not (Path(raw["output_dir"]) / "checkpoint-2").exists()


def test_without_push_to_hub_nothing_is_pushed(raw, monkeypatch):
    hub = Hub(monkeypatch)
    train_mod.train(from_dict({**raw, "push_to_hub": False}))
    assert hub.repos == [] and hub.uploads == []
