"""Vision-language models (VLMs): DPO on pairs whose prompts hold images (docs/vision.md).

    processor = load_processor(cfg)                         # None for a text-only model
    items = tokenize_vision_pairs(processor, pairs, cfg, report)
    batch = collate_vision(items, pad_id, index, processor=processor)   # + pixel_values, ...

What changes against text pairs, and what does not:
  * rendering and tokenizing: the processor's chat template renders the conversation with its
    {"type": "image"} parts, and the processor turns each image placeholder into the model's image
    tokens (LLaVA: one `<image>` becomes patches + 1 of them). The prompt and each prompt + completion
    are processed whole; the completion starts where their ids part, so the boundary is exact as for
    text (a token merged across it is completion, and counted). Image tokens are prompt tokens: never
    in the completion mask, never in a log-prob.
  * batches: the same [chosen; rejected] rows as `batching.collate`, plus the image processor's tensors
    (pixel_values, and image_sizes etc. where it gives them) of the pairs' images in pair order, once: a
    pair's rejected row holds its chosen row's images (TRL's collator gives them once per row). Images are
    read when a batch is built.
  * the forward: `logps.get_batch_logps` runs the model's whole multimodal backbone (vision tower,
    projector, language model) on a batch with images, each image through the vision tower once and its
    features placed in both rows of its pair (`logps._rows_media`); its language model alone on a batch
    without.

Qwen2-VL / Qwen2.5-VL: without torchvision their processor is built without its video processor
(`images_only`), and a batch with images carries the processor's mm_token_type_ids (its M-RoPE needs them).
Gemma 3: its processor's token_type_ids (its image tokens attend to each other both ways).

One process or FSDP2 (`fsdp: full_shard`), padded batches or padding_free (not with M-RoPE), and a live reference
(a frozen copy, ref_model, or a LoRA policy's adapter off) or precomputed log-probs; the rest is refused in one
line (`check_config`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from preftune.adapters import is_vision_config
from preftune.config.names import VISION_TEMPLATES
from preftune.batching import collate, collate_chosen, collate_packed, collate_unpaired
from preftune.data.records import PreferencePair
from preftune.errors import ConfigError, DataError, ModelError
from preftune.tokenization import (TokenizedExample, TokenizedPair, TokenizeReport, as_pair, kl_neighbours,
                                   prompt_messages, truncate_pair)

log = logging.getLogger("preftune")


def is_processor(obj) -> bool:
    """Whether what tokenizes the pairs is a vision-language model's processor (`load_processor`)."""
    return getattr(obj, "image_processor", None) is not None


def check_config(cfg) -> None:
    """What this slice of VLM training does not do yet, refused before any model loads (docs/vision.md)."""
    refused = [
        (cfg.objective not in ("dpo", "kto", "sft"), f"stage/pref_loss {cfg.objective}",
         "preference pairs (dpo), unpaired examples (kto) and sft only"),
        (cfg.objective in ("kto", "sft") and cfg.padding_free, "padding_free",
         f"not tested on packed rows of {cfg.objective} examples with images"),
        (cfg.prefix_sharing, "prefix_sharing", "the 4D mask of shared prompts is not passed to the multimodal "
                                               "backbone; each pair's images are encoded once without it"),
        (cfg.enable_liger_kernel, "enable_liger_kernel", "Liger's fused loss runs the language model alone"),
        (bool(cfg.generate_during_eval), "generate_during_eval", "sampling with images is not built yet"),
        (cfg.sequence_parallel_size > 1, "sequence_parallel_size", "a process's slice of a row would need the "
                                                                   "image features of the whole row"),
        (cfg.finetuning_type == "freeze", "finetuning_type: freeze", "its layer numbers would count the vision "
                                          "tower's layers too; use full with the freeze_* keys, or lora"),
    ]
    for bad, key, why in refused:
        if bad:
            raise ConfigError(f"{key}: not with a vision-language model yet ({why}); remove it (docs/vision.md)")


def load_processor(cfg):
    """The model's processor (AutoProcessor) when model_name_or_path is a vision-language model, else None.
    Its image processor is the PIL one where torchvision is missing (transformers chooses it); a processor
    that then does not build for want of a video processor (Qwen2-VL's) is its class without one
    (`images_only`). template: LLaMA-Factory's name for the model's family (qwen2_vl) is taken, another
    VISION_TEMPLATES name is refused, a text template's name is not used (a warning)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - models.load_model says what is wrong with the folder, in one line
        return None
    if not is_vision_config(config):
        if cfg.template in VISION_TEMPLATES:
            raise ConfigError(f"template: {cfg.template} is LLaMA-Factory's template for a vision-language model "
                              f"({', '.join(VISION_TEMPLATES[cfg.template])}), and model_name_or_path is a text-only "
                              f"{config.model_type} model; use a text template (qwen, chatml, ...) or remove template")
        return None
    check_config(cfg)
    if cfg.padding_free and "mrope_section" in (getattr(config.get_text_config(), "rope_parameters", None) or {}):
        raise ConfigError(f"padding_free: not with a {config.model_type} model yet (its M-RoPE positions are computed "
                          "per padded row, not per sequence of a packed one); remove it (docs/vision.md)")
    processor = saved_processor(cfg.model_name_or_path, config, cfg.trust_remote_code)
    if cfg.padding_free and getattr(processor, "return_mm_token_type_ids", False) and \
            "token_type_ids" in processor.model_input_names:
        raise ConfigError(f"padding_free: not with a {config.model_type} model yet (its image tokens attend to each other "
                          "both ways by token_type_ids, a mask not tested on packed sequences); remove it "
                          "(docs/vision.md)")
    if cfg.template in VISION_TEMPLATES and config.model_type not in VISION_TEMPLATES[cfg.template]:
        raise ConfigError(f"template: {cfg.template} is LLaMA-Factory's template for "
                          f"{', '.join(VISION_TEMPLATES[cfg.template])} models, and model_name_or_path is a "
                          f"{config.model_type} model; remove template (its processor's chat template renders the "
                          "pairs)")
    if cfg.template is not None and cfg.template not in VISION_TEMPLATES:  # LLaMA-Factory's VLM configs name one
        log.warning("template: %s is not used: a vision-language model's pairs are rendered by its processor's chat "
                    "template", cfg.template)
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def saved_processor(folder, config, trust_remote_code: bool = False, what: str = "model_name_or_path"):
    """The processor saved with the vision-language model in `folder` (`config`: its config): AutoProcessor's,
    else its class without a video processor (`images_only`); a failure in one line naming `what`."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types (a missing torchvision among them)
        processor = _images_only_processor(folder, config)
        if processor is None:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = "; it needs torchvision (pip install torchvision, built for your torch)" \
                if "torchvision" in first.lower() or "VIDEO_PROCESSOR" in first or "_extra_content" in first else ""
            raise ModelError(f"{what} '{folder}': its processor does not load ({first}){hint}") from None
    if getattr(processor, "image_processor", None) is None or not getattr(processor, "image_token", None):
        raise ModelError(f"{what} '{folder}': a vision-language model whose processor "
                         f"({type(processor).__name__}) has no image processor or image token; save the model's "
                         "processor (processor_config.json) with it")
    return processor


def images_only(processor_class):
    """`processor_class` (Qwen2VLProcessor, Qwen2_5_VLProcessor, ...) without its video processor.

    transformers 5.23 builds these processors with a video processor, which needs torchvision (its class
    lookup fails without it, even for video_processor=None). ProcessorMixin takes a processor's parts from
    the names of its __init__ arguments (`get_attributes`): this subclass names image_processor and tokenizer
    only, so everything else, how images are processed, placeholders expanded and mm_token_type_ids made,
    is the class's own code. It keeps the class's name, so what it saves (processor_config.json) loads as
    the real processor where torchvision is installed."""
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        out = processor_class.save_pretrained(self, save_directory, **kwargs)
        # also as preprocessor_config.json, where the real class finds its video processor's settings when the
        # folder has no video_preprocessor_config.json (as in Qwen2-VL's own checkpoints)
        self.image_processor.save_pretrained(save_directory)
        return out

    return type(processor_class.__name__, (processor_class,), {"__init__": __init__, "__module__": __name__,
                                                               "save_pretrained": save_pretrained,
                                                               "__doc__": images_only.__doc__})


def _images_only_processor(folder, config):
    """The model's processor class without its video processor (`images_only`), loaded from `folder`; None
    where the class takes no video processor, or where that does not load either (the caller says why)."""
    import inspect

    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    processor_class = processor_class_from_name(name) if isinstance(name, str) else None
    if processor_class is None or "video_processor" not in inspect.signature(processor_class.__init__).parameters:
        return None
    try:
        processor = images_only(processor_class).from_pretrained(folder)
    except Exception:  # noqa: BLE001 - the caller reports AutoProcessor's own error
        return None
    log.info("%s without its video processor (torchvision is not installed): images only",
             processor_class.__name__)
    return processor


@dataclass
class VisionPair(TokenizedPair):
    """A tokenized pair whose prompt holds images (data.images.ImageRef), in the order of its image tokens."""
    images: list = field(default_factory=list)


def _structured(messages: list[dict]) -> list[dict]:
    """Every content as a list of parts, as TRL's prepare_multimodal_messages gives them to the template."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
             else m["content"]} for m in messages]


def _ids(processor, text: str, images: list) -> list[int]:
    """The ids of `text` with each image placeholder expanded into the model's image tokens."""
    out = processor(text=[text], images=[images] if images else None, add_special_tokens=False)
    return list(out["input_ids"][0])


def encode_vision_pair(processor, pair, chat_kwargs: dict, report: TokenizeReport) -> VisionPair:
    """The untruncated ids of a pair with images (module docstring: the boundary)."""
    token = processor.image_token
    messages = _structured(prompt_messages(pair))
    prompt_text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **chat_kwargs)
    images = [ref.load() for ref in pair.images or []]
    written = prompt_text.count(token)
    if written != len(images):  # a literal placeholder in the text, or a template that drops image parts
        raise DataError(f"{pair.where}: the rendered prompt holds {written} image token(s) '{token}' for "
                        f"{len(images)} image(s); remove '{token}' from the text (images are given as "
                        "{\"type\": \"image\"} parts), or use the model's own chat template")
    prompt_ids = _ids(processor, prompt_text, images)
    sides = []
    for name, completion in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if token in completion:
            raise DataError(f"{pair.where}: the {name} completion holds the image token '{token}'; a completion "
                            "is text the model writes, remove it")
        full_text = processor.apply_chat_template(
            messages + [{"role": "assistant", "content": [{"type": "text", "text": completion}]}], tokenize=False,
            **chat_kwargs)
        ids = _ids(processor, full_text, images)
        start = 0  # where the two part: the prompt is what both renderings share
        while start < min(len(ids), len(prompt_ids)) and ids[start] == prompt_ids[start]:
            start += 1
        if start < len(prompt_ids):
            report.boundary_merges += 1
        if start == 0 or start >= len(ids):
            raise DataError(f"{pair.where}: the {name} completion produced no tokens after the prompt")
        sides.append((ids, start))
    (chosen_ids, chosen_start), (rejected_ids, rejected_start) = sides
    return VisionPair(chosen_ids, chosen_start, rejected_ids, rejected_start, images=list(pair.images or []))


def tokenize_vision_pairs(processor, pairs: list, cfg, report: TokenizeReport | None = None,
                          kept: list[int] | None = None) -> list[VisionPair]:
    """Every pair (with images or text-only) through the processor, truncated to cutoff_len as text pairs
    are; a cut that would drop image tokens is refused (the features would have no place), a pair with no
    completion token left is dropped and counted as text pairs are. In order; `kept` gets the index of each
    pair returned (cache.py stores it). `cache.tokenize_vision_cached` is this through the tokenization cache."""
    report = report if report is not None else TokenizeReport()
    image_ids = set(processor.image_token_ids)  # where the features go (Gemma 3: not its placeholder, image_token)
    chat_kwargs = dict(cfg.chat_template_kwargs or {})
    out = []
    for index, pair in enumerate(pairs):
        t = encode_vision_pair(processor, pair, {**chat_kwargs, **(pair.chat_template_kwargs or {})}, report)
        cut = truncate_pair(t, cfg.cutoff_len, cfg.truncation_mode, cfg.max_prompt_length,
                            processor.tokenizer.bos_token_id)
        if cut is None:
            report.dropped += 1
            continue
        if cut is not t:
            report.truncated += 1
            for ids, full in ((cut.chosen_ids, t.chosen_ids), (cut.rejected_ids, t.rejected_ids)):
                n_image = sum(i in image_ids for i in full)
                if sum(i in image_ids for i in ids) != n_image:
                    raise DataError(f"{pair.where}: cutoff_len {cfg.cutoff_len} (or max_prompt_length) cuts into "
                                    f"its {n_image} image tokens; raise cutoff_len to at least "
                                    f"{max(len(t.chosen_ids), len(t.rejected_ids))}")
            cut = VisionPair(cut.chosen_ids, cut.chosen_start, cut.rejected_ids, cut.rejected_start, True, t.images)
        out.append(cut)
        if kept is not None:
            kept.append(index)
    if report.boundary_merges:
        log.warning("%d of %d pairs have a token that spans the prompt/completion boundary; it is scored as "
                    "completion", report.boundary_merges, len(pairs))
    return out


@dataclass
class VisionExample(TokenizedExample):
    """A tokenized unpaired (kto) example whose prompt holds images (data.images.ImageRef), in token order."""
    images: list = field(default_factory=list)


def tokenize_vision_examples(processor, examples: list, cfg, report: TokenizeReport | None = None) -> list:
    """kto's examples through the processor, as `tokenize_vision_pairs` does pairs (an unpaired example as a pair
    whose two completions are its one, `tokenization.as_pair`, as `tokenize_examples` does for text): an
    `UnpairedExample` gives one, a pair two (chosen desirable, rejected undesirable), each with its prompt's images;
    one that cannot fit is left out and counted. In order."""
    out, kept = [], []
    tokenized = tokenize_vision_pairs(processor, [as_pair(e) for e in examples], cfg, report, kept)
    for t, example in zip(tokenized, (examples[i] for i in kept)):
        if isinstance(example, PreferencePair):
            out += [VisionExample(t.chosen_ids, t.chosen_start, True, images=t.images),
                    VisionExample(t.rejected_ids, t.rejected_start, False, images=t.images)]
        else:
            out.append(VisionExample(t.chosen_ids, t.chosen_start, example.label, images=t.images))
    return kl_neighbours(out)


def collate_vision_chosen(pairs: list[VisionPair], pad_token_id: int, index: list[int] | None = None, *,
                          processor, multiple: int | None = None, lockstep: bool = False) -> dict:
    """sft: `batching.collate_chosen`'s B rows (each pair's chosen), plus the image tensors of the pairs' images in
    row order (each row its own: logps.OWN_IMAGES) and the processor's mm_token_type_ids where it makes them; a
    blank image's tensors for a batch without images under a lockstep engine (`collate_vision`)."""
    batch = collate_chosen(pairs, pad_token_id, index, multiple=multiple)
    images = [ref for p in pairs for ref in p.images]
    batch.update(media(processor, images, batch["input_ids"]))
    return _with_blank_image(batch, processor) if not images and lockstep else batch


def collate_vision_unpaired(examples: list[VisionExample], pad_token_id: int, index: list[int] | None = None, *,
                            processor, multiple: int | None = None, lockstep: bool = False) -> dict:
    """`batching.collate_unpaired`'s rows, plus the image tensors of the examples' images in row order (each row its
    own: logps.OWN_IMAGES) and the processor's mm_token_type_ids of the rows and of the KL rows (kl_*), where it makes
    them. A KL row is its example's prompt (its images) with another completion, so the two passes take the same
    image tensors. KL rows are not cut to the examples' width, as TRL's vision collator (its text path cuts them)."""
    batch = collate_unpaired(examples, pad_token_id, index, multiple, cut_kl=False)
    images = [ref for e in examples for ref in e.images]
    kl = media(processor, images, batch["kl_input_ids"])
    batch.update(media(processor, images, batch["input_ids"]))
    batch.update({f"kl_{k}": v for k, v in kl.items() if k in ("mm_token_type_ids", "token_type_ids")})
    # without images under a lockstep engine: a blank image for both passes (the examples' and the KL rows')
    return _with_blank_image(batch, processor) if not images and lockstep else batch


def collate_vision(pairs: list[VisionPair], pad_token_id: int, index: list[int] | None = None, *,
                   processor, multiple: int | None = None, lockstep: bool = False, packed: bool = False) -> dict:
    """`batching.collate`'s rows (padded to a multiple of `multiple` where given; `collate_packed`'s one row with
    `packed`), plus the image processor's
    tensors of the pairs' images in pair order, once (the rejected rows hold the chosen rows' images, in the same
    order: `logps._rows_media` encodes them once for both), and the processor's mm_token_type_ids of the rows
    where it makes them (1 on image tokens); none for a batch without images, except under a
    lockstep engine (FSDP2, ZeRO-3: `lockstep`), where such a batch carries a blank image's tensors as
    idle_pixel_values etc. (logps.IDLE): the vision part runs on it, times 0, as it runs on the other processes."""
    # padding_free (packed): the same 2B sequences in one row (`batching.collate_packed`), their image tokens in the
    # same order
    batch = collate_packed(pairs, pad_token_id, index) if packed else collate(pairs, pad_token_id, index, multiple)
    images = [ref for p in pairs for ref in p.images]  # once: the rejected rows hold the chosen rows' images
    batch.update(media(processor, images, batch["input_ids"]))
    return _with_blank_image(batch, processor) if not images and lockstep else batch


def _with_blank_image(batch: dict, processor) -> dict:
    """`batch` (without images) plus a blank image's tensors as idle_pixel_values etc. (logps.IDLE): under a lockstep
    engine the vision part runs on it, times 0, as it runs on the images of the other processes."""
    from PIL import Image

    from preftune.logps import IDLE

    blank = Image.new("RGB", (56, 56))  # (a multiple of Qwen2-VL's 28-pixel merged patches)
    batch.update({IDLE + k: v for k, v in _image_tensors(processor, [blank]).items()})
    return batch


def media(processor, images: list, input_ids: torch.Tensor) -> dict:
    """The image processor's tensors of `images` (data.images.ImageRef, in the order of the image tokens of the
    rows of `input_ids`), and the processor's mm_token_type_ids (Gemma 3: token_type_ids) where it makes them; {}
    without images."""
    if not images:
        return {}
    out = _image_tensors(processor, [ref.load() for ref in images])
    if getattr(processor, "return_mm_token_type_ids", False):
        # Qwen2-VL's M-RoPE finds the image tokens by these; Gemma 3 attends both ways within an image by them, under
        # the name its processor gives them (and its model takes): token_type_ids
        key = "mm_token_type_ids" if "mm_token_type_ids" in processor.model_input_names else "token_type_ids"
        out[key] = torch.tensor(processor.create_mm_token_type_ids(input_ids))  # (rows, T)
    return out


def _image_tensors(processor, images: list) -> dict:
    """The image processor's tensors of the PIL `images`, less what the model does not take (Gemma 3's num_crops),
    as the processor's own call leaves it out."""
    out = processor.image_processor(images=images, return_tensors="pt")
    return {k: v for k, v in out.items() if k not in processor.unused_input_names}


def vision_prompt_texts(processor, prompts: list, chat_kwargs: dict | None = None) -> list[str]:
    """The prompts (pairs with or without images) rendered by the processor's chat template with the generation
    prompt, one image placeholder per image (as `encode_vision_pair` renders a pair's prompt): what vLLM gets
    with the images, and expands itself."""
    out = []
    for pair in prompts:
        text = processor.apply_chat_template(_structured(prompt_messages(pair)), tokenize=False,
                                             add_generation_prompt=True,
                                             **{**(chat_kwargs or {}), **(pair.chat_template_kwargs or {})})
        if text.count(processor.image_token) != len(pair.images or []):
            raise DataError(f"{pair.where}: the rendered prompt holds {text.count(processor.image_token)} image "
                            f"token(s) '{processor.image_token}' for {len(pair.images or [])} image(s); remove "
                            f"'{processor.image_token}' from the text (images are given as {{\"type\": \"image\"}} "
                            "parts), or use the model's own chat template")
        out.append(text)
    return out


def encode_vision_prompts(processor, prompts: list, chat_kwargs: dict | None = None) -> list[list[int]]:
    """The prompts as transformers' generate gets them: `vision_prompt_texts` with each image placeholder expanded
    into the model's image tokens."""
    return [_ids(processor, text, [ref.load() for ref in pair.images or []])
            for pair, text in zip(prompts, vision_prompt_texts(processor, prompts, chat_kwargs))]


def completion_banned_ids(processor) -> list[int]:
    """The token ids a sampled completion must not hold: the model's image tokens and the processor's placeholder.
    Scored with the prompt's images (eval's KL), a completion's image token would ask for an image's features that
    are not there; a trained model all but never writes one, a random-init test model does."""
    ids = {i for i in processor.image_token_ids if i is not None}
    ids.add(processor.tokenizer.convert_tokens_to_ids(processor.image_token))
    return sorted(ids)


def describe(processor) -> dict[str, str]:
    """How pairs are rendered, for the log and summary.json (as tokenization.describe_rendering's)."""
    return {"used": f"the processor's chat template ({type(processor).__name__})",
            "why": "a vision-language model: its processor renders every pair, with or without images"}

