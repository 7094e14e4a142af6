"""Activation offloading (TRL's `activation_offloading`): the activations the policy's forward saves for its
backward are copied to CPU memory as they are saved and copied back when the backward needs them. The
accelerator then holds about one layer's activations at a time instead of the whole forward's, at the
cost of two copies over the host link per saved tensor; with gradient_checkpointing only the
checkpoints' inputs are saved, so the two together leave little but the weights on the device.

It is torch's saved-tensors hooks (`torch.autograd.graph.saved_tensors_hooks`), as torch's own
`save_on_cpu`, with three differences that matter for a language model:
- weights are not copied: autograd saves a Linear's weight (or a view of it) for the backward, and
  copying every weight out and back at each step would cost more than the activations it frees;
- tensors under `min_bytes` stay where they are (not worth a copy);
- a storage saved several times (a layer's input saved by two of its ops) is copied once.
On a CPU there is nothing to offload: the hooks keep every tensor as it is.
"""
from __future__ import annotations

import torch
from torch import nn


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Around the policy's forward (its backward may run after the context is left: the packed tensors
    carry what they need). `device_types`: the tensors offloaded, by their device's type."""

    def __init__(self, model: nn.Module, min_bytes: int = 1024, device_types: tuple[str, ...] = ("cuda", "xpu")):
        self.min_bytes = min_bytes
        self.device_types = device_types
        self.weights = {_storage(p) for p in model.parameters()} - {0}  # (a sharded weight: its local shard)
        self.copies: dict[tuple, torch.Tensor] = {}  # one forward's copies by storage, for the dedupe
        self.offloaded = 0  # bytes copied out, for the log and the tests
        super().__init__(self._pack, self._unpack)

    def __enter__(self):
        self.copies = {}
        return super().__enter__()

    def __exit__(self, *exc):
        # the dedupe serves one forward: the packed tensors hold their copies, so the backward frees each as it
        # is used, instead of this dict keeping the whole forward's pinned memory until the next one
        self.copies = {}
        return super().__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        if (tensor.device.type not in self.device_types or _is_weight(tensor, self.weights)
                or tensor.numel() * tensor.element_size() < self.min_bytes):
            return tensor
        key = (_storage(tensor), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        copy = self.copies.get(key)
        if copy is None:
            # pinned memory: the copy back can run asynchronously; the copy out is ordered on the tensor's stream
            # before any reuse of its memory (the caching allocator is stream-ordered)
            copy = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout,
                               pin_memory=tensor.device.type != "cpu")  # (a CPU tensor only in the tests)
            copy.copy_(tensor, non_blocking=True)
            self.copies[key] = copy
            self.offloaded += tensor.numel() * tensor.element_size()
        return tensor.device, copy

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, copy = packed
        return copy.to(device, non_blocking=True)


def _storage(tensor: torch.Tensor) -> int:
    local = getattr(tensor, "_local_tensor", tensor)  # a DTensor (FSDP2): its local shard
    try:
        return local.untyped_storage().data_ptr()
    except RuntimeError:  # a tensor without storage (meta, some subclasses)
        return 0


def _is_weight(tensor: torch.Tensor, weights: set[int]) -> bool:
    """A model weight or a view of one (autograd saves W.t() for a Linear's backward); FSDP2's weights are
    gathered into new storage at each forward but are Parameters."""
    base = tensor._base if tensor._base is not None else tensor
    return isinstance(tensor, nn.Parameter) or isinstance(base, nn.Parameter) or _storage(tensor) in weights
