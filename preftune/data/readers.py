"""Reading data files into records: `[(where, record)]`, where `where` names the record for messages
("file:line" for JSON Lines, "file row i" for CSV, "file record i" otherwise).

    records = read_records(Path("pairs.jsonl.gz"))      # JSON, JSON Lines, CSV, Parquet; gzip/bz2/xz
    records = read_hf("owner/data", "train")            # a save_to_disk folder, a datasets folder, a hub id
    records = json_lines(path, read_text(path))         # JSON Lines alone (labels.py reads candidates so)
    for line in data_lines(text): ...                   # the lines of JSON Lines text, split as JSON allows

What a record holds is not checked here (records.py does that); what is checked is everything that
would otherwise surface later as a confusing error: compression preftune cannot read, text that is
not UTF-8, a malformed or cut-off line, a JSON array in a .jsonl file, a CSV row whose field count
differs from the header's, a lone UTF-16 surrogate. Each is one line naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from preftune.errors import DataError

# Compressed files, known by their first bytes (whatever the name says): read through the standard
# library where it can, else named with the fix.
COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
              b"PK\x03\x04": "zip"}


def _compression(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(6)
    return next((kind for magic, kind in COMPRESSED.items() if head.startswith(magic)), None)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip, bz2 or xz (`data.jsonl.gz`)."""
    kind = _compression(path)
    if kind is None:
        return path.read_bytes()
    if kind in ("zstd", "zip"):
        fix = f"zstd -d '{path}'" if kind == "zstd" else f"unzip '{path}'"
        raise DataError(f"{path}: a {kind}-compressed file, which preftune does not read; decompress it first "
                        f"({fix}), or compress it with gzip")
    import bz2
    import gzip
    import lzma

    opener = {"gzip": gzip.decompress, "bz2": bz2.decompress, "xz": lzma.decompress}[kind]
    try:
        return opener(path.read_bytes())
    except (OSError, EOFError, ValueError, lzma.LZMAError) as e:
        raise DataError(f"{path}: a damaged {kind} file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        "compress it again, or give the uncompressed file") from None


def _inner_suffix(path: Path) -> str:
    """The format's suffix: `.jsonl` for data.jsonl.gz."""
    return Path(path.stem).suffix if path.suffix in (".gz", ".bz2", ".xz", ".zst", ".zstd", ".zip") else path.suffix


def read_text(path: Path) -> str:
    """The file as text: decompressed, UTF-8 (a byte-order mark dropped); UTF-16 or other bytes are one error."""
    raw = _read_bytes(path)
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{path}: UTF-16 text (byte-order mark {raw[:2]!r}); re-save the file as UTF-8")
    try:
        return raw.decode("utf-8-sig")  # utf-8-sig: a UTF-8 BOM is not part of the data
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                        "re-save the file as UTF-8") from None


def data_lines(text: str) -> list[str]:
    """The lines of JSON Lines text: split at "\\n" only, a CRLF file's "\\r" dropped. Not str.splitlines(),
    which also splits at U+2028, U+2029, U+0085 and other characters that JSON allows unescaped inside a
    string (preftune's own files hold them so: they are written with ensure_ascii=False)."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def json_lines(path: Path, text: str) -> list[tuple[str, Any]]:
    """[("file:line", value)] of JSON Lines text, blank lines skipped. The one JSON Lines reader: data
    files and `preftune label`'s candidates go through it. Values are whatever each line holds; the
    caller says which it expects."""
    out = []
    lines = data_lines(text)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not text.endswith("\n"):
                raise DataError(f"{path}:{lineno}: the last line is cut off ({e.msg}, column {e.colno}); the file "
                                "looks truncated: re-export it, or delete that line") from None
            raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg}, column {e.colno}); "
                            "each line must be one JSON object") from None
        out.append((f"{path}:{lineno}", value))
    return out


def read_json(path: Path) -> list[tuple[str, Any]]:
    """A JSON array (or one object) or JSON Lines; records are checked to be objects later."""
    text = read_text(path)
    suffix = _inner_suffix(path)
    if suffix == ".jsonl" and text.lstrip().startswith("["):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None
        if isinstance(doc, list) and doc and all(isinstance(r, dict) for r in doc):
            raise DataError(f"{path}: a JSON array, but a .jsonl file holds one JSON object per line; "
                            "rename it to .json or write one record per line")
    if suffix != ".jsonl":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # several JSON values: it is JSON Lines with a .json name
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        else:
            if isinstance(doc, dict):
                doc = [doc]
            if not isinstance(doc, list):
                raise DataError(f"{path}: expected a JSON array of records, got {type(doc).__name__}")
            return _encodable([(f"{path} record {i}", rec) for i, rec in enumerate(doc)], text)
    return _encodable(json_lines(path, text), text)


def _encodable(records: list[tuple[str, Any]], text: str) -> list[tuple[str, Any]]:
    """JSON may escape half of a UTF-16 surrogate pair ("\\ud83d", an emoji cut in two): valid JSON, but
    text no tokenizer can encode. Found here, naming the record, not as an encoder error later."""
    if "\\ud" not in text.lower():  # no escaped surrogate at all: the common case costs one scan
        return records
    for where, rec in records:
        try:
            json.dumps(rec, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: text with a lone surrogate (\\u{ord(e.object[e.start]):04x}, half of an emoji or other "
                            "character cut in two), which is not valid Unicode; fix or remove that character") from None
    return records


def read_csv(path: Path) -> list[tuple[str, Any]]:
    """Rows as header -> text (never numbers: a numeric-looking answer stays a string). Read with
    the csv module, not pandas, because pandas turns a row with one field too many into an index
    column and silently shifts every field; here any row whose field count differs from the
    header's is an error (an unquoted comma inside a field is the usual cause)."""
    text = read_text(path)  # the encoding check with its clear message
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty CSV file; the first line must name the columns")
        duplicated = sorted({h for h in header if header.count(h) > 1})
        if duplicated:
            raise DataError(f"{path}:1: column {duplicated[0]!r} appears twice in the header; rename one")
        out = []
        start = reader.line_num + 1  # the line a row starts on (a quoted field may span lines)
        for fields in reader:
            if fields:  # a blank line
                if len(fields) != len(header):
                    raise DataError(f"{path}:{start}: row {len(out) + 1} has {len(fields)} fields but the header "
                                    f"has {len(header)} ({', '.join(header)}); quote fields that contain commas "
                                    '(e.g. "Fine, thanks")')
                out.append((f"{path} row {len(out) + 1}", dict(zip(header, fields))))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not a readable CSV file ({e})") from None
    return out


def read_parquet(path: Path) -> list[tuple[str, Any]]:
    import pyarrow.parquet as pq

    source = io.BytesIO(_read_bytes(path)) if _compression(path) else path
    try:
        rows = pq.read_table(source).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    return [(f"{path} record {i}", rec) for i, rec in enumerate(rows)]


def read_hf(name: str, split: str, subset: str | None = None) -> list[tuple[str, Any]]:
    """A folder from `save_to_disk`, another folder `datasets` reads, or a hub dataset id."""
    import datasets

    try:
        if (Path(name) / "state.json").is_file() or (Path(name) / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{name}: no split '{split}' (splits: {', '.join(ds)}); write {name}:SPLIT")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, subset, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (offline, missing split, bad files)
        raise DataError(f"dataset '{name}' (split '{split}'): datasets could not load it: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return [(f"{name}[{split}] record {i}", rec) for i, rec in enumerate(ds)]


def read_records(path: Path) -> list[tuple[str, Any]]:
    """A data file's records, its format known by its suffix (under any compression suffix)."""
    suffix = _inner_suffix(path)
    if suffix == ".csv":
        return read_csv(path)
    if suffix in (".parquet", ".pq"):
        return read_parquet(path)
    return read_json(path)
