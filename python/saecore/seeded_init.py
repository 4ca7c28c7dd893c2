"""The SAE's seeded initialisation in fixed-size latent chunks, so any range of latents can be built alone.

Latent-sharded training (:mod:`saecore.distributed`) must start every shard exactly where the
one-process run starts, without any rank ever holding the whole dictionary. So the random part of
the init is drawn per chunk of :data:`INIT_CHUNK_LATENTS` latents, chunk ``c`` from its own generator
seeded with ``(seed, c)``: a shard draws only the chunks that overlap its latents, the one-process
SAE draws them all, and the values agree bit for bit. The data-derived part
(:meth:`saecore.sae.SAE.initialise_from_data`) runs over the same chunks with the same shapes, and
its one global statistic — JumpReLU's threshold, a quantile over every latent's pre-activations —
is found exactly by :func:`kth_largest`, two passes of histogram counting summed over the shards.

Memory: one chunk's decoder rows (INIT_CHUNK_LATENTS × d_in floats) and, for the data pass, one
chunk's pre-activations on the calibration rows (rows × INIT_CHUNK_LATENTS floats plus int64 keys).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

INIT_CHUNK_LATENTS = 1024
# Tag in each chunk generator's seed key [seed, tag, chunk], apart from the data order's keys
# ([seed, epoch, 0] and [seed, epoch, 1, window] in saecore.training.ShuffledBatches).
_INIT_STREAM = 0x5AE_1417
_KEY_BITS = 16  # each pass of kth_largest resolves this many bits of the 32-bit key


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class LatentShard:
    """Where an SAE's latents sit in the whole dictionary: latents ``[first, first + d_sae)`` of ``total``,
    drawn from ``seed``; ``reduce`` sums a tensor over the shards that together hold all ``total``."""

    first: int
    total: int
    seed: int | None = None
    reduce: Callable[[Tensor], Tensor] = field(default=_identity)


def chunk_spans(lo: int, hi: int, total: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each init chunk that overlaps latents ``[lo, hi)``, cut at ``total``."""
    c = INIT_CHUNK_LATENTS
    return [(s, min(s + c, total)) for s in range((lo // c) * c, hi, c)]


def seeded_directions(seed: int, start: int, stop: int, d_in: int, norm: float) -> Tensor:
    """Initial decoder rows of latents ``[start, stop)`` (one chunk: ``start`` a multiple of
    INIT_CHUNK_LATENTS, ``stop`` at most one chunk further): Gaussian directions scaled to ``norm``.

    The whole chunk is always drawn and normalised, so each row does not depend on which rows of the
    chunk a caller keeps (nor on the dictionary's size)."""
    chunk, offset = divmod(start, INIT_CHUNK_LATENTS)
    if offset or not start < stop <= start + INIT_CHUNK_LATENTS:
        raise ValueError(f"latents [{start}, {stop}) are not within one init chunk of {INIT_CHUNK_LATENTS}")
    rng = np.random.default_rng([seed, _INIT_STREAM, chunk])
    w = torch.from_numpy(rng.standard_normal((INIT_CHUNK_LATENTS, d_in), dtype=np.float32))
    w *= norm / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return w[: stop - start]


# --- exact selection over blocks --------------------------------------------------------------


def _ordered_keys(values: Tensor) -> Tensor:
    """float32 values → int32 keys with the same order (−0.0 just below +0.0): a negative float's
    magnitude bits are flipped, so larger magnitudes give smaller keys."""
    bits = values.float().contiguous().view(torch.int32).reshape(-1)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _key_value(key: int) -> float:
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)  # the same flip undoes itself
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def _descend(counts: Tensor, m: int) -> tuple[int, int]:
    """(bucket holding the m-th largest entry, its rank inside that bucket) from bucket counts."""
    from_top = counts.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor([m], dtype=from_top.dtype, device=from_top.device))[0])
    if i >= counts.numel():
        raise ValueError(f"kth_largest: asked for the {m}-th largest of {int(from_top[-1])} values")
    bucket = counts.numel() - 1 - i
    return bucket, m - int(from_top[i] - counts[bucket])


def _histogram(blocks: Iterable[Tensor], bucket_of: Callable[[Tensor], Tensor]) -> Tensor:
    """Counts of the 2¹⁶ buckets ``bucket_of(keys)`` puts the blocks' values in."""
    counts: Tensor | None = None
    for block in blocks:
        part = torch.bincount(bucket_of(_ordered_keys(block)), minlength=1 << _KEY_BITS)
        counts = part if counts is None else counts + part
    return counts if counts is not None else torch.zeros(1 << _KEY_BITS, dtype=torch.int64)


def kth_largest(blocks: Callable[[], Iterable[Tensor]], m: int,
                reduce: Callable[[Tensor], Tensor] = _identity) -> float:
    """The m-th largest (1-based) of all the float32 values in the blocks ``blocks()`` yields: exact, as
    ``torch.cat(blocks).topk(m).values.min()``, but holding one block at a time.

    Two passes over the blocks: a histogram of the upper 16 bits of the values' order-preserving
    integer keys finds the bucket holding the answer; a histogram of the lower 16 bits inside that
    bucket finds the value. ``reduce`` sums the histograms over processes holding other blocks
    (latent shards), so the answer is the one over all of them."""
    half = 1 << (_KEY_BITS - 1)  # the upper bits of an int32 key run from -half to half - 1
    high, m = _descend(reduce(_histogram(blocks(), lambda key: (key >> _KEY_BITS) + half)), m)
    high -= half
    low, _ = _descend(reduce(_histogram(blocks(), lambda key: key[(key >> _KEY_BITS) == high] & (2 * half - 1))), m)
    return _key_value(high * (1 << _KEY_BITS) + low)
