"""Every preference loss against TRL 1.16's own code, per pair, on random log-prob tensors.

TRL's losses are inline in `DPOTrainer._compute_loss`, so the test runs that very method (unbound,
on a stand-in for the trainer that carries the attributes `DPOTrainer.__init__` sets from a real
`trl.DPOConfig`) with stub policy and reference models. A stub's forward, called by TRL as
`model(**inputs, labels=labels, fused_lm_head=True)`, returns per-token `log_probs` (2B, T-1),
chosen rows first, spread over each row's completion tokens so that TRL's per-sequence sums are
the random log-probs, plus zero `entropy`, `mean_logits` and `is_top1` for TRL's metrics.

What is compared, float64, atol 1e-6:
* the per-pair losses: TRL only returns `per_sequence_loss.mean()`, so the test records the
  tensor that `.mean()` is called on (the first `Tensor.mean` in `_compute_loss`, checked by
  its shape and by its mean being the returned loss); for aot/aot_unpaired that is the sorted
  order, as in preftune;
* the rewards: the per-pair `chosen_rewards`/`rejected_rewards` TRL passes to
  `accelerator.gather` for its `rewards/*` metrics;
* preftune's side goes through `config.from_dict` and `step.configured_loss`, the path a run takes.

Deliberate difference, pinned here: TRL 1.16's `sigmoid` ignores `label_smoothing`; preftune's
applies it as cDPO, whose formula TRL still computes as `aot` on a one-pair batch (sorting one
pair changes nothing), so cDPO is checked against that.
"""

import ast
import inspect
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

import trl

from preftune import config
from preftune.config.names import F_DIVERGENCE_LOSSES
from preftune.errors import ConfigError
from preftune.logps import ld_token_weights
from preftune.losses import LOSSES, REFERENCE_FREE, UNPAIRED_LOSSES
from preftune.step import configured_loss

# trl.DPOConfig itself sets the deprecated alias; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")

B, T = 8, 12  # pairs, padded sequence length
ATOL = 1e-6

# (loss, beta, hyperparameters) per case: betas that keep the numbers O(1) for these log-ratios
# (a few units), hyperparameters at non-trivial values (and defaults) so a dropped one shows.
CASES = [
    ("sigmoid", 0.1, {}),
    ("sigmoid", 1.0, {}),
    ("hinge", 0.5, {}),
    ("ipo", 0.5, {}),
    ("robust", 0.1, {}),
    ("robust", 0.1, {"label_smoothing": 0.2}),
    ("exo_pair", 0.1, {"label_smoothing": 1e-3}),
    ("exo_pair", 0.5, {"label_smoothing": 0.2}),
    ("nca_pair", 0.1, {}),
    ("bco_pair", 0.1, {}),
    ("sppo_hard", 0.5, {}),
    ("aot", 0.1, {}),
    ("aot", 0.1, {"label_smoothing": 0.2}),
    ("aot_unpaired", 0.1, {}),
    ("aot_unpaired", 0.5, {"label_smoothing": 0.2}),
    ("apo_zero", 0.1, {}),
    ("apo_down", 0.1, {}),
    ("discopop", 0.1, {}),
    ("discopop", 0.5, {"discopop_tau": 0.2}),
    ("sigmoid_norm", 1.0, {}),
]


class LogProbsStub(torch.nn.Module):
    """Stands in for a model wrapped with TRL's fused LM head: returns fixed per-token log-probs."""
    is_gradient_checkpointing = False

    def __init__(self, per_token_logps):
        super().__init__()  # training mode, as TRL's policy in a training step
        self.per_token_logps = per_token_logps  # (2B, T-1)

    def forward(self, input_ids, attention_mask, labels, fused_lm_head, use_cache):
        assert fused_lm_head and not use_cache and labels.shape == input_ids.shape
        shape = self.per_token_logps.shape
        return SimpleNamespace(log_probs=self.per_token_logps, entropy=torch.zeros(shape, dtype=torch.float64),
                               mean_logits=torch.zeros(shape, dtype=torch.float64),
                               is_top1=torch.zeros(shape, dtype=torch.bool), aux_loss=None)


class RecordFirstMean(TorchFunctionMode):
    """Records the tensor of the first `Tensor.mean` call: in `_compute_loss` that is
    `per_sequence_loss.mean()` (the stubs and the loss branches call no other mean before it)."""
    def __init__(self):
        super().__init__()
        self.tensor = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.mean and self.tensor is None:
            self.tensor = args[0].detach().clone()
        return func(*args, **(kwargs or {}))


def random_batch(seed):
    """Sequence log-probs (2B,) for policy and reference, completion lengths (2B,), and a collated
    batch whose completion_mask has those lengths; chosen rows first, as in TRL and preftune."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 8, (2 * B,), generator=g)
    prompt_lengths = torch.randint(1, 4, (2 * B,), generator=g)  # >= 1: shifting drops only prompt
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    attention_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for row, (p, n) in enumerate(zip(prompt_lengths.tolist(), lengths.tolist())):
        completion_mask[row, p:p + n] = 1
        attention_mask[row, :p + n] = 1
    policy_logps = -lengths * (0.5 + 3 * torch.rand(2 * B, generator=g, dtype=torch.float64))
    reference_logps = policy_logps + 3 * torch.randn(2 * B, generator=g, dtype=torch.float64)
    batch = {"input_ids": torch.randint(0, 100, (2 * B, T), generator=g), "attention_mask": attention_mask,
             "completion_mask": completion_mask}
    return policy_logps, reference_logps, lengths, batch


def per_token(logps, completion_mask):
    """(2B, T-1) per-token log-probs: each sequence's log-prob spread evenly over its completion
    tokens (position t scores token t+1), zero elsewhere, so the row sums are `logps`."""
    shifted = completion_mask[:, 1:].to(logps.dtype)
    return shifted * (logps / shifted.sum(dim=1)).unsqueeze(1)


def trl_losses(loss_type, beta, label_smoothing, discopop_tau, policy_logps, reference_logps, batch, tmp_path,
               loss_weights=None, **options):
    """TRL's per-pair losses, chosen and rejected rewards for the batch. For a list of loss types
    (a combination), TRL's returned loss (sum_k w_k * mean of loss_k) in place of the per-pair losses.
    `options`: more DPOConfig arguments (f_divergence_type, f_alpha_divergence_coef)."""
    args = trl.DPOConfig(output_dir=str(tmp_path), loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                         discopop_tau=discopop_tau, use_cpu=True, report_to="none", loss_weights=loss_weights,
                         **options)
    gathered = []

    def gather(tensor):
        gathered.append(tensor)
        return tensor

    # The attributes `DPOTrainer.__init__` sets from the config, as it sets them (dpo_trainer.py ~800-975).
    policy = LogProbsStub(per_token(policy_logps, batch["completion_mask"]))
    trainer = SimpleNamespace(
        model=policy, ref_model=LogProbsStub(per_token(reference_logps, batch["completion_mask"])), args=args,
        beta=args.beta, precompute_ref_logps=args.precompute_ref_log_probs, loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type), ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        label_smoothing=args.label_smoothing, use_weighting=args.use_weighting, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=gather, gather_for_metrics=lambda t: t))
    with RecordFirstMean() as recorder:
        loss = trl.DPOTrainer._compute_loss(trainer, policy, dict(batch), return_outputs=False)
    chosen_rewards, rejected_rewards = gathered[:2]  # the first two gathers: rewards/chosen, rewards/rejected
    if isinstance(loss_type, list):
        return loss, chosen_rewards, rejected_rewards
    assert recorder.tensor.shape == (len(policy_logps) // 2,)
    assert recorder.tensor.mean().item() == pytest.approx(loss.item(), abs=1e-12)  # it is per_sequence_loss
    chosen_rewards, rejected_rewards = gathered[:2]  # the first two gathers: rewards/chosen, rewards/rejected
    return recorder.tensor, chosen_rewards, rejected_rewards



def preftune_losses(loss_type, beta, hyperparameters, policy_logps, reference_logps, lengths):
    cfg = config.from_dict({"pref_loss": loss_type, "pref_beta": beta, **hyperparameters})
    n = len(policy_logps) // 2
    reference_chosen, reference_rejected = (None, None) if reference_logps is None else reference_logps.split(n)
    return configured_loss(cfg)(policy_logps[:n], policy_logps[n:], reference_chosen, reference_rejected,
                                cfg.pref_beta, lengths[:n], lengths[n:])


def assert_close(actual, expected, what, atol=ATOL):
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"{what}: preftune {actual.tolist()} vs TRL {expected.tolist()} (max diff {diff:.3g})"


def test_every_trl_loss_is_covered():
    # simpo, orpo: TRL's CPO/ORPO trainers, below; sft: in combinations, below; kto_pair: gone from TRL
    # (LLaMA-Factory's, from TRL 0.8-0.9), checked by hand in test_losses.py; kto: TRL's KTOTrainer, below
    assert {case[0] for case in CASES} == set(LOSSES) - REFERENCE_FREE - {"kto_pair"}
    assert set(UNPAIRED_LOSSES) == {"kto"}


@pytest.mark.parametrize("loss_type,beta,hyperparameters", CASES,
                         ids=[f"{c[0]}-beta{c[1]}-" + "-".join(f"{k}{v}" for k, v in c[2].items()) for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_losses_and_rewards_match_trl(loss_type, beta, hyperparameters, seed, tmp_path):
    policy_logps, reference_logps, lengths, batch = random_batch(seed)
    expected = trl_losses(loss_type, beta, hyperparameters.get("label_smoothing", 0.0),
                          hyperparameters.get("discopop_tau", 0.05), policy_logps, reference_logps, batch, tmp_path)
    actual = preftune_losses(loss_type, beta, hyperparameters, policy_logps, reference_logps, lengths)
    for name, a, e in zip(("losses", "chosen rewards", "rejected rewards"), actual, expected):
        assert_close(a, e, f"{loss_type} {name}")
    assert actual[0].abs().max() > 1e-3  # not trivially zero


def test_sigmoid_label_smoothing_is_cdpo_where_trl_ignores_it(tmp_path):
    """Pins the deliberate difference: TRL 1.16's sigmoid with label_smoothing = 0.2 is plain DPO;
    preftune's is cDPO, which equals TRL's aot on each pair alone (a one-pair sort is the identity)."""
    policy_logps, reference_logps, lengths, batch = random_batch(2)
    trl_sigmoid, _, _ = trl_losses("sigmoid", 0.1, 0.2, 0.05, policy_logps, reference_logps, batch, tmp_path)
    plain = preftune_losses("sigmoid", 0.1, {}, policy_logps, reference_logps, lengths)[0]
    assert_close(plain, trl_sigmoid, "sigmoid ignores label_smoothing in TRL")
    cdpo = preftune_losses("sigmoid", 0.1, {"label_smoothing": 0.2}, policy_logps, reference_logps, lengths)[0]
    assert (cdpo - plain).abs().max() > 1e-2  # preftune does apply it
    for i in range(B):
        one = [i, B + i]  # pair i alone: its chosen and rejected rows
        one_batch = {k: v[one] for k, v in batch.items()}
        trl_aot, _, _ = trl_losses("aot", 0.1, 0.2, 0.05, policy_logps[one], reference_logps[one], one_batch,
                                   tmp_path)
        assert_close(cdpo[i:i + 1], trl_aot, f"cDPO pair {i}")


@pytest.mark.parametrize("beta,simpo_gamma", [(2.0, 0.5), (2.5, 1.4), (0.5, 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_simpo_matches_trl_cpo(beta, simpo_gamma, seed):
    """preftune's simpo against TRL 1.16's `CPOTrainer.cpo_loss` (trl.experimental.cpo, loss_type simpo,
    AlphaPO alpha = 0), which takes length-averaged log-probs: losses and rewards per pair."""
    from trl.experimental.cpo import CPOTrainer

    policy_logps, _, lengths, _ = random_batch(seed)
    trainer = SimpleNamespace(alpha=0.0, beta=beta, loss_type="simpo", simpo_gamma=simpo_gamma, label_smoothing=0.0,
                              accelerator=SimpleNamespace(device=torch.device("cpu")))
    average = policy_logps / lengths
    expected = CPOTrainer.cpo_loss(trainer, average[:B], average[B:])
    actual = preftune_losses("simpo", beta, {"simpo_gamma": simpo_gamma}, policy_logps, None, lengths)
    for name, a, e in zip(("losses", "chosen rewards", "rejected rewards"), actual, expected):
        assert_close(a, e, f"simpo {name}")


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_orpo_matches_trl_orpo(beta, seed):
    """preftune's orpo against TRL 1.16's `ORPOTrainer.odds_ratio_loss` (trl.experimental.orpo) on
    length-averaged log-probs. TRL returns beta * log sigmoid(log odds ratio) and subtracts its mean
    from an NLL averaged over all chosen tokens of the batch; preftune's per-pair loss is the
    per-pair NLL -log pi(y_w)/|y_w| (LLaMA-Factory's normalisation) minus that same term."""
    from trl.experimental.orpo import ORPOTrainer

    policy_logps, _, lengths, _ = random_batch(seed)
    policy_logps = policy_logps / 4  # average log-probs of -0.1 to -1: the odds matter
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    average = policy_logps / lengths
    trl_ratio, trl_chosen_rewards, trl_rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(
        trainer, average[:B], average[B:])
    actual = preftune_losses("orpo", beta, {}, policy_logps, None, lengths)
    assert_close(actual[0], -average[:B] - trl_ratio, "orpo losses")
    assert_close(actual[1], trl_chosen_rewards, "orpo chosen rewards")
    assert_close(actual[2], trl_rejected_rewards, "orpo rejected rewards")


@pytest.mark.parametrize("loss_types,loss_weights,hyperparameters", [
    (["sigmoid", "bco_pair", "sft"], [1.0, 0.5, 0.2], {}),
    (["sigmoid", "sft"], None, {}),
    (["ipo", "sft"], [1.0, 2.0], {}),
    (["robust", "aot", "sft"], [0.5, 0.5, 1.0], {"label_smoothing": 0.2}),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_combined_losses_match_trl(loss_types, loss_weights, hyperparameters, seed, tmp_path):
    """A list pref_loss with loss_weights against TRL's loss_type list with loss_weights: the training
    loss (TRL: sum_k w_k * mean(loss_k); preftune: the mean over pairs of sum_k w_k * loss_k) and the
    rewards (DPO's, from the first loss that uses the reference). TRL's sft averages over the batch's
    chosen tokens; so does preftune's."""
    policy_logps, reference_logps, lengths, batch = random_batch(seed)
    expected_loss, *expected_rewards = trl_losses(
        loss_types, 0.5, hyperparameters.get("label_smoothing", 0.0), 0.05, policy_logps, reference_logps, batch,
        tmp_path, loss_weights=loss_weights)
    raw = {"loss_type": loss_types, **hyperparameters, **({"loss_weights": loss_weights} if loss_weights else {})}
    actual = preftune_losses(raw.pop("loss_type"), 0.5, raw, policy_logps, reference_logps, lengths)
    assert actual[0].mean().item() == pytest.approx(expected_loss.item(), abs=ATOL)
    assert_close(actual[1], expected_rewards[0], "chosen rewards")
    assert_close(actual[2], expected_rewards[1], "rejected rewards")


# Every loss TRL 1.16 applies f_divergence_type with (besides sft, which ignores it), at a beta that keeps the
# margin O(1) for log-ratios of about +-1 and hyperparameters at non-default values where the loss has them
F_DIVERGENCE_CASES = [
    ("sigmoid", 0.5, {}),
    ("hinge", 0.5, {}),
    ("ipo", 0.5, {}),
    ("robust", 0.5, {"label_smoothing": 0.2}),
    ("exo_pair", 0.5, {"label_smoothing": 0.1}),
    ("discopop", 0.5, {"discopop_tau": 0.2}),
    ("sigmoid_norm", 2.0, {}),
]


def test_f_divergence_losses_are_trls():
    """preftune applies f_divergence_type with exactly the losses TRL 1.16's DPOTrainer allows it with (its
    `f_divergence_loss_types`, read from its source) and refuses the others; sft ignores it in both."""
    source = inspect.getsource(trl.DPOTrainer.__init__)
    trl_allowed = set(ast.literal_eval(re.search(r"f_divergence_loss_types = (\{[^}]*\})", source).group(1)))
    assert {case[0] for case in F_DIVERGENCE_CASES} == set(F_DIVERGENCE_LOSSES) == trl_allowed - {"sft"}
    for name in set(LOSSES) | set(UNPAIRED_LOSSES):
        raw = {"pref_loss": name, "f_divergence_type": "js_divergence", "label_smoothing": 0.1 * (name == "exo_pair")}
        if name in trl_allowed - {"sft"}:
            config.from_dict(raw)
        else:
            with pytest.raises(ConfigError, match=f"^f_divergence_type: js_divergence .* which {name} does not"):
                config.from_dict(raw)


@pytest.mark.parametrize("loss_type,beta,hyperparameters", F_DIVERGENCE_CASES, ids=[c[0] for c in F_DIVERGENCE_CASES])
@pytest.mark.parametrize("f_divergence_type,coef", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                                   ("alpha_divergence", 0.5), ("alpha_divergence", 0.2),
                                                   ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_f_divergence_matches_trl(loss_type, beta, hyperparameters, f_divergence_type, coef, seed, tmp_path):
    """f-DPO: each loss with f_divergence_type (and f_alpha_divergence_coef) against TRL 1.16's
    DPOTrainer with the same options, per pair; alpha = 1 is TRL's fallback to reverse KL."""
    policy_logps, reference_logps, lengths, batch = random_batch(seed)
    policy_logps = reference_logps + (policy_logps - reference_logps) / 4  # log-ratios of about +-1: exp() matters
    atol = ATOL
    if f_divergence_type == "alpha_divergence":  # TRL's clamp knows float16/32 and bfloat16 only
        policy_logps, reference_logps = policy_logps.float(), reference_logps.float()
        atol = 1e-5  # float32: TRL sums the per-token log-probs (a few ulps of values up to ~10 apart)
    options = {"f_divergence_type": f_divergence_type, "f_alpha_divergence_coef": coef}
    expected = trl_losses(loss_type, beta, hyperparameters.get("label_smoothing", 0.0),
                          hyperparameters.get("discopop_tau", 0.05), policy_logps, reference_logps, batch, tmp_path,
                          **options)
    ours = {**hyperparameters, **(options if coef != 0.5 else {"f_divergence_type": f_divergence_type})}
    actual = preftune_losses(loss_type, beta, ours, policy_logps, reference_logps, lengths)
    for name, a, e in zip(("losses", "chosen rewards", "rejected rewards"), actual, expected):
        assert_close(a, e, f"{loss_type} {f_divergence_type} {name}", atol)
    dpo = preftune_losses(loss_type, beta, hyperparameters, policy_logps, reference_logps, lengths)[0]
    assert ((actual[0] - dpo).abs().max() > 1e-3) == (coef != 1.0)  # an f-divergence other than DPO's


@pytest.mark.parametrize("ld_alpha", [0.0, 0.3])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_ld_alpha_matches_trl(ld_alpha, loss_type, tmp_path):
    """LD-DPO: TRL 1.16 weights the per-token log-probs beyond the shorter completion of each pair by
    ld_alpha; preftune's `ld_token_weights` (what `get_batch_logps` applies) on the same random
    per-token log-probs, then the loss, per pair. ipo also shows the lengths stay the full ones."""
    policy_logps, reference_logps, lengths, batch = random_batch(3)
    g = torch.Generator().manual_seed(4)
    score = batch["completion_mask"][:, 1:].bool()
    policy_tokens = -3 * torch.rand(score.shape, generator=g, dtype=torch.float64) * score  # (2B, T-1)
    reference_tokens = -3 * torch.rand(score.shape, generator=g, dtype=torch.float64) * score
    args = trl.DPOConfig(output_dir=str(tmp_path), loss_type=loss_type, beta=0.5, ld_alpha=ld_alpha, use_cpu=True,
                         report_to="none")
    gathered = []
    trainer = SimpleNamespace(
        model=LogProbsStub(policy_tokens), ref_model=LogProbsStub(reference_tokens), args=args, beta=0.5,
        precompute_ref_logps=False, loss_types=args.loss_type, loss_weights=[1.0], ld_alpha=ld_alpha,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, label_smoothing=0.0, use_weighting=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda t: gathered.append(t) or t,
                                    gather_for_metrics=lambda t: t))
    with RecordFirstMean() as recorder:
        trl.DPOTrainer._compute_loss(trainer, trainer.model, dict(batch), return_outputs=False)
    weights = torch.zeros(score.shape)  # (2B, T-1): the weights at the scored positions, 0 elsewhere
    weights[score] = ld_token_weights(score.nonzero()[:, 0], score.sum(dim=1), ld_alpha)
    pol, ref = (policy_tokens * weights).sum(dim=1), (reference_tokens * weights).sum(dim=1)
    actual = preftune_losses(loss_type, 0.5, {"ld_alpha": ld_alpha}, pol, ref, lengths)
    assert_close(actual[0], recorder.tensor, f"ld_alpha {loss_type} losses")
    assert_close(actual[1], gathered[0], "ld_alpha chosen rewards")
    assert_close(actual[2], gathered[1], "ld_alpha rejected rewards")
    assert (weights[score] < 1).any() and not torch.equal(lengths[:B], lengths[B:])  # a tail is down-weighted


class KTOStandIn(SimpleNamespace):
    """Carries the attributes `KTOTrainer.__init__` sets, and its two methods the loss uses."""
    _compute_loss = trl.KTOTrainer._compute_loss
    _compute_kl_logps = trl.KTOTrainer._compute_kl_logps


class KTOStub(LogProbsStub):
    """Per-token log-probs for the examples' rows, or for the KL rows when given the KL input ids."""
    def __init__(self, per_token_logps, kl_per_token_logps, kl_input_ids):
        super().__init__(per_token_logps)
        self.kl = kl_per_token_logps, kl_input_ids

    def forward(self, input_ids, attention_mask, labels, fused_lm_head, use_cache):
        out = super().forward(input_ids, attention_mask, labels, fused_lm_head, use_cache)
        if torch.equal(input_ids, self.kl[1]):
            out.log_probs = self.kl[0]
        return out


class RecordTensorMethods(TorchFunctionMode):
    """The tensors `Tensor.nanmean` (KTO's losses) and `Tensor.nansum` (its reward sums) are called on."""
    def __init__(self):
        super().__init__()
        self.calls = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.nanmean, torch.Tensor.nansum):
            self.calls[func.__name__].append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("beta,weights", [(0.1, (1.0, 1.0)), (0.5, (1.33, 0.7))])
@pytest.mark.parametrize("seed", [0, 1])
def test_kto_matches_trl(beta, weights, seed, tmp_path):
    """kto against TRL 1.16's `KTOTrainer._compute_loss` (run on a stand-in with stub models): the
    per-example losses (TRL concatenates desirable then undesirable ones and takes the nanmean),
    the rewards, and the KL baseline z_ref TRL logs as `kl`; B examples, about half desirable, the KL
    rows' log-probs random so that z_ref > 0 (seed 0) or is clamped to 0 (seed 1)."""
    policy_logps, reference_logps, lengths, batch = random_batch(seed)
    n = 2 * B  # the 2B rows serve as 2B unpaired examples
    g = torch.Generator().manual_seed(10 + seed)
    labels = torch.rand(n, generator=g) < 0.5
    kl_policy = policy_logps.flip(0)  # the KL rows: another completion under each prompt
    kl_reference = kl_policy - (-1) ** seed * (1 + torch.rand(n, generator=g, dtype=torch.float64))
    mask = batch["completion_mask"]
    kl_batch = {"KL_input_ids": batch["input_ids"].flip(0) + 100, "KL_attention_mask": batch["attention_mask"].flip(0),
                "KL_completion_mask": mask.flip(0)}
    args = trl.KTOConfig(output_dir=str(tmp_path), beta=beta, desirable_weight=weights[0],
                         undesirable_weight=weights[1], use_cpu=True, report_to="none")
    policy = KTOStub(per_token(policy_logps, mask), per_token(kl_policy, mask.flip(0)), kl_batch["KL_input_ids"])
    reference = KTOStub(per_token(reference_logps, mask), per_token(kl_reference, mask.flip(0)),
                        kl_batch["KL_input_ids"])
    trainer = KTOStandIn(
        model=policy, ref_model=reference, args=args, beta=beta, loss_type="kto", desirable_weight=weights[0],
        undesirable_weight=weights[1], calculate_KL=True, precompute_ref_logps=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t))
    with RecordTensorMethods() as recorder:
        loss = trainer._compute_loss(policy, {**batch, **kl_batch, "label": labels}, return_outputs=False)
    trl_losses_ = recorder.calls["nanmean"][0]
    trl_chosen_rewards, trl_rejected_rewards = recorder.calls["nansum"][0], recorder.calls["nansum"][4]
    assert trl_losses_.nanmean().item() == pytest.approx(loss.item(), abs=1e-12)
    assert trl_chosen_rewards.shape == (int(labels.sum()),) and trl_rejected_rewards.shape == (int((~labels).sum()),)

    cfg = config.from_dict({"pref_loss": "kto", "pref_beta": beta, "desirable_weight": weights[0],
                            "undesirable_weight": weights[1]})
    losses, rewards, z_ref = configured_loss(cfg)(policy_logps, reference_logps, kl_policy, kl_reference, labels, beta)
    assert_close(torch.cat((losses[labels], losses[~labels])), trl_losses_, "kto losses")
    assert_close(rewards[labels], trl_chosen_rewards, "kto chosen rewards")
    assert_close(rewards[~labels], trl_rejected_rewards, "kto rejected rewards")
    assert z_ref.item() == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=ATOL)
    assert (z_ref > 0) == (seed == 0)
