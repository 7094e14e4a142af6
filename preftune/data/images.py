"""Preference pairs with images, in TRL's or LLaMA-Factory's format, read into `PreferencePair`s whose
`images` are checked.

    pair = vision_pair(record, "pairs.jsonl:3", base_dir=Path("data"))          # TRL's format
    pair = llamafactory_pair(text_pair, record["images"], where, "images", options)  # LLaMA-Factory's
    options = image_options(cfg)     # media_dir, image_max_pixels, image_min_pixels

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

LLaMA-Factory's format (its data/README.md, mllm_demo.json, rlhf_v): a sharegpt or alpaca record with an
`images` column (a list of paths, or one) and `<image>` placeholders in its messages' text, each taking
the next image. `records.py` reads the record as text first (tags, history, system); `llamafactory_pair`
then turns each `<image>` into an image part, so the pair is the one TRL's format gives and training
does not know which format it came from. Relative paths are read as LLaMA-Factory's converter reads them
(data/converter.py `_find_medias`): `media_dir/path` where that file exists (media_dir defaults to
dataset_dir), else the path as written (from the current folder).

Resizing (LLaMA-Factory's mm_plugin `_preprocess_image`): an image of more than image_max_pixels pixels
is scaled down, one of fewer than image_min_pixels scaled up, keeping its aspect ratio (each side
times sqrt(bound / (width * height)), rounded down), then converted to RGB. LLaMA-Factory does this to
every image with its defaults (768 * 768 and 32 * 32); here its format gets those defaults, TRL's
format (which TRL does not resize) only the bounds a config sets. The size is decided, and the digest
taken, once when the data is read; a file's pixels are decoded and resized again when a batch needs them,
unless the tokenization cache holds them (cache.py: the ref's source is then `StoredPixels`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import DataError

ROLES = ("system", "user", "assistant")
IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory's (extras/constants.py)
LLAMAFACTORY_MAX_PIXELS, LLAMAFACTORY_MIN_PIXELS = 768 * 768, 32 * 32  # its defaults (hparams/model_args.py)


@dataclass(frozen=True)
class ImageOptions:
    """Where relative image paths are read from, and the pixel bounds images are resized into: the config's
    dataset_dir, media_dir, image_max_pixels and image_min_pixels (`image_options`)."""
    dataset_dir: str = "data"
    media_dir: str | None = None
    max_pixels: int | None = None
    min_pixels: int | None = None

    def bounds(self, llamafactory: bool) -> tuple[int | None, int | None] | None:
        """(max, min) pixels of an image, None where unbounded; None: not resized. A key left unset is
        LLaMA-Factory's default for its format, no bound for TRL's (module docstring)."""
        if not llamafactory and self.max_pixels is None and self.min_pixels is None:
            return None
        if not llamafactory:
            return self.max_pixels, self.min_pixels
        return (LLAMAFACTORY_MAX_PIXELS if self.max_pixels is None else self.max_pixels,
                LLAMAFACTORY_MIN_PIXELS if self.min_pixels is None else self.min_pixels)


def image_options(cfg) -> ImageOptions:
    """The config's image keys (media_dir, image_max_pixels, image_min_pixels) for the readers."""
    return ImageOptions(cfg.dataset_dir, cfg.media_dir, cfg.image_max_pixels, cfg.image_min_pixels)


def resize(image, max_pixels: int | None, min_pixels: int | None):
    """LLaMA-Factory's mm_plugin `_preprocess_image`: scaled into [min_pixels, max_pixels] keeping the aspect
    ratio (sides rounded down, PIL's default filter), then RGB."""
    if max_pixels is not None and image.width * image.height > max_pixels:
        image = _scaled(image, max_pixels)
    if min_pixels is not None and image.width * image.height < min_pixels:
        image = _scaled(image, min_pixels)
    return image if image.mode == "RGB" else image.convert("RGB")


def _scaled(image, pixels: int):
    factor = math.sqrt(pixels / (image.width * image.height))
    return image.resize((int(image.width * factor), int(image.height * factor)))


@dataclass(frozen=True)
class StoredPixels:
    """A file's image as the tokenization cache holds it (cache.py): its resized pixels, tensor `name` (H, W[, C])
    uint8 of the safetensors file `cache`, in PIL mode `mode`; `file` is read instead where the cache file has
    gone or fails to read (a `preftune cache clear` during the run)."""
    cache: str
    name: str
    mode: str
    file: str

    def read(self):
        """The PIL image, or None where the cache file does not give it."""
        from PIL import Image

        try:
            image = Image.fromarray(_open_cache(self.cache).get_tensor(self.name))  # (H, W, 3): RGB; (H, W): L
            return image if image.mode == self.mode else None
        except Exception:  # noqa: BLE001 - whatever is wrong with the cache file, the image file is read instead
            _open_cache.cache_clear()
            return None


@functools.lru_cache(maxsize=8)
def _open_cache(path: str):
    """The cache file, opened once (its header, one entry per image, is parsed once; the pixels are memory-mapped)."""
    from safetensors import safe_open

    return safe_open(path, framework="np")


@dataclass(frozen=True, eq=False)
class ImageRef:
    """One image of a pair: where its pixels come from (a file path, or the image itself), and a digest of
    its content that stands for it in fingerprints (its repr), so equal images hash alike wherever they live."""
    source: Any  # str: a file path; StoredPixels: its pixels in the tokenization cache; else a PIL image (resized)
    digest: str
    size: tuple[int, int]  # (width, height), as the model gets it (after `resize`)
    bounds: tuple | None = None  # a file's (max, min) pixels for `resize`; None: not resized

    def load(self):
        """The PIL image, decoded and resized (a file is read again: images are not held in memory between
        batches)."""
        source = self.source
        if isinstance(source, StoredPixels):  # a cache hit: the resized pixels, neither decoded nor resized again
            image = source.read()
            if image is not None and image.size == self.size:  # (the cache's checksum covers the ids, not pixels)
                return image
            source = source.file
        if not isinstance(source, str):
            return source
        from PIL import Image

        with Image.open(source) as image:
            image.load()
        return resize(image, *self.bounds) if self.bounds else image

    def __repr__(self) -> str:
        return f"image:{self.digest}"

    def __eq__(self, other) -> bool:
        return isinstance(other, ImageRef) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)


def _trl_path(value: str, what: str, base_dir: Path | None, media_dir: str | None) -> Path:
    """TRL's format: a relative path is media_dir's where that is set, else the data file's folder's."""
    path = Path(value).expanduser()
    folder = Path(media_dir).expanduser() if media_dir else base_dir
    if not path.is_absolute() and folder is not None:
        path = folder / path
    if not path.is_file():
        raise DataError(f"{what}: no such file '{path}'" + (
            "" if Path(value).is_absolute() else f" (a relative path is read from media_dir '{media_dir}')"
            if media_dir else " (a relative path is read from the data file's folder)")
            + "; fix the path or add the file")
    return path


def _llamafactory_path(value: str, what: str, media_dir: str) -> Path:
    """LLaMA-Factory's converter: media_dir/value where that file exists, else value as written."""
    for path in (Path(media_dir).expanduser() / value, Path(value).expanduser()):
        if path.is_file():
            return path
    raise DataError(f"{what}: no such file '{value}' (looked in media_dir '{media_dir}', then from the current "
                    "folder, as LLaMA-Factory does); fix the path, add the file, or set media_dir to the images' "
                    "folder")


def image_ref(value: Any, where: str, index: int, base_dir: Path | None, options: ImageOptions | None = None,
              llamafactory: bool = False) -> ImageRef:
    """`value` (a path, a PIL image, or {"bytes", "path"}) as a checked `ImageRef`, resized by `options`'
    bounds for the format; one line naming the record and the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    options = options or ImageOptions()
    bounds = options.bounds(llamafactory)
    what = f"{where}: image {index}"
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        value = value["path"]  # the datasets Image feature, by path
    if isinstance(value, str):
        path = _llamafactory_path(value, what, options.media_dir or options.dataset_dir) if llamafactory else \
            _trl_path(value, what, base_dir, options.media_dir)
        data, name = path.read_bytes(), str(path)
    elif isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        data, name = bytes(value["bytes"]), value.get("path") or "(embedded bytes)"
    elif isinstance(value, Image.Image):
        value = resize(value, *bounds) if bounds else value
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
    image = resize(image, *bounds) if bounds else image
    # a file is read (and resized) again for each batch; embedded bytes are held decoded, as a PIL image
    return ImageRef(name, _digest(image), image.size, bounds) if isinstance(value, str) else \
        ImageRef(image, _digest(image), image.size)


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


def vision_sft(rec: dict, where: str, base_dir: Path | None, options: ImageOptions | None = None):
    """A record of TRL's SFT vision formats as the pair SFT reads (it trains on chosen; the rejected completion is
    the same text): `prompt` and `completion`, or `messages` whose last turn is the assistant's completion, with
    `images`; a preference record trains on its chosen."""
    if "chosen" in rec or "rejected" in rec:
        return vision_pair(rec, where, base_dir, options)
    rest = {k: v for k, v in rec.items() if k not in ("messages", "completion")}
    if "messages" in rec:
        messages = rec["messages"]
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) or \
                messages[-1].get("role") != "assistant":
            raise DataError(f"{where}: field 'messages' must be a list of messages ending on the assistant's turn "
                            "(the completion SFT trains on)")
        rest |= {"prompt": messages[:-1], "chosen": messages[-1:]}
    else:
        rest["chosen"] = rec.get("completion")
    pair = vision_pair({**rest, "rejected": ""}, where, base_dir, options)
    pair.rejected = pair.chosen  # (tokenized as a pair of two equal completions, as text SFT records are)
    return pair


def vision_unpaired(rec: dict, where: str, base_dir: Path | None, options: ImageOptions | None = None):
    """A TRL unpaired vision record (prompt, completion, label, images: KTO's) as an `UnpairedExample` with
    `images`: read as `vision_pair` reads a pair whose chosen is the completion."""
    from preftune.data.records import UnpairedExample

    label = rec.get("label")
    if not isinstance(label, bool):
        raise DataError(f"{where}: field 'label' is {type(label).__name__ if label is not None else 'missing'}, "
                        "expected true (desirable) or false (undesirable)")
    if "chosen" in rec or "rejected" in rec:
        raise DataError(f"{where}: a record with 'label' is one completion (KTO's unpaired format); it has "
                        "chosen/rejected too: keep 'completion' and 'label', or the pair")
    pair = vision_pair({**{k: v for k, v in rec.items() if k not in ("completion", "label")},
                        "chosen": rec.get("completion"), "rejected": ""}, where, base_dir, options)
    return UnpairedExample(prompt=pair.prompt, completion=pair.chosen, label=label, system=pair.system, where=where,
                           messages=pair.messages, conversational=True, chat_template_kwargs=pair.chat_template_kwargs,
                           completion_messages=pair.chosen_messages, images=pair.images)


def vision_pair(rec: dict, where: str, base_dir: Path | None, options: ImageOptions | None = None):
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
    refs = [image_ref(value, where, i, base_dir, options) for i, value in enumerate(images)]
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
    if rec.get("system") is not None:
        # a top-level system text (as `preftune sample` writes its pairs, and text records take it): the
        # pair's system turn; given twice it is refused rather than one of them dropped
        if not isinstance(rec["system"], str):
            raise DataError(f"{where}: field 'system' is {type(rec['system']).__name__}, expected a string")
        if system is not None and rec["system"] != system:
            raise DataError(f"{where}: a system text in both field 'system' and the prompt's first message; "
                            "keep one of them")
        system = rec["system"] or system
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end on the user turn that chosen/rejected answer")
    return PreferencePair(prompt=text_of(messages[-1]["content"]), chosen=chosen, rejected=rejected, system=system,
                          where=where, messages=messages, conversational=True, images=refs)


def _split_placeholders(text: str) -> str | list[dict]:
    """A message's text with LLaMA-Factory's `<image>` placeholders as image parts between its text parts;
    a text without one unchanged."""
    if IMAGE_PLACEHOLDER not in text:
        return text
    parts: list[dict] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def llamafactory_pair(pair, value: Any, where: str, column: str, options: ImageOptions | None):
    """A pair read from a LLaMA-Factory sharegpt or alpaca record (records.py, as text) with its `images`
    column's `value` (a list, or one image): each `<image>` placeholder of its messages becomes an image part,
    in order, and the images are checked and resized (the module docstring). A record without images stays
    text-only, in the same form."""
    images = [] if value is None else value if isinstance(value, list) else [value]
    if pair.tools or pair.chosen_messages or pair.rejected_messages:
        raise DataError(f"{where}: tool definitions or function calls in a record with an '{column}' column are not "
                        "supported yet; remove them, or the images")
    for name, text in (("system prompt", pair.system or ""), ("chosen answer", pair.chosen),
                       ("rejected answer", pair.rejected)):
        if IMAGE_PLACEHOLDER in text:
            raise DataError(f"{where}: the {name} holds '{IMAGE_PLACEHOLDER}'; images belong in the user turns (a "
                            "completion is what the model writes)")
    turns = pair.messages if pair.messages is not None else [{"role": "user", "content": pair.prompt}]
    messages = [{**m, "content": _split_placeholders(m["content"])} for m in turns]
    placeholders = _placeholders(messages)
    if placeholders != len(images):
        raise DataError(f"{where}: {placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) in the messages but "
                        f"{len(images)} image(s) in '{column}'; give one image per placeholder, in order (as "
                        "LLaMA-Factory requires)")
    refs = [image_ref(v, where, i, None, options, llamafactory=True) for i, v in enumerate(images)]
    return dataclasses.replace(pair, prompt=text_of(messages[-1]["content"]), messages=messages,
                               conversational=True, images=refs)
