"""Many SAEs on the fly vs harvest-then-train vs one model pass per SAE, on the built-in model, in one run.

    python bench/train_onthefly.py                        # 2 hooks x 2 TopK SAEs, 4,096 tokens of pydoc
    python bench/train_onthefly.py --tokens 16384 --no-separate

Every case trains the same SAEs (hooks blocks.3/blocks.6 resid_post × TopK 1024/k16 and 2048/k32) on
the same tokens with the real code paths, the model loaded once beforehand (its load time is not
counted):

  on the fly       saecore.onthefly.train_on_the_fly: one LM pass (stopped after block 6) feeds all SAEs;
  harvest + train  saecore.harvest into a float16 store (the harvest default), then saecore.train once per
                   SAE from the store;
  one pass per SAE train_on_the_fly once per SAE (what a tool that trains one SAE per model pass does).

tokens/s is corpus tokens through the whole job (LM + every SAE) per wall-clock second. A short warm-up
forward runs first; each case runs ``--repeats`` times, interleaved, and the best time counts (the
shared machines this was written on are noisy).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from saecore import models
from saecore.harvesting import HarvestConfig, harvest
from saecore.onthefly import OnTheFlyConfig, train_on_the_fly
from saecore.training import TrainConfig, train

HOOKS = ["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"]
SPECS = ["d_sae=1024,k=16", "d_sae=2048,k=32"]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _cases(lm, args, cfg: TrainConfig, hcfg: HarvestConfig) -> dict:
    """Case name -> a function of a fresh folder that runs it."""

    def on_the_fly(root: Path) -> None:
        otf = OnTheFlyConfig(hooks=HOOKS, saes=SPECS, contexts_per_batch=hcfg.batch_size)
        train_on_the_fly(lm, args.corpus, root, cfg, otf, hcfg)

    def harvest_then_train(root: Path) -> None:
        store = harvest(lm, args.corpus, root / "store.zarr", hcfg)
        for hook in HOOKS:
            for spec in SPECS:
                d_sae, k = (int(p.split("=")[1]) for p in spec.split(","))
                train(store, root / f"{hook}-{d_sae}", TrainConfig(**{**cfg.to_dict(), "hook": hook, "d_sae": d_sae, "k": k}))

    def one_pass_each(root: Path) -> None:
        for hook in HOOKS:
            for spec in SPECS:
                one = OnTheFlyConfig(hooks=[hook], saes=[spec], contexts_per_batch=hcfg.batch_size)
                train_on_the_fly(lm, args.corpus, root / f"{hook}-{spec}", cfg, one, hcfg)

    cases = {"on the fly (1 LM pass, 4 SAEs)": on_the_fly, "harvest (float16 store) + 4 x train": harvest_then_train}
    if not args.no_separate:
        cases["one LM pass per SAE (4 passes)"] = one_pass_each
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--corpus", default="pydoc")
    ap.add_argument("--batch-size", type=int, default=512, help="SAE batch (tokens per step)")
    ap.add_argument("--no-separate", action="store_true", help="skip the one-pass-per-SAE case")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    lm = models.load(models.BUILTIN_MODEL, device="cpu", dtype=torch.float32)
    hcfg = HarvestConfig(hooks=HOOKS, context_length=128, batch_size=8, max_tokens=args.tokens, progress=False)
    cfg = TrainConfig(architecture="topk", batch_size=args.batch_size, shuffle_buffer_rows=65536, progress=False,
                      holdout_fraction=0.0)
    tokens = hcfg.max_contexts * hcfg.context_length
    run_cases = _cases(lm, args, cfg, hcfg)
    with torch.inference_mode():  # warm-up: first-call allocations, thread pools
        lm.model(input_ids=torch.zeros(8, 128, dtype=torch.long))
    rows: dict[str, float] = {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, fn) in enumerate(run_cases.items()):
                seconds = _timed(lambda fn=fn, folder=Path(tmp) / f"case-{i}": fn(folder))
                rows[name] = min(rows.get(name, float("inf")), seconds)
    print(f"{tokens} tokens of {args.corpus!r}, SmolLM2-135M fp32 on CPU ({torch.get_num_threads()} threads), "
          f"hooks {', '.join(HOOKS)}; SAEs TopK {' and '.join(SPECS)}; SAE batch {args.batch_size}\n")
    print("| case | wall s | tokens/s |\n|---|---:|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.1f} | {tokens / seconds:,.0f} |")


if __name__ == "__main__":
    main()
