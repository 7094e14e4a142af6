"""Fine-tuning types (LoRA, freeze, QLoRA refusal), every kind of reference, saving adapters and
merged weights, and the loading safety defaults, on the tiny local model."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune import adapters, checkpoints, final, models
from preftune import train as train_mod
from preftune.adapters import REFERENCE_ADAPTER, AdapterReference
from preftune.batching import collate
from preftune.config import from_dict
from preftune.data import PreferencePair
from preftune.demo import build_model, make_pairs
from preftune.errors import ConfigError, ModelError
from preftune.logps import completion_kl, get_batch_logps
from preftune.reference import load_models
from preftune.tokenization import tokenize_pairs



def load_policy_and_reference(cfg):
    """The policy and the reference model that `reference.load_models` builds from cfg (neither an
    accelerator nor a tokenizer check: the models themselves)."""
    policy, reference = load_models(cfg)
    return policy, reference.model

def cfg_for(model_dir, **over):
    return from_dict({"model_name_or_path": str(model_dir), "torch_dtype": "float32", **over})


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [PreferencePair(**p) for p in make_pairs(4, 3)]
    return collate(tokenize_pairs(tokenizer, pairs, 128, None), tokenizer.pad_token_id)


def base_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@torch.no_grad()
def logps_of(model, batch):
    return get_batch_logps(model, **batch)[0]


def randomize_lora(model, adapter="default", seed=0):
    """LoRA's B starts at zero (adapter = no-op); give every adapter weight a visible value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name or f"lora_A.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory):
    """A saved LoRA adapter on the tiny base with non-zero weights: the 'SFT model' is base + this."""
    folder = tmp_path_factory.mktemp("sft_adapter")
    peft_model = get_peft_model(base_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(peft_model, seed=1)
    peft_model.save_pretrained(folder)
    return folder


def test_lora_reference_is_the_policy_with_its_adapter_off(tiny_model_dir, batch):
    policy, reference = load_policy_and_reference(cfg_for(tiny_model_dir, finetuning_type="lora"))
    assert isinstance(policy, PeftModel) and isinstance(reference, AdapterReference) and reference.policy is policy
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n or "embed" in n for n in trainable)  # lora_target: all spares the LM head
    randomize_lora(policy)  # the policy moves away from the base; the reference must not
    base = base_model(tiny_model_dir)
    policy.train()
    reference_logps = logps_of(reference, batch)
    torch.testing.assert_close(reference_logps, logps_of(base, batch))
    assert not torch.allclose(logps_of(policy, batch), reference_logps, atol=1e-3)
    assert policy.training and all(p.requires_grad for n, p in policy.named_parameters() if n in trainable)
    # the KL metric with the adapter-off reference equals the KL to a separately loaded base
    with torch.no_grad():
        policy_hidden = get_batch_logps(policy, **batch, return_hidden=True).hidden
        reference_hidden = get_batch_logps(reference, **batch, return_hidden=True).hidden
        base_hidden = get_batch_logps(base, **batch, return_hidden=True).hidden
    kl, n = completion_kl(policy, reference, policy_hidden, reference_hidden)
    kl_base, _ = completion_kl(policy, base, policy_hidden, base_hidden)
    assert n > 0 and kl.item() > 1e-3 and kl.item() == pytest.approx(kl_base.item(), rel=1e-4)


def test_starting_from_an_sft_adapter_the_reference_is_the_sft_model(tiny_model_dir, sft_adapter, batch):
    """The known trap: disabling the adapter of base + SFT adapter gives the bare base."""
    cfg = cfg_for(tiny_model_dir, finetuning_type="lora", adapter_name_or_path=str(sft_adapter))
    policy, reference = load_policy_and_reference(cfg)
    sft = PeftModel.from_pretrained(base_model(tiny_model_dir), sft_adapter)
    sft_logps, base_logps = logps_of(sft, batch), logps_of(base_model(tiny_model_dir), batch)
    assert not torch.allclose(sft_logps, base_logps, atol=1e-3)
    torch.testing.assert_close(logps_of(policy, batch), sft_logps)  # training continues from the SFT adapter
    randomize_lora(policy, seed=5)  # train the policy's adapter: the reference stays the SFT model
    torch.testing.assert_close(logps_of(reference, batch), sft_logps)
    assert not torch.allclose(logps_of(policy, batch), sft_logps, atol=1e-3)
    grads = {n: p.requires_grad for n, p in policy.named_parameters() if "lora_" in n}
    assert all(g for n, g in grads.items() if ".default." in n)
    assert not any(g for n, g in grads.items() if f".{REFERENCE_ADAPTER}." in n)


def test_adapter_list_merges_all_but_the_last(tiny_model_dir, sft_adapter, tmp_path, batch):
    second = get_peft_model(base_model(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_lora(second, seed=2)
    second.save_pretrained(tmp_path / "second")
    cfg = cfg_for(tiny_model_dir, finetuning_type="lora", adapter_name_or_path=f"{sft_adapter},{tmp_path / 'second'}")
    policy, reference = load_policy_and_reference(cfg)
    expected = PeftModel.from_pretrained(
        PeftModel.from_pretrained(base_model(tiny_model_dir), sft_adapter).merge_and_unload(), tmp_path / "second")
    torch.testing.assert_close(logps_of(reference, batch), logps_of(expected, batch))
    assert all("q_proj" in n or "v_proj" in n for n, p in policy.named_parameters() if p.requires_grad)


def test_ref_model_with_adapters_is_that_checkpoint(tiny_model_dir, tiny_tokenizer, sft_adapter, tmp_path, batch):
    other = tmp_path / "other"
    build_model(len(tiny_tokenizer), seed=7, hidden=32, layers=2).save_pretrained(other)
    cfg = cfg_for(tiny_model_dir, finetuning_type="lora", ref_model=str(other), ref_model_adapters=str(sft_adapter))
    policy, reference = load_policy_and_reference(cfg)
    assert not isinstance(reference, AdapterReference) and not any(p.requires_grad for p in reference.parameters())
    expected = PeftModel.from_pretrained(base_model(other), sft_adapter)
    torch.testing.assert_close(logps_of(reference, batch), logps_of(expected, batch))
    with pytest.raises(ModelError, match="ref_model_adapters: '.*missing' is not an adapter folder"):
        load_policy_and_reference(cfg_for(tiny_model_dir, ref_model=str(other),
                                                 ref_model_adapters=str(tmp_path / "missing")))


@pytest.mark.parametrize("layers,modules,extra,expected", [
    (1, "all", None, {"model.layers.1."}),
    (-1, "mlp", None, {"model.layers.0.mlp."}),
    (1, "self_attn", "embed_tokens,norm", {"model.layers.1.self_attn.", "model.embed_tokens.", "model.norm."}),
])
def test_freeze_trains_the_chosen_layers_with_a_frozen_copy_as_reference(tiny_model_dir, batch, layers, modules,
                                                                         extra, expected):
    cfg = cfg_for(tiny_model_dir, finetuning_type="freeze", freeze_trainable_layers=layers,
                  freeze_trainable_modules=modules, freeze_extra_modules=extra)
    policy, reference = load_policy_and_reference(cfg)
    for name, p in policy.named_parameters():
        assert p.requires_grad == any(name.startswith(prefix) for prefix in expected), name
    assert reference is not policy and not any(p.requires_grad for p in reference.parameters())
    torch.testing.assert_close(logps_of(reference, batch), logps_of(base_model(tiny_model_dir), batch))


def test_freeze_names_an_unknown_module(tiny_model_dir):
    with pytest.raises(ConfigError, match="freeze_trainable_modules: no module 'attention'.*self_attn"):
        load_policy_and_reference(cfg_for(tiny_model_dir, finetuning_type="freeze",
                                                 freeze_trainable_modules="attention"))


@pytest.mark.parametrize("over,message", [
    ({"use_dora": True}, "use_dora needs finetuning_type: lora"),
    ({"adapter_name_or_path": "a"}, "adapter_name_or_path needs finetuning_type: lora"),
    ({"finetuning_type": "lora", "lora_target": "q_proj,lm_head"}, "additional_target: lm_head"),
    ({"finetuning_type": "lora", "quantization_bit": 3}, "quantization_bit must be 4 or 8"),
    ({"quantization_bit": 4}, "quantization_bit needs finetuning_type: lora"),
    ({"finetuning_type": "lora", "ref_model_quantization_bit": 4}, "no separate reference is loaded"),
    ({"ref_model_adapters": "a"}, "ref_model_adapters needs ref_model"),
    ({"finetuning_type": "qlora"}, "use full, freeze or lora"),
    ({"finetuning_type": "freeze", "freeze_trainable_layers": 0}, "trains nothing"),
])
def test_config_refuses_inconsistent_keys(over, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(over)


def test_lora_target_that_matches_nothing_lists_the_linear_modules(tiny_model_dir):
    with pytest.raises(ConfigError, match="lora_target.*Linear modules of this model: .*q_proj"):
        load_policy_and_reference(cfg_for(tiny_model_dir, finetuning_type="lora", lora_target="query"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("over,key", [({"finetuning_type": "lora", "quantization_bit": 4}, "quantization_bit"),
                                      ({"ref_model_quantization_bit": 8}, "ref_model_quantization_bit")])
def test_quantization_without_cuda_fails_with_one_line(tiny_model_dir, over, key):
    with pytest.raises(ModelError) as err:
        load_policy_and_reference(cfg_for(tiny_model_dir, **over))
    assert str(err.value).startswith(f"{key}: ") and "CUDA GPU" in str(err.value) and "\n" not in str(err.value)


def test_gradient_checkpointing_with_lora_passes_gradients(tiny_model_dir, batch):
    cfg = cfg_for(tiny_model_dir, finetuning_type="lora", gradient_checkpointing=True)
    policy = models.load_policy(cfg)
    assert policy.base_model.model.model.gradient_checkpointing
    randomize_lora(policy)
    policy.train()
    get_batch_logps(policy, **batch)[0].sum().backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_every_load_as_configured(tiny_model_dir, monkeypatch, trust):
    seen = []

    def recording(real):
        def from_pretrained(name, **kwargs):
            seen.append(kwargs.get("trust_remote_code", "absent"))
            return real(name, **kwargs)
        return from_pretrained

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", recording(models.AutoTokenizer.from_pretrained))
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained",
                        recording(models.AutoModelForCausalLM.from_pretrained))
    cfg = cfg_for(tiny_model_dir, ref_model=str(tiny_model_dir), trust_remote_code=trust)
    models.load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    load_policy_and_reference(cfg)
    assert seen == [trust] * 3  # tokenizer, policy, reference


def test_no_weights_are_unpickled():
    """Weights are read by safetensors or from_pretrained only: no torch.load or pickle in preftune."""
    source = "".join(p.read_text() for p in Path(models.__file__).parent.glob("*.py"))
    assert not re.search(r"torch\.load\((?![^)]*weights_only=True)", source)
    assert not re.search(r"import pickle|pickle\.loads?\(|import dill", source)


def lora_policy(tiny_model_dir, **over):
    cfg = cfg_for(tiny_model_dir, finetuning_type="lora", **over)
    policy, _ = load_policy_and_reference(cfg)
    randomize_lora(policy)
    return cfg, policy


def test_lora_final_output_reloads_as_adapter_and_as_merged_weights(tiny_model_dir, tiny_tokenizer, tmp_path, batch):
    cfg, policy = lora_policy(tiny_model_dir)
    trained = logps_of(policy, batch)
    adapter_cfg = from_dict({**cfg.to_dict(), "output_dir": str(tmp_path / "adapter"), "save_adapter_only": True})
    merged_cfg = from_dict({**cfg.to_dict(), "output_dir": str(tmp_path / "merged")})
    final.save_final(copy.deepcopy(policy), tiny_tokenizer, adapter_cfg)
    final.save_final(policy, tiny_tokenizer, merged_cfg)

    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in adapter_dir.iterdir()}
    assert not (adapter_dir / "model.safetensors").exists() and not (adapter_dir / REFERENCE_ADAPTER).exists()
    torch.testing.assert_close(logps_of(PeftModel.from_pretrained(base_model(tiny_model_dir), adapter_dir), batch),
                               trained)
    torch.testing.assert_close(logps_of(AutoPeftModelForCausalLM.from_pretrained(adapter_dir), batch), trained)

    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    merged = base_model(merged_dir)
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logps_of(merged, batch), trained, rtol=1e-5, atol=1e-4)
    AutoTokenizer.from_pretrained(merged_dir)


def test_best_lora_adapter_is_saved_and_loaded_back(tiny_model_dir, tiny_tokenizer, tmp_path, batch):
    cfg, policy = lora_policy(tiny_model_dir, output_dir=str(tmp_path))
    best = logps_of(policy, batch)
    checkpoints.save_model(policy, tiny_tokenizer, checkpoints.best_dir(cfg), step=3)
    assert (checkpoints.best_dir(cfg) / "adapter_model.safetensors").exists()
    randomize_lora(policy, seed=9)  # training went on and got worse
    assert not torch.allclose(logps_of(policy, batch), best, atol=1e-3)
    checkpoints.load_weights_into(policy, checkpoints.best_dir(cfg))
    torch.testing.assert_close(logps_of(policy, batch), best)


def write_pairs(folder, n_train=96, n_val=32):
    folder.mkdir(parents=True, exist_ok=True)
    for name, pairs in (("train", make_pairs(n_train, 0)), ("val", make_pairs(n_val, 1))):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return str(folder / "train.jsonl"), str(folder / "val.jsonl")


def run(tmp_path, model_dir, **over):
    train_file, val_file = write_pairs(tmp_path / "data")
    cfg = cfg_for(model_dir, dataset=train_file, eval_dataset=val_file, output_dir=str(tmp_path / "out"),
                  per_device_train_batch_size=16, cutoff_len=128, logging_steps=2, progress_bar=False,
                  plot_loss=False, **over)
    return cfg, train_mod.train(cfg)


@pytest.mark.slow
@pytest.mark.one_process
def test_lora_training_learns_and_saves_a_loadable_adapter(tmp_path, tiny_model_dir, sft_adapter):
    """Started from base + SFT adapter: step 0 is a tie everywhere (the reference is the SFT model,
    not the base), then the trained adapter pulls held-out accuracy up; the output is an adapter."""
    cfg, summary = run(tmp_path, tiny_model_dir, finetuning_type="lora", adapter_name_or_path=str(sft_adapter),
                       save_adapter_only=True, learning_rate=1e-2, max_steps=12, eval_steps=12)
    assert summary["baseline"]["eval_rewards/accuracies"] == 0.5
    assert summary["baseline"]["eval_kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert summary["final"]["eval_rewards/accuracies"] > 0.6 and summary["final"]["eval_kl_per_token"] > 0
    assert summary["final"]["eval_loss"] < summary["baseline"]["eval_loss"]
    AutoPeftModelForCausalLM.from_pretrained(cfg.output_dir)


def test_freeze_training_changes_only_the_trainable_layer(tmp_path, tiny_model_dir):
    cfg, summary = run(tmp_path, tiny_model_dir, finetuning_type="freeze", freeze_trainable_layers=1,
                       learning_rate=2e-3, max_steps=3, eval_strategy="no")
    before, after = base_model(tiny_model_dir).state_dict(), base_model(cfg.output_dir).state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]) != key.startswith("model.layers.1."), key


def test_lora_example_config_parses():
    from preftune.config import load_config

    cfg = load_config(str(Path(__file__).parent.parent / "examples" / "lora.yaml"))
    assert cfg.finetuning_type == "lora" and cfg.lora_rank == 16 and cfg.save_adapter_only and cfg.gradient_checkpointing


def history_without_timing(out):
    rows = json.loads((Path(out) / "dpo_metrics" / "log_history.json").read_text())
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_run_from_an_sft_adapter_resumes_exactly(tmp_path, tiny_model_dir, sft_adapter, monkeypatch):
    """Checkpoints of a LoRA run hold the trained adapter only (not the frozen reference copy), and a
    run stopped after one resumes to the same metrics and adapter as the uninterrupted run."""
    over = dict(finetuning_type="lora", adapter_name_or_path=str(sft_adapter), save_adapter_only=True,
                learning_rate=1e-2, max_steps=4, eval_steps=2, save_steps=2, lora_dropout=0.1)
    assert_adapter_run_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch, **over)


def assert_adapter_run_resumes_exactly(tmp_path, model_dir, monkeypatch, **over):
    run(tmp_path / "whole", model_dir, **over)

    class Killed(Exception):
        pass

    real_save = checkpoints.save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        raise Killed

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run(tmp_path / "cut", model_dir, **over)
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    checkpoint = tmp_path / "cut" / "out" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert not (checkpoint / REFERENCE_ADAPTER).exists()  # the frozen SFT copy is not the run's state
    run(tmp_path / "cut", model_dir, resume_from_checkpoint=True, **over)
    assert history_without_timing(tmp_path / "cut" / "out") == history_without_timing(tmp_path / "whole" / "out")
    from safetensors.torch import load_file

    resumed = load_file(tmp_path / "cut" / "out" / "adapter_model.safetensors")
    whole = load_file(tmp_path / "whole" / "out" / "adapter_model.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_precompute_with_lora_from_an_sft_adapter_matches_the_live_reference(tmp_path, tiny_model_dir, sft_adapter):
    """precompute_ref_log_probs under LoRA loads base + the SFT adapter merged: the same reference as
    the live one (the policy with the frozen SFT adapter on), so the same losses and rewards."""
    over = dict(finetuning_type="lora", adapter_name_or_path=str(sft_adapter), learning_rate=1e-2, max_steps=3,
                eval_steps=3, ref_logps_cache_dir=str(tmp_path / "cache"))
    run(tmp_path / "live", tiny_model_dir, **over)
    run(tmp_path / "pre", tiny_model_dir, precompute_ref_log_probs=True, **over)
    live, pre = history_without_timing(tmp_path / "live" / "out"), history_without_timing(tmp_path / "pre" / "out")
    assert [r["step"] for r in live] == [r["step"] for r in pre]
    assert pre[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # step 0: policy = reference
    for row_live, row_pre in zip(live, pre):
        for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/margins", "eval_rewards/chosen"):
            if key in row_live:
                assert row_pre[key] == pytest.approx(row_live[key], rel=1e-3, abs=1e-4), (row_live["step"], key)


@pytest.fixture(scope="module")
def qlora_model_dir(tiny_tokenizer, tmp_path_factory):
    """The tiny model at hidden size 64: bitsandbytes' CPU 4-bit kernel quantizes in blocks of 64
    input features, so a layer needs at least that many."""
    folder = tmp_path_factory.mktemp("qlora_model")
    build_model(len(tiny_tokenizer), seed=0, hidden=64, layers=2).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def bnb_on_cpu(monkeypatch):
    """bitsandbytes (a test dependency, pyproject's test extra) placing quantized models on the CPU
    backend instead of the CUDA GPU `adapters.quantized_device_map` insists on."""
    import bitsandbytes as bnb  # never skipped: a broken install fails
    monkeypatch.setattr(adapters, "quantized_device_map", lambda bits, key: {"": "cpu"})
    # bitsandbytes' CPU backend repacks 4-bit weights for AVX512-BF16 inference at the first eval
    # forward and then cannot train on them; a CPU-only path that CUDA does not have
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)
    return bnb


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_an_adapter_on_a_quantized_base(tmp_path, qlora_model_dir, bnb_on_cpu, bits):
    """QLoRA end to end through bitsandbytes' CPU backend (the CUDA-only placement swapped for the
    CPU): the base's linear layers are bitsandbytes 4/8-bit layers, only the adapter trains, the
    reference is the quantized base with the adapter off (step 0 is a tie), held-out accuracy rises,
    and the output is the adapter (merging into quantized weights would lose precision), which
    loads onto the unquantized base."""
    bnb = bnb_on_cpu
    over = dict(finetuning_type="lora", quantization_bit=bits, learning_rate=1e-2, max_steps=12, eval_steps=12)
    policy, reference = load_policy_and_reference(cfg_for(qlora_model_dir, **over))
    layer = policy.base_model.model.model.layers[0].mlp.up_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    assert isinstance(reference, AdapterReference)
    assert all("lora_" in n for n, p in policy.named_parameters() if p.requires_grad)

    cfg, summary = run(tmp_path, qlora_model_dir, **over)
    assert cfg.final_adapter_only
    assert summary["baseline"]["eval_rewards/accuracies"] == 0.5
    assert summary["baseline"]["eval_kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert summary["final"]["eval_rewards/accuracies"] > 0.6
    out = Path(cfg.output_dir)
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert isinstance(AutoPeftModelForCausalLM.from_pretrained(out), PeftModel)


@pytest.mark.filterwarnings("ignore")
def test_qlora_run_resumes_exactly(tmp_path, qlora_model_dir, bnb_on_cpu, monkeypatch):
    assert_adapter_run_resumes_exactly(tmp_path, qlora_model_dir, monkeypatch, finetuning_type="lora",
                                       quantization_bit=4, learning_rate=1e-2, max_steps=4, eval_steps=2,
                                       save_steps=2, lora_dropout=0.1)


@pytest.mark.filterwarnings("ignore")
def test_quantized_reference_is_the_frozen_copy_in_8_bits(qlora_model_dir, tiny_tokenizer, bnb_on_cpu):
    """ref_model_quantization_bit: the separately loaded reference of a full run is an 8-bit copy,
    frozen, whose log-probs stay close to the full-precision policy's at the start."""
    bnb = bnb_on_cpu
    policy, reference = load_policy_and_reference(cfg_for(qlora_model_dir, ref_model_quantization_bit=8))
    assert isinstance(reference.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert not isinstance(policy.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert not any(p.requires_grad for p in reference.parameters())
    pairs = [PreferencePair(**p) for p in make_pairs(4, 3)]
    batch = collate(tokenize_pairs(tiny_tokenizer, pairs, 128, None), tiny_tokenizer.pad_token_id)
    policy_logps, reference_logps = logps_of(policy, batch), logps_of(reference, batch)
    assert not torch.equal(policy_logps, reference_logps)  # quantized, so not bit-identical
    # sequence log-probs of about -300: 8-bit weights move them by hundredths
    assert (reference_logps - policy_logps).abs().max() < 0.1


def test_qlora_refuses_a_merged_output():
    with pytest.raises(ConfigError, match="save_adapter_only: false with quantization_bit"):
        from_dict({"finetuning_type": "lora", "quantization_bit": 4, "save_adapter_only": False})
    assert from_dict({"finetuning_type": "lora"}).final_adapter_only is False
    assert from_dict({"finetuning_type": "lora", "quantization_bit": 4}).final_adapter_only is True


def test_a_fresh_run_does_not_mix_with_an_earlier_runs_checkpoints_or_weights(tmp_path, tiny_model_dir):
    """An earlier run's checkpoint-N folders would be rotated together with the new run's (by step
    number) and picked by resume: true, so a fresh run refuses them unless overwrite_output_dir; and
    an earlier adapter-only output must not stay beside new merged weights (transformers would load
    the adapter on top of them)."""
    over = dict(finetuning_type="lora", learning_rate=1e-2, max_steps=4, eval_strategy="no", save_steps=2)
    cfg, _ = run(tmp_path, tiny_model_dir, save_adapter_only=True, **over)
    out = Path(cfg.output_dir)
    assert (out / "adapter_model.safetensors").exists() and (out / "checkpoint-4").is_dir()
    with pytest.raises(ConfigError, match=r"^output_dir: .* holds checkpoint-2, checkpoint-4 from an earlier run; "
                                          r"resume it .*overwrite_output_dir: true"):
        run(tmp_path, tiny_model_dir, **{**over, "max_steps": 2})
    run(tmp_path, tiny_model_dir, overwrite_output_dir=True, **{**over, "max_steps": 2})
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # checkpoint-4 was the old run's
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert not (out / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not isinstance(merged, PeftModel) and not getattr(merged, "_hf_peft_config_loaded", False)


@pytest.mark.parametrize("precompute", [False, True])
def test_a_reference_on_another_vocabulary_is_refused_by_name(tmp_path, tiny_model_dir, tiny_tokenizer, precompute):
    other = tmp_path / "small_vocab"
    build_model(len(tiny_tokenizer) // 2, seed=3, hidden=32, layers=1).save_pretrained(other)
    with pytest.raises(ModelError, match=r"^ref_model: its vocabulary has \d+ tokens but the policy's tokenizer has "
                                         r"\d+; a reference must use the policy's tokenizer"):
        run(tmp_path, tiny_model_dir, ref_model=str(other), precompute_ref_log_probs=precompute, max_steps=1,
            ref_logps_cache_dir=str(tmp_path / "cache"))
