"""Harvest throughput against a bare forward of the same model to the same layer, in the same run.

    python bench/harvest.py                       # SmolLM2-135M, blocks.6.hook_resid_post, 4096 tokens
    python bench/harvest.py --tokens 16384 --hook blocks.15.hook_resid_post --repeats 3

Baseline: what a user would write by hand. The same pre-tokenized batches run through the model's own
layers truncated after the hooked layer (``model.model.layers[:L+1]``, no hooks, nothing kept).
Harvest: ``saecore.harvest`` end to end on the same corpus prefix: tokenization, the forward to the
hook, exclusions, float16 conversion and the zstd-compressed Zarr writes with their commits.
Runs alternate (baseline, harvest, baseline, harvest …) and the best of each is reported, so load
from other processes on the machine hits both sides alike; the ratio of process CPU times is printed
too, being less sensitive to such load. Also printed: the matmul rate this machine
reaches (torch.mm, float32) and the fraction of it the baseline forward achieves.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import saecore
import torch
from saecore import corpus as corpus_mod
from saecore import hooks, models
from saecore.harvesting import iter_batches, iter_contexts


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """Best float32 torch.mm rate (GFLOP/s) on this machine: the practical compute ceiling."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def flops_per_token(model: torch.nn.Module, layer: int, context_length: int) -> float:
    """Forward FLOPs per token up to and including ``layer``: 2 × weights touched + attention scores."""
    layers = hooks.decoder_layers(model)[: layer + 1]
    weights = sum(p.numel() for blk in layers for n, p in blk.named_parameters() if p.dim() == 2)
    d = model.config.hidden_size
    attention = 2 * 2 * context_length * d / 2 * len(layers)  # QK^T and AV, causal (half the context)
    return 2 * weights + attention


def bare_forward(model: torch.nn.Module, batches: list[torch.Tensor], layer: int) -> tuple[float, float]:
    """(wall, CPU) seconds to run every batch through layers 0..layer with no hooks."""
    base = model.model
    full = base.layers
    base.layers = full[: layer + 1]
    try:
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for ids in batches:
                base(input_ids=ids, use_cache=False)
        return time.perf_counter() - t, time.process_time() - c
    finally:
        base.layers = full


def harvest_once(
    model_tok: tuple, corpus: corpus_mod.Corpus, hook: str, tokens: int, args: argparse.Namespace, scratch: Path
) -> tuple[float, float]:
    """(wall, CPU) seconds of one end-to-end ``saecore.harvest`` into a fresh store."""
    out = scratch / "activations.zarr"
    shutil.rmtree(out, ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    saecore.harvest(
        model=model_tok,
        corpus=corpus,
        hooks=[hook],
        out=out,
        context_length=args.context_length,
        batch_size=args.batch_size,
        max_tokens=tokens,
        dtype="float16",
        progress=False,
    )
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="pydoc")
    ap.add_argument("--hook", default="blocks.6.hook_resid_post")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = models.load(args.model)
    corpus = corpus_mod.load(args.corpus)
    layer = hooks.resolve(model, args.hook).layer
    n_contexts = args.tokens // args.context_length
    device = next(model.parameters()).device
    batches = [
        torch.from_numpy(b.input_ids).to(device)
        for b in iter_batches(iter_contexts(iter(corpus), tok, args.context_length), args.batch_size, n_contexts)
    ]
    tokens = sum(b.numel() for b in batches)
    print(
        f"model {args.model} on {device} ({torch.get_num_threads()} threads), hook {args.hook}, "
        f"{tokens} tokens = {len(batches)} batches of {args.batch_size}x{args.context_length}"
    )

    bare_forward(model, batches[:1], layer)  # warm-up: first calls allocate
    bare_s, harvest_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            bare_s.append(bare_forward(model, batches, layer))
            harvest_s.append(harvest_once((model, tok), corpus, args.hook, tokens, args, Path(tmp)))
            print(
                f"  repeat {r + 1}: bare {tokens / bare_s[-1][0]:8.0f} tok/s   harvest {tokens / harvest_s[-1][0]:8.0f} tok/s"
            )
    bare_rate, harvest_rate = tokens / min(w for w, _ in bare_s), tokens / min(w for w, _ in harvest_s)
    cpu_ratio = min(c for _, c in bare_s) / min(c for _, c in harvest_s)
    peak = matmul_gflops()
    achieved = bare_rate * flops_per_token(model, layer, args.context_length) / 1e9
    print(
        f"bare forward to layer {layer}: {bare_rate:8.0f} tok/s  ({achieved:.1f} GFLOP/s, "
        f"{achieved / peak:.0%} of this machine's float32 matmul rate {peak:.1f} GFLOP/s)"
    )
    print(f"saecore harvest         : {harvest_rate:8.0f} tok/s")
    print(
        f"harvest / bare          : {harvest_rate / bare_rate:.3f}  (overhead {bare_rate / harvest_rate - 1:+.1%}; goal within 10%)"
    )
    print(f"same ratio in CPU time  : {cpu_ratio:.3f}  (less sensitive to other processes on a shared machine)")


if __name__ == "__main__":
    main()
