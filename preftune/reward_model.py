"""A reward model's pass: the score r(x, y) of each row of a batch, as one module the engines wrap.

    rewards = RewardModule(model)(input_ids, attention_mask)      # (R,) float32, one per row

The model is a transformers sequence-classification model with one output (`models.load_model` loads it
for stage: rm, from a causal LM checkpoint or a reward model's folder). Its own forward pass gives the
reward: the score head applied to the last hidden state of each row's last token that is not the pad
token, as TRL's RewardTrainer trains it and as `pipeline("text-classification")` and `preftune sample
--reward` read it, so that training and scoring read the same position. Rows are right-padded
(`batching.collate`: [prompt+chosen; prompt+rejected]).
"""

from __future__ import annotations

import torch


class RewardModule(torch.nn.Module):
    """The reward model seen as one module whose forward is the whole scoring pass, so that an engine's
    wrapper around it (DDP) synchronises every gradient, the score head's included. `call_head` is the
    attribute the engines set on a log-prob module; the model's forward always calls its head."""

    def __init__(self, model):
        super().__init__()
        self.model, self.call_head = model, False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # (R, T) -> (R, 1) logits at each row's last non-pad token (transformers' rule) -> (R,)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[:, 0].float()
