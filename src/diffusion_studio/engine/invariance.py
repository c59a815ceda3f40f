"""Batch-invariant execution: an image's bits do not depend on what else shares its batch.

Why: the job service batches compatible requests from different users into one pipeline call and promises each
job exactly the image it would get alone. On CPU, oneDNN/MKL pick other kernels (with another summation order)
for matrix products with fewer than ~4 rows and for convolutions over a batch of one, so a lone image differed
from the same image in a batch by up to 2/255. Every other op the pipelines use computes each sample the same way
whatever the batch (tests/test_batching.py checks the whole pipeline bit for bit). So the small calls are padded
up to sizes whose kernels match the big ones', and the padding is cut off again. The cost falls only on the small
calls (time embeddings, a batch of one without guidance); bench/engine.py's engine/raw ratio includes it.

GPU kernels are not covered: cuBLAS chooses kernels by shape too, so on CUDA batched images may differ from lone
ones in the last bits (the service then still batches, and says so in the README).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch
    from torch import nn


MIN_ROWS = 8  # matrix products with fewer rows are padded to this many
MIN_BATCH = 2  # convolutions over one sample are run over two


def _padded_linear(forward):
    import torch
    def padded(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] >= MIN_ROWS:
            return forward(x)
        out = forward(torch.cat([rows, rows.new_zeros(MIN_ROWS - rows.shape[0], rows.shape[1])]))
        return out[: rows.shape[0]].reshape(*x.shape[:-1], out.shape[-1])

    return padded


def _padded_conv(forward):
    import torch
    def padded(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[0] >= MIN_BATCH:
            return forward(x)
        return forward(torch.cat([x, x.new_zeros(MIN_BATCH - x.shape[0], *x.shape[1:])]))[: x.shape[0]]

    return padded


def make_pipeline_batch_invariant(components: dict) -> None:
    """The autoencoder decodes one image at a time (its single-head attention over a batch of one takes another
    kernel too, and batching the last decode buys little); every other module gets padded small calls."""
    from torch import nn
    for name, component in components.items():
        if name == "vae" and hasattr(component, "enable_slicing"):
            component.enable_slicing()
        elif isinstance(component, nn.Module):
            make_batch_invariant(component)


def make_batch_invariant(module: nn.Module) -> None:
    """Wrap every Linear and Conv2d under `module` (once; safe to call again). The wrappers keep no state, so
    several threads may run the module at once."""
    from torch import nn
    for layer in module.modules():
        if getattr(layer, "_batch_invariant", False):
            continue
        if isinstance(layer, nn.Linear):
            layer.forward = _padded_linear(layer.forward)
        elif isinstance(layer, nn.Conv2d):
            layer.forward = _padded_conv(layer.forward)
        else:
            continue
        layer._batch_invariant = True
