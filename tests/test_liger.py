"""enable_liger_kernel: Liger's fused linear DPO loss (liger-kernel, its chunked losses run on a CPU)
gives the same losses, statistics and gradients as preftune's chunked LM head, step after step, for
every loss it takes; what it cannot do is refused in one line; its Triton layer kernels, GPU-only,
are applied as the stand-in records."""

import copy
import json
import logging

import liger_kernel  # noqa: F401  (a test dependency: a broken install fails the suite, not skips it)
import pytest
import torch
from hostile import run_refused
from stand_ins import bind
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune import logps, models
from preftune.engines import fsdp
from preftune import train as train_mod
from preftune.batching import collate
from preftune.config import LIGER_LOSSES, from_dict
from preftune.data import PreferencePair
from preftune.demo import make_pairs
from preftune.errors import ConfigError
from preftune.logps import FusedDPO, LogpsModule, fused_dpo_logps, get_batch_logps
from preftune.reference import Reference, load_models
from preftune.step import PreferenceStep
from preftune.tokenization import tokenize_pairs


OPTIONS = {"robust": {"label_smoothing": 0.1}, "exo_pair": {"label_smoothing": 1e-3}, "discopop": {"discopop_tau": 0.2}}
TOL = 1e-4


def cfg_for(model_dir, **over):
    return from_dict({"model_name_or_path": str(model_dir), "torch_dtype": "float32", **over})


@pytest.fixture(scope="module")
def batches(tiny_model_dir):
    """Three batches of 4 pairs of different lengths, indexed for a precomputed reference."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    items = tokenize_pairs(tokenizer, [PreferencePair(**p) for p in make_pairs(12, 5)], 128, None)
    return [collate(items[i:i + 4], tokenizer.pad_token_id, list(range(i, i + 4))) for i in range(0, 12, 4)]


@pytest.fixture(scope="module")
def models_pair(tiny_model_dir):
    """(policy, reference): the reference is the saved model, the policy moved away from it, so that the
    log-ratios, and every loss's gradient, are far from zero."""
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy, reference


def run_steps(cfg, policy, reference, batches, chunk_size=64, own=False, autocast=False):
    """Train a copy of `policy` (`own`: the policy itself) over `batches` (one SGD step each) as the loop
    does; per step the losses, the statistics, the KL and every trainable parameter's gradient."""
    model = (policy if own else copy.deepcopy(policy)).train()
    runner, step = LogpsModule(model, chunk_size), PreferenceStep(cfg)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    seen = []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = step(runner, reference, batch, kl=True)
        (out.losses.sum() / out.losses.numel()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        seen.append((out.losses.detach(), {k: v.detach() for k, v in out.stats.items()}, out.kl, grads))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # sppo_hard's gradients are large here
        optimizer.step()
        optimizer.zero_grad()
    return seen


def assert_same_steps(fused, chunked):
    for k, ((loss_f, stats_f, kl_f, grads_f), (loss_c, stats_c, kl_c, grads_c)) in enumerate(zip(fused, chunked)):
        torch.testing.assert_close(loss_f, loss_c, atol=TOL, rtol=TOL, msg=lambda m: f"step {k} losses: {m}")
        # Liger's fused loss never forms the logits: no logits/* or entropy (step.token_stats)
        assert stats_f.keys() == stats_c.keys() - {"logits/chosen", "logits/rejected", "entropy"}
        for key in stats_f:
            torch.testing.assert_close(stats_f[key].float(), stats_c[key].float(), atol=TOL, rtol=TOL,
                                       msg=lambda m: f"step {k} {key}: {m}")
        if kl_c is not None:  # kl_per_token, kl_per_sequence: (sum, count)
            assert kl_f.keys() == kl_c.keys() and all(kl_f[key][1] == kl_c[key][1] for key in kl_c)
            assert all(kl_f[key][0] == pytest.approx(kl_c[key][0], abs=TOL, rel=TOL) for key in kl_c)
        for name in grads_c:  # within 1e-4 of the tensor's largest entry: sums in another order differ by that
            scale = max(1.0, grads_c[name].abs().max().item())
            torch.testing.assert_close(grads_f[name], grads_c[name], atol=TOL * scale, rtol=0,
                                       msg=lambda m: f"step {k} grad {name}: {m}")


@pytest.mark.parametrize("loss", LIGER_LOSSES)
def test_fused_steps_equal_the_chunked_steps(loss, tiny_model_dir, models_pair, batches):
    """Losses, every statistic, the KL and the gradients, over three training steps, with a live reference."""
    policy, model = models_pair
    over = {"pref_loss": loss, **OPTIONS.get(loss, {})}
    reference = Reference(model, chunk_size=64)
    fused = run_steps(cfg_for(tiny_model_dir, enable_liger_kernel=True, **over), policy, reference, batches)
    chunked = run_steps(cfg_for(tiny_model_dir, **over), policy, reference, batches)
    assert_same_steps(fused, chunked)
    assert fused[0][1]["rewards/margins"].abs().max() > 0.05  # the policy is not the reference
    assert any(fused[-1][3][n].abs().max() > 0 for n in fused[-1][3])


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_lora_steps_equal_the_chunked_steps(tiny_model_dir, batches, autocast):
    """LoRA: the LM head is frozen (Liger computes no gradient for it), the reference is the policy with its
    adapter off; under bf16 autocast the backbone runs in bfloat16 and both LM heads in float32."""
    seen = {}
    for fused in (True, False):
        cfg = cfg_for(tiny_model_dir, enable_liger_kernel=fused, finetuning_type="lora", pref_loss="hinge")
        policy, reference = load_models(cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # LoRA's B starts at zero: give the adapter a visible effect
            for name, p in policy.named_parameters():
                if "lora_" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        seen[fused] = run_steps(cfg, policy, reference, batches, own=True, autocast=autocast)
    assert seen[True][0][1]["rewards/margins"].abs().max() > 0.05
    assert_same_steps(seen[True], seen[False])


def test_fused_steps_with_precomputed_reference_logps(tiny_model_dir, models_pair, batches):
    """A precomputed reference: Liger gets its log-probs as tensors, no model."""
    policy, model = models_pair
    with torch.no_grad():
        table = torch.stack([get_batch_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"]).logps
                             .view(2, -1).T for b in batches])  # (3, 4, 2) [chosen, rejected]
    reference = Reference(None, {"train": table.reshape(-1, 2)}, 64, "train")
    fused = run_steps(cfg_for(tiny_model_dir, enable_liger_kernel=True), policy, reference, batches)
    chunked = run_steps(cfg_for(tiny_model_dir), policy, reference, batches)
    assert fused[0][2] is None  # no model, no KL
    assert_same_steps(fused, chunked)


def test_evaluation_without_gradients_takes_the_chunked_path(tiny_model_dir, models_pair, batches, monkeypatch):
    policy, model = models_pair
    step = PreferenceStep(cfg_for(tiny_model_dir, enable_liger_kernel=True))
    monkeypatch.setattr("preftune.logps.fused_dpo_logps", lambda *a, **k: pytest.fail("Liger without gradients"))
    with torch.no_grad():
        out = step(LogpsModule(policy, 64), Reference(model, chunk_size=64), batches[0], kl=True)
    assert out.losses.shape == (4,) and out.kl is not None


def test_given_reference_logps_equal_liger_own_reference_pass(models_pair, batches):
    """preftune hands Liger the reference's log-probs; Liger's stock class runs the reference's hidden
    states through its LM head itself: the same loss and gradients."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    policy, model = models_pair
    batch = batches[1]
    score = batch["completion_mask"][:, 1:].bool()
    targets = batch["input_ids"][:, 1:].masked_fill(~score, -100)
    with torch.no_grad():
        ref_hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref_logps = get_batch_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).logps
    hidden = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    hidden = hidden[:, :-1].detach().requires_grad_()
    stock = LigerFusedLinearDPOLoss(beta=0.1, compiled=False, chunk_size=2)
    loss, aux = stock(policy.lm_head.weight, hidden, targets, ref_input=ref_hidden[:, :-1],
                      ref_weight=model.lm_head.weight)
    loss.backward()
    expected = hidden.grad.clone()

    ours = fused_dpo_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], ref_logps,
                           FusedDPO("sigmoid", 0.1), chunk_size=2 * 2 * hidden.size(1))  # 2 pairs per Liger call
    torch.testing.assert_close(ours.fused_loss, loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.logps, torch.cat((aux[0], aux[1])), atol=1e-5, rtol=1e-5)
    captured = {}
    h = policy.model.norm.register_forward_hook(lambda m, i, o: captured.setdefault("hidden", o))  # noqa: ARG005
    try:
        again = fused_dpo_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                ref_logps, FusedDPO("sigmoid", 0.1))
    finally:
        h.remove()
    (grad,) = torch.autograd.grad(again.fused_loss, captured["hidden"])
    torch.testing.assert_close(grad[:, :-1], expected, atol=1e-5, rtol=1e-5)


def test_one_pair_per_liger_call_is_the_same(tiny_model_dir, models_pair, batches):
    """logps_chunk_size smaller than two rows: one pair per Liger call, the same numbers."""
    policy, model = models_pair
    reference = Reference(model, chunk_size=64)
    cfg = cfg_for(tiny_model_dir, enable_liger_kernel=True)
    assert_same_steps(run_steps(cfg, policy, reference, batches[:1], chunk_size=1),
                      run_steps(cfg, policy, reference, batches[:1], chunk_size=100_000))


def test_the_training_alias_and_an_end_to_end_run(tmp_path, tiny_model_dir, demo_pairs, monkeypatch):
    """use_liger_kernel (TrainingArguments) sets enable_liger_kernel; a run with it logs what the chunked run logs."""
    calls = []
    monkeypatch.setattr(logps, "fused_dpo_logps", lambda *a, **k: calls.append(1) or fused_dpo_logps(*a, **k))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs[:40]))
    raw = {"model_name_or_path": str(tiny_model_dir), "dataset": str(data), "val_size": 8, "learning_rate": 1e-3,
           "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 4, "logging_steps": 1,
           "eval_steps": 2, "cutoff_len": 128, "torch_dtype": "float32", "progress_bar": False, "plot_loss": False,
           "logps_chunk_size": 200}
    assert from_dict({**raw, "use_liger_kernel": True}).enable_liger_kernel
    train_mod.train(from_dict({**raw, "output_dir": str(tmp_path / "chunked")}))
    assert not calls
    train_mod.train(from_dict({**raw, "output_dir": str(tmp_path / "liger"), "use_liger_kernel": True}))
    assert len(calls) == 4 * 2  # every training micro-batch went through Liger
    rows = [json.loads((tmp_path / d / "dpo_metrics" / "log_history.json").read_text()) for d in ("chunked", "liger")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    for chunked, liger in zip(*rows):
        for key in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "nll_loss",
                    "kl_per_token", "kl_per_sequence", "grad_norm", "eval_loss", "eval_logps/rejected",
                    "eval_kl_per_token", "eval_kl_per_sequence"):
            if key == "rewards/accuracies" and abs(chunked.get("rewards/margins", 1.0)) < 1e-3:
                continue  # policy = reference: Liger's margins are float noise (the chunked path's exactly 0)
            if key in chunked:
                assert liger[key] == pytest.approx(chunked[key], abs=TOL, rel=TOL), (chunked["step"], key)
    assert rows[1][-1]["eval_loss"] < rows[1][0]["eval_loss"]  # it trained


@pytest.mark.parametrize("over, words", [
    ({"pref_loss": "ipo"}, "not pref_loss: ipo"),
    ({"pref_loss": "sigmoid_norm"}, "not pref_loss: sigmoid_norm"),
    ({"pref_loss": "aot"}, "not pref_loss: aot"),
    ({"pref_loss": "simpo"}, "not pref_loss: simpo"),
    ({"pref_loss": "orpo"}, "not pref_loss: orpo"),
    ({"pref_loss": "sigmoid,hinge"}, "not pref_loss: sigmoid,hinge"),
    ({"pref_loss": "kto"}, "not pref_loss: kto"),
    ({"stage": "sft", "pref_loss": "sigmoid"}, "not stage: sft"),
    ({"label_smoothing": 0.1}, "no label smoothing"),
    ({"f_divergence_type": "js_divergence"}, "f_divergence_type"),
    ({"ld_alpha": 0.5}, "not with ld_alpha"),
    ({"use_weighting": True}, "not with use_weighting"),
    ({"pref_ftx": 0.5}, "not with pref_ftx"),
    ({"pref_bco_weight": 0.5}, "not with pref_bco_weight"),
    ({"padding_free": True}, "not with padding_free"),
    ({"prefix_sharing": True}, "not with prefix_sharing"),
])
def test_what_liger_cannot_compute_is_refused(over, words):
    with pytest.raises(ConfigError, match=f"^enable_liger_kernel: .*{words}") as err:
        from_dict({"model_name_or_path": "m", "enable_liger_kernel": True, **over})
    assert "\n" not in str(err.value)


def test_supported_losses_with_lora_load():
    for loss in LIGER_LOSSES:
        cfg = from_dict({"model_name_or_path": "m", "use_liger_kernel": True, "finetuning_type": "lora",
                         "pref_loss": loss, **OPTIONS.get(loss, {})})
        assert cfg.enable_liger_kernel


def test_liger_not_installed_names_the_package(monkeypatch):
    real = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError, match="^enable_liger_kernel: .*pip install liger-kernel"):
        from_dict({"model_name_or_path": "m", "enable_liger_kernel": True})
    from_dict({"model_name_or_path": "m", "enable_liger_kernel": False})  # off: not needed


def test_fsdp_is_refused():
    cfg = from_dict({"model_name_or_path": "m", "enable_liger_kernel": True})
    with pytest.raises(ConfigError, match="^fsdp: enable_liger_kernel"):
        fsdp.check(cfg)


def test_a_soft_capped_model_is_refused(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="^enable_liger_kernel: .*final_logit_softcapping"):
        models.apply_liger_kernels(model, cfg_for(tiny_model_dir, enable_liger_kernel=True))


@pytest.fixture
def apply_calls(monkeypatch):
    """Liger's instance patcher replaced by a recorder (its Triton kernels need a CUDA GPU), bound to its
    signature and, stricter than Liger (which drops the keywords an architecture's function lacks, a
    misspelt one too), to the tiny Qwen2 model's apply function (tests/stand_ins.py)."""
    import liger_kernel.transformers

    calls = []

    def apply(*args, **kwargs):
        call = bind("liger_kernel", "_apply_liger_kernel_to_instance", *args, **kwargs)
        assert call["model"].config.model_type == "qwen2"
        bind("liger_kernel", "apply_liger_kernel_to_qwen2", model=call["model"], **call.get("kwargs", {}))
        calls.append({"model": call["model"], **call.get("kwargs", {})})

    monkeypatch.setattr(liger_kernel.transformers, "_apply_liger_kernel_to_instance", apply)
    return calls


def test_on_a_gpu_the_layer_kernels_are_applied_without_liger_cross_entropy(tiny_model_dir, apply_calls,
                                                                           monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    models.apply_liger_kernels(model, cfg_for(tiny_model_dir, enable_liger_kernel=True))
    assert apply_calls == [{"model": model, "fused_linear_cross_entropy": False, "cross_entropy": False}]
    apply_calls.clear()
    models.apply_liger_kernels(model, cfg_for(tiny_model_dir))  # off: nothing
    model.config.model_type = "no_such_architecture"  # no kernels in Liger: only the fused loss
    models.apply_liger_kernels(model, cfg_for(tiny_model_dir, enable_liger_kernel=True))
    assert apply_calls == []


def test_on_a_gpu_a_lora_policy_patches_its_transformers_model(tiny_model_dir, apply_calls, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    policy = models.load_policy(cfg_for(tiny_model_dir, enable_liger_kernel=True, finetuning_type="lora"))
    assert len(apply_calls) == 1 and apply_calls[0]["model"] is policy.get_base_model()


def test_on_a_cpu_only_the_fused_loss_is_used(tiny_model_dir, apply_calls, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_logged", set())
    cfg = cfg_for(tiny_model_dir, enable_liger_kernel=True)
    with caplog.at_level(logging.INFO, logger="preftune"):
        models.load_policy(cfg)
        models.load_reference(cfg)
    assert apply_calls == []
    said = [r.message for r in caplog.records if "Triton layer kernels are not applied" in r.message]
    assert len(said) == 1


def test_the_cli_refuses_in_one_line(tmp_path, tiny_model_dir):
    message = run_refused(["train", "--model_name_or_path", str(tiny_model_dir), "--use_liger_kernel", "true",
                           "--pref_loss", "ipo", "--output_dir", str(tmp_path / "out")], cwd=tmp_path,
                          watch=[tmp_path, tiny_model_dir], expect=["enable_liger_kernel", "pref_loss: ipo"])
    assert "remove enable_liger_kernel" in message


@pytest.mark.slow
@pytest.mark.one_process
def test_compiled_liger_chunks_equal_the_eager_ones(models_pair, batches):
    """On a GPU Liger's chunks are compiled (its default); the given reference log-probs must reach the
    compiled loss too. Checked here on the CPU (about 10 s of compilation), values and gradients."""
    from preftune.logps import _liger_dpo

    policy, model = models_pair
    batch = batches[2]
    score = batch["completion_mask"][:, 1:].bool()
    targets = batch["input_ids"][:, 1:].masked_fill(~score, -100)
    with torch.no_grad():
        hidden = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ref_logps = get_batch_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).logps
    results = []
    for compiled in (False, True):
        h = hidden[:, :-1].clone().requires_grad_()
        loss, aux = _liger_dpo().apply(h, policy.lm_head.weight, targets, None, ref_logps[:4], ref_logps[4:],
                                       FusedDPO("discopop", 0.1, discopop_tau=0.2), compiled)
        (grad,) = torch.autograd.grad(loss, h)
        results.append((loss.detach(), aux[0], grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
