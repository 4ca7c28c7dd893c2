"""The ``saecore`` command line: one verb per pipeline stage.

Each verb lives in its own module, which defines ``cli_configure(parser)`` and ``cli_run(args)``. The
module is imported only when its verb runs, so ``saecore --help`` answers without importing torch.
Options come from config dataclasses (:mod:`saecore.config`), so bad numbers fail while parsing.

Error policy (one place, :func:`main`): verbs just raise. A :class:`SaecoreError`, ``ValueError`` or
``OSError`` escaping a verb prints one line, ``saecore VERB: error: …``, on stderr and exits with 2; a
usage error does the same; ``--debug`` (before or after the verb) adds the traceback. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import NoReturn

from .errors import SaecoreError

# verb -> (module, one-line help). Order is the pipeline's order.
VERBS: dict[str, tuple[str, str]] = {
    "quickstart": ("saecore.quickstart", "run the whole pipeline on the built-in model and corpus"),
    "harvest": ("saecore.harvesting", "capture hook-point activations of a causal LM into a Zarr store"),
    "train": ("saecore.onthefly", "train SAEs on an activation store, or many at once on the fly from a model"),
    "consolidate": ("saecore.distributed", "join a distributed training checkpoint into one SAELens-layout SAE"),
    "eval": ("saecore.evaluate", "evaluate an SAE: L0, explained variance, dead fraction, CE-loss recovered"),
    "sweep": ("saecore.sweep", "scaling-law sweep over dictionary size x training tokens"),
    "bench-synth": ("saecore.bench_synth", "train SAEs on SynthSAEBench-style synthetic data; MCC, F1 vs ground truth"),
    "encode": ("saecore.encode", "encode an activation store through an SAE into a sparse feature store"),
    "index": ("saecore.index", "per-feature statistics, histograms, top-k and quantile samples"),
    "neighbours": ("saecore.geometry", "cosine neighbours of decoder directions within and across SAEs"),
    "splitting": ("saecore.geometry", "feature splitting across SAEs of increasing size"),
    "geometry": ("saecore.geometry", "decoder-geometry baselines, encoder/decoder cosines and a 2-D feature map"),
    "steer": ("saecore.interventions", "clamp features during generation; baseline vs steered completion"),
    "attribute": ("saecore.interventions", "features behind a logit difference: activation, attribution, ablation"),
    "probe": ("saecore.interventions", "top features on the final token of each prompt (concept probe)"),
    "logit-lens": ("saecore.logit_lens", "the tokens each feature's decoder direction promotes and suppresses"),
    "token-scores": ("saecore.token_scores", "model-free scores of every feature (token simulators, logit shape)"),
    "explain": ("saecore.explain", "explain features with a language model (local or OpenAI-compatible), from their examples"),
    "score": ("saecore.scoring", "score explanations: detection, fuzzing, specificity by activation level, vs baselines"),
    "xor": ("saecore.xor", "experiment: is A XOR B linearly readable because of superposition? (toy + every layer)"),
    "maximise": ("saecore.maximise", "experiment: synthetic max-activating text for a feature (greedy coordinate gradient)"),
    "composite": ("saecore.composite", "experiment: SAE features as composites (meta-SAE on decoder rows + planted toy)"),
    "classical": ("saecore.classical", "experiment: PCA and FastICA dictionaries saved as SAEs, compared with the SAE"),
    "pages": ("saecore.pages", "write static HTML feature pages for a run"),
    "serve": ("saecore.pages", "serve a run's feature pages on localhost"),
}


def _top_level_help() -> str:
    width = max(map(len, VERBS))
    lines = [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    return "verbs:\n" + "\n".join(lines) + "\n\nRun 'saecore VERB --help' for a verb's options."


class VerbParser(argparse.ArgumentParser):
    """A verb's parser: a usage error is one line on stderr (``saecore VERB: error: …``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(verb: str) -> argparse.ArgumentParser:
    """The argument parser of one verb (imports that verb's module)."""
    module_name, help_ = VERBS[verb]
    module = importlib.import_module(module_name)
    parser = VerbParser(prog=f"saecore {verb}", description=help_)
    configure = getattr(module, f"cli_configure_{verb}", None) or module.cli_configure
    configure(parser)
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    parser.set_defaults(_run=getattr(module, f"cli_run_{verb}", None) or module.cli_run)
    return parser


# Errors that mean "bad input or a bad file": reported as one line. Anything else is a bug and keeps
# its traceback. ModuleNotFoundError covers an optional dependency that is not installed.
REPORTED_ERRORS = (SaecoreError, ValueError, OSError, ModuleNotFoundError)


def _one_line(err: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``saecore VERB …``; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"  # --debug before the verb (after it, the verb parses it)
    argv = argv[1:] if debug else argv
    top = argparse.ArgumentParser(
        prog="saecore",
        description="Sparse-autoencoder dictionary learning on transformer activations.",
        epilog=_top_level_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="store_true", help="print the version and exit")
    top.add_argument("--debug", action="store_true", help="print the full traceback of an error (before or after VERB)")
    top.add_argument("verb", nargs="?", choices=list(VERBS), metavar="VERB", help="the stage to run")
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    if argv[0] not in VERBS:
        top.print_usage(sys.stderr)
        print(f"saecore: error: unknown verb {argv[0]!r}; choose from {', '.join(VERBS)}", file=sys.stderr)
        return 2
    verb, rest = argv[0], argv[1:]
    try:
        parser = build_parser(verb)
    except ModuleNotFoundError as e:
        if e.name == VERBS[verb][0]:
            print(f"saecore {verb}: not available in this build", file=sys.stderr)
            return 2
        raise
    try:
        args = parser.parse_args(rest)
    except SystemExit as e:  # a usage error or --help, already printed: return its code, as for any error
        return int(e.code or 0)
    return _run_verb(verb, args, debug or args.debug)


def _run_verb(verb: str, args: argparse.Namespace, debug: bool) -> int:
    """The one error policy: verbs raise; bad input becomes one line on stderr and exit code 2."""
    try:
        code = args._run(args)
    except KeyboardInterrupt:
        print(f"saecore {verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except REPORTED_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"saecore {verb}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
