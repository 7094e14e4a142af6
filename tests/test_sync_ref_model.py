"""TR-DPO's moving reference (sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps).

* test_trdpo_steps_match_trl: TRL 1.16's DPOTrainer with sync_ref_model and a preftune run of the same
  config (tiny model, 8 pairs in one batch, SGD at a constant rate so float noise stays float noise),
  5 steps with a sync after steps 2 and 4: the same loss, rewards, log-probs and gradient norm at every
  step. A run without sync differs from step 3 on, so the sync (and when it happens) is what is tested.
* LoRA, which TRL refuses: the reference is a second, frozen adapter; after a sync its weights are the
  alpha-mixed adapter weights and its log-probs are those of the policy with those weights.
* an interrupted run resumes from a checkpoint written after a sync to the uninterrupted run's numbers.
* sharded (slow): 2 CPU processes under FSDP2 and under ZeRO-3, the reference synced after every step,
  equal the one-process run (per-step metrics, the checkpoint's reference, final weights), and resume
  from a checkpoint written after a sync to the same numbers; a LoRA reference adapter under FSDP2 too.
* the refusals: precomputed reference log-probs, reference-free losses, and the rest, one line each.
"""

import copy
import json
import shutil

import datasets  # noqa: E402  (test dependencies: a missing TRL must fail the suite, not skip it)
import pytest
import torch
import trl
from safetensors.torch import load_file

from preftune import checkpoints
from preftune import train as train_mod
from preftune.batching import collate
from preftune.config import from_dict
from preftune.data import PreferencePair
from preftune.engines import make_engine
from preftune.errors import ConfigError
from preftune.logps import get_batch_logps
from preftune.models import load_tokenizer
from preftune.reference import SYNCED_REFERENCE_FILE, load_models, sync_reference
from preftune.tokenization import tokenize_pairs
from test_deepspeed import EXAMPLES
from test_distributed import raw_config, same_histories, same_weights, torchrun

STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
         "logps/rejected", "grad_norm")
TIMING = {"tokens_per_second"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: as fast, and steady when other processes share the CPUs
    yield
    torch.set_num_threads(threads)


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def history(out):
    return json.loads((out / "dpo_metrics" / "log_history.json").read_text())


# --- the same numbers as TRL ------------------------------------------------------------------------------


def test_trdpo_steps_match_trl(tmp_path, tiny_model_dir, tiny_tokenizer, demo_pairs):
    pairs = demo_pairs[:8]
    common = {"learning_rate": 0.5, "optim": "sgd", "lr_scheduler_type": "constant", "max_grad_norm": 0,
              "per_device_train_batch_size": 8, "max_steps": 5, "logging_steps": 1}
    sync = {"sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.6}
    raw = {"model_name_or_path": str(tiny_model_dir), "dataset": str(write_pairs(tmp_path / "train.jsonl", pairs)),
           "torch_dtype": "float32", "progress_bar": False, "plot_loss": False, "save_strategy": "no", **common}
    train_mod.train(from_dict({**raw, **sync, "output_dir": str(tmp_path / "ours")}))
    ours = [r for r in history(tmp_path / "ours") if "loss" in r]

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type="sigmoid", weight_decay=0.0,
                         report_to="none", max_length=None, use_cpu=True, save_strategy="no", seed=0, bf16=False,
                         dataloader_num_workers=0, activation_checkpointing=False,
                         model_init_kwargs={"dtype": torch.float32}, **common, **sync)
    # the policy from the folder; TRL builds its reference from the same folder (a copy of the starting model)
    trainer = trl.DPOTrainer(model=str(tiny_model_dir), args=args, train_dataset=datasets.Dataset.from_list(pairs),
                             processing_class=copy.deepcopy(tiny_tokenizer))
    trainer.train()
    theirs = [r for r in trainer.state.log_history if "loss" in r and "rewards/chosen" in r]

    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [1, 2, 3, 4, 5]
    for mine, trl_row in zip(ours, theirs):
        for key in STATS:  # summed log-probs of ~-250: float32 noise of a few 1e-5, grown a little by 5 steps
            if key == "rewards/accuracies" and mine["step"] == 1:  # policy = reference: every pair a tie, which
                assert (mine[key], trl_row[key]) == (0.5, 0.0)  # preftune counts as 0.5 and TRL as 0 (trl-differences.md)
                continue
            assert mine[key] == pytest.approx(trl_row[key], abs=1e-4, rel=1e-5), (mine["step"], key)

    # the sync is what makes these numbers: without it, the same run parts from them at step 3
    train_mod.train(from_dict({**raw, "max_steps": 3, "output_dir": str(tmp_path / "fixed")}))
    fixed = [r for r in history(tmp_path / "fixed") if "loss" in r]
    assert [r["loss"] for r in fixed[:2]] == [r["loss"] for r in ours[:2]]
    assert abs(fixed[2]["loss"] - ours[2]["loss"]) > 0.1 and abs(fixed[2]["rewards/margins"] - ours[2]["rewards/margins"]) > 0.1


# --- LoRA: the reference as a second, frozen adapter -------------------------------------------------------


def test_lora_reference_is_a_frozen_adapter_mixed_from_the_trained_one(tmp_path, tiny_model_dir, demo_pairs):
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "finetuning_type": "lora", "lora_target": "all",
                     "sync_ref_model": True, "ref_model_mixup_alpha": 0.3, "output_dir": str(tmp_path / "out"),
                     "torch_dtype": "float32"})
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    policy, reference = load_models(cfg, tokenizer)
    weights = reference.synced_weights(policy)
    assert weights and all(".reference." in name for name, _, _ in weights)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable), "only the trained adapter trains"
    assert all(not ref.requires_grad and torch.equal(ref, trained) for _, ref, trained in weights), \
        "the reference starts as a copy of the new adapter"

    batch = collate(tokenize_pairs(tokenizer, [PreferencePair(**p) for p in demo_pairs[:4]], cutoff_len=256,
                                   template=None), tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    start = reference.logps(inputs).logps

    # training moved the trained adapter (lora_B starts at 0: this is what makes the reference move at all)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, trained in weights:
            trained.add_(0.5 * torch.randn(trained.shape, generator=generator))
    before = {name: ref.detach().clone() for name, ref, _ in weights}
    sync_reference(reference, policy, 0.3, make_engine(cfg))
    for name, ref, trained in weights:  # ref = alpha * trained + (1 - alpha) * ref, weight by weight
        torch.testing.assert_close(ref, 0.3 * trained + 0.7 * before[name], rtol=0, atol=1e-7)
        assert not torch.equal(ref, before[name]) or not before[name].any() and not trained.any()
    moved = reference.logps(inputs).logps
    assert (moved - start).abs().max() > 1e-2, "the reference's log-probs did not move with its weights"

    # its log-probs are those of the policy whose adapter holds the mixed weights
    with torch.no_grad():
        for _, ref, trained in weights:
            trained.copy_(ref)
    policy.eval()
    mixed_policy = get_batch_logps(policy, **inputs, chunk_size=cfg.logps_chunk_size).logps
    torch.testing.assert_close(moved, mixed_policy.detach(), rtol=0, atol=1e-5)


# --- resume ------------------------------------------------------------------------------------------------


class Killed(Exception):
    pass


def resume_raw(tmp_path, model_dir, finetuning_type, **over):
    """16 pairs, 4 a step, 6 steps: the reference syncs after steps 2 and 4; checkpoints after 3 and 6."""
    raw = {"model_name_or_path": str(model_dir), "dataset": str(tmp_path.parent / "train.jsonl"),
           "output_dir": str(tmp_path / "out"), "finetuning_type": finetuning_type, "learning_rate": 5e-3,
           "per_device_train_batch_size": 4, "max_steps": 6, "logging_steps": 1, "save_steps": 3,
           "cutoff_len": 64, "torch_dtype": "float32", "progress_bar": False, "plot_loss": False,
           "sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 0.5, "dropout": 0.1}
    return {**raw, **over}


def steps_of(out):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history(out)]


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_a_resume_after_a_sync_continues_with_the_synced_reference(tmp_path, tiny_model_dir, demo_pairs,
                                                                    finetuning_type, monkeypatch):
    write_pairs(tmp_path / "train.jsonl", demo_pairs[:16])
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train_mod.train(from_dict(resume_raw(whole, tiny_model_dir, finetuning_type)))

    real_save = checkpoints.save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        if args[6] == 3:  # one step after the first sync
            raise Killed

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_mod.train(from_dict(resume_raw(cut, tiny_model_dir, finetuning_type)))
    monkeypatch.undo()
    saved = load_file(cut / "out" / "checkpoint-3" / SYNCED_REFERENCE_FILE)
    if finetuning_type == "lora":  # the reference adapter only, not a second copy of the model
        assert saved and all(".reference." in name for name in saved)
    else:  # the synced reference: no longer the starting model
        start = load_file(tiny_model_dir / "model.safetensors")
        assert set(saved) >= set(start) - {"lm_head.weight"}
        assert any(not torch.equal(saved[name], start[name]) for name in start if name in saved)

    train_mod.train(from_dict(resume_raw(cut, tiny_model_dir, finetuning_type, resume_from_checkpoint=True)))
    assert steps_of(cut / "out") == steps_of(whole / "out")
    assert [r["step"] for r in steps_of(whole / "out")] == [1, 2, 3, 4, 5, 6]
    final = "adapter_model.safetensors" if (whole / "out" / "adapter_model.safetensors").is_file() else "model.safetensors"
    ours, reference = load_file(cut / "out" / final), load_file(whole / "out" / final)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    ours, reference = (load_file(run / "out" / "checkpoint-6" / SYNCED_REFERENCE_FILE) for run in (cut, whole))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


# --- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("over, message", [
    ({"precompute_ref_log_probs": True}, r"^sync_ref_model: precompute_ref_log_probs scores the reference once"),
    ({"pref_loss": "simpo"}, r"^sync_ref_model: pref_loss simpo is reference-free"),
    ({"pref_loss": "orpo"}, r"^sync_ref_model: pref_loss orpo is reference-free"),
    ({"finetuning_type": "lora", "ref_model": "some/model"}, r"^sync_ref_model: with LoRA the reference is a second"),
    ({"ref_model_quantization_bit": 4}, r"^sync_ref_model: a 4/8-bit reference"),
    ({"ref_model_mixup_alpha": 0.0}, r"^ref_model_mixup_alpha must be in \(0, 1\]"),
    ({"ref_model_mixup_alpha": 1.5}, r"^ref_model_mixup_alpha must be in \(0, 1\]"),
    ({"ref_model_sync_steps": 0}, r"^ref_model_sync_steps must be at least 1"),
])
def test_what_cannot_move_is_refused_in_one_line(over, message):
    with pytest.raises(ConfigError, match=message) as error:
        from_dict({"sync_ref_model": True, **over})
    assert "\n" not in str(error.value)


def test_the_mixing_keys_alone_are_warned(caplog):
    from preftune.config import validation

    validation.WARNED.clear()
    from_dict({"ref_model_sync_steps": 64})
    assert "ref_model_sync_steps: used only with sync_ref_model: true" in caplog.text


# --- sharded engines ---------------------------------------------------------------------------------------


SHARDED = {"max_steps": 3, "eval_strategy": "no", "save_steps": 2, "sync_ref_model": True,
           "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5}


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model_dir):
    """The one-process run the sharded ones must equal: 3 steps of 8 pairs, the reference synced after each,
    a checkpoint after step 2."""
    tmp_path = tmp_path_factory.mktemp("one")
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), **SHARDED)))
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("engine", [{"fsdp": "full_shard"}, {"deepspeed": str(EXAMPLES / "ds_z3_config.json")}],
                         ids=["fsdp2", "zero3"])
def test_sharded_runs_sync_as_one_process_and_resume(tmp_path, tiny_model_dir, one_process_run, engine):
    torch.set_num_threads(1)
    one = one_process_run / "one"
    over = {**SHARDED, **engine, "per_device_train_batch_size": 4}
    torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"), **over), "two")
    same_histories(one, tmp_path / "two")
    same_weights(one, tmp_path / "two")
    # the checkpoint's reference: gathered whole, as the one process's after its second sync
    same_weights(one / "checkpoint-2", tmp_path / "two" / "checkpoint-2", SYNCED_REFERENCE_FILE)

    out = tmp_path / "resumed"  # from step 2: step 3 is scored against the reference restored into its shards
    out.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-2", out / "checkpoint-2")
    torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(out), resume_from_checkpoint=True,
                                  **over), "resumed")
    assert steps_of(out)[-1] == steps_of(tmp_path / "two")[-1] and steps_of(out)[-1]["step"] == 3
    same_weights(tmp_path / "two", out)


@pytest.mark.slow
def test_a_sharded_lora_reference_adapter_syncs_as_one_process(tmp_path, tiny_model_dir):
    """FSDP2 and LoRA: the reference adapter, sharded inside the policy's units, is mixed shard by shard (the
    process that builds the model without weights gets its starting copy from the main process)."""
    torch.set_num_threads(1)
    over = {**SHARDED, "finetuning_type": "lora", "lora_rank": 4, "save_adapter_only": True, "learning_rate": 5e-3}
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), **over)))
    torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"), fsdp="full_shard",
                                  per_device_train_batch_size=4, **over), "two")
    same_histories(tmp_path / "one", tmp_path / "two")
    same_weights(tmp_path / "one", tmp_path / "two", "adapter_model.safetensors")
    reference = same_weights(tmp_path / "one" / "checkpoint-2", tmp_path / "two" / "checkpoint-2", SYNCED_REFERENCE_FILE)
    assert reference and all(".reference." in name for name in reference)
