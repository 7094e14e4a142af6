"""Human preference labels: the comparisons of a candidates file and the judgements people make on
them, kept in an append-only file beside it. Pure Python; `preftune label` serves it as a web page.

    store = LabelStore("candidates.jsonl", seed=0, writable=True)   # reads candidates.jsonl.labels.jsonl
    comparison = store.hand_out("tab-1")                            # the next unlabelled comparison
    store.judge(comparison.id, "A", comparison.shown_as_a, annotator="ana", seconds=4.2)
    store.undo()                                                    # the last judgement, if regretted
    export_pairs(store, "pairs.jsonl")                              # the pairs training reads

Input: JSON Lines, one record per prompt, as `preftune sample` writes it:
  {"id": "...", "prompt": "..." or [{"role", "content"}, ...], "system": "optional",
   "images": ["optional", "paths"], "completions": [{"text": "...", "score": 0.3 or null}, ...]}
Each record yields one comparison per pair of completions (i < j; at least 2 completions). A plain
pairs file ({"prompt", "chosen", "rejected"}, strings or TRL's one-assistant-message lists) is read
too: each record is one comparison of its two completions, so existing data can be labelled again.
A prompt with images is TRL's vision format (`images` paths, `{"type": "image"}` content parts); the
store serves those files only from the candidates' folder or `media_dir` (`image`).

The labels file (`FILE.labels.jsonl`) is the only state. Every judgement is one JSON line,
appended and fsynced before it is acknowledged; an undo is another line, so the file is never
rewritten and a killed server loses nothing it confirmed. Reading it back gives the standing
judgement of every comparison, so a restarted server resumes at the next unlabelled one. Each
line carries a fingerprint of the texts it judged: labels are never silently applied to texts
that changed since.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from preftune.data.readers import data_lines, json_lines, read_text
from preftune.errors import DataError
from preftune.files import write_atomic

log = logging.getLogger("preftune")

CHOICES = ("A", "B", "tie", "skip")  # what a person answers; A and B are stored as completion indices
ROLES = ("system", "user", "assistant", "tool")


class AlreadyJudged(Exception):
    """A judgement for a comparison that already has a standing one (another tab got there first)."""


class NotJudged(Exception):
    """An undo of a comparison that has no standing judgement."""


@dataclass
class Record:
    """One prompt and its candidate completions. `prompt` is text (one user turn) or a list of
    {role, content} messages, kept as given so that export writes it back in the same form."""
    id: str
    prompt: str | list[dict]
    completions: list[str]
    system: str | None = None
    where: str = ""  # "file:line", for messages
    images: list[str] | None = None  # the prompt's image paths as given (None: the record has no images field)


@dataclass(frozen=True)
class Comparison:
    """Completions `first` < `second` of a record, and which of them the page shows as A."""
    id: str
    record: Record
    first: int
    second: int
    shown_as_a: int

    @property
    def shown_as_b(self) -> int:
        return self.second if self.shown_as_a == self.first else self.first

    @property
    def fingerprint(self) -> str:
        """A short hash of the texts judged: a labels line whose texts have since changed is refused."""
        r = self.record
        judged = [r.prompt, r.system, r.completions[self.first], r.completions[self.second]]
        blob = json.dumps(judged + [r.images] if r.images else judged, ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def shown(value: Any, limit: int = 80) -> str:
    """A value as an error message repeats it: its repr, cut to `limit` characters (a refused 5 MB
    value is not echoed back whole)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def labels_path(path: str | Path) -> Path:
    """Where the judgements on `path` are kept: FILE.labels.jsonl beside it."""
    path = Path(path)
    return path.with_name(path.name + ".labels.jsonl")


# --- the prompts' images ----------------------------------------------------------------------

BROWSER_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "GIF": "image/gif",
                   "WEBP": "image/webp", "BMP": "image/bmp"}  # PIL's format -> the type a browser shows as is


class ImageRefused(Exception):
    """An image the page is not sent; `status` is the HTTP status that says why: 403 outside the folders
    served, 404 no such file, 415 not an image."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ImageFolders:
    """Where a candidates file's images are read from, and the only folders they are served from.

    A relative path is read from media_dir where given, else from the file's folder (as training reads
    TRL-format paths). Whatever the path, the file it names, once `..` and every symlink are resolved, must
    lie inside the file's folder, media_dir or one of `roots`, and open as an image: a candidates file that
    names ~/.ssh/id_rsa, or an image link pointing there, gets its line on the page, never the bytes."""

    def __init__(self, candidates: Path, media_dir: str | None = None, roots: list[str] = ()):
        self.base = Path(media_dir).expanduser() if media_dir else candidates.parent
        folders = [candidates.parent] + ([self.base] if media_dir else []) + [Path(r).expanduser() for r in roots]
        self.roots = list(dict.fromkeys(Path(os.path.realpath(f)) for f in folders))

    def path(self, value: str) -> Path:
        """The image's absolute path, symlinks kept (what export writes, so training reads the same file)."""
        return Path(os.path.abspath(self.base / Path(value).expanduser()))  # an absolute value stays itself

    def _file(self, value: str) -> Path:
        """The real file behind `value`, checked to lie inside a served folder."""
        try:
            real = Path(os.path.realpath(self.path(value)))
            inside = any(real.is_relative_to(root) for root in self.roots)
            exists = inside and real.is_file()
        except (OSError, ValueError):  # a NUL byte, a name too long
            raise ImageRefused(404, f"{shown(value)} is not a usable file path") from None
        if not inside:
            verb = "links to a file" if self.path(value) != real else "is"  # a symlink, or a folder on the way
            raise ImageRefused(403, f"{shown(value)} {verb} outside the folders images are served from "
                                    f"({', '.join(map(str, self.roots))}); pass --media_dir with its folder")
        if not exists:
            raise ImageRefused(404, f"{shown(value)}: no such file")
        return real

    def read(self, value: str, pixels: bool = True) -> tuple[bytes, str]:
        """The image's bytes and content type, as the browser gets them (a format browsers do not show,
        TIFF say, as PNG); pixels=False checks only (the file's header) and returns no bytes."""
        from PIL import Image, UnidentifiedImageError

        real = self._file(value)
        try:
            with Image.open(real) as image:  # reads the header only
                kind = BROWSER_FORMATS.get(image.format)
                if not pixels:
                    return b"", kind or "image/png"
                if kind:
                    return real.read_bytes(), kind
                out = io.BytesIO()
                image.save(out, "PNG")
                return out.getvalue(), "image/png"
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ImageRefused(415, f"{shown(value)} is not an image ({reason[:80]})") from None

    def problem(self, value: str) -> str | None:
        """Why the page cannot show `value` (one line), or None."""
        try:
            self.read(value, pixels=False)
        except ImageRefused as e:
            return str(e)
        return None


def dataset_folders(cfg) -> list[str]:
    """The folders a run's data reads images from (media_dir, dataset_dir and each local data file's folder):
    where `preftune iterate` serves the images of the prompts it sampled from."""
    folders = [cfg.media_dir] if cfg.media_dir else []
    for name in (cfg.dataset or "").split(","):
        path = Path(name.strip()).expanduser()
        if path.is_file():
            folders.append(str(path.parent))
    return folders + [cfg.dataset_dir]


# --- reading the candidates -------------------------------------------------------------------

def _json_lines(path: Path) -> list[tuple[str, dict]]:
    """[("file:line", record)] of a candidates file, read as data files are (readers.json_lines: the same
    one-line errors, compressed files too); each line must hold one JSON object."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the candidates file that `preftune sample` wrote "
                        "(or a pairs file)")
    text = read_text(path)
    first = text.split("\n", 1)[0]
    if first.lstrip().startswith("[") and not _parses(first.encode()):  # an indented JSON array: said as such
        raise DataError(f"{path}:1: a JSON array, but labelling reads JSON Lines (one record per line); "
                        "write one JSON object per line")
    out = json_lines(path, text)
    for where, value in out:
        if isinstance(value, list):
            raise DataError(f"{where}: a JSON array, but labelling reads JSON Lines (one record per line); "
                            "write one JSON object per line")
        if not isinstance(value, dict):
            raise DataError(f"{where}: a JSON {type(value).__name__}, expected an object "
                            '{"id", "prompt", "completions"}')
    if not out:
        raise DataError(f"{path}: no records; it should hold one JSON object per line")
    return out


def _unicode(value: str, where: str, name: str) -> str:
    """JSON may escape half of a UTF-16 surrogate pair ("\\ud83d", an emoji cut in two): valid JSON, but
    not text: the page could never be sent it (the server would answer 500 for ever). Refused at load,
    as training's reader refuses it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: field {name} holds a lone surrogate (\\u{ord(e.object[e.start]):04x}, half of an "
                        "emoji or other character cut in two), which is not valid Unicode; fix or remove that "
                        "character") from None
    return value


def _string(rec: dict, name: str, where: str, required: bool = True) -> str | None:
    value = rec.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field '{name}' (a string); fields present: "
                            f"{', '.join(sorted(rec)) or 'none'}")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' is {type(value).__name__}, expected a string"
                        + ("; quote it" if isinstance(value, (int, float)) else ""))
    return _unicode(value, where, f"'{name}'")


def _content(content: Any, where: str, name: str) -> str | list[dict]:
    """A message's content: a string, or TRL's list of {"type": "text", "text"} and {"type": "image"} parts
    (the n-th image part stands for the record's n-th image)."""
    if isinstance(content, str):
        return _unicode(content, where, f"{name} 'content'")
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise DataError(f"{where}: field {name} must be an object with string 'role' and 'content' (a string, or a "
                        'list of {"type": "text", "text": ...} / {"type": "image"} parts)')
    parts = []
    for part in content:
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": _unicode(part["text"], where, f"{name} 'content'")})
        elif part.get("type") == "image":
            parts.append({"type": "image"})  # the image itself is the record's `images` entry
        else:
            raise DataError(f"{where}: field {name}: a content part {shown(part)}; expected "
                            '{"type": "text", "text": ...} or {"type": "image"}')
    return parts


def _image_parts(messages: list[dict]) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")


def _prompt(rec: dict, where: str) -> str | list[dict]:
    """A prompt text, or messages that end on the turn the completions answer (as training reads them)."""
    prompt = rec.get("prompt")
    if not isinstance(prompt, list):
        return _string(rec, "prompt", where)
    if not prompt:
        raise DataError(f"{where}: field 'prompt' is an empty list; it needs at least one user message")
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: field 'prompt' message {i} must be an object with string 'role' and "
                            "'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: field 'prompt' message {i}: role '{m['role']}' is not one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _content(m.get("content"), where, f"'prompt' message {i}")})
    if prompt[-1]["role"] in ("assistant", "system"):
        raise DataError(f"{where}: field 'prompt' ends on a message with role '{prompt[-1]['role']}'; it must end on "
                        "the user (or tool) turn that the completions answer")
    return out


def _images(rec: dict, where: str, prompt: str | list[dict]) -> list[str] | None:
    """The prompt's image paths (TRL's `images`, or `image` for one), checked against its image parts as
    training checks them; None when the record has neither field."""
    images = rec.get("images", [rec["image"]] if rec.get("image") is not None else None)
    name = "images" if "images" in rec else "image"
    if images is not None and (not isinstance(images, list) or not all(isinstance(v, str) for v in images)):
        raise DataError(f"{where}: field '{name}' must be a list of image file paths (the page shows files; "
                        "an image embedded as bytes cannot be labelled: write it to a file)")
    for v in images or []:
        _unicode(v, where, f"'{name}'")
    parts = _image_parts(prompt) if isinstance(prompt, list) else 0
    if parts and _image_parts([m for m in prompt if m["role"] == "system"]):
        raise DataError(f"{where}: field 'prompt': a system message holds an image part; put images in a user turn "
                        "(as training requires)")
    if parts and parts != len(images or []):
        raise DataError(f"{where}: {parts} image placeholder(s) ({{\"type\": \"image\"}} parts) but "
                        f"{len(images or [])} image(s) in 'images'; give one image per placeholder, in order")
    return images


def _pair_completion(rec: dict, name: str, where: str) -> str:
    """chosen/rejected of a pairs file: a string, or TRL's list of one assistant message."""
    value = rec.get(name)
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant" \
                and isinstance(value[0].get("content"), (str, list)):
            content = _content(value[0]["content"], where, f"'{name}' message 0")
            if isinstance(content, str):
                return content
            if not _image_parts([{"content": content}]):  # TRL's vision data: a list of text parts
                return "".join(p["text"] for p in content)
        raise DataError(f"{where}: field '{name}' must be a string or one assistant message "
                        '[{"role": "assistant", "content": "..."}] (tool calls cannot be labelled)')
    return _string(rec, name, where)


def _candidates(rec: dict, where: str) -> Record:
    completions = rec.get("completions")
    if not isinstance(completions, list):
        got = "missing" if completions is None else f"a {type(completions).__name__}"
        raise DataError(f"{where}: field 'completions' is {got}; expected a list of at least 2 "
                        '{"text": "...", "score": ...} objects')
    if len(completions) < 2:
        raise DataError(f"{where}: field 'completions' has {len(completions)} completion(s); a comparison needs "
                        "at least 2 (sample more per prompt, or drop this record)")
    texts = []
    for i, c in enumerate(completions):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise DataError(f"{where}: field 'completions' item {i} must be an object with a string 'text' "
                            '({"text": "...", "score": 0.5 or null})')
        score = c.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
            raise DataError(f"{where}: field 'completions' item {i}: 'score' is {type(score).__name__}, expected "
                            "a number or null")
        texts.append(_unicode(c["text"], where, f"'completions' item {i} 'text'"))
    prompt = _prompt(rec, where)
    return Record(id=_string(rec, "id", where), prompt=prompt, completions=texts,
                  system=_string(rec, "system", where, required=False), where=where, images=_images(rec, where, prompt))


def _pair(rec: dict, where: str, seen: dict[str, int]) -> Record:
    """A pairs-file record as a record of two completions. Without an 'id', the id is a hash of its
    texts, so labels stay with their pair when lines are added to or removed from the file."""
    prompt, system = _prompt(rec, where), _string(rec, "system", where, required=False)
    texts = [_pair_completion(rec, "chosen", where), _pair_completion(rec, "rejected", where)]
    images = _images(rec, where, prompt)
    rid = _string(rec, "id", where, required=False)
    if rid is None:
        blob = json.dumps([prompt, system, *texts] + ([images] if images else []), ensure_ascii=False, sort_keys=True)
        rid = "pair-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]
        seen[rid] = seen.get(rid, 0) + 1
        if seen[rid] > 1:  # the same pair twice: each copy is its own comparison
            rid += f"-{seen[rid]}"
    return Record(id=rid, prompt=prompt, completions=texts, system=system, where=where, images=images)


def read_candidates(path: str | Path) -> list[Record]:
    """The records of a candidates file (or a plain pairs file), checked: one line per problem."""
    path = Path(path)
    records: list[Record] = []
    first_id: dict[str, str] = {}
    hashed: dict[str, int] = {}
    kind = None
    for where, rec in _json_lines(path):
        shape = "candidates" if "completions" in rec or "chosen" not in rec else "pairs"
        if kind is None:  # the first record decides, so a later odd one gets a field error
            kind = shape
        elif shape != kind:
            expected = "'completions'" if kind == "candidates" else "'chosen' and 'rejected'"
            raise DataError(f"{where}: a {shape} record in a {kind} file (the first record has {expected}); "
                            "use one shape for the whole file")
        record = _candidates(rec, where) if kind == "candidates" else _pair(rec, where, hashed)
        if record.id in first_id:
            raise DataError(f"{where}: duplicate id '{record.id}' (first at {first_id[record.id]}); ids must be "
                            "unique in the file")
        first_id[record.id] = where
        records.append(record)
    return records


def comparisons(records: list[Record], seed: int = 0) -> list[Comparison]:
    """Every pair of completions i < j of every record, in file order. Which one is shown as A is
    drawn per comparison from (seed, comparison id): random against position bias, yet the same on
    every restart and independent of the order in which comparisons are handed out."""
    out = []
    for r in records:
        for i in range(len(r.completions)):
            for j in range(i + 1, len(r.completions)):
                cid = f"{r.id}#{i}-{j}"  # unique: the suffix after the last '#' names the pair
                a = i if random.Random(f"{seed}:{cid}").random() < 0.5 else j
                out.append(Comparison(cid, r, i, j, a))
    return out


# --- the labels file ----------------------------------------------------------------------------

def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:  # also a UnicodeDecodeError
        return False
    return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LabelStore:
    """The comparisons of one candidates file and their standing judgements.

    writable=True (the server) opens the labels file for appending and locks it, so a second server
    on the same file is refused instead of interleaving judgements; it also cuts off a last line
    left half-written by a crash (it was never acknowledged). writable=False (export) only reads.
    Not thread-safe: the server calls it under one lock.
    """

    def __init__(self, path: str | Path, seed: int = 0, writable: bool = False, media_dir: str | None = None,
                 image_roots: list[str] = ()):
        self.path = Path(path)
        self.records = read_candidates(self.path)
        self.images = ImageFolders(self.path, media_dir, image_roots)
        self.comparisons = comparisons(self.records, seed)
        self.by_id = {c.id: c for c in self.comparisons}
        self.labels_path = labels_path(self.path)
        self.current: dict[str, dict] = {}  # comparison id -> its standing judgement line
        self.order: list[str] = []  # ids of the standing judgements, oldest first (undo takes the last)
        self.leases: dict[str, str] = {}  # client (a browser tab) -> the comparison it was handed
        self._line: dict[str, str] = {}  # comparison id -> the labels-file line of its standing judgement
        self._fd: int | None = None
        if writable:
            self._open()
        try:
            self._load()
        except BaseException:
            self.close()  # and with it the lock
            raise

    # reading back ------------------------------------------------------------------------------
    def _open(self) -> None:
        self._fd = os.open(self.labels_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; one server per file is then up to the user
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                self._fd = None
                raise DataError(f"{self.labels_path} is in use by another `preftune label` on {self.path}; "
                                "label in that one's page, or stop it first") from None
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.labels_path, "rb") as f:
                text = f.read()
            cut = text.rfind(b"\n") + 1
            if cut < size and _parses(text[cut:]):  # a whole line without its newline (edited by hand): kept
                os.write(self._fd, b"\n")
            elif cut < size:  # a write cut off by a crash: never acknowledged to the page, so no judgement
                log.warning("%s: dropping a half-written last line (%d bytes; a crash during a write, "
                            "never confirmed to the page)", self.labels_path, size - cut)
                os.truncate(self.labels_path, cut)
        else:
            self._sync_dir()  # the new file's name survives a crash too

    def _sync_dir(self) -> None:
        try:
            fd = os.open(self.labels_path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _load(self) -> None:
        if not self.labels_path.is_file():
            return
        try:
            text = self.labels_path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{self.labels_path}: not UTF-8 text; this file is written by `preftune label` only: "
                            "restore it from a backup") from None
        lines = data_lines(text)  # not splitlines(): an annotator's name may hold U+2028
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{self.labels_path}:{lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                if lineno == len(lines) and not text.endswith("\n"):
                    log.warning("%s: ignoring a half-written last line (a crash during a write)", where)
                    break
                raise DataError(f"{where}: not a JSON line ({e.msg}); this file is written by `preftune label` "
                                "only: restore it from a backup or delete that line") from None
            self._replay(entry, where)

    def _replay(self, entry: Any, where: str) -> None:
        """Apply one line of the labels file, checking it against the candidates."""
        moved = (f"the labels belong to another version of {self.path}: restore that version, or move "
                 f"{self.labels_path.name} away to start over")
        if not isinstance(entry, dict) or not isinstance(entry.get("comparison", entry.get("undo")), str):
            raise DataError(f"{where}: not a judgement or undo line (no 'comparison' or 'undo' id)")
        if "undo" in entry:
            cid = entry["undo"]
            if cid not in self.current:
                raise DataError(f"{where}: undo of comparison '{cid}', which has no judgement standing there; "
                                "delete that line")
            del self.current[cid]
            self.order.remove(cid)
            return
        cid = entry["comparison"]
        comparison = self.by_id.get(cid)
        if comparison is None:
            raise DataError(f"{where}: comparison '{cid}' is not in {self.path}; {moved}")
        if entry.get("fingerprint") != comparison.fingerprint:
            raise DataError(f"{where}: comparison '{cid}' was judged on other texts than {self.path} now holds; "
                            f"{moved}")
        if entry.get("choice") not in (comparison.first, comparison.second, "tie", "skip"):
            raise DataError(f"{where}: 'choice' is {entry.get('choice')!r}; expected {comparison.first}, "
                            f"{comparison.second}, 'tie' or 'skip'")
        if cid in self.current:
            raise DataError(f"{where}: a second judgement of comparison '{cid}' without an undo in between "
                            f"(the first is at line {self._line[cid]}); delete one of the two lines")
        self.current[cid] = entry
        self._line[cid] = where.rsplit(":", 1)[1]
        self.order.append(cid)

    # writing ------------------------------------------------------------------------------------
    def _append(self, entry: dict) -> None:
        """One line, flushed to disk before returning: once the page hears back, it is kept."""
        if self._fd is None:
            raise RuntimeError("LabelStore opened read-only")
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)  # O_APPEND: one write, at the end
            if written != len(data):
                raise OSError(f"{self.labels_path}: short write ({written} of {len(data)} bytes)")
            os.fsync(self._fd)
        except OSError:
            try:  # a disk-full or failing disk: no half line for the next judgement to be glued onto
                os.ftruncate(self._fd, size)
            except OSError:
                pass
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # also releases the lock
            self._fd = None

    def comparison(self, cid: str) -> Comparison:
        try:
            return self.by_id[cid]
        except KeyError:
            raise KeyError(f"no comparison {shown(cid)} in {self.path}") from None

    def hand_out(self, client: str) -> Comparison | None:
        """The next unlabelled comparison (file order) that no other client holds; when every one
        left is held, the first of those (an abandoned tab must not block the end: a duplicate
        answer is refused anyway). The client holds it until it judges it or asks again."""
        held = {cid for who, cid in self.leases.items() if who != client}
        pick = fallback = None
        for c in self.comparisons:
            if c.id in self.current:
                continue
            if c.id not in held:
                pick = c
                break
            fallback = fallback or c
        pick = pick or fallback
        if pick is None:
            self.leases.pop(client, None)
        else:
            self.leases[client] = pick.id
        return pick

    def judge(self, cid: str, choice: str, shown_as_a: int, annotator: str | None = None,
              seconds: float | None = None, client: str | None = None) -> dict:
        """Record a judgement (A, B, tie or skip, as seen with completion `shown_as_a` on the left) and
        return its line. AlreadyJudged when the comparison has a standing judgement (undo it first)."""
        comparison = self.comparison(cid)
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {shown(choice)}")
        if shown_as_a not in (comparison.first, comparison.second) or isinstance(shown_as_a, bool):
            raise ValueError(f"shown_as_a must be {comparison.first} or {comparison.second}, got {shown(shown_as_a)}")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or not math.isfinite(seconds) or seconds < 0):
            raise ValueError(f"seconds must be a non-negative number, got {shown(seconds)}")
        if cid in self.current:
            who = self.current[cid].get("annotator") or "someone"
            raise AlreadyJudged(f"comparison '{cid}' was already labelled by {who}; moving on")
        shown_as_b = comparison.second if shown_as_a == comparison.first else comparison.first
        entry = {"comparison": cid, "record": comparison.record.id,
                 "completions": [comparison.first, comparison.second], "shown_as_a": shown_as_a,
                 "choice": {"A": shown_as_a, "B": shown_as_b}.get(choice, choice),
                 "annotator": (annotator or "").strip() or None,
                 "seconds": None if seconds is None else round(float(seconds), 3),
                 "time": _now(), "fingerprint": comparison.fingerprint}
        self._append(entry)
        self.current[cid] = entry
        self.order.append(cid)
        if client is not None and self.leases.get(client) == cid:
            del self.leases[client]
        return entry

    def undo(self, cid: str | None = None, annotator: str | None = None, client: str | None = None) -> Comparison:
        """Withdraw the standing judgement of `cid` (default: the latest one) by appending an undo line;
        the comparison is unlabelled again and handed to `client`. NotJudged when there is none."""
        if cid is None:
            if not self.order:
                raise NotJudged("nothing to undo: no comparison is labelled")
            cid = self.order[-1]
        comparison = self.comparison(cid)
        if cid not in self.current:
            raise NotJudged(f"comparison '{cid}' has no judgement to undo (undone already?)")
        self._append({"undo": cid, "annotator": (annotator or "").strip() or None, "time": _now()})
        del self.current[cid]
        self.order.remove(cid)
        if client is not None:
            self.leases[client] = cid
        return comparison

    def progress(self) -> dict:
        """How many comparisons have a standing judgement, by kind."""
        choices = [e["choice"] for e in self.current.values()]
        ties, skips = choices.count("tie"), choices.count("skip")
        return {"total": len(self.comparisons), "labelled": len(choices), "preferred": len(choices) - ties - skips,
                "ties": ties, "skips": skips, "unlabelled": len(self.comparisons) - len(choices)}


# --- export ---------------------------------------------------------------------------------------

def pair_record(record: Record, chosen: int, rejected: int, images: ImageFolders | None = None) -> dict:
    """A pair as preftune's data readers take it: standard (prompt text) or conversational (prompt
    messages, each completion one assistant message), plus `system` when the record has one. A record
    with images is TRL's vision format: messages (the system turn the first of them, where the vision
    reader takes it) and `images` as absolute paths, so the pairs file trains from any folder."""
    texts = record.completions
    if record.images is not None:
        prompt = record.prompt if isinstance(record.prompt, list) else [{"role": "user", "content": record.prompt}]
        if record.system is not None:
            prompt = [{"role": "system", "content": record.system}, *prompt]
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": texts[chosen]}],
                "rejected": [{"role": "assistant", "content": texts[rejected]}],
                "images": [str(images.path(v)) if images else v for v in record.images]}
    if isinstance(record.prompt, list):
        out = {"prompt": record.prompt, "chosen": [{"role": "assistant", "content": texts[chosen]}],
               "rejected": [{"role": "assistant", "content": texts[rejected]}]}
    else:
        out = {"prompt": record.prompt, "chosen": texts[chosen], "rejected": texts[rejected]}
    if record.system is not None:
        out["system"] = record.system
    return out


def export_pairs(store: LabelStore, dest: str | Path) -> dict:
    """Write a pair for every comparison with a preferred completion to `dest` (JSON Lines, in file
    order, replaced atomically); return the counts, ties, skips and unlabelled comparisons included."""
    lines = []
    for c in store.comparisons:
        entry = store.current.get(c.id)
        if entry and entry["choice"] not in ("tie", "skip"):
            rejected = c.second if entry["choice"] == c.first else c.first
            lines.append(json.dumps(pair_record(c.record, entry["choice"], rejected, store.images), ensure_ascii=False))
    dest = Path(dest)
    if dest.resolve() in (store.path.resolve(), store.labels_path.resolve()):
        raise DataError(f"--export '{dest}' would overwrite the file it is made from; choose another path")
    if dest.is_dir():  # else the rename onto it fails naming the temporary file
        raise DataError(f"--export '{dest}' is a folder; --export names the pairs file to write, e.g. "
                        f"--export '{dest / 'pairs.jsonl'}'")
    if not dest.parent.is_dir():
        raise DataError(f"--export '{dest}': folder '{dest.parent}' does not exist; create it or choose another path")
    write_atomic(dest, "".join(line + "\n" for line in lines))
    return {**store.progress(), "pairs": len(lines), "out": str(dest)}
