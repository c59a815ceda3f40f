"""The opt-in fast path: step caching, fused attention projections, channels-last and compiled UNet blocks, and
VAE tiling chosen from the size. Nothing here runs unless the config or the request asks for it.

Step caching (DeepCache, Ma et al. 2023): between two denoising steps the UNet's deep features change little, so
on N-1 of every N steps only its shallow ends run (conv_in, the first down block, the last up block, conv_out) and
the deep blocks' outputs from the last full step are reused. It is done by wrapping the deep blocks' `forward`s,
so the UNet's own forward, its time and text embeddings and a ControlNet's residuals all run as always; the
wrappers pass straight through unless the calling thread has a step cache open (`step_caching`), so one shared
UNet serves cached and plain runs on several threads at once.

The load options (config `performance.*`) change the loaded model for every run: fused QKV projections (one
matrix product for q, k and v), channels-last memory, and `torch.compile` of the UNet's repeated transformer
blocks (diffusers' regional compilation: seconds to compile, not the minutes of a whole UNet; inductor's cache
in `<data_dir>/compile-cache` keeps the compiled code across restarts). Each may change the last bits of an
image; bench/speed.py measures each and the adherence it keeps.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


log = logging.getLogger(__name__)

_local = threading.local()
_install_lock = threading.Lock()


@dataclass
class StepCache:
    """One pipeline call's cache: the deep blocks' outputs of its last full step, by block."""

    interval: int
    calls: int = 0
    reusing: bool = False
    shape: tuple = ()
    stored: dict = field(default_factory=dict)
    full_steps: int = 0

    def begin_step(self, sample: torch.Tensor) -> None:
        shape = tuple(sample.shape)
        self.reusing = self.calls % self.interval != 0 and shape == self.shape and bool(self.stored)
        if not self.reusing:
            self.shape = shape
            self.full_steps += 1
        self.calls += 1


def deep_modules(unet) -> list[torch.nn.Module]:
    """The blocks a cached step skips: every down block but the first, the mid block, every up block but the
    last (whose input is the second-to-last up block's output: the reused deep feature)."""
    modules = [*unet.down_blocks[1:], *unet.up_blocks[:-1]]
    if unet.mid_block is not None:
        modules.append(unet.mid_block)
    return modules


def _counting(forward):
    def counted(*args, **kwargs):
        cache = getattr(_local, "cache", None)
        if cache is not None:
            cache.begin_step(args[0] if args else kwargs["sample"])
        return forward(*args, **kwargs)

    return counted


def _reusing(forward, key: int):
    def reused(*args, **kwargs):
        cache = getattr(_local, "cache", None)
        if cache is None:
            return forward(*args, **kwargs)
        if cache.reusing:
            return cache.stored[key]
        out = forward(*args, **kwargs)
        cache.stored[key] = out
        return out

    return reused


def install_step_cache(unet) -> None:
    """Wrap the UNet (to count its calls) and its deep blocks, once; the wrappers keep no state of their own."""
    with _install_lock:
        if getattr(unet, "_step_cache_installed", False):
            return
        for key, module in enumerate(deep_modules(unet)):
            module.forward = _reusing(module.forward, key)
        unet.forward = _counting(unet.forward)
        unet._step_cache_installed = True


@contextmanager
def step_caching(unet, interval: int) -> Iterator[StepCache | None]:
    """Within this block, this thread's calls of `unet` reuse its deep features on N-1 of every N steps (one
    pipeline call per block: a new call starts a new cache). interval 1: nothing changes."""
    if interval <= 1:
        yield None
        return
    install_step_cache(unet)
    cache = StepCache(interval)
    _local.cache = cache
    try:
        yield cache
    finally:
        _local.cache = None


# -- load options -------------------------------------------------------------------------------------------------
def apply_load_options(pipe, options, data_dir: Path, sliced: bool = False) -> list[str]:
    """Apply the config's `performance` load options to a freshly loaded pipeline; returns what was applied.
    `sliced`: attention slicing is on (memory.attention_slicing), whose processors fusing would replace."""
    import torch
    applied = []
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return applied
    if options.fuse_qkv and sliced:
        log.warning("performance.fuse_qkv is off for %s: memory.attention_slicing is on, and fused attention would "
                    "replace its sliced processors", type(pipe).__name__)
    elif options.fuse_qkv:
        unet._fuse_qkv_wanted = True
        fuse_unless_adapted(unet, adapted=False)
        applied.append("fuse_qkv")
    if options.channels_last:
        unet.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if options.compile:
        # inductor's cache (its default is a temp dir) in the data dir, so a restart reuses the compiled code.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(data_dir) / "compile-cache"))
        # Not fullgraph: each LoRA set or fuse/unfuse recompiles, and past dynamo's recompile limit a fullgraph
        # compile raises (failing jobs) where this falls back to running the blocks eagerly.
        unet.compile_repeated_blocks(fullgraph=False)
        applied.append("compile")
    if applied:
        log.info("performance options on %s: %s", type(pipe).__name__, ", ".join(applied))
    return applied


def fuse_unless_adapted(unet, adapted: bool) -> None:
    """Fused projections while no LoRA is active; the separate ones while one is (peft's LoRA layers wrap to_q,
    to_k and to_v, which the fused layer would bypass). Called by the LoRA gate with no run in flight."""
    if not getattr(unet, "_fuse_qkv_wanted", False):
        return
    fused = getattr(unet, "_qkv_fused", False)
    if adapted and fused:
        unet.unfuse_qkv_projections()
        unet._qkv_fused = False
    elif not adapted and not fused:
        from .invariance import make_batch_invariant

        unet.fuse_qkv_projections()  # the fused weights from the base layers (LoRAs are off by then)
        make_batch_invariant(unet)  # the new fused layers, as every other one
        unet._qkv_fused = True


# -- memory from the size -----------------------------------------------------------------------------------------
def decode_tiled(vae, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's decode in tiles (diffusers' tiled_decode, blended seams), for one call: the shared VAE's own
    `use_tiling` switch is left as it is, since other threads may be decoding with it."""
    return vae.tiled_decode(latents, return_dict=False)[0]
