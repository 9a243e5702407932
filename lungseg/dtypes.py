"""Tensors that keep their floating dtype when the module holding them is cast.

``trainer.precision=bf16-true`` (and ``16-true``) casts the whole LightningModule with
``.to(dtype)``: the network's weights, as meant, but also the losses' class weights and the
metrics' running sums, which bfloat16's 8 significant bits would round (0.1 becomes
0.10009765625; an image count stops growing at 2,048 in batches of 8)."""

from collections.abc import Callable

import torch


def keeping_dtype(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """``fn`` (what ``nn.Module._apply`` applies: ``.to``, ``.cuda``, ``.half`` ...) but a
    floating tensor keeps its dtype and values: only the device follows ``fn``."""

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if t.is_floating_point() and out.dtype != t.dtype:
            return t.to(out.device)
        return out

    return apply
