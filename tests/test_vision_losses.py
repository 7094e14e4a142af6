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
def models(tmp_path_factory, tiny_tokenizer):
    """The policy's folder and the reference's (two random inits of the tiny LLaVA, one processor)."""
    root = tmp_path_factory.mktemp("vision_losses")
    return build_llava(tiny_tokenizer, root / "policy"), build_llava(tiny_tokenizer, root / "ref", 1)


def load(folder):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)


def trl_records(data) -> list[dict]:
    """The records of `data` with their images opened as PIL images, as TRL takes them."""
    from PIL import Image

    records = [json.loads(line) for line in data.read_text().splitlines()]
    for r in records:
        r["images"] = [Image.open(data.parent / name).copy() for name in r["images"]]
    return records


@pytest.fixture(scope="module")
def setup(models, tmp_path_factory, demo_pairs):
    """The two models, preftune's batch and TRL's (its DPOTrainer's collator on the same records)."""
    import datasets
    import trl
    from transformers import AutoProcessor

    from preftune.data import read_dataset
    from preftune.vision import collate_vision, tokenize_vision_pairs

    root = tmp_path_factory.mktemp("vision_pairs")
    policy_dir, reference_dir = models
    data = write_vision_pairs(root / "data", demo_pairs[:8])
    processor = AutoProcessor.from_pretrained(policy_dir)
    items = tokenize_vision_pairs(processor, read_dataset(str(data), "data"), from_dict({"cutoff_len": 4096}))
    batch = collate_vision(items, processor.tokenizer.pad_token_id, processor=processor)

    records = trl_records(data)
    args = trl.DPOConfig(output_dir=str(root / "trl"), report_to="none", max_length=None, use_cpu=True, bf16=False,
                         model_init_kwargs={"dtype": torch.float32}, per_device_train_batch_size=8)
    # TRL takes the reference as a model (not a path), and wraps it for its fused LM head: one of its own
    trainer = trl.DPOTrainer(model=str(policy_dir), ref_model=load(reference_dir), args=args,
                             processing_class=processor, train_dataset=datasets.Dataset.from_list(records))
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



def write_unpaired(folder, pairs: list[dict]):
    """TRL's unpaired vision format (KTO's): pair i's prompt and images (test_vision.vision_records), its chosen
    answer as a desirable completion for odd i, its rejected one as an undesirable completion for even i."""
    path = write_vision_pairs(folder, pairs)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    unpaired = [{"images": r["images"], "prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"],
                 "label": bool(i % 2)} for i, r in enumerate(records)]
    out = folder / "unpaired.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    return out


def test_kto_on_vision_examples_matches_trl(models, demo_pairs, tmp_path):
    """kto on 8 unpaired examples with 0, 1 or 2 images (half desirable), in one batch: preftune's step (its KL rows
    each prompt, with its images, and the previous example's completion) against TRL 1.16's KTOTrainer.compute_loss
    on its vision collator's batch of the same records in the same order (it rotates the completions by one too):
    loss, rewards, log-probs, TRL's `kl` (preftune's z_ref) and the gradient norm within 1e-4. Other pixels give
    another loss."""
    import datasets
    import trl
    from transformers import AutoProcessor

    from preftune.data import read_dataset
    from preftune.logps import LogpsModule
    from preftune.reference import Reference
    from preftune.step import UnpairedStep

    reference_dir, policy_dir = models  # this way round, z_ref > 0: not clamped away
    data = write_unpaired(tmp_path / "data", demo_pairs[8:16])
    processor = AutoProcessor.from_pretrained(policy_dir)
    cfg = from_dict({"pref_loss": "kto", "pref_beta": 0.5, "kto_chosen_weight": 1.3, "cutoff_len": 4096})
    step = UnpairedStep(cfg, processor=processor)
    examples = read_dataset(str(data), "data", allow_unpaired=True)
    assert [len(e.images) for e in examples] == [0, 1, 2, 0, 1, 2, 0, 1]
    batch = step.collate(step.tokenize(processor, examples, cfg, None), processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 7  # each example's images once, in row order
    policy, reference = load(policy_dir), Reference(load(reference_dir).eval(), chunk_size=64)
    out = step(LogpsModule(policy, 64), reference, batch)
    out.losses.mean().backward()
    norm = grad_norm(policy)
    labels = batch["labels"]
    ours = {"loss": out.losses.mean().item(), "kl": out.stats["z_ref"][0].item(),
            **{k: out.stats[k].mean().item() for k in STATS if k != "rewards/margins"}}

    records = trl_records(data)
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), report_to="none", max_length=None, use_cpu=True, bf16=False,
                         beta=0.5, desirable_weight=1.3, model_init_kwargs={"dtype": torch.float32})
    trainer = trl.KTOTrainer(model=str(policy_dir), ref_model=load(reference_dir), args=args,
                             processing_class=processor, train_dataset=datasets.Dataset.from_list(records))
    trl_batch = trainer.data_collator(records)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trl_batch)
    loss.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    theirs = {"loss": loss.item(), **{k: logged[k] for k in ours if k != "loss"}}
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4, rel=1e-5), (key, ours[key], theirs[key])
    assert norm == pytest.approx(grad_norm(trainer.model), abs=1e-4, rel=1e-4)
    assert ours["kl"] > 0 and labels.any() and not labels.all()

    grey = processor.image_processor(images=[square((60, 60, 60))] * 7, return_tensors="pt")
    with torch.no_grad():
        other = step(LogpsModule(policy, 64), reference, batch | grey)
    assert abs(other.losses.mean().item() - ours["loss"]) > 1e-5


def test_kto_trains_on_vision_examples_and_pairs(models, demo_pairs, tmp_path):
    """preftune train with pref_loss kto on a VLM: TRL's unpaired vision records (prompt, completion, label,
    images) and vision pairs (each split into a desirable and an undesirable example) in one run, evaluated on
    held-out examples with images. At step 0 the policy is its reference (loss w / 2 = 0.5, z_ref 0); it trains."""
    from preftune import train as train_mod

    unpaired = write_unpaired(tmp_path / "unpaired", demo_pairs[16:24])
    pairs = write_vision_pairs(tmp_path / "pairs", demo_pairs[24:28])
    summary = train_mod.train(from_dict({
        "model_name_or_path": str(models[0]), "dataset": f"{unpaired},{pairs}", "pref_loss": "kto", "max_steps": 2,
        "per_device_train_batch_size": 4, "val_size": 4, "learning_rate": 1e-2, "freeze_vision_tower": False,
        "progress_bar": False, "plot_loss": False, "save_strategy": "no", "output_dir": str(tmp_path / "out"),
        "torch_dtype": "float32"}))
    assert summary["data"]["train"] + summary["data"]["eval"] == 12
    rows = json.loads((tmp_path / "out" / "dpo_metrics" / "log_history.json").read_text())
    baseline = rows[0]
    assert baseline["step"] == 0 and baseline["eval_loss"] == pytest.approx(0.5, abs=1e-6)
    assert baseline["eval_z_ref"] == 0 and baseline["eval_kl_per_token"] == pytest.approx(0, abs=1e-6)
    assert rows[-1]["step"] == 2 and abs(rows[-1]["eval_loss"] - baseline["eval_loss"]) > 1e-4
    assert any("z_ref" in r and r["loss"] > 0 for r in rows if "loss" in r)


@pytest.mark.parametrize("change, message", [
    ({"label": "yes"}, r"unpaired.jsonl:1: field 'label' is str, expected true \(desirable\) or false"),
    ({"chosen": "A."}, r"unpaired.jsonl:1: a record with 'label' is one completion \(KTO's unpaired format\)"),
    ({"images": []}, r"unpaired.jsonl:1: 1 image placeholder\(s\) .* but 0 image\(s\) in 'images'"),
])
def test_bad_unpaired_vision_records_are_one_line(change, message, demo_pairs, tmp_path):
    from preftune.data import read_dataset
    from preftune.errors import DataError

    path = write_unpaired(tmp_path, demo_pairs[:2])
    first, second = path.read_text().splitlines()
    path.write_text(json.dumps({**json.loads(second), **change}) + "\n" + first + "\n")
    with pytest.raises(DataError, match=message) as raised:
        read_dataset(str(path), "data", allow_unpaired=True)
    assert "\n" not in str(raised.value)


def write_sft(folder, pairs: list[dict], messages: bool = False):
    """TRL's SFT vision formats: pair i's prompt and images with its chosen answer as the completion, as
    prompt/completion, or (`messages`) as one conversation."""
    path = write_vision_pairs(folder, pairs)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    if messages:
        records = [{"images": r["images"], "messages": r["prompt"] + r["chosen"]} for r in records]
    else:
        records = [{"images": r["images"], "prompt": r["prompt"], "completion": r["chosen"]} for r in records]
    out = folder / "sft.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_sft_on_vision_records_matches_trl(models, demo_pairs, tmp_path):
    """stage: sft on 8 prompt/completion records with 0, 1 and 2 images, one batch: preftune's step against TRL
    1.16's SFTTrainer.compute_loss (prompt-completion data: the loss over the completion tokens only) on its vision
    collator's batch of the same records: the loss and the gradient norm within 1e-4; other pixels change the loss;
    the messages form reads into the same examples."""
    import datasets
    import trl
    from transformers import AutoProcessor

    from preftune.data import read_dataset
    from preftune.logps import LogpsModule
    from preftune.reference import Reference
    from preftune.step import SFTStep
    from preftune.tokenization import TokenizeReport

    policy_dir = models[0]
    data = write_sft(tmp_path / "data", demo_pairs[28:36])
    processor = AutoProcessor.from_pretrained(policy_dir)
    cfg = from_dict({"stage": "sft", "cutoff_len": 4096, "tokenized_cache_dir": str(tmp_path / "cache")})
    step = SFTStep(cfg, processor=processor)
    examples = read_dataset(str(data), "data", sft=True)
    items = step.tokenize(processor, examples, cfg, TokenizeReport())
    as_messages = read_dataset(str(write_sft(tmp_path / "messages", demo_pairs[28:36], messages=True)), "data",
                               sft=True)
    again = from_dict({**vars(cfg), "tokenized_cache_dir": str(tmp_path / "cache2")})  # (not a cache hit)
    assert [(t.chosen_ids, t.chosen_start) for t in step.tokenize(processor, as_messages, again, TokenizeReport())] == \
        [(t.chosen_ids, t.chosen_start) for t in items]
    batch = step.collate(items, processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape[0] == 7 and batch["input_ids"].shape[0] == 8  # each row its own images
    policy = load(policy_dir)
    out = step(LogpsModule(policy, 64), Reference(), batch)
    out.losses.mean().backward()
    ours, norm = out.losses.mean().item(), grad_norm(policy)

    records = trl_records(data)
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", max_length=None, use_cpu=True, bf16=False,
                         model_init_kwargs={"dtype": torch.float32})
    trainer = trl.SFTTrainer(model=str(policy_dir), args=args, processing_class=processor,
                             train_dataset=datasets.Dataset.from_list(records))
    trl_batch = trainer.data_collator(records)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trl_batch)
    loss.backward()
    assert ours == pytest.approx(loss.item(), abs=1e-4, rel=1e-5)
    assert norm == pytest.approx(grad_norm(trainer.model), abs=1e-4, rel=1e-4) and norm > 0

    grey = processor.image_processor(images=[square((60, 60, 60))] * 7, return_tensors="pt")
    with torch.no_grad():
        other = step(LogpsModule(policy, 64), Reference(), batch | grey)
    assert abs(other.losses.mean().item() - ours) > 1e-5


def test_sft_trains_on_vision_records(models, demo_pairs, tmp_path):
    """preftune train with stage: sft on a VLM: TRL's messages form with images and image pairs (their chosen) in
    one run, evaluated on held-out examples with images; the output loads with its processor."""
    from transformers import AutoProcessor

    from preftune import train as train_mod

    records = write_sft(tmp_path / "sft", demo_pairs[36:44], messages=True)
    pairs = write_vision_pairs(tmp_path / "pairs", demo_pairs[44:48])
    summary = train_mod.train(from_dict({
        "model_name_or_path": str(models[0]), "dataset": f"{records},{pairs}", "stage": "sft", "max_steps": 2,
        "per_device_train_batch_size": 4, "val_size": 4, "learning_rate": 1e-2, "progress_bar": False,
        "plot_loss": False, "save_strategy": "no", "output_dir": str(tmp_path / "out"), "torch_dtype": "float32"}))
    assert summary["data"]["train"] == 8
    rows = json.loads((tmp_path / "out" / "sft_metrics" / "log_history.json").read_text())
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 2 and rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert AutoProcessor.from_pretrained(tmp_path / "out").image_processor is not None


def test_llamafactory_sft_and_kto_entries_with_images_equal_trl_format(models, demo_pairs, tmp_path):
    """LLaMA-Factory's SFT entries (mllm_demo's shape: sharegpt with an images column) and KTO entries (a kto_tag
    column) with `<image>` placeholders read into the examples TRL's SFT and unpaired vision records give: the same
    images (by pixels), labels, token ids and completion starts."""
    from transformers import AutoProcessor

    from preftune.data import read_dataset
    from preftune.data.images import image_options
    from preftune.vision import tokenize_vision_examples, tokenize_vision_pairs

    folder = tmp_path / "data"
    sft_trl, unpaired_trl = write_sft(folder, demo_pairs[:6]), write_unpaired(folder, demo_pairs[:6])
    sft, kto = [], []
    for i, r in enumerate(json.loads(line) for line in unpaired_trl.read_text().splitlines()):
        human = {"from": "human", "value": "<image>" * len(r["images"]) + r["prompt"][0]["content"][-1]["text"]}
        chosen = demo_pairs[i]["chosen"]
        sft.append({"conversations": [human, {"from": "gpt", "value": chosen}], "images": r["images"]})
        kto.append({"conversations": [human, {"from": "gpt", "value": r["completion"][0]["content"][0]["text"]}],
                    "kto_tag": r["label"], "images": r["images"]})
    (folder / "sft.json").write_text(json.dumps(sft))
    (folder / "kto.json").write_text(json.dumps(kto))
    columns = {"messages": "conversations", "images": "images"}
    (folder / "dataset_info.json").write_text(json.dumps({
        "lf_sft": {"file_name": "sft.json", "formatting": "sharegpt", "columns": columns},
        "lf_kto": {"file_name": "kto.json", "formatting": "sharegpt", "columns": {**columns, "kto_tag": "kto_tag"}}}))
    processor = AutoProcessor.from_pretrained(models[0])
    # image_min_pixels: LLaMA-Factory's default (32 * 32) would enlarge these small squares in its format only
    cfg = from_dict({"cutoff_len": 4096, "image_min_pixels": 1, "dataset_dir": str(folder)})
    bounds = image_options(cfg)

    ours = read_dataset("lf_sft", str(folder), sft=True, images=bounds)
    theirs = read_dataset(str(sft_trl), "data", sft=True, images=bounds)
    assert [p.images for p in ours] == [p.images for p in theirs] and [len(p.images) for p in ours] == [0, 1, 2] * 2
    assert [(t.chosen_ids, t.chosen_start) for t in tokenize_vision_pairs(processor, ours, cfg)] == \
        [(t.chosen_ids, t.chosen_start) for t in tokenize_vision_pairs(processor, theirs, cfg)]
    ours = read_dataset("lf_kto", str(folder), allow_unpaired=True, images=bounds)
    theirs = read_dataset(str(unpaired_trl), "data", allow_unpaired=True, images=bounds)
    assert [(e.label, e.images) for e in ours] == [(e.label, e.images) for e in theirs]
    assert [(e.ids, e.start, e.label) for e in tokenize_vision_examples(processor, ours, cfg)] == \
        [(e.ids, e.start, e.label) for e in tokenize_vision_examples(processor, theirs, cfg)]
