"""`preftune rm`: a Bradley-Terry reward model trained on preference pairs (docs/reward-model.md).

    preftune rm CONFIG.yaml                        # LLaMA-Factory `stage: rm` YAML runs as it is
    preftune rm --model_name_or_path M --dataset pairs.jsonl --output_dir rm_out

The same loop, keys and data as `preftune train` with the rm objective (`step.RewardStep`): the model
is loaded as a sequence classifier with one output (a new score head on a causal LM checkpoint), and
the loss is -log sigmoid(r_chosen - r_rejected) per pair (`losses.reward_model_loss`; a `margin` column
and center_rewards_coefficient as TRL's RewardTrainer). Metrics go to <output_dir>/rm_metrics/; the
model it writes is what `preftune sample --reward DIR`, `preftune eval --reward DIR` and transformers'
`pipeline("text-classification")` load.
"""

from __future__ import annotations

from preftune.commands import train

USAGE = """usage: preftune rm [CONFIG.yaml] [--key value ...]

Train a reward model on preference pairs (the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected)):
the same loop, data and keys as preftune train with stage: rm. The model (a sequence classifier with one
output) scores completions for preftune sample --reward DIR and preftune eval --reward DIR. Any config key
can be given as --key value, overriding the file.
"""


def main(args: list[str]) -> int:
    return train.main(args, stage="rm")
