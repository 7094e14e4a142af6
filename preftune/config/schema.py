"""`TrainConfig`: every key a user can write in YAML or on the command line, with its default, its
help text and its group.

A field is made by its group's maker (`OBJECTIVE(0.1, "help")` is a key of the objective group): the
groups order docs/config.md and focus each command's `--help` on the keys it reads
(`cli.COMMAND_GROUPS`). Values are checked in validation.py; other tools' spellings are
in compat.py.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

from preftune.config.names import (F_DIVERGENCES, FLASH_ATTN, LIGER_LOSSES, LOSSES, OPTIMIZERS, REFERENCE_FREE,
                                   SCHEDULERS, TORCH_DTYPES, UNPAIRED_LOSSES)

# The groups of keys, in the order `--help` and docs/config.md list them: name -> title.
GROUPS = {
    "model": "Model",
    "adapters": "Fine-tuning type: full, freeze, LoRA, QLoRA",
    "reference": "Reference model",
    "objective": "Objective",
    "data": "Data",
    "tokenization": "Rendering and truncation",
    "caches": "Caches",
    "batches": "Batches",
    "optimisation": "Optimisation",
    "precision": "Precision, memory and speed",
    "sampling": "Sampling",
    "rounds": "Iterative DPO (preftune iterate)",
    "evaluation": "Evaluation during training and the best model",
    "health": "Health report",
    "run": "Output folder and seed",
    "saving": "Logging, checkpoints and resuming",
    "hub": "Hugging Face Hub",
    "distributed": "Several processes",
}


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None, *, group: str) -> Any:
    """A field with a default, its help text (shown by `--help` and docs/config.md), its group and, for a
    key with a fixed set of values, those values (checked by `validate`, listed in the help)."""
    metadata = {"help": help, "group": group, **({"choices": choices} if choices else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


MODEL = functools.partial(_f, group="model")
ADAPTERS = functools.partial(_f, group="adapters")
REFERENCE = functools.partial(_f, group="reference")
OBJECTIVE = functools.partial(_f, group="objective")
DATA = functools.partial(_f, group="data")
TOKENIZATION = functools.partial(_f, group="tokenization")
CACHES = functools.partial(_f, group="caches")
BATCHES = functools.partial(_f, group="batches")
OPTIMISATION = functools.partial(_f, group="optimisation")
PRECISION = functools.partial(_f, group="precision")
SAMPLING = functools.partial(_f, group="sampling")
ROUNDS = functools.partial(_f, group="rounds")
EVALUATION = functools.partial(_f, group="evaluation")
HEALTH = functools.partial(_f, group="health")
RUN = functools.partial(_f, group="run")
SAVING = functools.partial(_f, group="saving")
HUB = functools.partial(_f, group="hub")
DISTRIBUTED = functools.partial(_f, group="distributed")


@dataclass
class TrainConfig:
    # --- model: the policy and how transformers loads it (preftune/models.py) ---
    model_name_or_path: str | None = MODEL(None, "Hugging Face model id or local folder of the policy (usually an SFT checkpoint); `preftune train` with no config at all runs the embedded demo.")
    trust_remote_code: bool = MODEL(False, "Allow model code from the model's repository (off unless you trust it).")
    torch_dtype: str = MODEL("auto", "dtype the weights are loaded in (auto: as the checkpoint stores them; bfloat16 with pure_bf16). Trainable weights are then held in float32 unless pure_bf16.", TORCH_DTYPES)
    attn_implementation: str | None = MODEL(None, "Passed to transformers: eager, sdpa, flash_attention_2, flex_attention.")
    model_init_kwargs: dict[str, Any] | None = MODEL(None, "Extra keyword arguments of from_pretrained for the policy and a reference loaded from a path (TRL's key), e.g. {revision: v1.0, use_cache: false}. Keys preftune sets itself from other keys are refused here: torch_dtype/dtype (torch_dtype), attn_implementation (attn_implementation, flash_attn), quantization_config (quantization_bit), trust_remote_code, device_map.")
    flash_attn: str = MODEL("auto", "LLaMA-Factory's attention key, another way to set attn_implementation: auto (transformers' default), disabled (eager), sdpa, fa2 (flash_attention_2: needs the flash-attn package and a CUDA GPU).", tuple(FLASH_ATTN))

    # --- what is trained: full, freeze, LoRA, QLoRA (LLaMA-Factory names and semantics; preftune/adapters.py) ---
    finetuning_type: str = ADAPTERS("full", "full (every weight), freeze (only some layers, freeze_* keys) or lora (peft adapters, lora_* keys).", ("full", "freeze", "lora"))
    lora_rank: int = ADAPTERS(8, "LoRA rank r (finetuning_type: lora).")
    lora_alpha: int | None = ADAPTERS(None, "LoRA alpha (default 2 x lora_rank); the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    lora_dropout: float = ADAPTERS(0.0, "Dropout on the LoRA branch's input.")
    lora_target: str = ADAPTERS("all", "Modules that get LoRA adapters: all (every linear layer but the LM head), or a comma list of module names, e.g. q_proj,v_proj.")
    use_dora: bool = ADAPTERS(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = ADAPTERS(False, "Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    additional_target: str | None = ADAPTERS(None, "Comma list of modules trained fully and saved with the adapter (peft modules_to_save), e.g. embed_tokens,lm_head.")
    adapter_name_or_path: str | None = ADAPTERS(None, "Comma list of LoRA adapters the policy starts from: all but the last are merged into the base, the last one continues training (and a frozen copy of it is the reference).")
    freeze_trainable_layers: int = ADAPTERS(2, "finetuning_type: freeze: train the last N layers (N > 0) or the first -N layers (N < 0); the rest is frozen.")
    freeze_trainable_modules: str = ADAPTERS("all", "finetuning_type: freeze: comma list of module names inside a layer to train (e.g. mlp,self_attn), or all.")
    freeze_extra_modules: str | None = ADAPTERS(None, "finetuning_type: freeze: comma list of modules outside the layers to train too, e.g. embed_tokens,norm.")
    freeze_vision_tower: bool = ADAPTERS(True, "A vision-language model: its vision tower is not trained (full fine-tuning: frozen; lora: no adapters in it), as LLaMA-Factory. No effect on a text-only model (docs/vision.md).")
    freeze_multi_modal_projector: bool = ADAPTERS(True, "A vision-language model: its multi-modal projector (image features into the language model) is not trained, as freeze_vision_tower. No effect on a text-only model.")
    freeze_language_model: bool = ADAPTERS(False, "A vision-language model: its language model (and LM head) is not trained, only the parts whose freeze_* key is false. Refused for a text-only model.")
    quantization_bit: int | None = ADAPTERS(None, "Load the policy's base weights in 4 or 8 bits through bitsandbytes (QLoRA: needs finetuning_type: lora and a CUDA GPU).")
    save_adapter_only: bool | None = ADAPTERS(None, "finetuning_type: lora: true writes only the adapter (adapter_config.json, adapter_model.safetensors), false merged full weights; unset: merged for LoRA, the adapter for QLoRA (quantization_bit).")

    # --- the reference model (preftune/reference.py) ---
    ref_model: str | None = REFERENCE(None, "Reference model id or folder. Unset (or 'same_as_policy'): a frozen copy of the starting policy.")
    ref_model_quantization_bit: int | None = REFERENCE(None, "Load a separately loaded reference (ref_model, or the frozen copy of full/freeze) in 4 or 8 bits (CUDA GPU).")
    ref_model_adapters: str | None = REFERENCE(None, "Comma list of LoRA adapters merged into ref_model.")
    precompute_ref_log_probs: bool = REFERENCE(False, "Run the reference once over the training and validation pairs before training, cache its log-probs on disk and free it: no reference model in memory while training. No KL columns (kl_per_token, kl_per_sequence and their eval_) then; not with pref_loss: kto.")
    sync_ref_model: bool = REFERENCE(False, "TR-DPO (Gorbatovski et al. 2024, TRL's key): every ref_model_sync_steps optimizer steps the reference is soft-updated from the policy, ref = alpha * policy + (1 - alpha) * ref with alpha = ref_model_mixup_alpha (after the step's update, before its evaluation and checkpoint; checkpoints hold the updated reference). LoRA: the reference is a second, frozen adapter, mixed from the trained one. fsdp: each process mixes its own shards of both models (sharded alike, nothing gathered); ZeRO-3: each pair of weights is gathered whole for its mix, one at a time; the checkpoint's reference is gathered whole by the main process and loaded back into each process's part. Not with precompute_ref_log_probs, a reference-free loss, ref_model with LoRA, or ref_model_quantization_bit.")
    ref_model_mixup_alpha: float = REFERENCE(0.6, "sync_ref_model: alpha, the policy's share in ref = alpha * policy + (1 - alpha) * ref (1: the reference becomes the policy). TRL's default 0.6.")
    ref_model_sync_steps: int = REFERENCE(512, "sync_ref_model: tau, the reference is updated after every optimizer step whose number (1-based) is a multiple of it. TRL's default 512.")

    # --- the objective: stage, preference loss and its hyperparameters (docs/losses.md) ---
    stage: str = OBJECTIVE("dpo", "LLaMA-Factory stage: dpo (a preference loss, pref_loss), sft (supervised fine-tuning on completions, what `preftune sft` runs; no reference) or rm (a Bradley-Terry reward model on the pairs, what `preftune rm` runs: a sequence-classification model with one output; docs/reward-model.md); LLaMA-Factory's kto means pref_loss: kto.", ("dpo", "sft", "rm"))
    do_train: bool = OBJECTIVE(True, "LLaMA-Factory flag; must be true for preftune train.")
    pref_beta: float = OBJECTIVE(0.1, "beta: strength of the implicit KL constraint to the reference (higher = stay closer).")
    pref_loss: str = OBJECTIVE("sigmoid", f"Preference loss (sigmoid is DPO): {', '.join(n for n in LOSSES if n not in REFERENCE_FREE)}; {', '.join(UNPAIRED_LOSSES)} (unpaired data; pairs are split); reference-free: {', '.join(n for n in LOSSES if n in REFERENCE_FREE)}. A comma list (or YAML list) sums several, weighted by loss_weights (docs/losses.md).")
    loss_weights: list[float] | None = OBJECTIVE(None, "Weights of the losses in pref_loss, same length (default: all 1.0); the loss is sum_k w_k * mean over pairs of loss_k, as TRL.")
    label_smoothing: float = OBJECTIVE(0.0, "Share eps in [0, 0.5) of preference labels assumed flipped: cDPO for sigmoid, robust DPO for robust, the label smoothing of exo_pair (needs eps > 0; paper: 1e-3), aot and aot_unpaired. Other losses refuse eps > 0.")
    discopop_tau: float = OBJECTIVE(0.05, "Temperature tau of the discopop loss's log-ratio modulation (paper and TRL default 0.05).")
    simpo_gamma: float = OBJECTIVE(0.5, "SimPO's target reward margin gamma (>= 0, in reward units, after beta; LLaMA-Factory default 0.5).")
    pref_bco_weight: float = OBJECTIVE(0.0, "Weight w of LLaMA-Factory's BCO term (with its running reward shift): loss becomes (loss + w * bco) / (1 + w). Needs a loss with the reference.")
    pref_ftx: float = OBJECTIVE(0.0, "Weight of the SFT term added to any loss: pref_ftx * (NLL of the chosen completion per token, per pair), as LLaMA-Factory.")
    # KTO, f-DPO, LD-DPO and WPO (docs/losses.md)
    kto_chosen_weight: float = OBJECTIVE(1.0, "KTO's weight of desirable examples (lambda_D; TRL's desirable_weight). pref_loss: kto only.")
    kto_rejected_weight: float = OBJECTIVE(1.0, "KTO's weight of undesirable examples (lambda_U; TRL's undesirable_weight). pref_loss: kto only.")
    f_divergence_type: str = OBJECTIVE("reverse_kl", "f-DPO's divergence to the reference: reverse_kl (DPO), forward_kl, js_divergence, alpha_divergence (TRL). pref_loss: sigmoid, hinge, ipo, robust, exo_pair, discopop, sigmoid_norm (with sft too), as TRL.", F_DIVERGENCES)
    f_alpha_divergence_coef: float = OBJECTIVE(0.5, "alpha of f_divergence_type: alpha_divergence (TRL default 0.5; 1 is reverse_kl).")
    ld_alpha: float | None = OBJECTIVE(None, "LD-DPO's alpha in [0, 1]: each pair's tokens beyond the shorter completion's length count alpha times in the log-probs. Unset: off. Paired losses with the reference only.")
    router_aux_loss_coef: float | None = OBJECTIVE(None, "Mixture-of-experts models: the weight of the router's load-balancing loss added to the policy's objective (logged as aux_loss), as TRL. Unset: the model config's own router_aux_loss_coef; 0: off. Refused for a model without router logits. LLaMA-Factory: moe_aux_loss_coef (docs/moe.md).")
    center_rewards_coefficient: float | None = OBJECTIVE(None, "stage: rm: adds coef * mean over pairs of (r_chosen + r_rejected)^2 to the reward model's loss, pulling its rewards toward mean zero (TRL's key; Eisenstein et al. 2023, Eq. 2; TRL recommends 0.01). Unset: off.")
    use_weighting: bool = OBJECTIVE(False, "WPO: weight each pair's loss by the policy's own per-token probability of both completions (TRL's use_weighting). Not with aot, aot_unpaired, kto.")

    # --- data (preftune/data.py, docs/data.md) ---
    dataset: str | None = DATA(None, "Comma list of dataset names from <dataset_dir>/dataset_info.json, files (JSON, JSONL, CSV, Parquet), save_to_disk folders, or hub ids; folders and hub ids take an optional :split.")
    dataset_dir: str = DATA("data", "Folder holding dataset_info.json and the files it names.")
    media_dir: str | None = DATA(None, "Folder that relative image paths are read from (LLaMA-Factory's key). Unset: LLaMA-Factory-format data (an images column, <image> placeholders) reads them from dataset_dir, falling back to the path as written, as LLaMA-Factory; TRL-format data from the data file's folder (docs/vision.md).")
    image_max_pixels: int | None = DATA(None, "Images of more pixels are scaled down to this many, keeping their aspect ratio, once when the data is read (LLaMA-Factory's key and rule). Unset: LLaMA-Factory's 768*768 for data in its format, no bound for TRL's format (TRL does not resize).")
    image_min_pixels: int | None = DATA(None, "Images of fewer pixels are scaled up to this many, as image_max_pixels. Unset: LLaMA-Factory's 32*32 for data in its format, no bound for TRL's format.")
    eval_dataset: str | dict[str, str] | None = DATA(None, "Validation data, same forms as `dataset`; overrides val_size. A mapping of names to data ({in_domain: a.jsonl, ood: b.jsonl}) evaluates several sets: the first is the validation set (eval_* metrics, early stopping), each other one is logged as eval_<name>_*.")
    val_size: float = DATA(0.0, "Held-out share (0..1) or count (>= 1) of the training pairs used for validation.")
    columns: dict[str, str] | None = DATA(None, "Field names of your data for the standard ones, e.g. {prompt: question, chosen: good, rejected: bad} (files and hub datasets; dataset_info.json entries have their own).")
    shuffle: bool = DATA(False, "Shuffle the training pairs (seeded by seed) after reading, before the validation split.")
    mix_strategy: str = DATA("concat", "How the entries of a comma list in dataset (and eval_dataset) are mixed, as LLaMA-Factory: concat (one after the other), interleave_under (one of each in turn until the shortest runs out: undersampling), interleave_over (in turn until the longest runs out, the shorter ones repeated: oversampling), interleave_once (in turn, each example once). Interleaving is seeded by seed.", ("concat", "interleave_under", "interleave_over", "interleave_once"))
    interleave_probs: list[float] | None = DATA(None, "With an interleave_* mix_strategy: the probability of each entry of dataset (one per entry, summing to 1); each next example comes from an entry drawn with them (seeded by seed) instead of in turn.")
    mask_history: bool | None = DATA(None, "LLaMA-Factory's key. true: train on the last turn of a multi-turn conversation only, which is what preftune does (sft: the final assistant turn; dpo and kto: the earlier turns are the prompt). false (LLaMA-Factory's sft trains every assistant turn) is refused for stage: sft; for dpo and kto it changes nothing, as in LLaMA-Factory.")
    max_samples: int | None = DATA(None, "Use at most this many pairs from each dataset (first ones, before the split).")
    drop_invalid_pairs: bool = DATA(False, "Skip (and count) pairs with chosen == rejected instead of failing. An empty completion is a valid answer (EOS or the end-of-turn token alone) and is trained on.")

    # --- rendering and truncation (preftune/tokenization.py) ---
    template: str | None = TOKENIZATION(None, "How to render the data. Unset: conversational data (messages) through the tokenizer's chat template, plain strings as raw text (BOS as the tokenizer adds it, EOS appended). A name (LLaMA-Factory's: qwen, qwen3, qwen3_nothink, chatml, llama3, llama4, mistral, gemma, gemma3, glm4, phi4, deepseek3, default): everything through a chat template, the tokenizer's own, or that built-in for a tokenizer without one. qwen2_vl (LLaMA-Factory's, for a Qwen2-VL or Qwen2.5-VL model): its processor's chat template renders the pairs, as LLaMA-Factory's qwen2_vl does (docs/vision.md). none (or empty, plain, raw): raw text whatever the tokenizer holds.")
    enable_thinking: bool | None = TOKENIZATION(None, "Thinking models (LLaMA-Factory's key, passed to the chat template as apply_chat_template's enable_thinking): false trains without the thought, the empty <think> block closing the prompt (as Qwen3 generates with thinking off); true keeps the completion's thought, and an answer without one gets the empty block in front, trained on. Unset: not passed, the template's default (the built-in qwen3's is true, as LLaMA-Factory's). A `chat_template_kwargs` column (TRL) sets it, and other template arguments, per example.")
    preserve_thinking: bool | None = TOKENIZATION(None, "Thinking models (LLaMA-Factory's key, passed to the chat template when true): keep the thoughts of the assistant turns in the prompt's history; by default they are dropped, as the model sees its history when it is used.")
    cutoff_len: int = TOKENIZATION(2048, "Maximum tokens of prompt + completion (default 2048, LLaMA-Factory's, so its YAMLs mean the same here), split between them as LLaMA-Factory does (a completion under half stays whole, else a prompt under half stays whole, else both shrink in proportion); completions keep their start.")
    default_system: str | None = TOKENIZATION(None, "A system prompt for every example that has none (LLaMA-Factory's key: it replaces the template's default system message). Examples with their own system prompt keep it.")
    truncation_mode: str = TOKENIZATION("keep_start", "Which end of a prompt that is cut is kept: keep_start (as LLaMA-Factory and TRL 1.16) or keep_end (the words before the answer, BOS kept).", ("keep_start", "keep_end"))
    max_prompt_length: int | None = TOKENIZATION(None, "Cut prompts to at most this many tokens (per truncation_mode) before cutoff_len is applied.")
    preprocessing_num_workers: int | None = TOKENIZATION(None, "Processes that tokenize the pairs (unset or 1: in-process; sets under 512 pairs always are).")

    # --- caches (preftune cache lists and clears them) ---
    overwrite_cache: bool = CACHES(False, "Re-tokenize and rewrite the tokenization cache instead of loading it.")
    tokenized_cache_dir: str | None = CACHES(None, "Folder of the tokenization cache (default: $XDG_CACHE_HOME or ~/.cache, then preftune/tokenized); files are named by a hash of data, tokenizer and settings.")
    ref_logps_cache_dir: str | None = CACHES(None, "Folder of the precomputed reference log-probs, reused by later runs with the same reference, data and precision (default: $XDG_CACHE_HOME/preftune/ref_logps, else ~/.cache/preftune/ref_logps).")

    # --- batches ---
    per_device_train_batch_size: int = BATCHES(4, "Preference pairs per micro-batch (each pair is two sequences).")
    per_device_eval_batch_size: int | None = BATCHES(None, "Pairs per evaluation batch (default: the train batch size).")
    gradient_accumulation_steps: int = BATCHES(1, "Micro-batches per optimizer step.")
    pad_to_multiple_of: int | None = BATCHES(None, "Pad each padded batch to a multiple of this many tokens (TRL's and LLaMA-Factory's key; tensor cores like multiples of 8): the same numbers, more padding. Unset: to the longest sequence. Not with padding_free, which has no padding.")
    group_by_length: bool = BATCHES(False, "Batch pairs of similar length together (each group of 50 batches of the seeded order sorted by length, as transformers' group_by_length): less padding, the same pairs per epoch.")
    dataloader_num_workers: int = BATCHES(0, "Accepted for LLaMA-Factory configs; batches are built in-process.")

    # --- optimisation (preftune/optim.py) ---
    num_train_epochs: float = OPTIMISATION(3.0, "Epochs over the training pairs (fractions allowed).")
    max_steps: int = OPTIMISATION(-1, "Stop after this many optimizer steps (overrides num_train_epochs when > 0).")
    learning_rate: float = OPTIMISATION(5e-6, "Peak AdamW learning rate.")
    weight_decay: float = OPTIMISATION(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = OPTIMISATION(0.9, "AdamW beta1.")
    adam_beta2: float = OPTIMISATION(0.999, "AdamW beta2.")
    adam_epsilon: float = OPTIMISATION(1e-8, "AdamW epsilon.")
    optim: str = OPTIMISATION("adamw_torch", "Optimizer (transformers' names): adamw_torch, adamw_torch_fused, adafactor, sgd, and bitsandbytes' adamw_bnb_8bit, paged_adamw_8bit, paged_adamw_32bit.", ("adamw", *OPTIMIZERS))
    lr_scheduler_type: str = OPTIMISATION("linear", "Learning-rate schedule after warmup (transformers' get_scheduler; every one honours the warmup).", SCHEDULERS)
    lr_scheduler_kwargs: dict[str, Any] | None = OPTIMISATION(None, "Extra arguments of the schedule, e.g. {num_cycles: 2} for cosine_with_restarts, {min_lr_rate: 0.1} for cosine_with_min_lr.")
    warmup_ratio: float = OPTIMISATION(0.0, "Share of optimizer steps used for linear warmup.")
    warmup_steps: int = OPTIMISATION(0, "Warmup steps (overrides warmup_ratio when > 0).")
    max_grad_norm: float = OPTIMISATION(1.0, "Clip the global gradient norm to this (0 disables clipping).")
    disable_dropout: bool = OPTIMISATION(True, "Turn dropout off in the policy, as TRL does (log-ratios are then deterministic).")
    dropout: float | None = OPTIMISATION(None, "Set every dropout probability in the policy to this value (implies disable_dropout: false).")
    neftune_noise_alpha: float | None = OPTIMISATION(None, "NEFTune: add uniform noise of scale alpha / sqrt(sequence length x hidden size) to the input embeddings while training (not in evaluation or generation), as transformers. Unset: off; the paper uses 5.")
    skip_nonfinite_steps: int = OPTIMISATION(0, "Optimizer steps with a non-finite (NaN or infinite) loss or gradient norm that may be skipped (gradients dropped; no optimizer or learning-rate step) before the run stops; the count is in summary.json. 0: stop at the first one.")

    # --- precision, memory and speed (docs/precision.md, docs/performance.md) ---
    bf16: bool = PRECISION(False, "bfloat16 mixed precision: trainable weights are held in float32 (so the optimizer's small updates are kept), the forward and backward passes autocast to bfloat16; frozen weights stay as loaded (docs/precision.md).")
    pure_bf16: bool = PRECISION(False, "Hold the trainable weights, and so the optimizer state, in bfloat16 instead of float32 (needs bf16: true; loads the weights in bfloat16): half the memory of weights + optimizer state, but updates smaller than bfloat16's resolution (about 1/256 of a weight's size) round away, as most do at DPO's usual learning rates. LLaMA-Factory's key.")
    fp16: bool = PRECISION(False, "float16 mixed precision (GPU only).")
    gradient_checkpointing: bool = PRECISION(False, "Recompute activations in backward instead of storing them (less memory, about a third more compute).")
    gradient_checkpointing_kwargs: dict[str, Any] | None = PRECISION(None, "Arguments of gradient_checkpointing_enable, e.g. {use_reentrant: true} (default {use_reentrant: false}).")
    activation_offloading: bool = PRECISION(False, "Move the activations the policy's forward saves for its backward to CPU memory as they are saved, and back when the backward needs them (weights and tensors under 1 KiB stay): less accelerator memory, two copies per activation over the host link (docs/performance.md). Nothing to offload on a CPU. TRL's key; not with deepspeed (use its offload_param/offload_optimizer).")
    torch_compile: bool = PRECISION(False, "Compile the policy's (and a separately loaded reference's) transformer layers with torch.compile (dynamic shapes: batches differ in length). The first steps pay the compilation; the numbers are the eager ones (within float noise). Not with fsdp yet.")
    torch_compile_backend: str | None = PRECISION(None, "torch.compile's backend (unset: inductor).")
    torch_compile_mode: str | None = PRECISION(None, "torch.compile's mode: default, reduce-overhead, max-autotune (unset: default).")
    logps_chunk_size: int = PRECISION(1024, "Completion tokens projected through the LM head at once (bounds logits memory).")
    enable_liger_kernel: bool = PRECISION(False, f"Train with Liger's fused linear DPO loss (the liger-kernel package): the LM head and the loss in one pass that computes their gradient as it goes, a few pairs (logps_chunk_size tokens) at a time; on a CUDA GPU also Liger's kernels in the model's layers (RMSNorm, SwiGLU, RoPE) where Liger has them for the architecture. The same numbers. pref_loss: {', '.join(LIGER_LOSSES)}; padded batches (not padding_free, prefix_sharing), not sharded (fsdp, ZeRO-3; ZeRO-2 works), and none of ld_alpha, use_weighting, pref_ftx, pref_bco_weight.")
    padding_free: bool = PRECISION(False, "Put a micro-batch's sequences back to back in one row (position ids restart at each) instead of padding them to the longest: no compute spent on pad tokens, the same log-probs. It pays with attn_implementation flash_attention_2 (varlen kernels) or flex_attention; with sdpa or eager it is correct but attention spans the whole row. Not with pref_loss: kto.")
    prefix_sharing: bool = PRECISION(False, "Run each pair's prompt once for both completions: one row [prompt | chosen | rejected] per pair, a mask that keeps each completion to the prompt and itself, the same log-probs. Fewer tokens through the model when prompts are long (with a 4D mask, so attn_implementation sdpa or eager). Pairs only (not kto, not sft); not with padding_free.")

    # --- sampling (preftune sample, preftune eval, generate_during_eval) ---
    num_samples: int = SAMPLING(2, "Completions sampled per prompt (sample: at least 2 to form pairs).")
    max_new_tokens: int = SAMPLING(128, "Most tokens generated per completion (it also ends at EOS or the chat template's end of turn).")
    temperature: float = SAMPLING(1.0, "Sampling temperature (> 0); 1.0 samples the model's own distribution.")
    top_p: float | None = SAMPLING(None, "Nucleus sampling: keep the smallest set of tokens with this much probability. Unset: no cut (plain ancestral sampling, so KL estimates are honest).")
    top_k: int | None = SAMPLING(None, "Sample among the k most likely tokens only. Unset: no cut.")
    reward: str | None = SAMPLING(None, "What scores a completion: module:function or path/to/file.py:function (called with the prompts and the completions, returns one float each), or a sequence-classification reward model (hub id or folder). Unset: sample writes candidates for people to label.")
    pairing: str = SAMPLING("best_worst", "How sample forms pairs from a prompt's scored completions: best_worst (the best against the worst), all (every two whose scores differ by at least min_margin), random (two at random). Ties are skipped and counted.", ("best_worst", "all", "random"))
    min_margin: float = SAMPLING(0.0, "Smallest reward difference that makes a pair (ties, equal rewards, never do).")
    prompts: str | None = SAMPLING(None, "eval: prompts to sample from and score with `reward` (same forms as dataset; prompt-only records allowed).")
    infer_backend: str = SAMPLING("auto", "What generates in preftune sample: huggingface (transformers' generate), vllm (the vllm package, a CUDA GPU; much faster on large models), or auto (vllm when it is installed and a CUDA GPU is present, else huggingface).", ("auto", "huggingface", "vllm"))
    vllm_gpu_util: float = SAMPLING(0.7, "infer_backend: vllm: the share of GPU memory vLLM may take for weights and KV cache (LLaMA-Factory's key).")
    vllm_enforce_eager: bool = SAMPLING(False, "infer_backend: vllm: no CUDA graphs (starts faster, generates slower; LLaMA-Factory's key).")

    # --- iterative DPO (preftune iterate; docs/iterate.md) ---
    rounds: int = ROUNDS(3, "preftune iterate: rounds of sample (from the current policy), score (reward), pair, train DPO, evaluate. The prompts of dataset are split into this many disjoint parts, one per round, when each part holds at least one optimizer step's pairs (per_device_train_batch_size x gradient_accumulation_steps prompts); else every round samples all of them (summary.json says which).")
    round_reference: str = ROUNDS("sft", "preftune iterate: the reference each round's DPO trains against: sft (the starting model, fixed over the rounds: ref_model when set, else model_name_or_path) or previous (the policy the round starts from, the previous round's). The evaluation's KL is always to the starting model.", ("sft", "previous"))
    label_host: str = ROUNDS("127.0.0.1", "preftune iterate without reward: the address each round serves the label page on (as preftune label --host; 127.0.0.1: this machine only, the page has no login).")
    label_port: int = ROUNDS(8765, "preftune iterate without reward: the port of the label page (as preftune label --port; 0 picks a free one, printed in the log).")
    label_min_pairs: int = ROUNDS(0, "preftune iterate without reward: a round trains once this many comparisons are labelled with a preferred completion (ties and skips make no pair). 0: once every comparison of the round is labelled.")

    # --- evaluation during training and the best model ---
    eval_strategy: str = EVALUATION("steps", "When to evaluate: steps (every eval_steps), epoch (once per epoch) or no (never); LLaMA-Factory/transformers key.", ("steps", "epoch", "no"))
    eval_steps: int | None = EVALUATION(None, "Evaluate every N optimizer steps (default: once per epoch, and at the end).")
    generate_during_eval: int = EVALUATION(0, "At each evaluation, sample one completion for each of the first N validation prompts (temperature, top_p, top_k, max_new_tokens, seed) into <metrics dir>/completions.jsonl, and log their mean length (eval_completion_length). 0: off.")
    early_stopping_patience: int | None = EVALUATION(None, "Stop after this many evaluations without a better metric_for_best_model (default: a lower eval_loss); the best model is kept.")
    load_best_model_at_end: bool = EVALUATION(False, "Keep the best evaluation's weights (by metric_for_best_model) in best_model/ and save them as the final model, not the last step's. Needs evaluation.")
    best_model_before_drift: bool = EVALUATION(False, "load_best_model_at_end and early stopping: no evaluation at or after the step where a drift signal of the health report fired (kl_per_sequence, kl_per_token, margin_explosion, completion_length_growth) becomes the best model; with early stopping those evaluations count as without gain. false: the best metric wherever it is (transformers' rule), with a warning when it comes after a drift signal.")
    metric_for_best_model: str | None = EVALUATION(None, "The evaluation metric that picks the best model (load_best_model_at_end, early stopping, summary.json's best), with or without the eval_ prefix: loss, rewards/accuracies, rewards/margins, kl_per_token, eval_<set>_loss, ... (kl, the name before kl_per_token, means kl_per_token). Unset: eval_loss.")
    greater_is_better: bool | None = EVALUATION(None, "Whether a larger metric_for_best_model is better. Unset: false for names ending in loss, perplexity, kl_per_token or kl_per_sequence, true otherwise (transformers: false for names ending in loss).")

    # --- the health report (preftune/health.py) ---
    # The drift thresholds, and where each comes from (docs/pipeline.md, "The health report"). They read the
    # validation set's metrics where the run evaluates (the KL teacher-forced along the dataset's completions).
    # KL per completion, 5 nats: healthy DPO runs measured 1.45-1.9 nats per completion on their own samples (the
    # demo's 3 seeds; issue 22's healthy seeds) and 2.4-2.9 along the demo's validation completions; the runs that
    # broke the language 5.2 on samples and 5.3-6.3 on the validation set (the demo without pref_ftx, half its
    # samples malformed) and 7.2 on samples (issue 22's drifted seed). 5 nats is also the KL of picking the best
    # of ~400 samples of the reference (log n - (n-1)/n), more selection than a few thousand labels can direct.
    health_max_kl_per_sequence: float = HEALTH(5.0, "Health report: flag a KL to the reference above this many nats per completion (eval_kl_per_sequence; without evaluation kl_per_sequence): the policy drifts. Per completion, so it scales with completion length: raise it for long answers.")
    # KL per token, 0.4 nats: twice the healthy demo run's validation KL (0.16-0.20 nats per token), below issue
    # 22's drifted seed (0.59) and what the demo without pref_ftx reached (0.43). The old 1.5 was a level no real
    # run reaches: exp(1.5) is a 4.5x change of the next-token probabilities at every token.
    health_max_kl_per_token: float = HEALTH(0.4, "Health report: flag a KL to the reference above this many nats per completion token (eval_kl_per_token; without evaluation kl_per_token): the policy drifts at every token, whatever the completion lengths.")
    # Margins, 5 reward units (beta x nats): at a margin of 5 the sigmoid loss's gradient weight sigma(-5) is 0.7%:
    # the pairs are fitted and further growth only moves the log-ratios apart. Healthy demo runs (beta 0.1): 0.3-0.7
    # on the validation set, up to 1.0 in training rows; ipo aims at 0.5, hinge at 1.
    health_max_margin: float = HEALTH(5.0, "Health report: flag reward margins (eval_rewards/margins; without evaluation rewards/margins) above this, in reward units (beta x nats): the margins explode.")
    health_max_length_growth: float = HEALTH(1.5, "Health report: flag completions growing longer than this many times their early length (length exploitation): sampled ones (generate_during_eval) against step 0, else the training batches' mean completion length (length/chosen, length/rejected), the last quarter of the logged rows against the first.")
    # Seeds, 2x the median KL of the others: issue 22's healthy seeds spread 1.5-1.9 nats per completion (1.3x) and the
    # demo's 3 seeds 1.24-1.81 offline, 2.60-3.48 after 3 rounds (at most 1.3x); its drifted seed was 7.2 (4.2x).
    health_max_seed_kl_ratio: float = HEALTH(2.0, "Health report across seeds (preftune eval of 3 or more runs of one configuration with different seeds): flag a run whose KL per completion to the reference is above this many times the median KL of the other seeds.")
    health_max_train_val_gap: float = HEALTH(0.15, "Health report: flag validation loss above training loss by more than this share.")
    health_min_accuracy: float = HEALTH(0.5, "Health report: flag a final held-out preference accuracy below this.")
    health_max_val_loss_rise: float = HEALTH(0.05, "Health report: flag validation loss risen above its best by more than this share.")
    health_max_chosen_drop: float = HEALTH(5.0, "Health report: flag chosen log-probs (summed per sequence) fallen by more than this many nats while margins grow (likelihood displacement).")
    health_max_rejected_drop: float = HEALTH(20.0, "Health report: flag rejected log-probs (summed per sequence) fallen by more than this many nats (collapse toward zero).")

    # --- the run's output folder and seed ---
    output_dir: str = RUN("output", "Where the model, checkpoints and the metrics folder (dpo_metrics/; sft_metrics/ for sft, rm_metrics/ for rm) are written.")
    seed: int = RUN(42, "Seed for initialisation, shuffling and dropout.")

    # --- logging, checkpoints, resuming ---
    logging_steps: int = SAVING(10, "Log training metrics every N optimizer steps.")
    plot_loss: bool = SAVING(True, "Write training_curves.png into the metrics folder.")
    report_to: str = SAVING("none", "Experiment trackers every logged row also goes to (accelerate's): tensorboard, wandb, mlflow, trackio, a comma list (or YAML list) of them, all (every installed one) or none. The metric files are written either way.")
    run_name: str | None = SAVING(None, "The run's name in wandb, mlflow and trackio (unset: the tracker's own).")
    logging_dir: str | None = SAVING(None, "TensorBoard's event folder (unset: <output_dir>/runs/<date>_<time>_<host>, as transformers).")
    progress_bar: bool = SAVING(True, "Show a tqdm progress bar.")
    overwrite_output_dir: bool = SAVING(False, "A fresh run into an output_dir that holds checkpoint-N folders of an earlier run is refused unless this is true, which deletes them (and best_model/) first. Other outputs are always overwritten.")
    save_strategy: str = SAVING("steps", "When to write checkpoint-N folders: steps (every save_steps: by default every 500 steps), epoch (at the end of each epoch) or no (never); transformers' key.", ("steps", "epoch", "no"))
    save_steps: int | None = SAVING(500, "Write a checkpoint every N optimizer steps (save_strategy: steps); default 500, transformers' default, so a run longer than 500 steps writes checkpoint-500, ... unless save_strategy: no (null: no step checkpoints either).")
    save_total_limit: int | None = SAVING(2, "Keep at most this many step checkpoints.")
    save_only_model: bool = SAVING(False, "Checkpoints hold the model only (no optimizer, scheduler or random state): smaller, but such a checkpoint cannot be resumed (as transformers).")
    resume_from_checkpoint: str | None = SAVING(None, "A checkpoint-N folder to continue from, or true for the latest complete one in output_dir; the resumed run reaches the same metrics and weights as an uninterrupted one.")
    resume_override: bool = SAVING(False, "Resume even though the model, reference, data or loss settings differ from the checkpoint's run (the differences are listed in a warning). Off: such a resume is refused.")

    # --- the Hugging Face Hub (preftune/hub.py) ---
    push_to_hub: bool = HUB(False, "Upload the trained model, tokenizer and metric files to the Hugging Face Hub (huggingface_hub; log in with `hf auth login` or set hub_token). The repo is created (or found) before training, so a login problem stops the run at once.")
    hub_model_id: str | None = HUB(None, "The Hub repo to push to, 'name' (under your account) or 'org/name'; unset: output_dir's folder name.")
    hub_private_repo: bool | None = HUB(None, "Create the repo private (true), public (false), or the Hub's default for your account (unset).")
    hub_strategy: str = HUB("every_save", "When to push (TrainingArguments' values): end (once, at the end), every_save (also the model at each checkpoint), checkpoint (also the latest checkpoint into last-checkpoint/, to resume from), all_checkpoints (every checkpoint-N/ folder).", ("end", "every_save", "checkpoint", "all_checkpoints"))
    hub_token: str | None = HUB(None, "Token for the Hub (unset: the one `hf auth login` saved, or HF_TOKEN).")

    # --- several processes (docs/distributed.md) ---
    fsdp: str = DISTRIBUTED("", "Shard weights, gradients and optimizer state over the processes with FSDP2 (TrainingArguments' words): full_shard, shard_grad_op (keep gathered weights from forward to backward), offload (parameters on the CPU between uses; GPU only). An accelerate config with distributed_type FSDP and fsdp_version 2 does the same. Full, freeze and LoRA (with save_adapter_only: true); docs/distributed.md.")
    deepspeed: str = DISTRIBUTED("", "A DeepSpeed JSON config (LLaMA-Factory's examples/deepspeed/ds_z3_config.json): ZeRO stage 2 partitions gradients and optimizer state over the processes, stage 3 the weights too (offload_optimizer/offload_param: to the CPU). Its \"auto\" values are filled from this config; an accelerate config with distributed_type DEEPSPEED does the same. Full, freeze and LoRA (at stage 3 with save_adapter_only: true); docs/distributed.md.")
    sequence_parallel_size: int = DISTRIBUTED(1, "Split each sequence over this many processes (DeepSpeed's Ulysses attention, ALST; the name ms-swift and 360-LLaMA-Factory use), for pairs too long for one GPU's activations: each process runs a slice of every row, the processes of a group train on the same pairs, so the data-parallel world is processes / sequence_parallel_size. With deepspeed only (tested at ZeRO-1, 2 and 3); the attention and KV heads must divide by it; attention sdpa, flash_attention_2 or flex_attention; not with padding_free, prefix_sharing, ld_alpha, enable_liger_kernel, generate_during_eval, pref_loss: kto or stage: sft. docs/distributed.md.")
    ddp_timeout: int | None = DISTRIBUTED(None, "Seconds every collective of several processes may wait (torch.distributed's process-group timeout, under DDP, FSDP2 and ZeRO): a process that died or hangs stops the others within it, with one line naming it. Unset: torch's 30 minutes on gloo, 10 on NCCL. Set it above the longest pause between collectives (a large model's checkpoint save), e.g. 1800; docs/distributed.md.")

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size or self.per_device_train_batch_size

    @property
    def mixed_precision(self) -> str:
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"

    @property
    def attention(self) -> str | None:
        """transformers' attn_implementation, as attn_implementation or flash_attn set it (`validate`
        refuses the two disagreeing); None leaves transformers' default."""
        return self.attn_implementation or FLASH_ATTN[self.flash_attn]

    @property
    def trackers(self) -> list[str]:
        """report_to as a list of tracker names ("none": empty; "all" stays, tracking.py resolves it)."""
        names = [n.strip().lower() for n in self.report_to.split(",") if n.strip()]
        return [n for n in names if n != "none"]

    @property
    def best_metric(self) -> str:
        """metric_for_best_model as logged: with the eval_ prefix (transformers adds it the same way)."""
        name = self.metric_for_best_model or "loss"
        return name if name.startswith("eval_") else f"eval_{name}"

    @property
    def best_greater(self) -> bool:
        """Whether a larger best_metric is better (greater_is_better; unset: derived from the name)."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not self.best_metric.endswith(("loss", "perplexity", "kl_per_token", "kl_per_sequence"))

    @property
    def keeps_best(self) -> bool:
        """Whether the best evaluation's weights are kept in best_model/ and become the final model."""
        return self.load_best_model_at_end or bool(self.early_stopping_patience)

    @property
    def pref_losses(self) -> list[str]:
        """pref_loss as a list of loss names (it is stored as written: one name or a comma list)."""
        return [name.strip() for name in self.pref_loss.split(",")]

    @property
    def chat_template_kwargs(self) -> dict[str, Any]:
        """The arguments every apply_chat_template call gets (before an example's own chat_template_kwargs):
        enable_thinking when set, preserve_thinking when true."""
        return {**({"enable_thinking": self.enable_thinking} if self.enable_thinking is not None else {}),
                **({"preserve_thinking": True} if self.preserve_thinking else {})}

    @property
    def is_kto(self) -> bool:
        """pref_loss: kto, trained on unpaired examples (pairs are split into one of each label)."""
        return self.stage == "dpo" and self.pref_losses == ["kto"]

    @property
    def saves_checkpoints(self) -> bool:
        """Whether the run writes checkpoints at all: save_strategy epoch, or steps with save_steps."""
        return self.save_strategy == "epoch" or (self.save_strategy == "steps" and bool(self.save_steps))

    @property
    def final_adapter_only(self) -> bool:
        """Whether the final output of a LoRA run is its adapter (save_adapter_only; unset: only for
        QLoRA, whose 4/8-bit base cannot take a merge without losing precision)."""
        return self.save_adapter_only if self.save_adapter_only is not None else bool(self.quantization_bit)

    @property
    def uses_reference(self) -> bool:
        """Whether any loss in pref_loss needs the reference model (else none is loaded; sft has none)."""
        return self.stage == "dpo" and any(name not in REFERENCE_FREE for name in self.pref_losses)

    @property
    def eval_sets(self) -> dict[str, str]:
        """eval_dataset by name: one set is "validation"; a mapping keeps its names, the first renamed
        "validation" (its metrics are eval_*, the others' eval_<name>_*)."""
        if not self.eval_dataset:
            return {}
        if isinstance(self.eval_dataset, str):
            return {"validation": self.eval_dataset}
        specs = list(self.eval_dataset.items())
        return {"validation": specs[0][1], **dict(specs[1:])}

    @property
    def health_thresholds(self) -> dict[str, float]:
        """The health report's thresholds by signal (`health.SIGNALS`)."""
        return {"train_val_gap": self.health_max_train_val_gap, "kl_per_sequence": self.health_max_kl_per_sequence,
                "kl_per_token": self.health_max_kl_per_token, "margin_explosion": self.health_max_margin,
                "heldout_accuracy": self.health_min_accuracy, "val_loss_rising": self.health_max_val_loss_rise,
                "likelihood_displacement": self.health_max_chosen_drop,
                "rejected_collapse": self.health_max_rejected_drop,
                "completion_length_growth": self.health_max_length_growth}

    @property
    def objective(self) -> str:
        """What a step optimises (`step.STEPS`): dpo on preference pairs, kto on unpaired examples,
        sft on completions, rm (a reward model) on preference pairs."""
        return self.stage if self.stage in ("sft", "rm") else "kto" if self.is_kto else "dpo"

    def loss_options(self, name: str) -> dict[str, Any]:
        """Loss `name`'s hyperparameters beyond beta, as keyword arguments for its function: the
        config keys named as its keyword-only parameters (`losses.loss_options`)."""
        from preftune.losses import loss_options  # torch: imported when a run builds its loss, not to read a config

        values = vars(self)
        return {key: values[key] for key in loss_options(name)}

    def to_dict(self) -> dict[str, Any]:
        """Every key; a secret (hub_token) as None: this goes into preftune_config.yaml, summary.json,
        checkpoints and trackers, which may all end up on the Hub."""
        return {**dataclasses.asdict(self), "hub_token": None}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES = get_type_hints(TrainConfig)
# the type a key's value has when set: int for `int | None`, list for `list[float] | None`
TYPES_BASE = {name: next(a for a in get_args(hint) if a is not type(None))
              if get_origin(hint) in (Union, types.UnionType) else hint for name, hint in TYPES.items()}
