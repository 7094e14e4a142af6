"""activation_offloading: the saved-tensors hooks copy activations out and back, never weights, each storage
once; and a training run whose activations really make the round trip (CPU tensors offloaded here, as CUDA
ones are on a GPU) takes the same steps as one without."""

import pytest
import torch
from torch import nn

from preftune import offload
from preftune import train as train_mod
from preftune.config import from_dict
from preftune.errors import ConfigError
from test_distributed import COMPARED, history, raw_config, same_weights


class Recording(offload.OffloadActivations):
    """Offloads CPU tensors (nothing else to offload on this machine) and records each decision."""

    def __init__(self, model, **kwargs):
        super().__init__(model, device_types=("cpu",), **kwargs)
        self.packed: list[tuple[torch.Tensor, object]] = []

    def _pack(self, tensor):
        packed = super()._pack(tensor)
        self.packed.append((tensor, packed))
        return packed


def _grads(model, x, hooks=None):
    model.zero_grad()
    if hooks is None:
        loss = model(x).pow(2).sum()
    else:
        with hooks:
            loss = model(x).pow(2).sum()
    loss.backward()  # (after the context: the packed activations carry what the backward needs)
    return [p.grad.clone() for p in model.parameters()]


def test_activations_go_out_and_back_weights_never_and_the_gradients_are_the_same():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    x = torch.randn(8, 64)
    hooks = Recording(model, min_bytes=1024)
    plain, offloaded = _grads(model, x), _grads(model, x, hooks)
    for a, b in zip(plain, offloaded):
        assert torch.equal(a, b)
    copied = [t for t, packed in hooks.packed if isinstance(packed, tuple)]
    kept = [t for t, packed in hooks.packed if not isinstance(packed, tuple)]
    assert copied and hooks.offloaded >= sum(t.numel() * t.element_size() for t in copied[:1])
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(t.untyped_storage().data_ptr() in weights for t in copied)  # no weight (nor a view of one)
    assert any(t.untyped_storage().data_ptr() in weights for t in kept)  # autograd did save them: they stayed


def test_a_storage_saved_twice_is_copied_once_and_small_tensors_stay():
    model = nn.Linear(4, 4)
    hooks = Recording(model, min_bytes=1024)
    big = torch.randn(32, 32, requires_grad=True)  # 4 KiB
    small = torch.randn(4, requires_grad=True)  # 16 bytes
    with hooks:
        out = (big * big).sum() + (small * small).sum()  # mul saves both operands: the same tensor twice
    out.backward()
    assert torch.equal(big.grad, 2 * big.detach()) and torch.equal(small.grad, 2 * small.detach())
    assert hooks.offloaded == 32 * 32 * 4  # big once; small not at all
    assert all(not isinstance(p, tuple) for t, p in hooks.packed if t.numel() == 4)


def test_a_run_with_offloaded_activations_takes_the_same_steps(tmp_path, tiny_model_dir, monkeypatch):
    made = []

    def recording(model):
        made.append(Recording(model, min_bytes=0))
        return made[-1]

    monkeypatch.setattr(train_mod, "OffloadActivations", recording)
    over = {"max_steps": 3, "eval_steps": 3, "gradient_checkpointing": True}
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "plain"), **over)))
    assert not made  # off by default
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "offloaded"),
                                         activation_offloading=True, **over)))
    assert made and made[0].offloaded > 0
    plain, offloaded = history(tmp_path / "plain"), history(tmp_path / "offloaded")
    assert [r["step"] for r in offloaded] == [r["step"] for r in plain]
    for a, b in zip(plain, offloaded):
        for key in COMPARED:
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-6, rel=1e-6), (a["step"], key)
    same_weights(tmp_path / "plain", tmp_path / "offloaded")


def test_zero_refuses_activation_offloading_and_names_its_own():
    from preftune.engines.zero import check

    cfg = from_dict({"model_name_or_path": "m", "dataset": "d", "activation_offloading": True})
    with pytest.raises(ConfigError, match="activation_offloading.*offload_param"):
        check(cfg, {"stage": 3})
