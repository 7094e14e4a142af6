"""Pushing a run to the Hugging Face Hub (`push_to_hub`), through huggingface_hub, as TrainingArguments does.

    repo = create_repo(cfg)                   # before training: a login or name problem stops the run at once
    push_checkpoint(cfg, folder)              # after each checkpoint, as hub_strategy says
    push_final(cfg)                           # at the end: the model, tokenizer and metric files of output_dir

Only the main process calls these. hub_strategy: `end` pushes once, at the end; `every_save` also the
model files of each checkpoint to the repo's root; `checkpoint` also the whole latest checkpoint into
`last-checkpoint/` (a resume can start from it); `all_checkpoints` every `checkpoint-N/` as it is. The
final push carries output_dir without its checkpoints, best_model/ and preftune's own lock and manifest.
The tests replace HfApi's create_repo and upload_folder to check what would be uploaded (no network).
"""

from __future__ import annotations

import logging
from pathlib import Path

from preftune.errors import ConfigError

log = logging.getLogger("preftune")

# never uploaded: what a resume or preftune itself keeps in output_dir
PRIVATE = [".preftune.lock", ".preftune_manifest.json", ".*.tmp/**", ".*.tmp", "*.deleting/**"]
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.yaml"]  # weights, config, tokenizer


_FULL_IDS: dict[str, str] = {}  # the id as configured -> 'namespace/name' as create_repo resolved it


def repo_id(cfg) -> str:
    """The repo as configured (hub_model_id, else output_dir's folder name)."""
    return cfg.hub_model_id or Path(cfg.output_dir).expanduser().resolve().name


def _full_id(cfg) -> str:
    """The repo as create_repo resolved it ('namespace/name'), where it ran."""
    return _FULL_IDS.get(repo_id(cfg), repo_id(cfg))


def _api(cfg):
    from huggingface_hub import HfApi

    return HfApi(token=cfg.hub_token)


def _refused(what: str, cfg, err: Exception) -> ConfigError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"push_to_hub: {what} '{repo_id(cfg)}' failed: {first}; log in with `hf auth login` (or set "
                       "hub_token), check hub_model_id, or set push_to_hub: false")


def create_repo(cfg) -> str | None:
    """Create (or find) the repo; its full id. None when push_to_hub is off."""
    if not cfg.push_to_hub:
        return None
    try:
        url = _api(cfg).create_repo(repo_id(cfg), private=cfg.hub_private_repo, exist_ok=True)
    except Exception as e:  # noqa: BLE001  (huggingface_hub raises HTTP, auth and validation errors alike)
        raise _refused("creating the repo", cfg, e) from None
    full = getattr(url, "repo_id", None) or repo_id(cfg)  # a bare name gets the account's namespace
    _FULL_IDS[repo_id(cfg)] = full
    log.info("push_to_hub: %s (hub_strategy: %s)", full, cfg.hub_strategy)
    return full


def _upload(cfg, folder: Path, path_in_repo: str, message: str, allow=None, ignore=()) -> None:
    try:
        _api(cfg).upload_folder(repo_id=_full_id(cfg), folder_path=str(folder), path_in_repo=path_in_repo,
                                commit_message=message, allow_patterns=allow, ignore_patterns=[*PRIVATE, *ignore])
    except Exception as e:  # noqa: BLE001
        raise _refused(f"uploading {folder} to", cfg, e) from None


def push_checkpoint(cfg, folder: Path) -> None:
    """After checkpoint `folder` is in place: what hub_strategy pushes of it."""
    if not cfg.push_to_hub or cfg.hub_strategy == "end":
        return
    step = folder.name.removeprefix("checkpoint-")
    if cfg.hub_strategy in ("every_save", "checkpoint"):
        _upload(cfg, folder, ".", f"step {step}: model", allow=MODEL_FILES)
    if cfg.hub_strategy == "checkpoint":
        _upload(cfg, folder, "last-checkpoint", f"step {step}: checkpoint")
    if cfg.hub_strategy == "all_checkpoints":
        _upload(cfg, folder, folder.name, f"step {step}: checkpoint")
    log.info("push_to_hub: step %s pushed to %s (%s)", step, repo_id(cfg), cfg.hub_strategy)


def push_final(cfg) -> None:
    """output_dir at the end of the run: the model, tokenizer, config and metric files."""
    if not cfg.push_to_hub:
        return
    ignore = [] if cfg.hub_strategy == "all_checkpoints" else ["checkpoint-*/**"]
    _upload(cfg, Path(cfg.output_dir), ".", "end of training", ignore=[*ignore, "best_model/**", "runs/**"])
    log.info("push_to_hub: %s pushed to https://huggingface.co/%s", cfg.output_dir, _full_id(cfg))
