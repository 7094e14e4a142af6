"""fp16 mixed precision and its loss scaler (GradScaler), checkpointed in scaler.json and resumed exactly.

preftune refuses fp16 without a CUDA GPU (engines.check_hardware; tests/test_numbers.py), and rightly:
accelerate makes fp16 on a CPU inert (no autocast, no scaler: the run would train float32 while its
config says fp16), which the first test below pins. So the scaler path is tested here on a stand-in
for the GPU: accelerate's own fp16 code (scaler.scale(loss).backward(), unscale_ before clipping,
scaler.step/update in its optimizer wrapper) driven by torch's CPU GradScaler under float16 autocast on
the CPU, which is what accelerate would build on CUDA with device "cuda". Everything of preftune's
(the loop, the non-finite guard, scaler.json in checkpoints, the resume) runs as it is. The same run
on a real GPU is benchmarks/gpu_check.sh's step f.

The scaler starts at 2**20 with a growth interval of 2: on this model steps 1 and 3 overflow (skipped, the
scale backs off) and it grows after 2 good ones, so the checkpoint's scale (step 3's) is one a fresh
scaler does not have, and a resume that lost it would overflow at step 4.
"""

import json
import shutil

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from preftune import checkpoints, engines
from preftune import train as train_mod
from preftune.config import from_dict
from preftune.demo import make_pairs
from preftune.errors import ConfigError

TIMING = {"tokens_per_second"}
INIT_SCALE = 2.0 ** 20


def test_accelerate_makes_fp16_on_a_cpu_inert_so_preftune_refuses_it():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # an earlier run's state (as make_accelerator does)
    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    assert accelerator.scaler is None and not accelerator.native_amp  # no loss scaling, and no autocast:
    with accelerator.autocast():
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.float32  # float32 throughout


def cpu_fp16_on(mp, made: list) -> None:
    """fp16 on this CPU: the hardware check lets it through, and the Accelerator gets what it builds on a
    GPU (native autocast, a GradScaler), for the CPU; each accelerator made is appended to `made`."""
    real = engines.make_accelerator

    def with_cpu_scaler(cfg, log_with=None, **kwargs):
        accelerator = real(cfg, log_with, **kwargs)
        assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None  # what accelerate leaves
        accelerator.native_amp = True  # autocast(device_type="cpu", dtype=float16)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=2)
        made.append(accelerator)
        return accelerator

    mp.setattr(train_mod, "check_hardware", lambda cfg: None)
    mp.setattr(engines, "make_accelerator", with_cpu_scaler)


@pytest.fixture
def cpu_fp16(monkeypatch):
    made = []
    cpu_fp16_on(monkeypatch, made)
    return made


def raw_config(tmp_path, **over):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(24, 0)))
    return {"model_name_or_path": over.pop("model"), "dataset": str(data), "output_dir": str(tmp_path / "out"),
            "fp16": True, "torch_dtype": "float32", "learning_rate": 1e-3, "max_steps": 6,
            "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 3, "cutoff_len": 64,
            "warmup_steps": 2, "progress_bar": False, "plot_loss": False, **over}


def outputs(out):
    history = json.loads((out / "dpo_metrics" / "log_history.json").read_text())
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history], load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """6 steps, checkpoints at 3 and 6: (output_dir, summary, the scaler's final state)."""
    tmp, made = tmp_path_factory.mktemp("fp16"), []
    with pytest.MonkeyPatch.context() as mp:
        cpu_fp16_on(mp, made)
        summary = train_mod.train(from_dict(raw_config(tmp, model=str(tiny_model_dir))))
    return tmp / "out", summary, made[-1].scaler.state_dict()


def test_fp16_trains_with_the_scaler_and_skips_an_overflowing_step(uninterrupted):
    out, summary, scaler = uninterrupted
    history, weights = outputs(out)
    steps = [r for r in history if "loss" in r]
    # steps 1 and 3 overflowed (infinite gradients): the scaler skipped them, so they have no row, and the
    # learning-rate schedule did not advance (as transformers' Trainer: optimizer_step_was_skipped)
    assert [r["step"] for r in steps] == [2, 4, 5, 6]
    assert steps[0]["learning_rate"] == pytest.approx(1e-3 / 2)  # warm-up's first step: 1 of 2
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 10 for r in steps)  # finite
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert summary["nonfinite_steps_skipped"]["count"] == 0  # the scaler's business, not the non-finite guard's
    state = json.loads((out / "checkpoint-3" / "scaler.json").read_text())
    assert state.keys() >= {"scale", "_growth_tracker"}
    assert state["scale"] < INIT_SCALE  # backed off: a fresh scaler would start elsewhere
    assert scaler["scale"] != state["scale"]  # and it moved again after the checkpoint


def test_fp16_resume_restores_the_scaler_and_continues_exactly(tmp_path, tiny_model_dir, uninterrupted, cpu_fp16,
                                                               monkeypatch):
    class Killed(Exception):
        pass

    real_save = checkpoints.save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        raise Killed  # after the first checkpoint, step 3's

    raw = raw_config(tmp_path / "b", model=str(tiny_model_dir))
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_mod.train(from_dict(raw))
    monkeypatch.setattr(checkpoints, "save_checkpoint", real_save)
    summary = train_mod.train(from_dict({**raw, "resume_from_checkpoint": True}))
    assert summary["resumed_from"]["step"] == 3
    reference_out, _, reference_scaler = uninterrupted
    assert cpu_fp16[-1].scaler.state_dict() == reference_scaler  # scale and growth counter, as uninterrupted
    history, weights = outputs(tmp_path / "b" / "out")
    reference_history, reference_weights = outputs(reference_out)
    assert history == reference_history
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[k], reference_weights[k]) for k in weights)  # bitwise


def test_resuming_a_checkpoint_without_scaler_json_in_fp16_is_one_line(tmp_path, tiny_model_dir, uninterrupted,
                                                                      cpu_fp16):
    raw = raw_config(tmp_path, model=str(tiny_model_dir), max_steps=8)
    shutil.copytree(uninterrupted[0] / "checkpoint-6", tmp_path / "out" / "checkpoint-6")
    (tmp_path / "out" / "checkpoint-6" / "scaler.json").unlink()
    with pytest.raises(ConfigError, match=r"has no scaler.json \(it was not an fp16 run\)") as err:
        train_mod.train(from_dict({**raw, "resume_from_checkpoint": True}))
    assert "\n" not in str(err.value)


def test_zero_reports_an_overflow_skipped_step_as_not_stepped():
    """Under ZeRO the loss scaler is DeepSpeed's: an overflowing fp16 step is skipped inside engine.step(), so
    update() must say the weights did not change (no schedule step, no row) and must not hand the overflow's
    norm to the non-finite guard (it would stop the run). A stand-in DeepSpeedEngine with DeepSpeed's names."""
    from preftune.engines.zero import ZeRO

    class Engine:  # deepspeed.DeepSpeedEngine: step, was_step_applied, get_global_grad_norm
        def __init__(self, applied):
            self.applied, self.steps = applied, 0

        def step(self):
            self.steps += 1

        def was_step_applied(self):
            return self.applied

        def get_global_grad_norm(self):
            return 0.5

    class Optimizer:  # accelerate's wrapper: its step is a no-op under DeepSpeed
        def step(self):
            pass

    norms = []
    zero = object.__new__(ZeRO)  # update() reads no state of the engine object
    norm, stepped = zero.update(Engine(applied=False), Optimizer(), 1.0, skip=norms.append)
    assert not stepped and norm != norm and norms == [0.0]  # only the loss check, before the step
    norm, stepped = zero.update(Engine(applied=True), Optimizer(), 1.0, skip=norms.append)
    assert stepped and norm == 0.5 and norms == [0.0, 0.0, 0.5]
