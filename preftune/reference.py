"""The reference model pi_ref, as one object that the step asks for log-probs one way.

    policy, reference = load_models(cfg, tokenizer, engine, {"train": train_items, "validation": val_items})
    reference.on("train").logps(batch)        # BatchLogps of the batch's rows, or None without a reference

`load_models` is the one place that decides, from the config, what the reference is:
  - none: a reference-free loss (simpo, orpo, sft); `logps` returns None and nothing is loaded;
  - a frozen separately loaded model: `ref_model` (+ `ref_model_adapters` merged in), or a copy of
    the starting policy (full and freeze runs; a LoRA run with ref_model);
  - the LoRA policy itself with its adapter off, or with a frozen copy of its starting adapter
    (`adapters.AdapterReference`): no second copy of the weights;
  - precomputed (`precompute_ref_log_probs: true`): the reference runs once over the training and
    validation pairs before the policy is loaded, and is then freed, so training holds one model
    (plus its optimizer state) instead of two. Its (N, 2) log-probs per split are looked up by the
    batch's `index`; `on(split)` says which split a batch comes from. No KL then: the KL needs the
    reference's whole next-token distribution, which is not kept.

A moving reference (`sync_ref_model`, TR-DPO): `sync_reference` mixes the policy's weights into the
reference's every `ref_model_sync_steps` optimizer steps (train.py calls it), and a checkpoint holds the
mixed reference (`Reference.save_synced`, `Reference.load_synced`). With LoRA the reference is then always
the frozen `reference` adapter (a copy of the starting adapter, or of the new one), mixed from the trained
adapter's own weights. Under an engine that shards (engines/), the engine says which tensors the mix
reads and writes (FSDP2: each process's shards of both models, sharded alike; ZeRO-3: each pair of weights
gathered whole), and gathers the reference whole for a checkpoint on the main process; every process
loads it back into its part.

Precomputed log-probs are cached in `<ref_logps_cache_dir>/<key>.safetensors`, the key a hash of
everything that changes the numbers:
  - the reference weights. A local folder: name, size and modification time of each file in it
    (cheap, the weights are not read; re-saved or edited weights change size or mtime; a copied
    folder misses once). A hub id: its commit hash (files at a commit never change). The same
    for each adapter merged into it (`ref_model_adapters`, or a LoRA run's adapter_name_or_path),
    and its quantization.
  - the tokenized pairs: every token id and completion start, so data, template, cutoff_len and
    tokenizer changes are all in it; a vision-language model's pairs also their images, by their
    pixels after any resize (data/images.py `ImageRef.digest`), and the image processor's settings.
  - the dtype the reference loads in, mixed precision, the attention implementation, the device
    type, the torch and transformers versions (kernels differ), and this file's CACHE_FORMAT.
A file is written to a temporary name and renamed into place, so a killed run leaves no partial
file under the key. A file that does not load or does not match its key is recomputed and
replaced, never trusted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
from pathlib import Path

import torch
import transformers

from safetensors.torch import load_file, save_file

from preftune.adapters import REFERENCE_ADAPTER, AdapterReference, adapter_pairs, split_names
from preftune.batching import collate
from preftune.errors import ModelError
from preftune.cache import data_fingerprint, key_of, model_fingerprint, read_ref_logps, ref_logps_dir, write_ref_logps
from preftune.evaluate import pair_logps
from preftune.logps import BatchLogps, LogpsModule, get_batch_logps, model_inputs
from preftune.models import (check_same_tokenizer, check_vocabulary, load_dtype, load_policy, load_reference,
                             reference_adapters, reference_name, weight_dtypes)
from preftune.tokenization import TokenizedPair
from preftune.vision import collate_vision

log = logging.getLogger("preftune")

SYNCED_REFERENCE_FILE = "reference.safetensors"  # a checkpoint's moving reference (sync_ref_model)
CACHE_FORMAT = 2  # bump when what a cache file holds, or how it is computed, changes (2: cache.data_fingerprint)


def cache_key(cfg, pairs: list[TokenizedPair], device_type: str, processor=None) -> str:
    """The reference log-probs cache's key (the module docstring). A vision-language model's pairs carry their
    images (`vision.VisionPair.images`), which `data_fingerprint` hashes by their pixels; `processor` adds how its
    image processor turns pixels into pixel_values (size, crop, normalization), which the token ids do not show."""
    image_processor = {"image_processor": processor.image_processor.to_json_string()} if processor is not None else {}
    return key_of({
        **image_processor,
        "format": CACHE_FORMAT,
        "reference": model_fingerprint(cfg.ref_model or cfg.model_name_or_path),
        # the adapters merged into it (models.load_reference), in order
        "adapters": [model_fingerprint(a) for a in split_names(reference_adapters(cfg))],
        "quantization_bit": cfg.ref_model_quantization_bit,
        "data": data_fingerprint(pairs),
        "torch_dtype": str(load_dtype(cfg)),  # bf16 and bfloat16 are one key; pure_bf16 loads bfloat16
        "mixed_precision": cfg.mixed_precision,
        "attn_implementation": cfg.attention,  # flash_attn: sdpa and attn_implementation: sdpa are one key
        "ld_alpha": cfg.ld_alpha,  # LD-DPO weights the reference's tokens too
        "device": device_type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    })


def precompute_reference_logps(cfg, splits: dict[str, list[TokenizedPair]], pad_id: int, engine,
                               tokenizer=None, processor=None) -> dict[str, torch.Tensor]:
    """Every split's reference log-probs, (N, 2) float32 [chosen, rejected] in the split's order,
    from the cache or from one pass of the reference (batched as evaluation is, under the run's
    precision and engine), which is loaded only on a miss and freed before returning (and checked to
    cover `tokenizer`'s vocabulary when given). processor: a vision-language model's (vision.py), whose
    batches carry the pairs' image tensors, as training's do."""
    folder = ref_logps_dir(cfg)
    # every process runs the same batches here, so none needs the lockstep engines' blank image
    collate_fn = functools.partial(collate_vision, processor=processor) if processor is not None else collate
    scorer, tables = None, {}
    for split, pairs in splits.items():
        if not pairs:
            continue
        # with several processes the main one computes and writes first; the others then read its file.
        # A sharded reference needs every process in every forward: all compute, the main one writes
        with contextlib.nullcontext() if engine.lockstep else engine.accelerator.main_process_first():
            key = cache_key(cfg, pairs, engine.device.type, processor)
            path = folder / f"{key}.safetensors"
            logps = read_ref_logps(path, key, len(pairs))
            if logps is None:
                if scorer is None:
                    scorer = _live_reference(cfg, tokenizer, engine)
                progress = "reference log-probs" if cfg.progress_bar and engine.is_main else None
                logps, _ = pair_logps(scorer, pairs, pad_id, cfg.eval_batch_size, cfg.ld_alpha, engine.device,
                                      engine.autocast, progress, collate_fn)
                if engine.is_main:
                    write_ref_logps(path, key, logps)
                log.info("reference log-probs of %d %s pairs computed, cached in %s", len(pairs), split, path)
            else:
                log.info("reference log-probs of %d %s pairs read from %s", len(pairs), split, path)
        tables[split] = logps
    # the point of precomputing: no reference in memory while training
    del scorer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("precompute_ref_log_probs: no KL columns (kl_per_token, kl_per_sequence); the KL needs the reference's "
             "whole next-token distribution at every completion token, which is not cached")
    return tables


def _live_reference(cfg, tokenizer, engine):
    """The separately loaded reference as the module its passes go through (for the precompute pass)."""
    model, runner = _separate_reference(cfg, tokenizer, engine)
    return runner or LogpsModule(model, cfg.logps_chunk_size)


def _separate_reference(cfg, tokenizer=None, engine=None):
    """The frozen reference loaded as a model of its own (`models.load_reference`), checked against the
    tokenizer's vocabulary and prepared by the engine: (the model, the module its passes must go through,
    or None). Without an engine it stays as loaded."""
    name, what = reference_name(cfg)
    model = load_reference(cfg, engine is None or engine.reads_weights_of(name, cfg, what))
    if tokenizer is not None:
        check_vocabulary(model, tokenizer, "ref_model" if cfg.ref_model else "the reference copy")
    return model, engine.prepare_reference(model, cfg.logps_chunk_size) if engine is not None else None


class Reference:
    """pi_ref for the step: `logps(batch)` gives log pi_ref of the batch's rows, or None without a
    reference. `model` is what computes them live (a frozen model or an `AdapterReference`; None when
    precomputed or absent), which is also what the KL to the reference needs. `runner`: the module the
    passes go through where the engine says so (a sharded `LogpsModule`; engines/)."""

    def __init__(self, model=None, tables: dict[str, torch.Tensor] | None = None, chunk_size: int = 1024,
                 split: str | None = None, description: str = "none (reference-free loss)", runner=None,
                 call_head: bool = False):
        self.model, self.tables, self.chunk_size, self.split = model, tables, chunk_size, split
        self.description = description
        self.runner = runner
        self.call_head = call_head  # passes without a runner read the LM head by calling it (`LogpsModule`)

    @property
    def reads_policy_weights(self) -> bool:
        """Whether this reference is the policy's own weights (a LoRA policy's adapter off)."""
        return isinstance(self.model, AdapterReference)

    def on(self, split: str) -> Reference:
        """This reference for batches of `split` ("train", "validation"): which table a precomputed one reads."""
        return Reference(self.model, self.tables, self.chunk_size, split, self.description, self.runner,
                         self.call_head)

    def synced_weights(self, policy) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, the reference's weight, the policy's weight it is mixed from) for every weight a moving
        reference updates (`sync_reference`): a LoRA policy's `reference` adapter and its trained adapter, or
        a separately loaded reference's weights and the policy's of the same name (all, trainable or not, as
        TRL mixes them). Only for a live reference whose weights are its own (sync_ref_model's validation)."""
        if isinstance(self.model, AdapterReference):
            names = {id(p): n for n, p in self.model.policy.named_parameters()}
            return [(names[id(ref)], ref, trained) for ref, trained in adapter_pairs(self.model.policy)]
        own = dict(policy.named_parameters())
        weights = []
        for name, ref in self.model.named_parameters():
            if name not in own or _shape(own[name]) != _shape(ref):
                shape = f"shape {tuple(_shape(own[name]))}" if name in own else "no such weight"
                raise ModelError(f"sync_ref_model: the reference's {name} {tuple(_shape(ref))} has {shape} in the "
                                 "policy; a moving reference needs the policy's architecture (ref_model of the same "
                                 "model), or remove sync_ref_model")
            weights.append((name, ref, own[name]))
        return weights

    def save_synced(self, policy, folder: Path, engine) -> None:
        """Collective: the moving reference's weights (a LoRA run: its `reference` adapter), gathered whole by
        `engine`, into a checkpoint folder being written, by the main process: a resume continues from the
        reference as it was mixed, not the starting one."""
        engine.settle()
        state = {name: engine.whole_tensor(ref) for name, ref, _ in self.synced_weights(policy)}
        if engine.is_main:
            save_file({name: tensor.contiguous() for name, tensor in state.items()}, folder / SYNCED_REFERENCE_FILE)

    @torch.no_grad()
    def load_synced(self, policy, folder: Path, engine) -> bool:
        """Collective: the weights `save_synced` wrote in `folder` into the reference (every process reads the
        file and keeps its part); False where the checkpoint has none (written without sync_ref_model, resumed
        with resume_override: the reference stays the starting one)."""
        path = folder / SYNCED_REFERENCE_FILE
        if not path.is_file():
            return False
        engine.settle()
        state, weights = load_file(path), self.synced_weights(policy)
        if set(state) != {name for name, _, _ in weights}:
            raise ModelError(f"{path}: its weights do not match this run's reference; resume with the run's own "
                             "model and finetuning_type")
        for name, ref, _ in weights:
            engine.load_whole(ref, state[name])
        return True

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor], ld_alpha: float | None = None,
              return_hidden: bool = False) -> BatchLogps | None:
        """log pi_ref of the batch's rows ([chosen; rejected] for pairs): a `BatchLogps` (precomputed:
        its logps only, (2B,)), or None for a reference-free run."""
        if self.tables is not None:
            rows = self.tables[self.split][batch["index"].cpu()]  # (B, 2) [chosen, rejected]
            return BatchLogps(torch.cat((rows[:, 0], rows[:, 1])).to(batch["input_ids"].device), None)
        if self.model is None:
            return None
        if self.runner is not None:
            return self.runner(**model_inputs(batch), return_hidden=return_hidden, ld_alpha=ld_alpha)
        return get_batch_logps(self.model, **model_inputs(batch), chunk_size=self.chunk_size, return_hidden=return_hidden,
                               ld_alpha=ld_alpha, call_head=self.call_head)


@torch.no_grad()
def sync_reference(reference: Reference, policy, alpha: float, engine) -> None:
    """TR-DPO's soft update of the reference (Gorbatovski et al. 2024, "Learn Your Reference Model for Real
    Good Alignment"): pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref_prev, weight by weight, in
    place (TRL's SyncRefModelCallback, the same order of operations). A LoRA reference mixes the adapter's
    weights (A and B each), not their product: its update is alpha-mixed adapter weights. Collective under
    an engine that shards: `engine.mixing` gives the tensors that hold each pair's elements here."""
    engine.settle()
    for _, ref, weight in reference.synced_weights(policy):
        with engine.mixing(ref, weight) as (ref_part, weight_part):
            ref_part.mul_(1.0 - alpha).add_(weight_part, alpha=alpha)


def _shape(param: torch.Tensor) -> torch.Size:
    """A weight's whole shape, also where ZeRO-3 leaves a process only its partition (an empty `shape`)."""
    return getattr(param, "ds_shape", param.shape)


def describe_precision(policy, reference: Reference, cfg) -> dict[str, str | None]:
    """Which dtypes the policy's trainable and frozen weights and the reference are held in, and
    what the passes compute in: for the log line at the start of training and summary.json."""
    frozen = weight_dtypes(p for p in policy.parameters() if not p.requires_grad) or "none"
    if isinstance(reference.model, AdapterReference):
        ref = f"the policy's frozen weights ({frozen})"
    elif reference.model is not None:
        ref = weight_dtypes(reference.model.parameters())
    else:
        ref = "precomputed log-probs" if reference.tables is not None else "none"
    compute = f"{cfg.mixed_precision} autocast" if cfg.mixed_precision != "no" else "each weight's own dtype (no autocast)"
    return {"policy_trainable": weight_dtypes(p for p in policy.parameters() if p.requires_grad),
            "policy_frozen": frozen, "compute": compute, "reference": ref}


def load_models(cfg, tokenizer=None, engine=None, splits: dict[str, list] | None = None, processor=None):
    """(the policy, its `Reference`), as the config says (module docstring). With precompute the
    reference's pass over `splits` runs, and its model is freed, before the policy loads. A given
    tokenizer is checked against every model's vocabulary, and ref_model's tokenizer against it
    (`models.check_same_tokenizer`); a given engine (engines/) decides which process reads the weights
    and prepares a separately loaded reference for evaluation (sharded as the policy is, never trained).
    Without an engine the models stay as loaded. processor: a vision-language model's (vision.py), for the
    precompute pass's batches."""
    chunk_size = cfg.logps_chunk_size
    if tokenizer is not None and cfg.ref_model and cfg.uses_reference:
        # before any model loads; a copy of the starting model has the policy's tokenizer by construction
        check_same_tokenizer(tokenizer, cfg.ref_model, "ref_model", "a reference must use the policy's tokenizer "
                             "(same model family)", cfg.trust_remote_code)
    read_policy = engine is None or engine.reads_weights_of(cfg.model_name_or_path, cfg, "model_name_or_path")
    if cfg.precompute_ref_log_probs:
        tables = precompute_reference_logps(cfg, splits or {}, tokenizer.pad_token_id, engine, tokenizer, processor)
        return _checked_policy(cfg, tokenizer, read_weights=read_policy), Reference(
            None, tables, chunk_size, description="precomputed log-probs (no model in memory)")
    adapter_off = cfg.uses_reference and cfg.finetuning_type == "lora" and not cfg.ref_model
    # a moving reference (sync_ref_model) needs adapter weights to mix into: a copy of the new adapter too
    starting_adapter = adapter_off and (bool(cfg.adapter_name_or_path) or cfg.sync_ref_model)
    policy = _checked_policy(cfg, tokenizer, reference_adapter=starting_adapter, read_weights=read_policy)
    if adapter_off:
        what = "a frozen copy of its starting adapter" if starting_adapter else "its adapter off"
        if cfg.sync_ref_model:
            what += f", mixed from the trained one every {cfg.ref_model_sync_steps} steps (sync_ref_model)"
        return policy, Reference(AdapterReference(policy, REFERENCE_ADAPTER if starting_adapter else None),
                                 chunk_size=chunk_size, description=f"the LoRA policy with {what}")
    if not cfg.uses_reference:
        return policy, Reference(description="none (a reward model)" if cfg.stage == "rm" else
                                 "none (reference-free loss)")
    model, runner = _separate_reference(cfg, tokenizer, engine)
    what = f"ref_model {cfg.ref_model}" if cfg.ref_model else "a frozen copy of the starting model"
    if cfg.sync_ref_model:
        what += f", mixed from the policy every {cfg.ref_model_sync_steps} steps (sync_ref_model)"
    reference = Reference(model, chunk_size=chunk_size, runner=runner, description=what)
    if cfg.sync_ref_model:
        reference.synced_weights(policy)  # a reference of another shape: refused now, not at the first update
    return policy, reference


# --- the reference a finished run trained against (eval, export) ---------------------------------------


def run_reference(run_cfg) -> list[str] | None:
    """The reference the run that `run_cfg` configured trained against, as [model, adapters merged into it...]:
    what `load_models` loads as a separate reference (`models.reference_name`, `models.reference_adapters`:
    ref_model + ref_model_adapters, else the starting model, which for a LoRA run from adapter_name_or_path
    is base + those adapters). None without a run, or when a part is not a local folder (a hub id: eval and
    export do not download)."""
    if run_cfg is None:
        return None
    parts = [reference_name(run_cfg)[0], *split_names(reference_adapters(run_cfg))]
    missing = [p for p in parts if not Path(p).expanduser().is_dir()]
    if missing:
        log.warning("the run's reference needs %s, not a folder here: accuracy is measured by log-probs alone "
                    "(pass --ref for the implicit reward)", ", ".join(missing))
        return None
    return parts


def load_run_reference(run_cfg):
    """`run_reference`'s model, built as training builds a separate reference (`models.load_reference`),
    unquantized and with transformers' default attention: eval and export measure on this machine, which
    may lack the GPU that a 4/8-bit reference or flash attention needs."""
    return load_reference(dataclasses.replace(run_cfg, ref_model_quantization_bit=None, attn_implementation=None,
                                              flash_attn="auto"))


def _checked_policy(cfg, tokenizer, reference_adapter: bool = False, read_weights: bool = True):
    policy = load_policy(cfg, reference_adapter, read_weights)
    if cfg.stage == "rm" and tokenizer is not None:
        # a sequence classifier reads its score at the last token that is not the pad token: the tokenizer's pad
        # id on the config (saved with the model), as TRL's RewardTrainer sets it
        policy.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if tokenizer is not None:
        check_vocabulary(policy, tokenizer, "model_name_or_path",
                         "the tokenizer has tokens the model has no embedding for; resize the model's embeddings")
    return policy
