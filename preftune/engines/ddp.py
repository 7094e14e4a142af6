"""Data parallelism: N processes, each with a whole copy of the model, train on their shares of every
global micro-batch; DDP (through accelerate) averages the gradients, so a step computes what one process
computes on the whole global batch. The processes come from a launcher (`accelerate launch`, `torchrun`);
docs/distributed.md."""

from __future__ import annotations

import contextlib

import torch

from preftune.engines.single import OneProcess


class DataParallel(OneProcess):
    """DDP through accelerate: the policy's log-prob module wrapped by `accelerator.prepare`, every other
    step of the one-process engine as it is (the optimizer state is the same on every process: the main
    one writes it)."""

    def unwrap(self, policy_logps):
        return policy_logps.module if isinstance(policy_logps, torch.nn.parallel.DistributedDataParallel) \
            else policy_logps

    @contextlib.contextmanager
    def accumulate(self, policy_logps, sync: bool):
        # gradients are all-reduced in the backward of the step's last micro-batch only
        with contextlib.nullcontext() if sync else self.accelerator.no_sync(policy_logps):
            yield
