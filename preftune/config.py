"""The one typed configuration of a preftune run.

`TrainConfig` is a dataclass: every key a user can write in YAML or on the command line is
a field here, with its default and its help text. Key names follow LLaMA-Factory
(`pref_beta`, `cutoff_len`, `per_device_train_batch_size`, ...) so its DPO YAML runs
unchanged; common other spellings (`beta`, `max_length`, `eval_every`, TRL's `loss_type`, ...)
are accepted as aliases (`ALIASES`). Unknown keys are an error that names the closest key.
Every command reads this one config: `parse_command_line` turns `preftune <command>` arguments
(a positional, `--config FILE`, `--key value` overrides, the command's own flags) into it.

    cfg = load_config("examples/dpo.yaml", ["--pref_beta", "0.2"])
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import logging
import math
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from preftune.errors import ConfigError
from preftune.losses import LOSSES, REFERENCE_FREE, UNPAIRED_LOSSES, loss_options
from preftune.optim import OPTIMIZERS, SCHEDULERS

log = logging.getLogger("preftune")


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field with a default, its help text (shown by `--help` and docs/config.md) and, for a key
    with a fixed set of values, those values (checked by `validate`, listed in the help)."""
    metadata = {"help": help, **({"choices": choices} if choices else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


LOSS_NAMES = [*LOSSES, *UNPAIRED_LOSSES]  # every pref_loss value
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
# LLaMA-Factory's flash_attn values -> transformers' attn_implementation (None: transformers' default)
FLASH_ATTN = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}
# `template` values: the built-in chat templates (tokenization.BUILTIN_TEMPLATES, kept equal by a test)
# and the names that mean raw text, no template
TEMPLATE_NAMES = ("chatml", "qwen", "llama3", "mistral", "gemma", "default")
RAW_TEMPLATE_NAMES = ("none", "empty", "plain")
# pref_loss values Liger's fused linear DPO loss (liger-kernel 0.8.5) computes as losses.py does, under
# the same names: enable_liger_kernel takes these. Not ipo (Liger refuses it), sigmoid_norm (no length
# average in Liger), aot / aot_unpaired (sorted over the batch), kto_pair, and the reference-free ones.
LIGER_LOSSES = ("sigmoid", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
                "discopop")


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------
    model_name_or_path: str | None = _f(None, "Hugging Face model id or local folder of the policy (usually an SFT checkpoint). Unset: the embedded demo.")
    ref_model: str | None = _f(None, "Reference model id or folder. Unset (or 'same_as_policy'): a frozen copy of the starting policy.")
    trust_remote_code: bool = _f(False, "Allow model code from the model's repository (off unless you trust it).")
    torch_dtype: str = _f("auto", "dtype the weights are loaded in (auto: as the checkpoint stores them; bfloat16 with pure_bf16). Trainable weights are then held in float32 unless pure_bf16.", TORCH_DTYPES)
    attn_implementation: str | None = _f(None, "Passed to transformers: eager, sdpa, flash_attention_2, flex_attention.")
    flash_attn: str = _f("auto", "LLaMA-Factory's attention key, another way to set attn_implementation: auto (transformers' default), disabled (eager), sdpa, fa2 (flash_attention_2: needs the flash-attn package and a CUDA GPU).", tuple(FLASH_ATTN))
    finetuning_type: str = _f("full", "full (every weight), freeze (only some layers, freeze_* keys) or lora (peft adapters, lora_* keys).", ("full", "freeze", "lora"))
    stage: str = _f("dpo", "LLaMA-Factory stage: dpo (a preference loss, pref_loss) or sft (supervised fine-tuning on completions, what `preftune sft` runs; no reference).", ("dpo", "sft"))
    do_train: bool = _f(True, "LLaMA-Factory flag; must be true for preftune train.")
    # LoRA, freeze, QLoRA and adapters (LLaMA-Factory names and semantics; preftune/adapters.py)
    lora_rank: int = _f(8, "LoRA rank r (finetuning_type: lora).")
    lora_alpha: int | None = _f(None, "LoRA alpha (default 2 x lora_rank); the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch's input.")
    lora_target: str = _f("all", "Modules that get LoRA adapters: all (every linear layer but the LM head), or a comma list of module names, e.g. q_proj,v_proj.")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    additional_target: str | None = _f(None, "Comma list of modules trained fully and saved with the adapter (peft modules_to_save), e.g. embed_tokens,lm_head.")
    adapter_name_or_path: str | None = _f(None, "Comma list of LoRA adapters the policy starts from: all but the last are merged into the base, the last one continues training (and a frozen copy of it is the reference).")
    freeze_trainable_layers: int = _f(2, "finetuning_type: freeze: train the last N layers (N > 0) or the first -N layers (N < 0); the rest is frozen.")
    freeze_trainable_modules: str = _f("all", "finetuning_type: freeze: comma list of module names inside a layer to train (e.g. mlp,self_attn), or all.")
    freeze_extra_modules: str | None = _f(None, "finetuning_type: freeze: comma list of modules outside the layers to train too, e.g. embed_tokens,norm.")
    quantization_bit: int | None = _f(None, "Load the policy's base weights in 4 or 8 bits through bitsandbytes (QLoRA: needs finetuning_type: lora and a CUDA GPU).")
    ref_model_quantization_bit: int | None = _f(None, "Load a separately loaded reference (ref_model, or the frozen copy of full/freeze) in 4 or 8 bits (CUDA GPU).")
    ref_model_adapters: str | None = _f(None, "Comma list of LoRA adapters merged into ref_model.")
    torch_compile: bool = _f(False, "Compile the policy's (and a separately loaded reference's) transformer layers with torch.compile (dynamic shapes: batches differ in length). The first steps pay the compilation; the numbers are the eager ones (within float noise). Not with fsdp yet.")
    torch_compile_backend: str | None = _f(None, "torch.compile's backend (unset: inductor).")
    torch_compile_mode: str | None = _f(None, "torch.compile's mode: default, reduce-overhead, max-autotune (unset: default).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward instead of storing them (less memory, about a third more compute).")
    gradient_checkpointing_kwargs: dict[str, Any] | None = _f(None, "Arguments of gradient_checkpointing_enable, e.g. {use_reentrant: true} (default {use_reentrant: false}).")
    neftune_noise_alpha: float | None = _f(None, "NEFTune: add uniform noise of scale alpha / sqrt(sequence length x hidden size) to the input embeddings while training (not in evaluation or generation), as transformers. Unset: off; the paper uses 5.")
    save_adapter_only: bool | None = _f(None, "finetuning_type: lora: true writes only the adapter (adapter_config.json, adapter_model.safetensors), false merged full weights; unset: merged for LoRA, the adapter for QLoRA (quantization_bit).")

    # --- precomputed reference log-probs (preftune/reference.py) ------------------------
    precompute_ref_log_probs: bool = _f(False, "Run the reference once over the training and validation pairs before training, cache its log-probs on disk and free it: no reference model in memory while training. No kl/eval_kl columns then; not with pref_loss: kto.")
    ref_logps_cache_dir: str | None = _f(None, "Folder of the precomputed reference log-probs, reused by later runs with the same reference, data and precision (default: $XDG_CACHE_HOME/preftune/ref_logps, else ~/.cache/preftune/ref_logps).")

    # --- preference objective -----------------------------------------------------------
    pref_beta: float = _f(0.1, "beta: strength of the implicit KL constraint to the reference (higher = stay closer).")
    pref_loss: str = _f("sigmoid", f"Preference loss (sigmoid is DPO): {', '.join(n for n in LOSSES if n not in REFERENCE_FREE)}; {', '.join(UNPAIRED_LOSSES)} (unpaired data; pairs are split); reference-free: {', '.join(n for n in LOSSES if n in REFERENCE_FREE)}. A comma list (or YAML list) sums several, weighted by loss_weights (docs/losses.md).")
    loss_weights: list[float] | None = _f(None, "Weights of the losses in pref_loss, same length (default: all 1.0); the loss is sum_k w_k * mean over pairs of loss_k, as TRL.")
    label_smoothing: float = _f(0.0, "Share eps in [0, 0.5) of preference labels assumed flipped: cDPO for sigmoid, robust DPO for robust, the label smoothing of exo_pair (needs eps > 0; paper: 1e-3), aot and aot_unpaired. Other losses refuse eps > 0.")
    discopop_tau: float = _f(0.05, "Temperature tau of the discopop loss's log-ratio modulation (paper and TRL default 0.05).")
    simpo_gamma: float = _f(0.5, "SimPO's target reward margin gamma (>= 0, in reward units, after beta; LLaMA-Factory default 0.5).")
    pref_bco_weight: float = _f(0.0, "Weight w of LLaMA-Factory's BCO term (with its running reward shift): loss becomes (loss + w * bco) / (1 + w). Needs a loss with the reference.")
    pref_ftx: float = _f(0.0, "Weight of the SFT term added to any loss: pref_ftx * (NLL of the chosen completion per token, per pair), as LLaMA-Factory.")
    # KTO, f-DPO, LD-DPO and WPO (docs/losses.md)
    kto_chosen_weight: float = _f(1.0, "KTO's weight of desirable examples (lambda_D; TRL's desirable_weight). pref_loss: kto only.")
    kto_rejected_weight: float = _f(1.0, "KTO's weight of undesirable examples (lambda_U; TRL's undesirable_weight). pref_loss: kto only.")
    f_divergence_type: str = _f("reverse_kl", "f-DPO's divergence to the reference: reverse_kl (DPO), forward_kl, js_divergence, alpha_divergence (TRL). pref_loss: sigmoid only.", F_DIVERGENCES)
    f_alpha_divergence_coef: float = _f(0.5, "alpha of f_divergence_type: alpha_divergence (TRL default 0.5; 1 is reverse_kl).")
    ld_alpha: float | None = _f(None, "LD-DPO's alpha in [0, 1]: each pair's tokens beyond the shorter completion's length count alpha times in the log-probs. Unset: off. Paired losses with the reference only.")
    use_weighting: bool = _f(False, "WPO: weight each pair's loss by the policy's own per-token probability of both completions (TRL's use_weighting). Not with aot, aot_unpaired, kto.")

    # --- data ---------------------------------------------------------------------------
    dataset: str | None = _f(None, "Comma list of dataset names from <dataset_dir>/dataset_info.json, files (JSON, JSONL, CSV, Parquet), save_to_disk folders, or hub ids; folders and hub ids take an optional :split.")
    dataset_dir: str = _f("data", "Folder holding dataset_info.json and the files it names.")
    eval_dataset: str | dict[str, str] | None = _f(None, "Validation data, same forms as `dataset`; overrides val_size. A mapping of names to data ({in_domain: a.jsonl, ood: b.jsonl}) evaluates several sets: the first is the validation set (eval_* metrics, early stopping), each other one is logged as eval_<name>_*.")
    val_size: float = _f(0.0, "Held-out share (0..1) or count (>= 1) of the training pairs used for validation.")
    columns: dict[str, str] | None = _f(None, "Field names of your data for the standard ones, e.g. {prompt: question, chosen: good, rejected: bad} (files and hub datasets; dataset_info.json entries have their own).")
    shuffle: bool = _f(False, "Shuffle the training pairs (seeded by seed) after reading, before the validation split.")
    max_samples: int | None = _f(None, "Use at most this many pairs from each dataset (first ones, before the split).")
    template: str | None = _f(None, "How to render the data. Unset: conversational data (messages) through the tokenizer's chat template, plain strings as raw text (BOS as the tokenizer adds it, EOS appended). A name (LLaMA-Factory's: qwen, chatml, llama3, mistral, gemma, default): everything through a chat template, the tokenizer's own, or that built-in for a tokenizer without one. none (or empty, plain, raw): raw text whatever the tokenizer holds.")
    cutoff_len: int = _f(1024, "Maximum tokens of prompt + completion, split between them as LLaMA-Factory does (a completion under half stays whole, else a prompt under half stays whole, else both shrink in proportion); completions keep their start.")
    drop_invalid_pairs: bool = _f(False, "Skip (and count) pairs with chosen == rejected instead of failing. An empty completion is a valid answer (EOS or the end-of-turn token alone) and is trained on.")
    preprocessing_num_workers: int | None = _f(None, "Processes that tokenize the pairs (unset or 1: in-process; sets under 512 pairs always are).")
    overwrite_cache: bool = _f(False, "Re-tokenize and rewrite the tokenization cache instead of loading it.")
    # --- truncation and the tokenization cache ---
    truncation_mode: str = _f("keep_start", "Which end of a prompt that is cut is kept: keep_start (as LLaMA-Factory and TRL 1.16) or keep_end (the words before the answer, BOS kept).", ("keep_start", "keep_end"))
    max_prompt_length: int | None = _f(None, "Cut prompts to at most this many tokens (per truncation_mode) before cutoff_len is applied.")
    tokenized_cache_dir: str | None = _f(None, "Folder of the tokenization cache (default: $XDG_CACHE_HOME or ~/.cache, then preftune/tokenized); files are named by a hash of data, tokenizer and settings.")

    # --- optimisation -------------------------------------------------------------------
    per_device_train_batch_size: int = _f(4, "Preference pairs per micro-batch (each pair is two sequences).")
    per_device_eval_batch_size: int | None = _f(None, "Pairs per evaluation batch (default: the train batch size).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    num_train_epochs: float = _f(3.0, "Epochs over the training pairs (fractions allowed).")
    max_steps: int = _f(-1, "Stop after this many optimizer steps (overrides num_train_epochs when > 0).")
    learning_rate: float = _f(5e-6, "Peak AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    optim: str = _f("adamw_torch", "Optimizer (transformers' names): adamw_torch, adamw_torch_fused, adafactor, sgd, and bitsandbytes' adamw_bnb_8bit, paged_adamw_8bit, paged_adamw_32bit.", ("adamw", *OPTIMIZERS))
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule after warmup (transformers' get_scheduler; every one honours the warmup).", SCHEDULERS)
    lr_scheduler_kwargs: dict[str, Any] | None = _f(None, "Extra arguments of the schedule, e.g. {num_cycles: 2} for cosine_with_restarts, {min_lr_rate: 0.1} for cosine_with_min_lr.")
    warmup_ratio: float = _f(0.0, "Share of optimizer steps used for linear warmup.")
    warmup_steps: int = _f(0, "Warmup steps (overrides warmup_ratio when > 0).")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0 disables clipping).")
    bf16: bool = _f(False, "bfloat16 mixed precision: trainable weights are held in float32 (so the optimizer's small updates are kept), the forward and backward passes autocast to bfloat16; frozen weights stay as loaded (docs/precision.md).")
    pure_bf16: bool = _f(False, "Hold the trainable weights, and so the optimizer state, in bfloat16 instead of float32 (needs bf16: true; loads the weights in bfloat16): half the memory of weights + optimizer state, but updates smaller than bfloat16's resolution (about 1/256 of a weight's size) round away, as most do at DPO's usual learning rates. LLaMA-Factory's key.")
    fp16: bool = _f(False, "float16 mixed precision (GPU only).")
    disable_dropout: bool = _f(True, "Turn dropout off in the policy, as TRL does (log-ratios are then deterministic).")
    dropout: float | None = _f(None, "Set every dropout probability in the policy to this value (implies disable_dropout: false).")
    seed: int = _f(42, "Seed for initialisation, shuffling and dropout.")
    logps_chunk_size: int = _f(1024, "Completion tokens projected through the LM head at once (bounds logits memory).")
    enable_liger_kernel: bool = _f(False, f"Train with Liger's fused linear DPO loss (the liger-kernel package): the LM head and the loss in one pass that computes their gradient as it goes, a few pairs (logps_chunk_size tokens) at a time; on a CUDA GPU also Liger's kernels in the model's layers (RMSNorm, SwiGLU, RoPE) where Liger has them for the architecture. The same numbers. pref_loss: {', '.join(LIGER_LOSSES)}; padded batches (not padding_free, prefix_sharing), not sharded (fsdp), and none of ld_alpha, use_weighting, pref_ftx, pref_bco_weight.")
    padding_free: bool = _f(False, "Put a micro-batch's sequences back to back in one row (position ids restart at each) instead of padding them to the longest: no compute spent on pad tokens, the same log-probs. It pays with attn_implementation flash_attention_2 (varlen kernels) or flex_attention; with sdpa or eager it is correct but attention spans the whole row. Not with pref_loss: kto.")
    prefix_sharing: bool = _f(False, "Run each pair's prompt once for both completions: one row [prompt | chosen | rejected] per pair, a mask that keeps each completion to the prompt and itself, the same log-probs. Fewer tokens through the model when prompts are long (with a 4D mask, so attn_implementation sdpa or eager). Pairs only (not kto, not sft); not with padding_free.")
    group_by_length: bool = _f(False, "Batch pairs of similar length together (each group of 50 batches of the seeded order sorted by length, as transformers' group_by_length): less padding, the same pairs per epoch.")

    # --- sampling and evaluation (preftune sample, preftune eval) -----------------------
    num_samples: int = _f(2, "Completions sampled per prompt (sample: at least 2 to form pairs).")
    max_new_tokens: int = _f(128, "Most tokens generated per completion (it also ends at EOS or the chat template's end of turn).")
    temperature: float = _f(1.0, "Sampling temperature (> 0); 1.0 samples the model's own distribution.")
    top_p: float | None = _f(None, "Nucleus sampling: keep the smallest set of tokens with this much probability. Unset: no cut (plain ancestral sampling, so KL estimates are honest).")
    top_k: int | None = _f(None, "Sample among the k most likely tokens only. Unset: no cut.")
    reward: str | None = _f(None, "What scores a completion: module:function or path/to/file.py:function (called with the prompts and the completions, returns one float each), or a sequence-classification reward model (hub id or folder). Unset: sample writes candidates for people to label.")
    pairing: str = _f("best_worst", "How sample forms pairs from a prompt's scored completions: best_worst (the best against the worst), all (every two whose scores differ by at least min_margin), random (two at random). Ties are skipped and counted.", ("best_worst", "all", "random"))
    min_margin: float = _f(0.0, "Smallest reward difference that makes a pair (ties, equal rewards, never do).")
    prompts: str | None = _f(None, "eval: prompts to sample from and score with `reward` (same forms as dataset; prompt-only records allowed).")
    infer_backend: str = _f("auto", "What generates in preftune sample: huggingface (transformers' generate), vllm (the vllm package, a CUDA GPU; much faster on large models), or auto (vllm when it is installed and a CUDA GPU is present, else huggingface).", ("auto", "huggingface", "vllm"))
    vllm_gpu_util: float = _f(0.7, "infer_backend: vllm: the share of GPU memory vLLM may take for weights and KV cache (LLaMA-Factory's key).")
    vllm_enforce_eager: bool = _f(False, "infer_backend: vllm: no CUDA graphs (starts faster, generates slower; LLaMA-Factory's key).")

    # --- evaluation, logging, saving ----------------------------------------------------
    generate_during_eval: int = _f(0, "At each evaluation, sample one completion for each of the first N validation prompts (temperature, top_p, top_k, max_new_tokens, seed) into <metrics dir>/completions.jsonl, and log their mean length (eval_completion_length). 0: off.")
    health_max_length_growth: float = _f(1.5, "Health report: flag sampled completions (generate_during_eval) growing longer than this many times their length at step 0 (length exploitation).")
    health_max_train_val_gap: float = _f(0.15, "Health report: flag validation loss above training loss by more than this share.")
    health_max_kl: float = _f(1.5, "Health report: flag a per-token KL to the reference above this.")
    health_min_accuracy: float = _f(0.5, "Health report: flag a final held-out preference accuracy below this.")
    health_max_val_loss_rise: float = _f(0.05, "Health report: flag validation loss risen above its best by more than this share.")
    health_max_chosen_drop: float = _f(5.0, "Health report: flag chosen log-probs (summed per sequence) fallen by more than this many nats while margins grow (likelihood displacement).")
    health_max_rejected_drop: float = _f(20.0, "Health report: flag rejected log-probs (summed per sequence) fallen by more than this many nats (collapse toward zero).")
    output_dir: str = _f("output", "Where the model, checkpoints and dpo_metrics/ are written.")
    overwrite_output_dir: bool = _f(False, "A fresh run into an output_dir that holds checkpoint-N folders of an earlier run is refused unless this is true, which deletes them (and best_model/) first. Other outputs are always overwritten.")
    logging_steps: int = _f(10, "Log training metrics every N optimizer steps.")
    eval_steps: int | None = _f(None, "Evaluate every N optimizer steps (default: once per epoch, and at the end).")
    eval_strategy: str = _f("steps", "When to evaluate: steps (every eval_steps), epoch (once per epoch) or no (never); LLaMA-Factory/transformers key.", ("steps", "epoch", "no"))
    early_stopping_patience: int | None = _f(None, "Stop after this many evaluations without a better metric_for_best_model (default: a lower eval_loss); the best model is kept.")
    save_strategy: str = _f("steps", "When to write checkpoint-N folders: steps (every save_steps; none while save_steps is unset), epoch (at the end of each epoch) or no (never); transformers' key.", ("steps", "epoch", "no"))
    save_steps: int | None = _f(None, "Write a checkpoint every N optimizer steps (save_strategy: steps).")
    save_total_limit: int | None = _f(2, "Keep at most this many step checkpoints.")
    save_only_model: bool = _f(False, "Checkpoints hold the model only (no optimizer, scheduler or random state): smaller, but such a checkpoint cannot be resumed (as transformers).")
    load_best_model_at_end: bool = _f(False, "Keep the best evaluation's weights (by metric_for_best_model) in best_model/ and save them as the final model, not the last step's. Needs evaluation.")
    metric_for_best_model: str | None = _f(None, "The evaluation metric that picks the best model (load_best_model_at_end, early stopping, summary.json's best), with or without the eval_ prefix: loss, rewards/accuracies, rewards/margins, eval_<set>_loss, ... Unset: eval_loss.")
    greater_is_better: bool | None = _f(None, "Whether a larger metric_for_best_model is better. Unset: false for names ending in loss, perplexity or kl, true otherwise (transformers: false for names ending in loss).")
    plot_loss: bool = _f(True, "Write dpo_metrics/training_curves.png.")
    report_to: str = _f("none", "Experiment trackers every logged row also goes to (accelerate's): tensorboard, wandb, mlflow, trackio, a comma list (or YAML list) of them, all (every installed one) or none. The metric files are written either way.")
    run_name: str | None = _f(None, "The run's name in wandb, mlflow and trackio (unset: the tracker's own).")
    logging_dir: str | None = _f(None, "TensorBoard's event folder (unset: <output_dir>/runs/<date>_<time>_<host>, as transformers).")
    push_to_hub: bool = _f(False, "Upload the trained model, tokenizer and metric files to the Hugging Face Hub (huggingface_hub; log in with `hf auth login` or set hub_token). The repo is created (or found) before training, so a login problem stops the run at once.")
    hub_model_id: str | None = _f(None, "The Hub repo to push to, 'name' (under your account) or 'org/name'; unset: output_dir's folder name.")
    hub_private_repo: bool | None = _f(None, "Create the repo private (true), public (false), or the Hub's default for your account (unset).")
    hub_strategy: str = _f("every_save", "When to push (TrainingArguments' values): end (once, at the end), every_save (also the model at each checkpoint), checkpoint (also the latest checkpoint into last-checkpoint/, to resume from), all_checkpoints (every checkpoint-N/ folder).", ("end", "every_save", "checkpoint", "all_checkpoints"))
    hub_token: str | None = _f(None, "Token for the Hub (unset: the one `hf auth login` saved, or HF_TOKEN).")
    resume_from_checkpoint: str | None = _f(None, "A checkpoint-N folder to continue from, or true for the latest complete one in output_dir; the resumed run reaches the same metrics and weights as an uninterrupted one.")
    dataloader_num_workers: int = _f(0, "Accepted for LLaMA-Factory configs; batches are built in-process.")
    ddp_timeout: int | None = _f(None, "Accepted for LLaMA-Factory configs.")
    fsdp: str = _f("", "Shard weights, gradients and optimizer state over the processes with FSDP2 (TrainingArguments' words): full_shard, shard_grad_op (keep gathered weights from forward to backward), offload (parameters on the CPU between uses; GPU only). An accelerate config with distributed_type FSDP and fsdp_version 2 does the same. Full, freeze and LoRA (with save_adapter_only: true); docs/distributed.md.")
    deepspeed: str = _f("", "A DeepSpeed JSON config (LLaMA-Factory's examples/deepspeed/ds_z3_config.json): ZeRO stage 2 partitions gradients and optimizer state over the processes, stage 3 the weights too (offload_optimizer/offload_param: to the CPU). Its \"auto\" values are filled from this config; an accelerate config with distributed_type DEEPSPEED does the same. Full, freeze and LoRA (at stage 3 with save_adapter_only: true); docs/distributed.md.")
    progress_bar: bool = _f(True, "Show a tqdm progress bar.")
    skip_nonfinite_steps: int = _f(0, "Optimizer steps with a non-finite (NaN or infinite) loss or gradient norm that may be skipped (gradients dropped; no optimizer or learning-rate step) before the run stops; the count is in summary.json. 0: stop at the first one.")
    resume_override: bool = _f(False, "Resume even though the model, reference, data or loss settings differ from the checkpoint's run (the differences are listed in a warning). Off: such a resume is refused.")

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
        return not self.best_metric.endswith(("loss", "perplexity", "kl"))

    @property
    def keeps_best(self) -> bool:
        """Whether the best evaluation's weights are kept in best_model/ and become the final model."""
        return self.load_best_model_at_end or bool(self.early_stopping_patience)

    @property
    def pref_losses(self) -> list[str]:
        """pref_loss as a list of loss names (it is stored as written: one name or a comma list)."""
        return [name.strip() for name in self.pref_loss.split(",")]

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
        return {"train_val_gap": self.health_max_train_val_gap, "kl_to_reference": self.health_max_kl,
                "heldout_accuracy": self.health_min_accuracy, "val_loss_rising": self.health_max_val_loss_rise,
                "likelihood_displacement": self.health_max_chosen_drop,
                "rejected_collapse": self.health_max_rejected_drop,
                "completion_length_growth": self.health_max_length_growth}

    @property
    def objective(self) -> str:
        """What a step optimises (`step.OBJECTIVES`): dpo on preference pairs, kto on unpaired examples,
        sft on completions."""
        return "sft" if self.stage == "sft" else "kto" if self.is_kto else "dpo"

    def loss_options(self, name: str) -> dict[str, Any]:
        """Loss `name`'s hyperparameters beyond beta, as keyword arguments for its function: the
        config keys named as its keyword-only parameters (`losses.loss_options`)."""
        values = vars(self)
        return {key: values[key] for key in loss_options(name)}

    def to_dict(self) -> dict[str, Any]:
        """Every key; a secret (hub_token) as None: this goes into preftune_config.yaml, summary.json,
        checkpoints and trackers, which may all end up on the Hub."""
        return {**dataclasses.asdict(self), "hub_token": None}


# Other common spellings (TRL's, short ones) -> the canonical field. Listed in docs/config.md.
ALIASES: dict[str, str] = {
    "beta": "pref_beta",
    "loss_type": "pref_loss",
    "model_name": "model_name_or_path",
    "model": "model_name_or_path",
    "max_length": "cutoff_len",
    "train_data_path": "dataset",
    "val_data_path": "eval_dataset",
    "batch_size": "per_device_train_batch_size",
    "num_epochs": "num_train_epochs",
    "eval_every": "eval_steps",
    "save_every": "save_steps",
    "log_every": "logging_steps",
    "dpo_label_smoothing": "label_smoothing",  # LLaMA-Factory's spelling
    "desirable_weight": "kto_chosen_weight",  # TRL's KTOConfig spelling
    "undesirable_weight": "kto_rejected_weight",
    "optimizer": "optim",  # preftune's earlier name
    "evaluation_strategy": "eval_strategy",  # transformers' name before 4.46
    "use_liger_kernel": "enable_liger_kernel",  # TrainingArguments' spelling (LLaMA-Factory's is the field)
}

# Keys whose values are translated, not just renamed.
_SPECIAL = ("mixed_precision",)

# The range of every numeric key, as an interval ("[" closed, "(" open); `validate` refuses a value
# outside it, and NaN or infinity in any float key, before anything loads (NaN passes `x <= 0`
# checks). Integer keys: the bounds are integers. A key that is None (unset) is not checked.
INF = math.inf
BOUNDS: dict[str, str] = {
    # model and adapters
    "lora_rank": "[1, inf)", "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)",
    # preference objective
    "pref_beta": "(0, inf)", "label_smoothing": "[0, 0.5)", "discopop_tau": "(0, inf)", "simpo_gamma": "[0, inf)",
    "pref_bco_weight": "[0, inf)", "pref_ftx": "[0, inf)", "kto_chosen_weight": "[0, inf)",
    "kto_rejected_weight": "[0, inf)", "f_alpha_divergence_coef": "(-inf, inf)", "ld_alpha": "[0, 1]",
    # data
    "val_size": "[0, inf)", "max_samples": "[1, inf)", "cutoff_len": "[2, inf)", "max_prompt_length": "[1, inf)",
    "preprocessing_num_workers": "[1, inf)",
    # optimisation
    "per_device_train_batch_size": "[1, inf)", "per_device_eval_batch_size": "[1, inf)",
    "gradient_accumulation_steps": "[1, inf)", "num_train_epochs": "[0, inf)", "max_steps": "[-1, inf)",
    "learning_rate": "(0, 1e30]", "weight_decay": "[0, inf)", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)",
    "adam_epsilon": "(0, inf)", "warmup_ratio": "[0, 1)", "warmup_steps": "[0, inf)", "max_grad_norm": "[0, inf)",
    "dropout": "[0, 1)", "seed": "[0, 4294967295]", "logps_chunk_size": "[1, inf)",
    # sampling and evaluation
    "num_samples": "[1, inf)", "max_new_tokens": "[1, inf)", "temperature": "(0, inf)", "top_p": "(0, 1]",
    "vllm_gpu_util": "(0, 1]",
    "top_k": "[1, inf)", "min_margin": "[0, inf)", "generate_during_eval": "[0, inf)",
    **{f"health_{name}": "[0, inf)" for name in ("max_length_growth", "max_train_val_gap", "max_kl", "min_accuracy",
                                                 "max_val_loss_rise", "max_chosen_drop", "max_rejected_drop")},
    # logging, saving, the run
    "logging_steps": "[1, inf)", "eval_steps": "[1, inf)", "early_stopping_patience": "[1, inf)",
    "save_steps": "[1, inf)", "save_total_limit": "[1, inf)", "dataloader_num_workers": "[0, inf)",
    "ddp_timeout": "[1, inf)", "skip_nonfinite_steps": "[0, inf)", "neftune_noise_alpha": "(0, inf)",
}
# What a bound means where a bare interval would not say it
BOUND_NOTES = {"max_steps": "-1 or 0: num_train_epochs decides", "val_size": "a share in (0, 1) or a count >= 1",
               "seed": "numpy's seed range", "learning_rate": "fine-tuning uses about 1e-6 to 1e-4",
               "max_grad_norm": "0 turns clipping off",
               "label_smoothing": "a share of flipped labels; robust divides by 1 - 2 * label_smoothing",
               "ld_alpha": "the weight of the tokens beyond the shorter completion"}


def _parse_interval(text: str) -> tuple[float, float, bool, bool]:
    """"[0, 1)" -> (0.0, 1.0, low closed, high open)."""
    low, high = (float(part) for part in text[1:-1].split(","))
    return low, high, text[0] == "[", text[-1] == "]"


def describe_bounds(name: str) -> str:
    """The allowed values of numeric key `name` in words, for messages and docs."""
    low, high, low_in, high_in = _parse_interval(BOUNDS[name])
    integer = _TYPES_BASE[name] is int
    if high == INF and low == -INF:
        words = "a finite number"
    elif high == INF:
        if integer:
            words = f"at least {int(low) if low_in else int(low) + 1}"
        else:
            words = "a positive number" if (low, low_in) == (0, False) else \
                f"a number {'>=' if low_in else '>'} {low:g}"
    else:
        words = f"{'an integer ' if integer else ''}in {BOUNDS[name]}"
    return words + (f" ({BOUND_NOTES[name]})" if name in BOUND_NOTES else "")


def _check_bounds(values: dict[str, Any]) -> None:
    """Every numeric key against BOUNDS, and finiteness for every float (lists and mappings included)."""
    for name, value in values.items():
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, (list, dict)):
            numbers = value.values() if isinstance(value, dict) else value
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ConfigError(f"{name}: NaN and infinity are not allowed; got {value}")
            continue
        if name not in BOUNDS or not isinstance(value, (int, float)):
            continue
        low, high, low_in, high_in = _parse_interval(BOUNDS[name])
        inside = (low <= value if low_in else low < value) and (value <= high if high_in else value < high)
        if not (math.isfinite(value) and inside):
            raise ConfigError(f"{name} must be {describe_bounds(name)}; got {value}")

_TEXT_ONLY = "images and videos are not supported: preftune trains text-only causal language models"
_ONE_PROCESS_GROUP = ("preftune trains on several processes through accelerate launch / torchrun "
                      "(docs/distributed.md), sharded with fsdp: full_shard when the model does not fit")
# Keys of transformers' TrainingArguments and LLaMA-Factory that preftune does not honour, with why
# and what to use instead. Each is accepted at the values in `off` (what the key does when absent:
# null, false, none, or the only behaviour preftune has), so configs that carry them unchanged load;
# any other value is refused with the message. docs/llamafactory-keys.md lists every key.
NOT_HONOURED: dict[str, tuple[tuple, str]] = {
    "fsdp_config": ((None, {}), "set the FSDP2 mode with fsdp: full_shard, shard_grad_op or offload, or launch "
                                "with an accelerate FSDP2 config (docs/distributed.md)"),
    "do_predict": ((None, False), "prediction is `preftune sample` (or `preftune eval` to score completions)"),
    "do_eval": ((None, False, True), "evaluation runs whenever there is validation data (val_size, eval_dataset)"),
    "predict_with_generate": ((None, False), "generation is `preftune sample`; generate_during_eval samples at "
                                             "each evaluation"),
    "logging_strategy": ((None, "steps"), "logging is every logging_steps optimizer steps; set logging_steps"),
    "logging_first_step": ((None, False, True), "step 0 is always evaluated (the baseline) when there is "
                                                "validation data"),
    "logging_nan_inf_filter": ((None, True, False), "every logged value is the mean of what the step computed"),
    "log_level": ((None, "passive", "info", "warning"), "preftune logs at info level (Python's logger "
                                                        "'preftune'); remove log_level"),
    "disable_tqdm": ((None, False), "use progress_bar: false"),
    "save_safetensors": ((None, True), "preftune writes safetensors only"),
    "remove_unused_columns": ((None, True, False), "preftune reads only the columns it needs"),
    "dataloader_pin_memory": ((None, True, False), "batches are built in-process and moved to the device directly"),
    "dataloader_drop_last": ((None, False), "an epoch's last short batch is trained, not dropped; set max_samples "
                                            "to a multiple of the global batch"),
    "dataloader_persistent_workers": ((None, False, True), "batches are built in-process (no workers)"),
    "ddp_find_unused_parameters": ((None, False, True), "set by accelerate"),
    "ddp_backend": ((None, "nccl", "gloo"), "accelerate chooses NCCL with GPUs, gloo without"),
    "include_num_input_tokens_seen": ((None, False, True), "tokens_per_second is always logged"),
    "tf32": ((None, False), "TF32 matmuls are not switched on; set torch.backends.cuda.matmul.allow_tf32 in your "
                            "own launcher, or train in bf16: true"),
    "auto_find_batch_size": ((None, False), "the batch size is the one you set; lower per_device_train_batch_size "
                                            "and raise gradient_accumulation_steps to fit"),
    "eval_accumulation_steps": ((None,), "evaluation pools sums per batch and never holds all predictions"),
    "label_smoothing_factor": ((None, 0, 0.0), "for preference losses use label_smoothing (cDPO / robust DPO)"),
    "optim_args": ((None, ""), "the optimizer takes adam_beta1, adam_beta2, adam_epsilon and weight_decay"),
    "use_cpu": ((None, False, True), "preftune uses the GPU when there is one; hide it with CUDA_VISIBLE_DEVICES="),
    "full_determinism": ((None, False), "a run is deterministic on CPU for a given seed; on GPU set "
                                        "CUBLAS_WORKSPACE_CONFIG and torch.use_deterministic_algorithms yourself"),
    "data_seed": ((None,), "seed sets the data order too"),
    "eval_on_start": ((None, False, True), "step 0 is always evaluated (the baseline) when there is validation data"),
    "save_on_each_node": ((None, False), "the main process writes every file; use a shared output_dir"),
    "average_tokens_across_devices": ((None, False, True), "losses are means over pairs (or completion tokens "
                                                           "for sft) of every process"),
    "quantization_method": ((None, "bnb", "bitsandbytes"), "quantization_bit loads through bitsandbytes only"),
    "double_quantization": ((None, True), "QLoRA always uses double quantization (bitsandbytes nf4 with a "
                                          "quantized scale)"),
    "rope_scaling": ((None,), "context extension by RoPE scaling is not applied; use a model whose config "
                              "already sets it"),
    "mask_history": ((None, False), "multi-turn training data trains on the last assistant turn only"),
    "train_on_prompt": ((None, False), "the loss is over completion tokens only"),
    "pad_to_multiple_of": ((None,), "batches are padded to their longest sequence; padding_free: true removes "
                                    "padding altogether"),
    "packing": ((None, False), "sequences are not concatenated across examples; padding_free: true puts a "
                               "micro-batch's sequences in one row without letting them attend to each other"),
    "use_reentrant_gc": ((None, False), "gradient checkpointing is non-reentrant by default; for the reentrant "
                                        "variant set gradient_checkpointing_kwargs: {use_reentrant: true}"),
    "freeze_vision_tower": ((None, True), _TEXT_ONLY),
    "freeze_multi_modal_projector": ((None, True), _TEXT_ONLY),
    "freeze_language_model": ((None, False), _TEXT_ONLY),
    "image_max_pixels": ((None,), _TEXT_ONLY),
    "image_min_pixels": ((None,), _TEXT_ONLY),
    "video_max_pixels": ((None,), _TEXT_ONLY),
    "video_min_pixels": ((None,), _TEXT_ONLY),
    "video_fps": ((None,), _TEXT_ONLY),
    "video_maxlen": ((None,), _TEXT_ONLY),
    "ray_run_name": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "runtime_env": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "env_vars": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "pip": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "ray_storage_path": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "ray_num_workers": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "resources_per_worker": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "placement_strategy": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "ray_init_kwargs": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
}


def _not_honoured(key: str, value: Any, source: str) -> None:
    """A NOT_HONOURED key: accepted (and without effect) at an off value, else one line with why."""
    off, why = NOT_HONOURED[key]
    if isinstance(value, str) and value.lower() in ("null", "none", "~", "false", "true"):
        value = {"null": None, "none": None, "~": None, "false": False, "true": True}[value.lower()]
    if not any(value == o and type(value) is type(o) for o in off if o is not None) and not (value is None and None in off):
        raise ConfigError(f"{source}: {key}: {value!r} is not honoured: {why}")

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = get_type_hints(TrainConfig)
# the type a key's value has when set: int for `int | None`, list for `list[float] | None`
_TYPES_BASE = {name: next(a for a in get_args(hint) if a is not type(None))
               if get_origin(hint) in (Union, types.UnionType) else hint for name, hint in _TYPES.items()}


def _coerce(key: str, value: Any) -> Any:
    """Parse `value` (from YAML, or a command-line string) into the field's type."""
    hint = _TYPES[key]
    optional = get_origin(hint) is Union or "None" in str(hint)
    base = next((a for a in get_args(hint) if a is not type(None)), hint) if get_args(hint) else hint
    none_words = ("null", "~") if key == "template" else ("null", "none", "~")  # template: none is raw text
    if value is None or (isinstance(value, str) and value.lower() in none_words and optional):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' cannot be null; expected {base.__name__}")
    try:
        if get_origin(base) is dict:  # a mapping of names, from YAML or a --key '{a: b}' override
            if isinstance(value, str):
                value = yaml.safe_load(value)
            value_type = get_args(base)[1] if get_args(base) else str
            scalar = (str,) if value_type is str else (str, int, float, bool)  # dict[str, Any]: scalar values
            if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, scalar) for k, v in value.items()):
                return value
            raise ValueError
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if get_origin(base) is list:  # a YAML list, or a comma list from the command line
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or any(isinstance(v, bool) for v in items):
                raise ValueError
            return [float(v) for v in items]
        if base is str:
            if isinstance(value, list):  # YAML list for a comma-list key
                return ",".join(str(v) for v in value)
            if isinstance(value, (dict, bool)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"config key '{key}' got {value!r}; expected {getattr(base, '__name__', str(base))}"
                      + (" of name: name, e.g. {prompt: question}" if get_origin(base) is dict else ""))


def _closest(key: str) -> str:
    names = list(_FIELDS) + list(ALIASES) + list(_SPECIAL)
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else " Run 'preftune train --help' for the list of keys."


def from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a validated TrainConfig from a flat dict of user keys (aliases allowed)."""
    values: dict[str, Any] = {}
    set_by: dict[str, str] = {}
    for key, value in raw.items():
        field_ = _FIELDS.get(ALIASES.get(key, key))
        choices = field_.metadata.get("choices", ()) if field_ else ()
        if value is False and (key == "mixed_precision" or "no" in choices):
            value = "no"  # YAML 1.1 reads a bare `no` as false: for a key whose values include "no", it meant "no"
        if key == "mixed_precision":  # accelerate's spelling: 'fp16' | 'bf16' | 'no'
            mp = str(value).lower()
            if mp not in ("no", "fp16", "bf16", "fp32", "none"):
                raise ConfigError(f"{source}: mixed_precision must be one of no, fp16, bf16; got {value!r}")
            values["bf16"], values["fp16"] = mp == "bf16", mp == "fp16"
            continue
        if key == "rpo_alpha":  # older TRL: not the same normalisation, so not an alias
            raise ConfigError(f"{source}: rpo_alpha (older TRL) averages the NLL over all chosen tokens of the batch; "
                              "preftune's pref_ftx (LLaMA-Factory) averages it per pair. Use pref_ftx")
        if key == "resume_from_checkpoint" and (isinstance(value, bool) or str(value).lower() in ("true", "false")):
            # true: the latest checkpoint in output_dir (resolved by checkpoints.resume_dir)
            values[key] = "true" if str(value).lower() == "true" else None
            continue
        if key in ("eval_dataset", "val_data_path") and isinstance(value, dict):  # named evaluation sets
            bad_names = [n for n in value if not (isinstance(n, str) and n.replace("_", "").isalnum())]
            if bad_names or not value or not all(isinstance(v, str) and v for v in value.values()):
                raise ConfigError(f"{source}: eval_dataset as a mapping needs names (letters, digits, _) to data, "
                                  f"e.g. {{in_domain: val.jsonl, ood: other.jsonl}}; got {value!r}")
            values["eval_dataset"] = dict(value)
            continue
        if key == "ref_model" and value == "same_as_policy":
            values["ref_model"] = None
            continue
        if key == "stage" and value == "kto":
            raise ConfigError(f"{source}: stage: kto is pref_loss: kto here; use stage: dpo with pref_loss: kto "
                              "(it trains on pairs, or on {prompt, completion, label} records; docs/losses.md)")
        if key == "report_to" and value is None:
            value = "none"
        if key == "deepspeed" and (value is None or str(value).strip().lower() == "none"):
            value = ""  # LLaMA-Factory's way of saying no DeepSpeed
        if key in NOT_HONOURED:
            _not_honoured(key, value, source)
            continue
        name = ALIASES.get(key, key)
        if name not in _FIELDS:
            raise ConfigError(f"{source}: unknown key '{key}'.{_closest(key)}")
        if name in set_by:
            raise ConfigError(f"{source}: '{set_by[name]}' and '{key}' both set {name}; keep one")
        set_by[name] = key
        values[name] = _coerce(name, value)
    _expand_paths(values, set_by, source)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


# Keys that name files or folders (comma lists for some): `~` is expanded here, once, so that every
# reader (transformers, datasets, the existence checks) sees the same path; set to "" (an unset shell
# variable) they are refused rather than read as unset or as the current folder.
PATH_KEYS = ("model_name_or_path", "ref_model", "adapter_name_or_path", "ref_model_adapters", "dataset",
             "dataset_dir", "eval_dataset", "prompts", "output_dir", "reward", "ref_logps_cache_dir",
             "tokenized_cache_dir", "resume_from_checkpoint")


def _expand_one(value: str) -> str:
    """'~/a, b' -> '/home/me/a, b': each entry of a comma list that starts with ~."""
    return ",".join(s.replace(s.strip(), os.path.expanduser(s.strip()), 1) if s.strip().startswith("~") else s
                    for s in value.split(","))


def _expand_paths(values: dict[str, Any], set_by: dict[str, str], source: str) -> None:
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and not value.strip() and key != "resume_from_checkpoint":
            raise ConfigError(f"{source}: {set_by.get(key, key)} is empty (an unset shell variable?); give a path, "
                              "or remove the key")
        if isinstance(value, str):
            values[key] = _expand_one(value)
        elif isinstance(value, dict):  # eval_dataset as a mapping of names to data
            values[key] = {name: _expand_one(v) for name, v in value.items()}


def validate(cfg: TrainConfig) -> None:
    """One clear line for every value preftune cannot train with."""
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    if not cfg.do_train:
        bad("do_train: false has nothing to do in preftune train; set do_train: true")
    values = vars(cfg)
    for name, f in _FIELDS.items():  # keys with a fixed set of values
        choices = f.metadata.get("choices")
        if choices and values[name] not in choices:
            bad(f"{name}: unknown value '{values[name]}'; use {', '.join(choices[:-1])} or {choices[-1]}")
    _check_bounds(values)  # first: every later check may assume finite numbers in range
    if cfg.val_size >= 1 and not float(cfg.val_size).is_integer():
        bad(f"val_size must be {describe_bounds('val_size')}; got {cfg.val_size}")
    _validate_adapters(cfg)
    if cfg.stage == "sft":
        for key, default in (("pref_loss", "sigmoid"), ("ref_model", None), ("precompute_ref_log_probs", False),
                             ("loss_weights", None)):
            if values[key] != default:
                bad(f"{key}: stage: sft trains on completions alone, with no preference loss or reference; remove "
                    f"{key} (or use stage: dpo)")
    names = cfg.pref_losses
    for name in names:
        if name not in LOSS_NAMES:
            match = difflib.get_close_matches(name, LOSS_NAMES, n=1)
            hint = f" Did you mean '{match[0]}'?" if match else ""
            bad(f"pref_loss: unknown loss '{name}'; choose one of {', '.join(LOSS_NAMES)}.{hint}")
    if len(set(names)) < len(names):
        bad(f"pref_loss: '{cfg.pref_loss}' names a loss twice; weight it with loss_weights instead")
    if cfg.loss_weights is not None:
        if len(cfg.loss_weights) != len(names):
            bad(f"loss_weights: {len(cfg.loss_weights)} weights for {len(names)} losses in pref_loss ({cfg.pref_loss}); "
                "give one per loss")
        if not all(w >= 0 for w in cfg.loss_weights):
            bad(f"loss_weights must be numbers >= 0; got {cfg.loss_weights}")
    if cfg.label_smoothing > 0 and not any("label_smoothing" in loss_options(name) for name in names):
        users = ", ".join(name for name in LOSS_NAMES if "label_smoothing" in loss_options(name))
        bad(f"label_smoothing: pref_loss {cfg.pref_loss} does not use it; set it to 0 or choose one of {users}")
    if "exo_pair" in names and cfg.label_smoothing == 0:
        bad("label_smoothing: exo_pair needs label_smoothing > 0 (its loss has log(label_smoothing)); the paper uses 1e-3")
    if cfg.ref_model and not cfg.uses_reference:
        bad(f"ref_model: pref_loss {cfg.pref_loss} is reference-free and loads no reference model; remove ref_model")
    if cfg.precompute_ref_log_probs and not cfg.uses_reference:
        bad(f"precompute_ref_log_probs: pref_loss {cfg.pref_loss} is reference-free and has no reference to "
            "precompute; remove precompute_ref_log_probs")
    if cfg.pref_bco_weight > 0 and not cfg.uses_reference:
        bad(f"pref_bco_weight: BCO needs the reference and pref_loss {cfg.pref_loss} is reference-free "
            "(LLaMA-Factory ignores it there); set it to 0")
    validate_loss_options(cfg)
    if cfg.bf16 and cfg.fp16:
        bad("bf16 and fp16 are both true; choose one")
    _validate_precision(cfg)
    if cfg.num_train_epochs == 0 and cfg.max_steps <= 0:
        bad("num_train_epochs must be positive (or set max_steps)")
    if cfg.columns:
        known = ("prompt", "chosen", "rejected", "system", "completion", "label")
        for key in cfg.columns:
            if key not in known:
                bad(f"columns: '{key}' is not a standard field; map your field names to {', '.join(known)}")
    unknown = set(cfg.fsdp.replace(",", " ").split()) - {"full_shard", "shard_grad_op", "offload", "auto_wrap"}
    if unknown:
        bad(f"fsdp: {', '.join(sorted(unknown))} is not a sharding mode here; use full_shard, shard_grad_op, "
            "offload (or leave fsdp empty for data parallelism)")
    if cfg.early_stopping_patience and cfg.eval_strategy == "no":
        bad("early_stopping_patience needs evaluation; remove eval_strategy: no")
    _validate_inert(cfg)
    _validate_saving_and_tracking(cfg)
    _validate_liger(cfg)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:  # a config is validated more than once in some commands
        _warned.add(message)
        log.warning("%s", message)


def _validate_inert(cfg: TrainConfig) -> None:
    """Options that could not act with the rest of the config: refused when the user would lose what they
    asked for (early stopping, sampled completions), warned once when the run is only not what they wrote."""
    validation = bool(cfg.eval_dataset) or cfg.val_size > 0
    if cfg.template and cfg.template not in TEMPLATE_NAMES + RAW_TEMPLATE_NAMES:
        raise ConfigError(f"template: unknown name '{cfg.template}'; use one of {', '.join(TEMPLATE_NAMES)} "
                          f"(chat templates) or {', '.join(RAW_TEMPLATE_NAMES)} (raw text), or remove template")
    if not validation:
        for key in ("early_stopping_patience", "generate_during_eval"):
            if vars(cfg)[key]:
                raise ConfigError(f"{key}: needs validation data, and there is none; set eval_dataset (a file) or "
                                  f"val_size (a share or count of the training pairs), or remove {key}")
        if cfg.eval_steps:
            _warn_once("eval_steps: no validation data (eval_dataset or val_size), so nothing is evaluated")
        if cfg.load_best_model_at_end:
            _warn_once("load_best_model_at_end: no validation data (eval_dataset or val_size) to pick the best model "
                       "by, so the last step's model is kept")
    if cfg.eval_steps and cfg.eval_strategy != "steps":
        _warn_once(f"eval_steps: ignored with eval_strategy: {cfg.eval_strategy}")
    if cfg.warmup_steps > 0 and cfg.warmup_ratio > 0:
        _warn_once(f"warmup_ratio: {cfg.warmup_ratio} is ignored, warmup_steps: {cfg.warmup_steps} sets the warmup")
    if cfg.save_only_model and not cfg.saves_checkpoints:
        _warn_once("save_only_model: no checkpoints are written (save_steps is unset or save_strategy: no), so it "
                   "changes nothing")
    if cfg.generate_during_eval and cfg.eval_strategy == "no":
        raise ConfigError("generate_during_eval samples at each evaluation, and eval_strategy is no; remove one")
    if cfg.overwrite_output_dir and cfg.resume_from_checkpoint:
        _warn_once("overwrite_output_dir: ignored when resuming (the checkpoints in output_dir are the run's own)")


TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # report_to values (accelerate's trackers), besides all/none


def _validate_saving_and_tracking(cfg: TrainConfig) -> None:
    """report_to, the best-model keys and the NEFTune / gradient checkpointing options."""
    for name in cfg.trackers:
        if name not in (*TRACKERS, "all"):
            raise ConfigError(f"report_to: unknown tracker '{name}'; use {', '.join(TRACKERS)}, all or none "
                              "(a comma list or YAML list for several)")
    if cfg.load_best_model_at_end and cfg.eval_strategy == "no":
        raise ConfigError("load_best_model_at_end needs evaluation to pick the best model; remove eval_strategy: no")
    if cfg.neftune_noise_alpha is not None and not (cfg.neftune_noise_alpha > 0 and math.isfinite(cfg.neftune_noise_alpha)):
        raise ConfigError(f"neftune_noise_alpha must be a positive number (the paper uses 5), or unset; "
                          f"got {cfg.neftune_noise_alpha}")
    if cfg.gradient_checkpointing_kwargs is not None and not cfg.gradient_checkpointing:
        raise ConfigError("gradient_checkpointing_kwargs: used only with gradient_checkpointing: true; set it or "
                          "remove gradient_checkpointing_kwargs")


def validate_loss_options(cfg: TrainConfig) -> None:
    """KTO, f-DPO, LD-DPO and WPO: the losses each applies to, one line per misuse."""
    names = cfg.pref_losses
    if "kto" in names and len(names) > 1:
        bad = [n for n in names if n != "kto"]
        raise ConfigError(f"pref_loss: kto trains on unpaired examples and cannot be combined with the paired "
                          f"loss(es) {', '.join(bad)}; use pref_loss: kto alone")
    for key, value in (("kto_chosen_weight", cfg.kto_chosen_weight), ("kto_rejected_weight", cfg.kto_rejected_weight)):
        if value != 1.0 and not cfg.is_kto:
            raise ConfigError(f"{key}: only pref_loss: kto weighs desirable/undesirable examples; "
                              f"pref_loss is {cfg.pref_loss}; remove {key}")
    if cfg.prefix_sharing:
        if cfg.padding_free:
            raise ConfigError("prefix_sharing and padding_free are two layouts of a batch; choose one (prefix_sharing "
                              "saves the prompt's second pass, padding_free the padding)")
        if cfg.is_kto or cfg.stage == "sft":
            raise ConfigError("prefix_sharing: shares a pair's prompt between chosen and rejected; "
                              f"{'pref_loss: kto' if cfg.is_kto else 'stage: sft'} has no pairs; set prefix_sharing: false")
        if cfg.attention in ("flash_attention_2", "flex_attention"):
            raise ConfigError(f"prefix_sharing: needs a 4D attention mask, which attn_implementation {cfg.attention} "
                              "does not take; use sdpa (or eager), or padding_free for flash-attn")
    if cfg.is_kto:
        if cfg.padding_free:
            raise ConfigError("padding_free: not supported with pref_loss: kto (its KL rows are built per padded batch); "
                              "set padding_free: false")
        if cfg.loss_weights is not None:
            raise ConfigError("loss_weights: weighs several losses, and kto runs alone; remove it (kto_chosen_weight / "
                              "kto_rejected_weight weigh its two kinds of example)")
        if cfg.pref_ftx or cfg.pref_bco_weight:
            key = "pref_ftx" if cfg.pref_ftx else "pref_bco_weight"
            raise ConfigError(f"{key}: not supported with pref_loss: kto (its terms need chosen/rejected pairs); set it to 0")
        if cfg.precompute_ref_log_probs:
            raise ConfigError("precompute_ref_log_probs: not supported with pref_loss: kto (its KL baseline scores "
                              "mismatched prompt/completion rows formed per batch); remove precompute_ref_log_probs")
        if cfg.per_device_train_batch_size < 2 or cfg.eval_batch_size < 2:
            raise ConfigError("per_device_train_batch_size: kto needs at least 2 examples per micro-batch (and per "
                              "eval batch): its KL baseline pairs each prompt with another example's completion")
    if cfg.f_divergence_type != "reverse_kl" and set(names) - {"sft"} != {"sigmoid"}:
        raise ConfigError(f"f_divergence_type: {cfg.f_divergence_type} applies to the sigmoid (DPO) loss only "
                          f"(f-DPO); pref_loss is {cfg.pref_loss}; use pref_loss: sigmoid or f_divergence_type: reverse_kl")
    if cfg.f_alpha_divergence_coef != 0.5 and cfg.f_divergence_type != "alpha_divergence":
        raise ConfigError(f"f_alpha_divergence_coef: used only with f_divergence_type: alpha_divergence "
                          f"(it is {cfg.f_divergence_type}); set that or remove f_alpha_divergence_coef")
    if cfg.ld_alpha is not None:
        unfit = [n for n in names if n in REFERENCE_FREE or n == "kto"]
        if unfit:
            raise ConfigError(f"ld_alpha: LD-DPO weights the log-ratios of a pair's completions and does not apply "
                              f"to {', '.join(unfit)} (reference-free or unpaired); remove ld_alpha")
    if cfg.use_weighting:
        unfit = [n for n in names if n in ("aot", "aot_unpaired", "kto")]
        if unfit:
            raise ConfigError(f"use_weighting: WPO's per-pair weights do not apply to {', '.join(unfit)} "
                              "(aot sorts the pairs, as TRL refuses; kto is unpaired); set use_weighting: false")


def _validate_liger(cfg: TrainConfig) -> None:
    """enable_liger_kernel: the package, and what Liger's fused DPO loss can compute as preftune does."""
    if not cfg.enable_liger_kernel:
        return
    key = "enable_liger_kernel"
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(f"{key}: needs the liger-kernel package, which is not installed; pip install liger-kernel, "
                          f"or remove {key}")
    if cfg.objective != "dpo":
        what = "stage: sft" if cfg.stage == "sft" else "pref_loss: kto"
        raise ConfigError(f"{key}: Liger's fused loss here is its DPO loss on pairs, not {what}; remove {key}")
    names = cfg.pref_losses
    if len(names) > 1 or names[0] not in LIGER_LOSSES:
        raise ConfigError(f"{key}: Liger's fused DPO loss computes one of {', '.join(LIGER_LOSSES)}, not pref_loss: "
                          f"{cfg.pref_loss}; choose one of those, or remove {key} (the chunked LM head, "
                          "logps_chunk_size, bounds the logits memory too)")
    if names == ["sigmoid"] and cfg.label_smoothing > 0:
        raise ConfigError(f"{key}: Liger's sigmoid loss has no label smoothing (cDPO); use pref_loss: robust for "
                          f"noisy labels, or remove {key}")
    if cfg.f_divergence_type != "reverse_kl":
        raise ConfigError(f"{key}: Liger's sigmoid loss is DPO's reverse KL only, not f_divergence_type: "
                          f"{cfg.f_divergence_type}; remove one of the two")
    for option, on, why in (("ld_alpha", cfg.ld_alpha is not None, "weighs tokens in the log-probs"),
                            ("use_weighting", cfg.use_weighting, "weighs each pair's loss"),
                            ("pref_ftx", cfg.pref_ftx > 0, "adds an SFT term"),
                            ("pref_bco_weight", cfg.pref_bco_weight > 0, "mixes in BCO with its reward shift"),
                            ("padding_free", cfg.padding_free, "packs the sequences into one row"),
                            ("prefix_sharing", cfg.prefix_sharing, "shares the prompt in one row per pair")):
        if on:
            raise ConfigError(f"{key}: not with {option} ({option} {why}; Liger's fused loss takes padded pairs and "
                              f"one plain loss); remove one of the two")


def _validate_precision(cfg: TrainConfig) -> None:
    """pure_bf16 and the two spellings of the attention implementation."""
    if cfg.pure_bf16:
        if not cfg.bf16:
            raise ConfigError("pure_bf16: true needs bf16: true (it trains bfloat16 weights under bfloat16 autocast); "
                              "set bf16: true, or remove pure_bf16")
        if cfg.torch_dtype not in ("auto", "bfloat16", "bf16"):
            raise ConfigError(f"pure_bf16: true trains the weights in bfloat16, but torch_dtype: {cfg.torch_dtype} "
                              "loads them otherwise; set torch_dtype: auto (or bfloat16), or remove pure_bf16")
        if cfg.quantization_bit:
            raise ConfigError("pure_bf16: not with quantization_bit (QLoRA keeps peft's float32 adapter and norms); "
                              "remove pure_bf16")
    from_flash_attn = FLASH_ATTN[cfg.flash_attn]  # a known value: validate checked the choices first
    if cfg.attn_implementation and from_flash_attn and cfg.attn_implementation != from_flash_attn:
        raise ConfigError(f"flash_attn: {cfg.flash_attn} means attn_implementation {from_flash_attn}, but "
                          f"attn_implementation is {cfg.attn_implementation}; keep one of the two keys")


def _validate_adapters(cfg: TrainConfig) -> None:
    """The fine-tuning type keys (LoRA, freeze, quantization, adapters) and the reference they imply."""
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    lora = cfg.finetuning_type == "lora"
    values = vars(cfg)
    if "lm_head" in [m.strip() for m in cfg.lora_target.split(",")]:
        # preftune applies the LM head itself, chunked (logps.py), reading its weight directly
        bad("lora_target: lm_head cannot get a LoRA adapter; train it fully with additional_target: lm_head")
    for key in ("use_dora", "use_rslora", "additional_target", "adapter_name_or_path", "save_adapter_only",
                "quantization_bit"):
        if values[key] and not lora:
            bad(f"{key} needs finetuning_type: lora (it is {cfg.finetuning_type})")
    if cfg.freeze_trainable_layers == 0:
        bad("freeze_trainable_layers: 0 trains nothing; use N > 0 for the last N layers, N < 0 for the first -N")
    for key in ("quantization_bit", "ref_model_quantization_bit"):
        if values[key] not in (None, 4, 8):
            bad(f"{key} must be 4 or 8 (or unset); got {values[key]}")
    if cfg.ref_model_adapters and not cfg.ref_model:
        bad("ref_model_adapters needs ref_model (the checkpoint they are merged into)")
    separate_reference = cfg.uses_reference and (cfg.ref_model or not lora or cfg.precompute_ref_log_probs)
    if cfg.ref_model_quantization_bit and not separate_reference:
        bad("ref_model_quantization_bit: no separate reference is loaded (LoRA uses the policy with its adapter "
            "off, a reference-free loss none); set ref_model or remove it")
    if cfg.quantization_bit and cfg.save_adapter_only is False:
        bad("save_adapter_only: false with quantization_bit: merging into 4/8-bit weights loses precision; keep the "
            "adapter (unset save_adapter_only) and merge it into the unquantized base with peft's merge_and_unload")
    if cfg.save_adapter_only and cfg.adapter_name_or_path and "," in cfg.adapter_name_or_path:
        bad("save_adapter_only: the adapter would apply to the base with the first adapters of adapter_name_or_path "
            "merged in, which no folder holds; save merged weights (save_adapter_only: false)")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` pairs from the command line; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got '{arg}'")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"command line: --{key} needs a value")
            value = args[i + 1]
            i += 1
        out[key.replace("-", "_")] = yaml.safe_load(value) if value != "" else ""
        i += 1
    return out


def parse_command_line(args: list[str], positional: str | None = None, flags: dict[str, Any] | None = None,
                       aliases: dict[str, str] | None = None) -> tuple[str | None, list[str], dict[str, Any]]:
    """`preftune <command>` arguments -> (config file, `--key value` overrides, the command's own flags).

    Every command reads the one config the same way: `[POSITIONAL] [--config FILE] [--key value ...]`,
    with `load_config(file, overrides)` then applying the file, the overrides and the validation.
    positional: the config key the command's one positional argument sets (inspect: dataset, export:
    model_name_or_path), or None when it is the config file (train). flags: the command's own options
    (not config keys), name -> default; a bool default makes a switch that takes no value. aliases:
    the command's own names for config keys (export's --data for eval_dataset).
    """
    flags, aliases = flags or {}, aliases or {}
    found = dict(flags)
    config_path, overrides, positional_value = None, [], None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            if positional_value is not None:
                raise ConfigError(f"command line: unexpected argument '{arg}' (after '{positional_value}'); "
                                  "options are --key value")
            positional_value = arg
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if isinstance(flags.get(name), bool):
            if eq:
                raise ConfigError(f"command line: --{name} is a switch and takes no value")
            found[name] = True
            continue
        if not eq:
            if i >= len(args) or args[i].startswith("--"):
                raise ConfigError(f"command line: --{name} needs a value")
            value, i = args[i], i + 1
        if name == "config":
            config_path = value
        elif name in flags:
            found[name] = value
        else:
            overrides += [f"--{aliases.get(name, name)}", value]
    if positional is None:
        if positional_value is not None and config_path is not None:
            raise ConfigError(f"command line: two config files, '{positional_value}' and --config {config_path}")
        config_path = config_path or positional_value
    elif positional_value is not None:
        overrides = [f"--{positional}", positional_value] + overrides
    return config_path, overrides, found


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML (or JSON) config file, apply `--key value` overrides, validate."""
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = p.read_text(encoding="utf-8")
            loaded = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML/JSON: {str(e).splitlines()[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
        raw.update(loaded)
        source = str(path)
    if overrides:
        over = parse_overrides(overrides)
        # an override replaces the value whatever spelling (alias or canonical) the file used
        for key in over:
            name = ALIASES.get(key, key)
            for k in list(raw):
                if ALIASES.get(k, k) == name or (name in ("bf16", "fp16") and k == "mixed_precision"):
                    del raw[k]
        raw.update(over)
    return from_dict(raw, source)


def command_help(args: list[str], usage: str) -> bool:
    """For -h/--help among a command's arguments: print its usage and every config key; True when it did."""
    if not any(a in ("-h", "--help") for a in args):
        return False
    print(usage + help_text())
    return True


def help_text() -> str:
    lines = []
    for name, f in _FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        lines.append(f"  --{name} (default: {default!r}{'; one of ' + ', '.join(choices) if choices else ''})\n"
                     f"      {f.metadata['help']}")
    lines.append("  Aliases: " + ", ".join(f"{a} -> {c}" for a, c in ALIASES.items())
                 + ", mixed_precision (no|fp16|bf16) -> bf16/fp16")
    return "\n".join(lines)
