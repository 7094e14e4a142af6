"""Does DeepSpeed's Ulysses sequence parallelism run on CPU processes, and does a sequence split across them
give the one-process log-prob and a gradient? (docs/distributed.md, "Long sequences"). Two processes, gloo:

    OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc_per_node 2 benchmarks/sequence_parallel_probe.py MODEL_DIR

MODEL_DIR: a causal LM whose attention and KV heads divide by the number of processes (the tiny Qwen2 of
`preftune.demo.build_model`, 4 and 2 heads, does). Prints each process's sequence log-prob, one-process and
split, and whether the backward reached the embeddings. A probe for the design, not preftune's code.
"""

import sys

import deepspeed
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
from transformers import AutoModelForCausalLM

LENGTH = 16


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) sums of log p(target) over positions whose target is not -100."""
    scored = targets != -100
    logps = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (logps * scored).sum(-1)


def main(model_dir: str) -> None:
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same sequence on every process
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    input_ids = torch.randint(3, model.config.vocab_size, (1, LENGTH))
    # shifted once, before the split: a slice's last token predicts the next slice's first
    targets = torch.cat([input_ids[:, 1:], torch.full((1, 1), -100)], 1)
    position_ids = torch.arange(LENGTH)[None]
    whole = sequence_logps(model(input_ids=input_ids, position_ids=position_ids).logits, targets)

    UlyssesSPAttentionHF.register_with_transformers(model_name_or_path=model, core_attn_implementation="sdpa",
                                                    sequence_parallel_size=world, micro_batch_size=1)
    part = slice(rank * LENGTH // world, (rank + 1) * LENGTH // world)
    local = sequence_logps(model(input_ids=input_ids[:, part], position_ids=position_ids[:, part]).logits,
                           targets[:, part])
    split = dist_autograd.all_reduce(local)  # differentiable: each process's tokens get their gradient
    split.sum().backward()
    reached = bool(model.get_input_embeddings().weight.grad.abs().sum() > 0)
    print(f"process {rank}: one process {whole.item():.6f}, split over {world} {split.item():.6f}, "
          f"gradient reached the embeddings: {reached}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
