"""Mixture-of-experts models: the router's load-balancing loss in the objective (router_aux_loss_coef, TRL's
key; LLaMA-Factory's moe_aux_loss_coef), on a tiny random-init Qwen2-MoE (4 experts, top-2) on CPU.

* the aux loss `get_batch_logps` computes from the backbone's router logits (the LM head is applied to
  completion positions only, never through the model's forward) is the model's own forward's `aux_loss`, for
  padded rows (padding masked out) and for the same sequences packed (padding_free), for Qwen2-MoE and Mixtral;
* the dpo step's loss, its `aux_loss` statistic and the gradient it gives the routers equal TRL 1.16's
  DPOTrainer with the same router_aux_loss_coef (and unset: both take the model config's own), on TRL's batch;
* a training run logs `aux_loss` (and `eval_aux_loss`); 0 turns it off; the keys are refused for a model
  without router logits, and with prefix_sharing, in one line;
* under FSDP2 (2 CPU processes, a decoder layer per unit) a run equals one process that sees the same
  micro-batches (the aux loss is per forward pass, as TRL's: docs/moe.md).
"""

import copy

import pytest
import torch
import trl
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from preftune import train as train_mod
from preftune.batching import collate, collate_packed
from preftune.config import from_dict
from preftune.errors import ConfigError
from preftune.logps import get_batch_logps
from preftune.models import router_aux_coef
from preftune.reference import Reference
from preftune.step import LogpsModule, PreferenceStep
from preftune.tokenization import tokenize_pairs
from preftune.data import PreferencePair
from test_distributed import COMPARED, history, raw_config, same_weights, torchrun
from test_trl_parity import B, BATCH_KEYS, CHUNK_SIZE, _trl_trainer

# trl.DPOConfig itself sets the deprecated alias; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")


def tiny_moe(vocab_size: int, seed: int, mixtral: bool = False):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_experts_per_tok=2,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True)
    if mixtral:
        return MixtralForCausalLM(MixtralConfig(num_local_experts=4, **common)).float()
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(num_experts=4, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=32, **common)).float()


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("tiny_moe")
    tiny_moe(len(tiny_tokenizer), seed=0).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _items(tokenizer, demo_pairs, n=B):
    return tokenize_pairs(tokenizer, [PreferencePair(**p) for p in demo_pairs[:n]], cutoff_len=100_000, template=None)


@pytest.mark.parametrize("mixtral", [False, True], ids=["qwen2_moe", "mixtral"])
def test_the_aux_loss_is_the_models_own_padded_and_packed(mixtral, tiny_tokenizer, demo_pairs):
    model = tiny_moe(len(tiny_tokenizer), seed=0, mixtral=mixtral)
    items = _items(tiny_tokenizer, demo_pairs)
    padded = collate(items, tiny_tokenizer.pad_token_id)
    assert (padded["attention_mask"] == 0).any()  # padding, which the mask must keep out
    expected = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                     output_router_logits=True).aux_loss
    out = get_batch_logps(model, padded["input_ids"], padded["attention_mask"], padded["completion_mask"],
                          CHUNK_SIZE, router_aux=True)
    assert out.aux_loss.item() == pytest.approx(expected.item(), abs=1e-6) and out.aux_loss.requires_grad
    packed = collate_packed(items, tiny_tokenizer.pad_token_id)
    out_packed = get_batch_logps(model, packed["input_ids"], None, packed["completion_mask"], CHUNK_SIZE,
                                 position_ids=packed["position_ids"], sequence_lengths=packed["sequence_lengths"],
                                 router_aux=True)
    assert out_packed.aux_loss.item() == pytest.approx(expected.item(), abs=1e-5)
    unmasked = model(input_ids=padded["input_ids"], output_router_logits=True).aux_loss  # padding counted
    assert abs(unmasked.item() - expected.item()) > 1e-4  # so the mask matters: the test can see it dropped
    assert get_batch_logps(model, padded["input_ids"], padded["attention_mask"], padded["completion_mask"],
                           CHUNK_SIZE).aux_loss is None


@pytest.mark.parametrize("coef", [0.5, None])
def test_dpo_step_with_the_aux_loss_matches_trl(coef, tiny_tokenizer, demo_pairs, tmp_path):
    """TRL adds coef x the policy forward's aux_loss (chosen and rejected concatenated, one pass) to its loss and
    logs it as aux_loss; unset, both take the model config's router_aux_loss_coef (0.001). The same loss, the same
    aux_loss, and the same gradient on the routers (where only the aux loss and the log-probs reach them)."""
    torch.set_num_threads(1)
    policy, reference = tiny_moe(len(tiny_tokenizer), 0), tiny_moe(len(tiny_tokenizer), 1).eval()
    options = {} if coef is None else {"router_aux_loss_coef": coef}
    trainer = _trl_trainer(tmp_path, policy, reference, tiny_tokenizer, demo_pairs[:B], "sigmoid", 0.1, **options)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(B)])
    trainer.model.train()
    trainer._metrics["train"].clear()
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_loss.backward()
    trl_aux = trainer._metrics["train"]["aux_loss"][-1]

    cfg = from_dict({"pref_loss": "sigmoid", "pref_beta": 0.1, "logps_chunk_size": CHUNK_SIZE, **options})
    resolved = router_aux_coef(cfg, policy)  # as a run resolves it for the policy's LogpsModule
    assert resolved == (coef or 0.001)
    policy.train()
    losses, stats, _ = PreferenceStep(cfg)(LogpsModule(policy, CHUNK_SIZE, router_aux_loss_coef=resolved),
                                           Reference(reference, chunk_size=CHUNK_SIZE),
                                           {k: batch[k] for k in BATCH_KEYS})
    losses.mean().backward()
    assert losses.mean().item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert stats["loss"].mean().item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert stats["aux_loss"].mean().item() == pytest.approx(trl_aux, abs=1e-6)
    routers = [(name, p) for name, p in policy.named_parameters() if name.endswith("mlp.gate.weight")]
    assert len(routers) == 2  # one per layer
    for name, p in routers:
        expected = dict(trainer.model.named_parameters())[name].grad
        torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-4)
    without, plain, _ = PreferenceStep(cfg)(LogpsModule(policy, CHUNK_SIZE), Reference(reference, chunk_size=CHUNK_SIZE),
                                            {k: batch[k] for k in BATCH_KEYS})
    assert "aux_loss" not in plain
    # the aux term is there: coef x aux_loss (aux_loss is about 2 here, experts x the balanced share)
    assert losses.mean().item() - without.mean().item() == pytest.approx(resolved * trl_aux, rel=1e-4)


def _run(tmp_path, model_dir, name, **over):
    raw = raw_config(tmp_path, model_dir, output_dir=str(tmp_path / name), max_steps=2, eval_steps=2, **over)
    train_mod.train(from_dict(raw))
    return history(tmp_path / name)


def test_a_run_logs_the_aux_loss_and_zero_turns_it_off(moe_dir, tmp_path):
    torch.set_num_threads(1)
    rows = _run(tmp_path, moe_dir, "on", moe_aux_loss_coef=0.1)  # LLaMA-Factory's name
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows and all(1.0 < r["aux_loss"] < 4.0 for r in train_rows)  # experts x a share near balance
    assert 1.0 < rows[-1]["eval_aux_loss"] < 4.0
    off = _run(tmp_path, moe_dir, "off", router_aux_loss_coef=0)
    assert not any("aux_loss" in k for r in off for k in r)
    first_on, first_off = train_rows[0], [r for r in off if "loss" in r][0]
    assert first_on["loss"] - first_off["loss"] == pytest.approx(0.1 * first_on["aux_loss"], rel=1e-4)


@pytest.mark.parametrize("model,over,message", [
    ("dense", {"router_aux_loss_coef": 0.01}, r"^router_aux_loss_coef: Qwen2ForCausalLM is not a mixture-of-experts "
                                              r"model that returns router logits .*; remove router_aux_loss_coef"),
    ("dense", {"moe_aux_loss_coef": 0.01}, r"^router_aux_loss_coef: Qwen2ForCausalLM is not a mixture-of-experts"),
    ("moe", {"prefix_sharing": True}, r"^router_aux_loss_coef: 0.001 \(set, or Qwen2MoeForCausalLM's own\): .* use "
                                      r"padding_free .*, or set router_aux_loss_coef: 0"),
])
def test_the_keys_are_refused_where_there_is_no_such_loss(model, over, message, moe_dir, tiny_model_dir, tmp_path):
    folder = moe_dir if model == "moe" else tiny_model_dir
    with pytest.raises(ConfigError, match=message) as e:
        train_mod.train(from_dict(raw_config(tmp_path, folder, output_dir=str(tmp_path / "out"), **over)))
    assert "\n" not in str(e.value)
    assert from_dict({"router_aux_loss_coef": 0, "prefix_sharing": True}).prefix_sharing  # 0: off, accepted


@pytest.mark.slow
def test_two_sharded_processes_equal_one_process_with_the_same_micro_batches(moe_dir, tmp_path):
    """FSDP2 over the MoE decoder layers: each process's forward has its own aux loss (as TRL's under DDP), so the
    one-process run it equals sees the same micro-batches: per_device 4 and 2 accumulation steps."""
    torch.set_num_threads(1)
    over = {"router_aux_loss_coef": 0.1, "max_steps": 3, "per_device_train_batch_size": 4}
    one = raw_config(tmp_path, moe_dir, output_dir=str(tmp_path / "one"), gradient_accumulation_steps=2, **over)
    train_mod.train(from_dict(one))
    result = torchrun(tmp_path, raw_config(tmp_path, moe_dir, output_dir=str(tmp_path / "two"), fsdp="full_shard",
                                           **over), "two")
    assert "fsdp: the policy (Qwen2MoeForCausalLM) sharded over 2 processes (FSDP2: 2 Qwen2MoeDecoderLayer" \
        in result.stderr
    rows_one, rows_two = history(tmp_path / "one"), history(tmp_path / "two")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]
    # (a training row's kl_per_*, logits/* and entropy score the step's last micro-batch: the second half of it in
    # one process, both halves with two; left out)
    compared = [k for k in COMPARED if not k.startswith(("kl_", "logits/", "entropy"))] + ["aux_loss", "eval_aux_loss"]
    for row_one, row_two in zip(rows_one, rows_two):
        for key in compared:
            if key in row_one:
                assert row_two[key] == pytest.approx(row_one[key], abs=1e-5, rel=1e-5), (row_one["step"], key)
    assert sum("aux_loss" in r for r in rows_one) == 3 and "eval_aux_loss" in rows_one[-1]
    same_weights(tmp_path / "one", tmp_path / "two")
