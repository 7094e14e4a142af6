"""Preference pairs with images: TRL's vision format, read into `PreferencePair`s whose `images` are checked.

    pair = vision_pair(record, "pairs.jsonl:3", base_dir=Path("data"))   # records.to_examples calls it

A record is TRL's vision preference format: `images` (a list; `image`: one) beside a conversational
`prompt` and `chosen` / `rejected`. A message's `content` is a string or a list of parts,
`{"type": "text", "text": ...}` and `{"type": "image"}`; each image part takes the next image of the
list, in order. Where no message has parts (every content a string), the images go in front of the
first user turn's text, as TRL's `prepare_multimodal_messages` puts them. A record with an empty list
is text-only (a text-only record of a vision dataset may also leave `images` out).

An image is a path (relative to the data file's folder), a PIL image, or the `datasets` Image feature's
{"bytes", "path"}. Each is opened and decoded once here, so that a missing file, a file that is not an
image, a truncated image, or a placeholder count that differs from the image count is one line naming
the record and the file, before any model loads; the images are then held as `ImageRef`s, opened
again when a batch needs their pixels (as TRL's collator does), and known to fingerprints by their
pixels (`ImageRef.digest`), so a cache or a resume keyed by the data is keyed by the images too.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, eq=False)
class ImageRef:
    """One image of a pair: where its pixels come from (a file path, or the image itself), and a digest of
    its content that stands for it in fingerprints (its repr), so equal images hash alike wherever they live."""
    source: Any  # str: a file path; else a PIL image
    digest: str
    size: tuple[int, int]  # (width, height)

    def load(self):
        """The PIL image, decoded (a file is read again: images are not held in memory between batches)."""
        if not isinstance(self.source, str):
            return self.source
        from PIL import Image

        with Image.open(self.source) as image:
            image.load()
            return image

    def __repr__(self) -> str:
        return f"image:{self.digest}"

    def __eq__(self, other) -> bool:
        return isinstance(other, ImageRef) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)


def image_ref(value: Any, where: str, index: int, base_dir: Path | None) -> ImageRef:
    """`value` (a path, a PIL image, or {"bytes", "path"}) as a checked `ImageRef`; one line naming the
    record and the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    what = f"{where}: image {index}"
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        value = value["path"]  # the datasets Image feature, by path
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise DataError(f"{what}: no such file '{path}'" + (
                " (a relative path is read from the data file's folder)" if not Path(value).is_absolute() else "")
                + "; fix the path or add the file")
        data, name = path.read_bytes(), str(path)
    elif isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        data, name = bytes(value["bytes"]), value.get("path") or "(embedded bytes)"
    elif isinstance(value, Image.Image):
        return ImageRef(value, _digest(value), value.size)
    else:
        raise DataError(f"{what} is {type(value).__name__}; expected a file path, a PIL image or "
                        "{\"bytes\": ..., \"path\": ...}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: a truncated file fails here, not in the middle of training
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{what} '{name}' is not a readable image ({reason}); replace or remove it") from None
    # a file is read again for each batch; embedded bytes are held decoded, as a PIL image
    return ImageRef(name if isinstance(value, str) else image, _digest(image), image.size)


def _digest(image) -> str:
    """The image's identity: its pixels (mode, size, bytes), so a file, its bytes in a dataset and the decoded
    image are one image to a fingerprint, whatever the container."""
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()[:32]


def _parts(content: Any, where: str, field: str, i: int) -> str | list[dict]:
    """A message's content: a string, or a checked list of text and image parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise DataError(f"{where}: field '{field}' message {i}: 'content' is {type(content).__name__}, expected a "
                        "string or a list of {\"type\": \"text\", \"text\": ...} / {\"type\": \"image\"} parts")
    out = []
    for part in content:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            out.append({"type": "image"})  # the image itself is the record's `images` entry
        else:
            raise DataError(f"{where}: field '{field}' message {i}: a content part {part!r}; expected "
                            "{\"type\": \"text\", \"text\": ...} or {\"type\": \"image\"}")
    return out


def _messages(value: Any, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' is {type(value).__name__}, expected a non-empty list of "
                        "{\"role\": ..., \"content\": ...} messages (TRL's vision format is conversational)")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: field '{field}' message {i}: expected an object with a 'role' among "
                            f"{', '.join(ROLES)} and a 'content'")
        out.append({"role": m["role"], "content": _parts(m.get("content"), where, field, i)})
    return out


def text_of(content: str | list[dict]) -> str:
    """A message's text, its image parts left out."""
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def _placeholders(messages: list[dict]) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image")


def _completion(value: Any, where: str, field: str) -> str:
    """A completion: one assistant message (or a string), as text; an image in a completion is refused."""
    if isinstance(value, str):
        return value
    msgs = _messages(value, where, field)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise DataError(f"{where}: field '{field}' must be one assistant message, got roles "
                        f"{[m['role'] for m in msgs]}")
    if _placeholders(msgs):
        raise DataError(f"{where}: field '{field}' holds an image part; images belong in the prompt (the "
                        "completion is what the model writes)")
    return text_of(msgs[0]["content"])


def vision_pair(rec: dict, where: str, base_dir: Path | None):
    """A TRL vision record as a `PreferencePair` with `images` (the module docstring)."""
    from preftune.data.records import PreferencePair

    images = rec.get("images", [rec["image"]] if rec.get("image") is not None else [])
    if images is None:
        images = []
    if not isinstance(images, list):
        raise DataError(f"{where}: field 'images' is {type(images).__name__}, expected a list of images")
    if not isinstance(rec.get("prompt"), list):
        raise DataError(f"{where}: field 'prompt' must be a list of messages in a record with images (TRL's vision "
                        "format: [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}, {\"type\": \"text\", "
                        "\"text\": ...}]}])")
    messages = _messages(rec["prompt"], where, "prompt")
    chosen, rejected = _completion(rec.get("chosen"), where, "chosen"), _completion(rec.get("rejected"), where,
                                                                                       "rejected")
    refs = [image_ref(value, where, i, base_dir) for i, value in enumerate(images)]
    if not any(isinstance(m["content"], list) for m in messages):
        # TRL's rule for string contents: the images go in front of the first user turn
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is None:
            raise DataError(f"{where}: the prompt has no user turn")
        text = messages[first]["content"]
        messages[first] = {"role": "user", "content": [{"type": "image"} for _ in refs]
                           + [{"type": "text", "text": text}]}
    placeholders = _placeholders(messages)
    if placeholders != len(refs):
        raise DataError(f"{where}: {placeholders} image placeholder(s) ({{\"type\": \"image\"}} parts) but "
                        f"{len(refs)} image(s) in 'images'; give one image per placeholder, in order")
    system = None
    if messages[0]["role"] == "system":
        if isinstance(messages[0]["content"], list) and _placeholders(messages[:1]):
            raise DataError(f"{where}: the system message holds an image part; put images in a user turn")
        system, messages = text_of(messages[0]["content"]), messages[1:]
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end on the user turn that chosen/rejected answer")
    return PreferencePair(prompt=text_of(messages[-1]["content"]), chosen=chosen, rejected=rejected, system=system,
                          where=where, messages=messages, conversational=True, images=refs)
