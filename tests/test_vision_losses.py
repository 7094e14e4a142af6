"""Every preference loss on vision-language pairs (docs/vision.md, docs/losses.md).

One batch of 8 pairs in TRL's vision format (0, 1 or 2 coloured squares each) on the tiny LLaVA of test_vision.py,
the policy one random init and the reference another (`ref_model`), so that every loss sees non-zero log-ratios at
the first step. For each loss, preftune's step (`step.PreferenceStep`, as a run configures it) on preftune's batch,
and TRL 1.16 on its own collator's batch of the same records with the same two models:

* a `loss_type` TRL's DPOTrainer has (and lists of them with loss_weights, an f-divergence): its `compute_loss`;
* simpo and orpo: TRL's CPOTrainer.cpo_loss / ORPOTrainer.odds_ratio_loss (trl.experimental) on the length-averaged
  log-probs TRL's own forward gives;
* kto_pair, pref_ftx, pref_bco_weight (no TRL loss): preftune's pure loss function on TRL's log-probs.

Compared within 1e-4: the loss, the rewards, log-probs and margins TRL logs, and the gradient norm of every weight
(vision tower included). And the image reaches each loss: other pixels give another loss.
"""

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from preftune.config import from_dict
from tests.test_vision import build_llava, square, write_vision_pairs

# trl.DPOConfig itself sets the deprecated alias; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning",
                                        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# (pref_loss, beta, more keys): every paired loss of losses.LOSSES, with hyperparameters at non-default values where
# a loss has them; the reference-free ones at the betas of their papers
CASES = [
    ("sigmoid", 0.5, {}), ("hinge", 0.5, {}), ("ipo", 0.5, {}), ("robust", 0.5, {"label_smoothing": 0.2}),
    ("exo_pair", 0.5, {"label_smoothing": 0.1}), ("nca_pair", 0.5, {}), ("bco_pair", 0.5, {}),
    ("sppo_hard", 0.5, {}), ("aot", 0.5, {"label_smoothing": 0.2}), ("aot_unpaired", 0.5, {}), ("apo_zero", 0.5, {}),
    ("apo_down", 0.5, {}), ("discopop", 0.5, {"discopop_tau": 0.2}), ("sigmoid_norm", 2.0, {}),
    (["sigmoid", "bco_pair", "sft"], 0.5, {"loss_weights": [1.0, 0.5, 0.2]}),
    ("sigmoid", 0.5, {"f_divergence_type": "js_divergence"}),
    ("simpo", 2.0, {"simpo_gamma": 0.3}), ("orpo", 0.5, {}),
    ("kto_pair", 0.5, {}), ("sigmoid", 0.5, {"pref_ftx": 0.5}), ("sigmoid", 0.5, {"pref_bco_weight": 0.5}),
]
# DPOTrainer's loss_type values (TRL 1.16); of preftune's paired losses it lacks simpo, orpo (TRL's CPO and ORPO
# trainers have them) and kto_pair, and LLaMA-Factory's pref_ftx and pref_bco_weight
TRL_DPO_LOSSES = {"sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft"}
# losses whose value for a pair depends on other pairs of the batch (sorting, batch means, BCO's shift)
BATCH_WIDE = {"aot", "aot_unpaired", "kto_pair", "sft"}
STATS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _id(case):
    name, beta, keys = case
    return "+".join(name) if isinstance(name, list) else "-".join([name, *map(str, keys)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, demo_pairs):
    """The two models, preftune's batch and TRL's (its DPOTrainer's collator on the same records)."""
    import datasets
    import trl
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from preftune.data import read_dataset
    from preftune.vision import collate_vision, tokenize_vision_pairs

    root = tmp_path_factory.mktemp("vision_losses")
    policy_dir, reference_dir = build_llava(tiny_tokenizer, root / "policy"), build_llava(tiny_tokenizer, root / "ref", 1)
    data = write_vision_pairs(root / "data", demo_pairs[:8])
    processor = AutoProcessor.from_pretrained(policy_dir)
    items = tokenize_vision_pairs(processor, read_dataset(str(data), "data"), from_dict({"cutoff_len": 4096}))
    batch = collate_vision(items, processor.tokenizer.pad_token_id, processor=processor)

    records = [json.loads(line) for line in data.read_text().splitlines()]
    for r in records:
        r["images"] = [Image.open(data.parent / name).copy() for name in r["images"]]
    args = trl.DPOConfig(output_dir=str(root / "trl"), report_to="none", max_length=None, use_cpu=True, bf16=False,
                         model_init_kwargs={"dtype": torch.float32}, per_device_train_batch_size=8)
    load = lambda folder: AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)  # noqa: E731
    # TRL takes the reference as a model (not a path), and wraps it for its fused LM head: one of its own
    trainer = trl.DPOTrainer(model=str(policy_dir), ref_model=load(reference_dir), args=args, processing_class=processor,
                             train_dataset=datasets.Dataset.from_list(records))
    trl_batch = trainer.data_collator(records)  # in record order (the trainer's loader would shuffle)
    policy, reference = load(policy_dir), load(reference_dir).eval()
    with_images = torch.tensor([bool(item.images) for item in items])
    return SimpleNamespace(trainer=trainer, trl_batch=trl_batch, batch=batch, policy=policy, reference=reference,
                           processor=processor, with_images=with_images)


def grad_norm(model) -> float:
    norm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item()
    model.zero_grad(set_to_none=True)
    return norm


def preftune_side(s, cfg, batch, grad=True):
    """preftune's step on `batch`: the mean loss, the statistics' means, the grad norm (with `grad`) and the
    per-pair losses."""
    from preftune.logps import LogpsModule
    from preftune.reference import Reference
    from preftune.step import PreferenceStep

    reference = Reference(s.reference if cfg.uses_reference else None, chunk_size=64)
    with torch.set_grad_enabled(grad):
        out = PreferenceStep(cfg)(LogpsModule(s.policy, 64), reference, batch)
    if not grad:
        return out.losses
    out.losses.mean().backward()
    stats = {k: out.stats[k].mean().item() for k in STATS}
    return out.losses.mean().item(), stats, grad_norm(s.policy), out.losses.detach()


def trl_logps(s, model):
    """TRL's log-probs of its batch's rows ([chosen; rejected]), summed, and the completion lengths, from its own
    forward (`DPOTrainer._compute_loss`'s: the model wrapped with its fused LM head)."""
    inputs = {k: v for k, v in s.trl_batch.items() if k != "completion_mask"}
    mask = s.trl_batch["completion_mask"]
    labels = inputs["input_ids"].masked_fill(mask == 0, -100)
    per_token = model(**inputs, labels=labels, fused_lm_head=True, use_cache=False).log_probs
    return per_token.sum(dim=1), mask[:, 1:].sum(dim=1)


def trl_dpo_side(s, name, beta, keys):
    """DPOTrainer.compute_loss with this loss_type, set as DPOTrainer.__init__ sets it from DPOConfig."""
    t = s.trainer
    t.loss_types = name if isinstance(name, list) else [name]
    t.loss_weights = keys.get("loss_weights", [1.0] * len(t.loss_types))
    t.beta = t.args.beta = beta
    t.label_smoothing = t.args.label_smoothing = keys.get("label_smoothing", 0.0)
    t.args.discopop_tau = keys.get("discopop_tau", 0.05)
    t.f_divergence_type = keys.get("f_divergence_type", "reverse_kl")
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.model.train()
    loss = t.compute_loss(t.model, dict(s.trl_batch))
    loss.backward()
    return loss.item(), {k: t._metrics["train"][k][-1] for k in STATS}, grad_norm(t.model)


def trl_pure_side(s, name, beta, keys):
    """Losses DPOTrainer lacks, on TRL's log-probs: simpo and orpo through TRL's CPO and ORPO trainers' own loss
    functions; kto_pair, pref_ftx and pref_bco_weight through preftune's pure loss functions."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from preftune.step import configured_loss

    t = s.trainer
    logps, lengths = trl_logps(s, t.model)
    B = logps.size(0) // 2
    chosen, rejected = logps[:B], logps[B:]
    chosen_avg, rejected_avg = chosen / lengths[:B], rejected / lengths[B:]
    stats = {"logps/chosen": chosen.mean().item(), "logps/rejected": rejected.mean().item()}
    if name == "simpo":
        stand_in = SimpleNamespace(alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=keys["simpo_gamma"],
                                   label_smoothing=0.0, accelerator=SimpleNamespace(device=torch.device("cpu")))
        losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(stand_in, chosen_avg, rejected_avg)
    elif name == "orpo":  # TRL's ratio term; the NLL per pair (LLaMA-Factory's, docs/losses.md)
        stand_in = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
        ratio, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(stand_in, chosen_avg, rejected_avg)
        losses = -chosen_avg - ratio
    else:
        with torch.no_grad():
            reference, _ = trl_logps(s, t.ref_model)
        loss_fn = configured_loss(from_dict({"pref_loss": name, "pref_beta": beta, **keys}))
        losses, chosen_rewards, rejected_rewards = loss_fn(chosen, rejected, reference[:B], reference[B:], beta,
                                                           lengths[:B], lengths[B:])
    losses.mean().backward()
    stats |= {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
              "rewards/margins": (chosen_rewards - rejected_rewards).mean().item()}
    return losses.mean().item(), stats, grad_norm(t.model)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_every_loss_on_vision_pairs_matches_trl(case, setup):
    name, beta, keys = case
    names = name if isinstance(name, list) else [name]
    cfg = from_dict({"pref_loss": name, "pref_beta": beta, **keys})
    ours, stats, norm, losses = preftune_side(setup, cfg, setup.batch)
    in_dpo_trainer = set(names) <= TRL_DPO_LOSSES and not {"pref_ftx", "pref_bco_weight"} & set(keys)
    theirs, trl_stats, trl_norm = (trl_dpo_side if in_dpo_trainer else trl_pure_side)(setup, name, beta, keys)
    assert ours == pytest.approx(theirs, abs=1e-4, rel=1e-5), ("loss", ours, theirs)
    for key in STATS:
        assert stats[key] == pytest.approx(trl_stats[key], abs=1e-4, rel=1e-5), (key, stats[key], trl_stats[key])
    assert norm == pytest.approx(trl_norm, abs=1e-4, rel=1e-4) and norm > 0, ("grad_norm", norm, trl_norm)

    # the image reaches the loss: other pixels (one grey square for every image) give other losses, and the
    # text-only pairs' own losses stay where a pair's loss is its own
    grey = setup.processor.image_processor(images=[square((60, 60, 60))] * setup.batch["pixel_values"].shape[0],
                                           return_tensors="pt")
    other = preftune_side(setup, cfg, setup.batch | grey, grad=False)
    assert (losses - other)[setup.with_images].abs().min() > 1e-5 or set(names) & BATCH_WIDE
    assert (losses - other).abs().max() > 1e-4
    if not set(names) & BATCH_WIDE and not keys.get("pref_bco_weight"):
        torch.testing.assert_close(losses[~setup.with_images], other[~setup.with_images], rtol=0, atol=1e-6)

