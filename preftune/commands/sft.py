"""`preftune sft`: supervised fine-tuning on completions (a reference model for DPO, when there is none).

    preftune sft CONFIG.yaml                       # LLaMA-Factory `stage: sft` YAML runs as it is
    preftune sft --model_name_or_path M --dataset data.jsonl --output_dir sft_out

The same loop as `preftune train` with the sft objective (`step.SFTStep`): the loss is the NLL of the
completion tokens only. Data: prompt/completion records, chat conversations (`messages`; the last
assistant message is the completion), alpaca (instruction/input/output) and sharegpt records (plain
or through dataset_info.json), or a preference set, whose chosen answers are trained on. Metrics go
to <output_dir>/sft_metrics/ (loss, perplexity).
"""

from __future__ import annotations

from preftune.commands import train

USAGE = """usage: preftune sft [CONFIG.yaml] [--key value ...]

Supervised fine-tuning of a causal LM on completions (the NLL of the completion tokens): the same
loop as preftune train with stage: sft. Data: prompt/completion records, chat conversations, alpaca
or sharegpt records, or preference pairs (their chosen answers). Any config key can be given as
--key value, overriding the file.
"""


def main(args: list[str]) -> int:
    return train.main(args, stage="sft")
