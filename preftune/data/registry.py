"""LLaMA-Factory's dataset registry, `<dataset_dir>/dataset_info.json`: which file or hub dataset a
name stands for, and the format its records are in (alpaca or sharegpt, `columns`, `tags`).

    info_path, info = read_info(Path("data"))
    records, fmt = entry_records("my_pairs", info["my_pairs"], info_path, Path("data"))  # for to_examples
    base, split = split_name("owner/data:test")                                          # ('owner/data', 'test')

An entry follows LLaMA-Factory's (src/llamafactory/data/parser.py DatasetAttr): `"ranking": true`
for preference data (an SFT entry is read by `preftune sft` only), `file_name` (a file or folder in
dataset_dir) or `hf_hub_url` with `split` and `subset`, `formatting`, `columns`, `tags`. Sources and
columns preftune does not read (ms_hub_url, videos, audios, ...) are refused by name, never ignored. An
`images` column (LLaMA-Factory's multimodal data) is read by ranking entries (data/images.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.data.readers import read_hf, read_records
from preftune.data.records import ALPACA_COLUMNS, SHAREGPT_COLUMNS, SHAREGPT_TAGS
from preftune.errors import DataError


def read_info(dataset_dir: Path) -> tuple[Path, dict[str, Any]]:
    """(the path of dataset_dir's dataset_info.json, its entries); no file: no entries."""
    info_path = dataset_dir / "dataset_info.json"
    if not info_path.is_file():
        return info_path, {}
    try:
        return info_path, json.loads(info_path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{info_path}:{e.lineno}: malformed JSON ({e.msg})") from None


def entry_format(entry: dict, where: str, sft: bool = False) -> dict:
    """The column and tag maps of a LLaMA-Factory dataset_info.json entry: a ranking entry, or for
    sft also an SFT entry (alpaca with its response column, sharegpt ending on the assistant)."""
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"{where}: formatting '{formatting}' is not supported; use alpaca or sharegpt")
    ranking = bool(entry.get("ranking", False))
    given = entry.get("columns", {}) or {}
    # LLaMA-Factory's KTO data: SFT-shaped records with a boolean column saying whether the answer is desirable
    kto_tag = None if ranking else given.get("kto_tag")
    if not ranking and not sft and not kto_tag:
        raise DataError(f"{where}: not a preference dataset; DPO needs \"ranking\": true with chosen/rejected "
                        "(or KTO a kto_tag column)")
    defaults = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    if not ranking:  # SFT: alpaca's answer is its `response` column (LLaMA-Factory's default: output)
        defaults = {**defaults, "response": "output", "history": "history"} if formatting == "alpaca" else defaults
    unknown = set(given) - set(defaults) - {"response", "images", "videos", "audios", "kto_tag"}
    if unknown:
        raise DataError(f"{where}: columns {sorted(unknown)} are not known for {formatting} ranking data "
                        f"(known: {', '.join(defaults)})")
    if ranking and given.get("kto_tag"):
        raise DataError(f"{where}: column 'kto_tag' marks single answers (KTO data) and a ranking entry has "
                        "chosen/rejected pairs; remove one of them")
    for key in ("videos", "audios"):
        if given.get(key):
            raise DataError(f"{where}: column '{key}': {key} are not supported (images are: docs/vision.md); remove "
                            "it from columns")
    images = given.get("images") or None
    if images is not None and not isinstance(images, str):
        raise DataError(f"{where}: column 'images' must name the field that holds the images, e.g. \"images\"")
    tags = {**SHAREGPT_TAGS, **{k: v for k, v in (entry.get("tags") or {}).items()}}
    unknown_tags = set(tags) - set(SHAREGPT_TAGS)
    if unknown_tags:
        raise DataError(f"{where}: tags {sorted(unknown_tags)} are not known (known: {', '.join(SHAREGPT_TAGS)})")
    columns = {**defaults, **{k: v for k, v in given.items() if k in defaults}}
    return {"formatting": formatting, "columns": columns, "tags": tags, "ranking": ranking, "kto_tag": kto_tag,
            "images": images}


def entry_records(name: str, entry: Any, info_path: Path, dataset_dir: Path,
                  sft: bool = False) -> tuple[list[tuple[str, Any]], dict]:
    """(the records, their format for `to_examples`) of the dataset_info.json entry `name`."""
    where = f"{info_path} entry '{name}'"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with file_name or hf_hub_url")
    for key in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
        if key in entry:
            raise DataError(f"{where}: '{key}' sources are not yet supported; use file_name or hf_hub_url")
    fmt = entry_format(entry, where, sft)
    if "hf_hub_url" in entry:
        return read_hf(entry["hf_hub_url"], entry.get("split", "train"), entry.get("subset")), fmt
    if "file_name" not in entry:
        raise DataError(f"{where}: missing 'file_name' (or 'hf_hub_url')")
    path = dataset_dir / entry["file_name"]
    if path.is_dir():
        return read_hf(str(path), entry.get("split", "train")), fmt
    if path.is_file():
        return read_records(path), fmt
    raise DataError(f"{where}: file '{path}' not found")


def split_name(name: str) -> tuple[str, str]:
    """'owner/data:test' -> ('owner/data', 'test'); no suffix -> split 'train'."""
    base, sep, split = name.rpartition(":")
    if sep and base and split.replace("_", "").replace("-", "").isalnum() and not Path(name).exists():
        return base, split
    return name, "train"
