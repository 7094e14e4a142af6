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
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from preftune.errors import ConfigError
from preftune.losses import LOSSES, REFERENCE_FREE, UNPAIRED_LOSSES, loss_options
from preftune.optim import OPTIMIZERS, SCHEDULERS


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
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward instead of storing them (less memory, about a third more compute).")
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
    padding_free: bool = _f(False, "Put a micro-batch's sequences back to back in one row (position ids restart at each) instead of padding them to the longest: no compute spent on pad tokens, the same log-probs. It pays with attn_implementation flash_attention_2 (varlen kernels) or flex_attention; with sdpa or eager it is correct but attention spans the whole row. Not with pref_loss: kto.")
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
    early_stopping_patience: int | None = _f(None, "Stop after this many evaluations without a lower eval loss; the best model is kept.")
    save_steps: int | None = _f(None, "Write a checkpoint every N optimizer steps.")
    save_total_limit: int | None = _f(2, "Keep at most this many step checkpoints.")
    save_only_model: bool = _f(False, "Checkpoints hold the model only (no optimizer state).")
    plot_loss: bool = _f(True, "Write dpo_metrics/training_curves.png.")
    report_to: str = _f("none", "Accepted for LLaMA-Factory configs; preftune writes its own reports.")
    resume_from_checkpoint: str | None = _f(None, "A checkpoint-N folder to continue from, or true for the latest complete one in output_dir; the resumed run reaches the same metrics and weights as an uninterrupted one.")
    dataloader_num_workers: int = _f(0, "Accepted for LLaMA-Factory configs; batches are built in-process.")
    ddp_timeout: int | None = _f(None, "Accepted for LLaMA-Factory configs.")
    progress_bar: bool = _f(True, "Show a tqdm progress bar.")

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
    def pref_losses(self) -> list[str]:
        """pref_loss as a list of loss names (it is stored as written: one name or a comma list)."""
        return [name.strip() for name in self.pref_loss.split(",")]

    @property
    def is_kto(self) -> bool:
        """pref_loss: kto, trained on unpaired examples (pairs are split into one of each label)."""
        return self.stage == "dpo" and self.pref_losses == ["kto"]

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
        return dataclasses.asdict(self)


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
}

# Keys whose values are translated, not just renamed.
_SPECIAL = ("mixed_precision",)

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = get_type_hints(TrainConfig)


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
        name = ALIASES.get(key, key)
        if name not in _FIELDS:
            raise ConfigError(f"{source}: unknown key '{key}'.{_closest(key)}")
        if name in set_by:
            raise ConfigError(f"{source}: '{set_by[name]}' and '{key}' both set {name}; keep one")
        set_by[name] = key
        values[name] = _coerce(name, value)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


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
    _validate_adapters(cfg)
    if cfg.stage == "sft":
        for key, default in (("pref_loss", "sigmoid"), ("ref_model", None), ("precompute_ref_log_probs", False),
                             ("loss_weights", None)):
            if values[key] != default:
                bad(f"{key}: stage: sft trains on completions alone, with no preference loss or reference; remove "
                    f"{key} (or use stage: dpo)")
    if not (cfg.pref_beta > 0 and math.isfinite(cfg.pref_beta)):
        bad(f"pref_beta (beta) must be a positive number; got {cfg.pref_beta}")
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
        if not all(math.isfinite(w) and w >= 0 for w in cfg.loss_weights):
            bad(f"loss_weights must be numbers >= 0; got {cfg.loss_weights}")
    if not 0 <= cfg.label_smoothing < 0.5:
        bad(f"label_smoothing must be in [0, 0.5) (a share of flipped labels; robust divides by 1 - 2 * label_smoothing); "
            f"got {cfg.label_smoothing}")
    if cfg.label_smoothing > 0 and not any("label_smoothing" in loss_options(name) for name in names):
        users = ", ".join(name for name in LOSS_NAMES if "label_smoothing" in loss_options(name))
        bad(f"label_smoothing: pref_loss {cfg.pref_loss} does not use it; set it to 0 or choose one of {users}")
    if "exo_pair" in names and cfg.label_smoothing == 0:
        bad("label_smoothing: exo_pair needs label_smoothing > 0 (its loss has log(label_smoothing)); the paper uses 1e-3")
    if not (cfg.discopop_tau > 0 and math.isfinite(cfg.discopop_tau)):
        bad(f"discopop_tau must be a positive number; got {cfg.discopop_tau}")
    if not (cfg.simpo_gamma >= 0 and math.isfinite(cfg.simpo_gamma)):
        bad(f"simpo_gamma must be a number >= 0 (SimPO's target reward margin); got {cfg.simpo_gamma}")
    if cfg.ref_model and not cfg.uses_reference:
        bad(f"ref_model: pref_loss {cfg.pref_loss} is reference-free and loads no reference model; remove ref_model")
    if not (cfg.pref_bco_weight >= 0 and math.isfinite(cfg.pref_bco_weight)):
        bad(f"pref_bco_weight must be a number >= 0; got {cfg.pref_bco_weight}")
    if cfg.precompute_ref_log_probs and not cfg.uses_reference:
        bad(f"precompute_ref_log_probs: pref_loss {cfg.pref_loss} is reference-free and has no reference to "
            "precompute; remove precompute_ref_log_probs")
    if cfg.pref_bco_weight > 0 and not cfg.uses_reference:
        bad(f"pref_bco_weight: BCO needs the reference and pref_loss {cfg.pref_loss} is reference-free "
            "(LLaMA-Factory ignores it there); set it to 0")
    if not (cfg.pref_ftx >= 0 and math.isfinite(cfg.pref_ftx)):
        bad(f"pref_ftx must be a number >= 0 (the weight of the chosen NLL term); got {cfg.pref_ftx}")
    validate_loss_options(cfg)
    if cfg.bf16 and cfg.fp16:
        bad("bf16 and fp16 are both true; choose one")
    _validate_precision(cfg)
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "cutoff_len", "logging_steps",
                 "logps_chunk_size"):
        if values[name] < 1:
            bad(f"{name} must be at least 1; got {values[name]}")
    for name in ("per_device_eval_batch_size", "eval_steps", "save_steps", "early_stopping_patience",
                 "save_total_limit", "max_samples"):
        value = values[name]
        if value is not None and value < 1:
            bad(f"{name} must be at least 1 (or unset); got {value}")
    if cfg.cutoff_len < 2:
        bad("cutoff_len must leave room for a prompt and a completion token (at least 2)")
    if cfg.learning_rate <= 0:
        bad(f"learning_rate must be positive; got {cfg.learning_rate}")
    if cfg.num_train_epochs <= 0 and cfg.max_steps <= 0:
        bad("num_train_epochs must be positive (or set max_steps)")
    if cfg.val_size < 0:
        bad(f"val_size must be >= 0; got {cfg.val_size}")
    if not 0 <= cfg.warmup_ratio < 1:
        bad(f"warmup_ratio must be in [0, 1); got {cfg.warmup_ratio}")
    if cfg.weight_decay < 0 or cfg.max_grad_norm < 0:
        bad("weight_decay and max_grad_norm must be >= 0")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        bad(f"dropout must be in [0, 1); got {cfg.dropout}")
    if cfg.columns:
        known = ("prompt", "chosen", "rejected", "system", "completion", "label")
        for key in cfg.columns:
            if key not in known:
                bad(f"columns: '{key}' is not a standard field; map your field names to {', '.join(known)}")
    if cfg.max_prompt_length is not None and cfg.max_prompt_length < 1:
        bad(f"max_prompt_length must be at least 1 (or unset); got {cfg.max_prompt_length}")
    if cfg.preprocessing_num_workers is not None and cfg.preprocessing_num_workers < 1:
        bad(f"preprocessing_num_workers must be at least 1 (or unset); got {cfg.preprocessing_num_workers}")
    if cfg.num_samples < 1 or cfg.max_new_tokens < 1:
        bad(f"num_samples and max_new_tokens must be at least 1; got {cfg.num_samples}, {cfg.max_new_tokens}")
    if not (cfg.temperature > 0 and math.isfinite(cfg.temperature)):
        bad(f"temperature must be a positive number; got {cfg.temperature}")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        bad(f"top_p must be in (0, 1] (or unset); got {cfg.top_p}")
    if cfg.top_k is not None and cfg.top_k < 1:
        bad(f"top_k must be at least 1 (or unset); got {cfg.top_k}")
    if not (cfg.min_margin >= 0 and math.isfinite(cfg.min_margin)):
        bad(f"min_margin must be a number >= 0; got {cfg.min_margin}")
    if cfg.generate_during_eval < 0:
        bad(f"generate_during_eval must be >= 0 (prompts to sample at each evaluation); got {cfg.generate_during_eval}")
    for name in ("health_max_length_growth", "health_max_train_val_gap", "health_max_kl", "health_min_accuracy", "health_max_val_loss_rise",
                 "health_max_chosen_drop", "health_max_rejected_drop"):
        if not (values[name] >= 0 and math.isfinite(values[name])):
            bad(f"{name} must be a number >= 0; got {values[name]}")
    if cfg.early_stopping_patience and cfg.eval_strategy == "no":
        bad("early_stopping_patience needs evaluation; remove eval_strategy: no")


def validate_loss_options(cfg: TrainConfig) -> None:
    """KTO, f-DPO, LD-DPO and WPO: the losses each applies to, one line per misuse."""
    names = cfg.pref_losses
    if "kto" in names and len(names) > 1:
        bad = [n for n in names if n != "kto"]
        raise ConfigError(f"pref_loss: kto trains on unpaired examples and cannot be combined with the paired "
                          f"loss(es) {', '.join(bad)}; use pref_loss: kto alone")
    for key, value in (("kto_chosen_weight", cfg.kto_chosen_weight), ("kto_rejected_weight", cfg.kto_rejected_weight)):
        if not (value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{key} must be a number >= 0; got {value}")
        if value != 1.0 and not cfg.is_kto:
            raise ConfigError(f"{key}: only pref_loss: kto weighs desirable/undesirable examples; "
                              f"pref_loss is {cfg.pref_loss}; remove {key}")
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
    if not math.isfinite(cfg.f_alpha_divergence_coef):
        raise ConfigError(f"f_alpha_divergence_coef must be a finite number; got {cfg.f_alpha_divergence_coef}")
    if cfg.f_alpha_divergence_coef != 0.5 and cfg.f_divergence_type != "alpha_divergence":
        raise ConfigError(f"f_alpha_divergence_coef: used only with f_divergence_type: alpha_divergence "
                          f"(it is {cfg.f_divergence_type}); set that or remove f_alpha_divergence_coef")
    if cfg.ld_alpha is not None:
        if not 0 <= cfg.ld_alpha <= 1:
            raise ConfigError(f"ld_alpha must be in [0, 1] (the weight of the tokens beyond the shorter "
                              f"completion); got {cfg.ld_alpha}")
        unfit = [n for n in names if n in REFERENCE_FREE or n == "kto"]
        if unfit:
            raise ConfigError(f"ld_alpha: LD-DPO weights the log-ratios of a pair's completions and does not apply "
                              f"to {', '.join(unfit)} (reference-free or unpaired); remove ld_alpha")
    if cfg.use_weighting:
        unfit = [n for n in names if n in ("aot", "aot_unpaired", "kto")]
        if unfit:
            raise ConfigError(f"use_weighting: WPO's per-pair weights do not apply to {', '.join(unfit)} "
                              "(aot sorts the pairs, as TRL refuses; kto is unpaired); set use_weighting: false")


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
    if cfg.lora_rank < 1:
        bad(f"lora_rank must be at least 1; got {cfg.lora_rank}")
    if cfg.lora_alpha is not None and cfg.lora_alpha <= 0:
        bad(f"lora_alpha must be positive (or unset for 2 x lora_rank); got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        bad(f"lora_dropout must be in [0, 1); got {cfg.lora_dropout}")
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
