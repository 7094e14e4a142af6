"""Reading preference pairs: files, LLaMA-Factory `dataset_info.json`, validation, the split.

A dataset entry (in `dataset` / `eval_dataset`, comma-separated) is either a name registered
in `<dataset_dir>/dataset_info.json` or a path to a JSON / JSONL file. Records are either
standard (`prompt`, `chosen`, `rejected`, optional `system`) or LLaMA-Factory alpaca ranking
(`instruction`, `input`, `chosen`, `rejected`, optional `system`, with a `columns` map).
Every problem names the file, the line (JSONL) or record index (JSON array), and the field.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import DataError


@dataclass
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    system: str | None = None
    where: str = ""  # "file:line" for messages


@dataclass
class DataReport:
    """Counts for summary.json and the log: nothing is dropped without being counted here."""
    read: int = 0
    skipped_empty: int = 0
    skipped_identical: int = 0
    train: int = 0
    eval: int = 0
    sources: dict[str, int] = field(default_factory=dict)


STANDARD_COLUMNS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system"}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
                  "system": "system"}


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """[(where, record)] from a JSON array or JSON Lines file."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # utf-8-sig: a BOM is not part of the data
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
    lines_mode = path.suffix == ".jsonl"
    if not lines_mode:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # several JSON values: it is JSON Lines with a .json name
                lines_mode = True
            else:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        else:
            if isinstance(doc, dict):
                doc = [doc]
            if not isinstance(doc, list):
                raise DataError(f"{path}: expected a JSON array of records, got {type(doc).__name__}")
            out = []
            for i, rec in enumerate(doc):
                if not isinstance(rec, dict):
                    raise DataError(f"{path}: record {i} is {type(rec).__name__}, expected an object with "
                                    "prompt/chosen/rejected")
                out.append((f"{path} record {i}", rec))
            return out
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg}, column {e.colno}); "
                            "each line must be one JSON object") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        out.append((f"{path}:{lineno}", rec))
    return out


def _field(rec: dict, name: str, where: str, required: bool) -> str | None:
    if name not in rec or rec[name] is None:
        if required:
            raise DataError(f"{where}: missing field '{name}' (expected a string); "
                            f"fields present: {', '.join(sorted(rec)) or 'none'}")
        return None
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' is {type(value).__name__}, expected a string")
    return value


def _to_pairs(records: list[tuple[str, dict]], columns: dict[str, str] | None) -> list[PreferencePair]:
    if columns is None:  # a plain file: standard, or alpaca if it has 'instruction' and no 'prompt'
        first = records[0][1] if records else {}
        columns = ALPACA_COLUMNS if ("instruction" in first and "prompt" not in first) else STANDARD_COLUMNS
    pairs = []
    for where, rec in records:
        prompt = _field(rec, columns["prompt"], where, required=True)
        query = _field(rec, columns["query"], where, required=False) if "query" in columns else None
        if query:  # LLaMA-Factory joins instruction and input with a newline
            prompt = f"{prompt}\n{query}"
        pairs.append(PreferencePair(
            prompt=prompt,
            chosen=_field(rec, columns["chosen"], where, required=True),
            rejected=_field(rec, columns["rejected"], where, required=True),
            system=_field(rec, columns["system"], where, required=False) if "system" in columns else None,
            where=where,
        ))
    return pairs


def _resolve(name: str, dataset_dir: Path) -> tuple[Path, dict[str, str] | None]:
    """A dataset entry -> (file, column map or None for auto)."""
    info_path = dataset_dir / "dataset_info.json"
    info: dict[str, Any] = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DataError(f"{info_path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if name in info:
        entry = info[name]
        where = f"{info_path} entry '{name}'"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object with file_name")
        for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
            if key in entry:
                raise DataError(f"{where}: '{key}' sources are not yet supported; download the data and use file_name")
        if entry.get("formatting", "alpaca") != "alpaca":
            raise DataError(f"{where}: formatting '{entry['formatting']}' is not yet supported; use alpaca")
        if not entry.get("ranking", False):
            raise DataError(f"{where}: not a preference dataset; DPO needs \"ranking\": true with chosen/rejected")
        if "file_name" not in entry:
            raise DataError(f"{where}: missing 'file_name'")
        columns = dict(ALPACA_COLUMNS)
        unknown = set(entry.get("columns", {})) - set(ALPACA_COLUMNS) - {"history", "response"}
        if unknown:
            raise DataError(f"{where}: columns {sorted(unknown)} are not yet supported for alpaca ranking data")
        if entry.get("columns", {}).get("history"):
            raise DataError(f"{where}: multi-turn 'history' is not yet supported")
        columns.update({k: v for k, v in entry.get("columns", {}).items() if k in ALPACA_COLUMNS})
        path = dataset_dir / entry["file_name"]
        if not path.is_file():
            raise DataError(f"{where}: file '{path}' not found")
        return path, columns
    for candidate in (Path(name), dataset_dir / name):
        if candidate.is_file():
            return candidate, None
    known = f" (registered there: {', '.join(sorted(info))})" if info else f" (no {info_path} found)"
    raise DataError(f"dataset '{name}': not a name in {info_path}{known} and not a file path")


def read_dataset(spec: str, dataset_dir: str, max_samples: int | None = None) -> list[PreferencePair]:
    """All pairs of a comma list of dataset entries, in order."""
    pairs: list[PreferencePair] = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        path, columns = _resolve(name, Path(dataset_dir))
        records = _read_records(path)
        if not records:
            raise DataError(f"{path}: no records")
        if max_samples is not None:
            records = records[:max_samples]
        pairs.extend(_to_pairs(records, columns))
    return pairs


def check_pairs(pairs: list[PreferencePair], drop_invalid: bool, report: DataReport) -> list[PreferencePair]:
    """Empty completions and chosen == rejected teach DPO nothing: fail, or skip them with a count."""
    empty = [p for p in pairs if not p.chosen.strip() or not p.rejected.strip()]
    identical = [p for p in pairs if p.chosen == p.rejected and p.chosen.strip()]
    if (empty or identical) and not drop_invalid:
        parts = []
        if empty:
            parts.append(f"{len(empty)} with an empty chosen/rejected (first: {', '.join(p.where for p in empty[:3])})")
        if identical:
            parts.append(f"{len(identical)} with chosen == rejected "
                         f"(first: {', '.join(p.where for p in identical[:3])})")
        raise DataError(f"{'; '.join(parts)}. Fix the data, or set drop_invalid_pairs: true to skip and count them")
    report.skipped_empty += len(empty)
    report.skipped_identical += len(identical)
    bad = {id(p) for p in empty + identical}
    return [p for p in pairs if id(p) not in bad]


def load_pairs(cfg) -> tuple[list[PreferencePair], list[PreferencePair], DataReport]:
    """Train and validation pairs for a config, plus the counts."""
    report = DataReport()
    if not cfg.dataset:
        raise DataError("no training data: set dataset (a name in dataset_info.json or a JSON/JSONL path)")
    train = read_dataset(cfg.dataset, cfg.dataset_dir, cfg.max_samples)
    report.read = len(train)
    for p in train:
        src = p.where.rsplit(":", 1)[0].split(" record ")[0]
        report.sources[src] = report.sources.get(src, 0) + 1
    train = check_pairs(train, cfg.drop_invalid_pairs, report)
    if cfg.eval_dataset:
        val = read_dataset(cfg.eval_dataset, cfg.dataset_dir, cfg.max_samples)
        report.read += len(val)
        val = check_pairs(val, cfg.drop_invalid_pairs, report)
    elif cfg.val_size > 0:
        n_val = int(cfg.val_size) if cfg.val_size >= 1 else max(1, round(len(train) * cfg.val_size))
        if n_val >= len(train):
            raise DataError(f"val_size {cfg.val_size} leaves no training pairs out of {len(train)}")
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
    else:
        val = []
    if not train:
        raise DataError("no training pairs left after checks")
    report.train, report.eval = len(train), len(val)
    return train, val, report
