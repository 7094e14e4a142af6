"""Sampling completions from a model, for `preftune sample` and `preftune eval`.

    prompts = encode_prompts(tokenizer, pairs, cfg.template)   # as training renders them
    for start, completions in sample(model, tokenizer, prompts, cfg, device): ...

Prompts are rendered by `tokenization.encode_prompts`, the rendering training uses, so a policy is
sampled in the format it was trained in. Generation is transformers' `generate`: batched prompts,
left-padded, with the KV cache; plain ancestral sampling unless top_k / top_p are set (a cut
distribution would bias the KL estimates of `preftune eval`). Each batch of prompts is seeded by
(seed, its first prompt's position), so a batch gives the same completions whatever ran before it
(a resumed `sample` continues exactly where the killed one stopped). A prompt longer than the model's
context less max_new_tokens is cut from the left first (`fit_context`), and counted.

`preftune sample` can also generate with vLLM (`infer_backend`, `backend`): `vllm_sample` yields
the same (start, completions) batches from the same token ids (a VLM's prompts with images: their text and
images, which vLLM expands into those ids), with the same sampling settings and a seed per prompt, so the
rest of `sample` (rewards, pairs, resume) does not know which engine ran.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

import torch
from transformers import GenerationConfig

from preftune.errors import ConfigError
from preftune.tokenization import encode_prompts, stop_ids

log = logging.getLogger("preftune")

VLLM_CHUNK = 256  # prompts per vLLM call: vLLM batches inside a call; results are written between calls
# torch_dtype's names -> vLLM's (LLM(dtype=...) takes auto, half, float16, bfloat16, float, float32: not bf16, ...)
VLLM_DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
VLLM_MAX_TEMPERATURE = 2.0  # vLLM's SamplingParams refuses higher temperatures; transformers' generate does not


def generation_config(cfg, tokenizer) -> GenerationConfig:
    """The sampling settings of cfg, stated in full: nothing is inherited from a model's own
    generation_config.json (its top_k or repetition penalty would change what is sampled)."""
    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p or 1.0, top_k=cfg.top_k or 0,
                            max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.num_samples,
                            eos_token_id=stop_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, use_cache=True)


def model_context(config) -> int | None:
    """The most positions a model attends over, from its config (max_position_embeddings, GPT-2's
    n_positions); None when the config names none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_context(prompts: list[list[int]], context: int | None, max_new_tokens: int,
                bos_id: int | None = None) -> tuple[list[list[int]], int]:
    """Prompts that fit the model's context with max_new_tokens after them, and how many were cut.

    A longer prompt is cut from the left to its last (context - max_new_tokens) tokens, as TRL's
    keep_end cuts prompts: the end holds the last user turn and the start of the assistant turn the
    model continues, the start the oldest context; a leading BOS is kept. Sampling past the context
    instead runs the positions past what the model was trained on (with RoPE silently, exit 0), and
    refusing would stop a whole run over one long prompt. Callers count the cut ones in their summary."""
    if context is None:
        return prompts, 0
    room = context - max_new_tokens
    if room < 1:
        raise ConfigError(f"max_new_tokens: {max_new_tokens} leaves no room for a prompt in the model's context of "
                          f"{context} tokens (max_position_embeddings); lower max_new_tokens")
    fitted, cut = [], 0
    for ids in prompts:
        if len(ids) > room:
            keep_bos = bos_id is not None and ids[0] == bos_id and room > 1
            ids = [ids[0]] + ids[len(ids) - room + 1:] if keep_bos else ids[len(ids) - room:]
            cut += 1
        fitted.append(ids)
    return fitted, cut


def log_cut(cut: int, total: int, context: int, max_new_tokens: int) -> None:
    if cut:
        log.warning("%d of %d prompts are longer than the model's context (%d tokens, max_position_embeddings) less "
                    "max_new_tokens (%d): cut from the left to their last %d tokens (a leading BOS kept)", cut, total,
                    context, max_new_tokens, context - max_new_tokens)


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    """A generated row up to and including its first stop token (the rest is padding)."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i + 1]
    return ids


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[int]], cfg, device, skip=frozenset(), images=None, processor=None):
    """Yields (position of the batch's first prompt, [[completion ids] * num_samples per prompt]) per
    batch of cfg.eval_batch_size prompts; batches whose prompts are all in `skip` are not generated.
    A vision-language model: `images`, each prompt's images (data.images.ImageRef), go in through its
    `processor`'s image processor (`vision.media`)."""
    gen = generation_config(cfg, tokenizer)
    n = cfg.num_samples
    if processor is not None:  # each prompt's rows are repeated here, with its images (below)
        from preftune.vision import completion_banned_ids

        gen.num_return_sequences = 1
        gen.suppress_tokens = completion_banned_ids(processor)  # no image token in a completion
    stops = list(gen.eos_token_id)
    model.eval()
    for start in range(0, len(prompts), cfg.eval_batch_size):
        batch = prompts[start:start + cfg.eval_batch_size]
        if all(start + i in skip for i in range(len(batch))):
            continue
        width = max(len(p) for p in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        extra = {}
        if processor is not None:
            from preftune.vision import media

            # generate's own num_return_sequences repeats every image tensor row by row, which misplaces the
            # images of a prompt that has several: the rows are repeated here, each with its prompt's images
            input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
            rows = [ref for i in range(len(batch)) for _ in range(n) for ref in images[start + i]]
            extra = {k: v.to(device) for k, v in media(processor, rows, input_ids).items()}
        torch.manual_seed(cfg.seed * 1_000_003 + start)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=gen, **extra)  # (len(batch) * num_samples, width + new), prompt-major
        new = out[:, width:].tolist()
        yield start, [[cut_at_stop(new[i * n + k], stops) for k in range(n)] for i in range(len(batch))]


def sample_texts(model, tokenizer, pairs: list, cfg, device) -> list[tuple[str, int]]:
    """One completion per prompt of `pairs` (cfg's sampling settings and seed), as (text, tokens), for
    the completions a run logs at each evaluation (generate_during_eval). The global random state and
    the model's train/eval mode are left as they were, so training goes on exactly as without it."""
    encoded = encode_prompts(tokenizer, pairs, cfg.template, cfg.chat_template_kwargs)
    was_training, out = model.training, []
    with torch.random.fork_rng():
        for _, batch in sample(model, tokenizer, encoded, dataclasses.replace(cfg, num_samples=1), device):
            out += [(tokenizer.decode(rows[0], skip_special_tokens=True), len(rows[0])) for rows in batch]
    model.train(was_training)
    return out


def backend(cfg) -> str:
    """The engine `preftune sample` generates with: infer_backend, with auto resolved (vLLM when it is
    installed, a CUDA GPU is present, the model loads as vLLM loads it (unquantized) and vLLM takes the
    temperature)."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if cfg.infer_backend == "vllm":
        if not has_vllm:
            raise ConfigError("infer_backend: vllm needs the vllm package (pip install vllm, on a CUDA machine); "
                              "or set infer_backend: huggingface")
        if cfg.quantization_bit:
            raise ConfigError("infer_backend: vllm loads the model unquantized; unset quantization_bit, or set "
                              "infer_backend: huggingface")
        if cfg.temperature > VLLM_MAX_TEMPERATURE:
            raise ConfigError(f"infer_backend: vllm samples at temperatures up to 2 (vLLM's limit); got temperature: "
                              f"{cfg.temperature}; lower it, or set infer_backend: huggingface")
        return "vllm"
    if (cfg.infer_backend == "auto" and has_vllm and torch.cuda.is_available() and not cfg.quantization_bit
            and cfg.temperature <= VLLM_MAX_TEMPERATURE):
        return "vllm"
    return "huggingface"


def vllm_sample(model_name: str, tokenizer, prompts: list[list[int]], cfg, skip=frozenset(), texts=None, images=None,
                banned_ids=()):
    """`sample`'s yields, generated by vLLM from the same prompt token ids. Each prompt gets its own
    seed (seed, its position), so a resumed run samples what an uninterrupted one would have.

    A vision-language model: a prompt with images (`images[i]`, data.images.ImageRef) goes in as vLLM's
    multimodal input, its text as the processor's chat template rendered it (`texts[i]`, one image placeholder
    per image, tokenized without special tokens as `vision._ids` tokenizes it) and its PIL images: vLLM's own
    processor expands the placeholders into the ids `prompts[i]` holds. A prompt without images goes in as its
    ids, as for a text model. `banned_ids` (a VLM's image tokens: `vision.completion_banned_ids`) are not sampled,
    as `sample` suppresses them (a logit bias of -100: vLLM's SamplingParams takes no -inf)."""
    from vllm import LLM, SamplingParams

    stops = stop_ids(tokenizer)
    todo = [i for i in range(len(prompts)) if i not in skip]
    if not todo:
        return
    dtype = VLLM_DTYPES[cfg.torch_dtype]
    if cfg.pure_bf16 and dtype == "auto":  # as the huggingface backend loads the weights (models.load_dtype)
        dtype = "bfloat16"
    most_images = max((len(images[i]) for i in todo), default=0) if images is not None else 0
    # vLLM takes at most limit_mm_per_prompt images per prompt and sizes its encoder cache by it
    mm = {"limit_mm_per_prompt": {"image": most_images}} if most_images else {}
    llm = LLM(model=model_name, tokenizer=model_name, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code,
              dtype=dtype,
              gpu_memory_utilization=cfg.vllm_gpu_util, enforce_eager=cfg.vllm_enforce_eager,
              max_model_len=max(len(prompts[i]) for i in todo) + cfg.max_new_tokens, **mm)

    def params(pos):  # the settings of generation_config, stated in full (nothing from the model's files)
        return SamplingParams(n=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p or 1.0,
                              top_k=cfg.top_k or -1, max_tokens=cfg.max_new_tokens, stop_token_ids=stops,
                              seed=cfg.seed * 1_000_003 + pos,
                              **({"logit_bias": {i: -100.0 for i in banned_ids}} if banned_ids else {}))

    def request(pos):
        if images is None or not images[pos]:
            return {"prompt_token_ids": prompts[pos]}
        return {"prompt": texts[pos], "multi_modal_data": {"image": [ref.load() for ref in images[pos]]}}

    # the chat template wrote the special tokens (BOS among them) already, as training's rendering has them
    text_kwargs = {"tokenization_kwargs": {"add_special_tokens": False}} if most_images else {}
    for c in range(0, len(todo), VLLM_CHUNK):
        chunk = todo[c:c + VLLM_CHUNK]
        outputs = llm.generate([request(i) for i in chunk], [params(i) for i in chunk], use_tqdm=False, **text_kwargs)
        for pos, out in zip(chunk, outputs):  # one prompt per yield: positions need not be contiguous
            yield pos, [[cut_at_stop(list(o.token_ids), stops) for o in out.outputs]]
