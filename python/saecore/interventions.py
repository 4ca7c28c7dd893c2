"""Interventions on a model through an SAE: steering by clamping, ablation, attribution, concept probes.

Everything here works through one *splice* at the SAE's hook point. With x the model's activation there
and f = encode(x), the spliced activation is

    x' = decode(f') + (x - decode(f))          computed as   x + (decode(f') - decode(f))

where f' is f with the chosen features edited (clamped, zeroed, scaled). The SAE error term
x - decode(f) is taken from the *unedited* f, so it cannot cancel the edit (re-encoding the edited
activation, or computing the error after clamping, would). With no edit, f' == f and the difference is
exactly zero, so the spliced model reproduces the clean model's logits bit for bit.

Public API: :func:`steer`, :func:`attribute`, :func:`attribution`, :func:`ablation_effects`,
:func:`probe`, :func:`splice` (context manager) and the CLI verbs ``steer``, ``attribute`` and ``probe``.
"""

from __future__ import annotations

import argparse
import contextlib
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import tables
from .config import SAEModelOptions, add_arguments, from_args, option, validate
from .logit_lens import read_logit_lens, write_logit_lens
from .models import name_of
from .run import sae_index_dir
from .sae import SAE
from .sae_model import check_compatible, load_model_for
from .sae_model import load_sae_and_model as _load
from .sae_model import model_device as _device

# --------------------------------------------------------------------------------------------------
# Checks: every error names the thing at fault.
# --------------------------------------------------------------------------------------------------


def _cfg(sae: Any) -> Any:
    return sae.cfg


def d_sae_of(sae: Any) -> int:
    """Number of features of an SAE."""
    return int(sae.W_dec.shape[0])


def check_features(sae: Any, features: Sequence[int] | int) -> list[int]:
    """Validate feature ids against the SAE's dictionary size; returns them as a list of ints."""
    ids = [features] if isinstance(features, (int, np.integer)) else list(features)
    n = d_sae_of(sae)
    for fid in ids:
        if isinstance(fid, bool) or not isinstance(fid, (int, np.integer)):
            raise TypeError(f"feature id {fid!r} is not an integer (valid ids are 0..{n - 1})")
        if not 0 <= int(fid) < n:
            raise ValueError(
                f"feature id {int(fid)} is out of range for SAE at hook {_cfg(sae).hook_name!r} "
                f"(valid ids are 0..{n - 1}, d_sae={n})"
            )
    return [int(f) for f in ids]


def context_length(model: torch.nn.Module) -> int:
    """The model's maximum number of positions."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 1 << 62)


def check_context(model: torch.nn.Module, n_prompt: int, n_new: int = 0) -> None:
    """Raise ValueError if a prompt (plus the tokens to generate) does not fit in the model's context."""
    ctx = context_length(model)
    if n_prompt + n_new > ctx:
        extra = f" + {n_new} new tokens" if n_new else ""
        raise ValueError(
            f"prompt is {n_prompt} tokens{extra} = {n_prompt + n_new}, longer than the context of model "
            f"{name_of(model)!r} ({ctx} positions); shorten the prompt"
            + (" or lower max_new_tokens" if n_new else "")
        )
    if n_prompt == 0:
        raise ValueError("prompt is empty (0 tokens)")


def tokenize(model: torch.nn.Module, tokenizer: Any, prompt: str, n_new: int = 0) -> torch.Tensor:
    """Token ids [1, T] of a prompt on the model's device, checked against the context length."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # [1, T]
    check_context(model, int(ids.shape[1]), n_new)
    return ids.to(_device(model))


def single_token_id(tokenizer: Any, text: str | int) -> int:
    """The id of a string that must be exactly one token (e.g. ``" sad"`` — the leading space matters)."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(f"{text!r} is {len(ids)} tokens {pieces}, not one; choose a single-token string")
    return int(ids[0])


def _sae_dtype(sae: Any) -> torch.dtype:
    return sae.W_dec.dtype


# --------------------------------------------------------------------------------------------------
# The splice.
# --------------------------------------------------------------------------------------------------


class FeatureEdit:
    """Base of the hook functions: x -> x + decode(edit(f)) - decode(f) at the SAE's hook point.

    Keeps ``offset``, the absolute position of the first row of the next activation it sees, so that
    with a KV cache (one new token per forward) edits tied to positions land on the right token.
    Subclasses implement :meth:`edit_features`. After a call, ``last_features`` holds the clean f of
    that call ([B, T, d_sae], detached), which callers use to read activations without a second pass.
    """

    def __init__(self, sae: Any) -> None:
        self.sae = sae
        self.offset = 0
        self.last_features: torch.Tensor | None = None

    def edit_features(self, f: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Return the edited copy of f [B, T, d_sae]; ``positions`` [T] are absolute token positions."""
        return f

    def delta(self, f: torch.Tensor, f_edit: torch.Tensor) -> torch.Tensor:
        """The change to the activation [B, T, d_in]: decode(f') - decode(f), written so that an edit that
        changes nothing adds exactly 0."""
        return self.sae.decode(f_edit) - self.sae.decode(f)

    def __call__(self, act: torch.Tensor) -> torch.Tensor:
        n = act.shape[1]
        positions = torch.arange(self.offset, self.offset + n, device=act.device)  # [T]
        self.offset += n
        x = act.to(_sae_dtype(self.sae))
        with torch.no_grad():
            f = self.sae.encode(x)  # [B, T, d_sae]
            self.last_features = f
            f_edit = self.edit_features(f.clone(), positions)
            delta = self.delta(f, f_edit)  # [B, T, d_in]: decode(f') + (x - decode(f)) - x
        return act + delta.to(act.dtype)


class ClampEdit(FeatureEdit):
    """Clamp features to fixed values at all positions (``positions=None``) or at chosen ones.

    Positions are absolute token positions; negative ones count back from the end of the prompt
    (``-1`` is its last token) and need ``prompt_length``.
    """

    def __init__(
        self,
        sae: Any,
        values: Mapping[int, float],
        positions: Sequence[int] | None = None,
        prompt_length: int | None = None,
    ) -> None:
        super().__init__(sae)
        feats = check_features(sae, list(values))
        self.features = torch.tensor(feats, dtype=torch.long)
        self.values = torch.tensor([float(values[f]) for f in feats], dtype=_sae_dtype(sae))
        self.positions: set[int] | None = None
        if positions is not None:
            if any(p < 0 for p in positions) and prompt_length is None:
                raise ValueError("negative positions count from the end of the prompt; give prompt_length")
            self.positions = {p if p >= 0 else int(prompt_length) + p for p in positions}  # type: ignore[arg-type]
            if any(p < 0 for p in self.positions):
                raise ValueError(f"positions {sorted(positions)} reach before the start of the prompt")

    def edit_features(self, f: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if len(self.features) == 0:
            return f
        feats = self.features.to(f.device)
        vals = self.values.to(f.device, f.dtype)
        if self.positions is None:
            f[:, :, feats] = vals
        else:
            rows = [i for i, p in enumerate(positions.tolist()) if p in self.positions]
            if rows:
                idx = torch.tensor(rows, device=f.device)
                f[:, idx[:, None], feats[None, :]] = vals
        return f


class DirectionEdit(ClampEdit):
    """A clamp that writes its change along other directions than the features' decoder rows.

    Feature j is clamped to c_j as in :class:`ClampEdit`, but the activation moves by
    ``(c_j - f_j(x)) * u_j`` with ``u_j`` row j of ``directions [n_features, d_in]`` (raw activation
    space) instead of ``(c_j - f_j(x)) * W_dec[j]``; with ``u_j = W_dec[j]`` it is the same edit.
    """

    def __init__(self, sae: Any, values: Mapping[int, float], directions: torch.Tensor,
                 positions: Sequence[int] | None = None, prompt_length: int | None = None) -> None:
        super().__init__(sae, values, positions, prompt_length)
        if tuple(directions.shape) != (len(self.features), int(sae.W_dec.shape[1])):
            raise ValueError(f"directions have shape {tuple(directions.shape)}, expected "
                             f"({len(self.features)}, {int(sae.W_dec.shape[1])}): one row per clamped feature")
        self.directions = directions.detach()

    def delta(self, f: torch.Tensor, f_edit: torch.Tensor) -> torch.Tensor:
        feats = self.features.to(f.device)
        change = f_edit[..., feats] - f[..., feats]  # [B, T, n]
        return change @ self.directions.to(f.device, f.dtype)


def steering_directions(sae: Any, features: Sequence[int], direction: str | Path) -> torch.Tensor | None:
    """The rows ``[n, d_in]`` ``steer`` writes along for ``features``: None for ``"decoder"`` (the plain
    clamp), the encoder columns for ``"encoder"``, or the vectors of a ``.npy`` file (``[d_in]`` for one
    feature, else ``[n, d_in]``). Encoder and file rows are rescaled to the norm of the feature's decoder
    row, so a clamp value moves the activation by the same distance whichever direction it takes."""
    from .logit_lens import feature_directions

    feats = check_features(sae, features)
    if str(direction) == "decoder":
        return None
    dec = feature_directions(sae, "decoder", feats)  # [n, d_in]
    if str(direction) == "encoder":
        rows = feature_directions(sae, "encoder", feats)
        dead = [f for f, r in zip(feats, rows) if not bool(r.any())]
        if dead:
            raise ValueError(f"features {dead} have an all-zero encoder column: no encoder direction to steer along")
        return rows
    rows = load_direction_file(Path(direction), len(feats), int(dec.shape[1])).to(dec.device, dec.dtype)
    return rows * (dec.norm(dim=1, keepdim=True) / rows.norm(dim=1, keepdim=True))


def load_direction_file(path: Path, n: int, d_in: int) -> torch.Tensor:
    """Steering vectors from a ``.npy`` file: ``[d_in]`` (one feature) or ``[n, d_in]``, finite, nonzero."""
    if not path.is_file():
        raise ValueError(f"--direction {path}: no such file (give decoder, encoder or a .npy file of vectors)")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"--direction {path}: not a NumPy .npy array ({e})") from e
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"--direction {path}: holds {getattr(arr, 'dtype', type(arr))}, expected real numbers")
    if arr.shape not in ((d_in,), (n, d_in)) or (arr.ndim == 1 and n != 1):
        raise ValueError(f"--direction {path}: shape {arr.shape}, expected ({d_in},) for one feature or "
                         f"({n}, {d_in}): one row per --feature")
    rows = arr.reshape(n, d_in).astype(np.float64)
    if not np.isfinite(rows).all():
        raise ValueError(f"--direction {path}: holds NaN or infinite values")
    zero = [i for i, r in enumerate(rows) if not r.any()]
    if zero:
        raise ValueError(f"--direction {path}: row(s) {zero} are all zero: no direction to steer along")
    return torch.from_numpy(rows)


class PointEdit(FeatureEdit):
    """One edit per batch row: f[row, position, feature] = factor * f[row, position, feature].

    ``factor=0`` is an ablation; ``factor=1-eps`` a small scaling (for checking attribution).
    Used to measure many single-feature ablations in one batched forward.
    """

    def __init__(self, sae: Any, positions: Sequence[int], features: Sequence[int], factor: float = 0.0) -> None:
        super().__init__(sae)
        if len(positions) != len(features):
            raise ValueError(f"{len(positions)} positions but {len(features)} features")
        self.features = torch.tensor(check_features(sae, features), dtype=torch.long)
        self.positions = torch.tensor(list(positions), dtype=torch.long)
        self.factor = float(factor)

    def edit_features(self, f: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if f.shape[0] != len(self.features):
            raise ValueError(f"batch has {f.shape[0]} rows but {len(self.features)} point edits")
        local = self.positions.to(f.device) - positions[0]  # [B] row inside this forward's window
        inside = (local >= 0) & (local < f.shape[1])
        rows = torch.arange(f.shape[0], device=f.device)[inside]
        loc, feats = local[inside], self.features.to(f.device)[inside]
        f[rows, loc, feats] = f[rows, loc, feats] * self.factor
        return f


@contextlib.contextmanager
def splice(model: torch.nn.Module, sae: Any, edit: FeatureEdit | None = None) -> Iterator[FeatureEdit]:
    """Context manager: run ``model`` with the SAE spliced in at its hook point.

    With ``edit=None`` nothing is edited and the model's outputs are unchanged (exactly). Otherwise
    ``edit`` (a :class:`ClampEdit`, :class:`PointEdit`, ...) decides f' on every forward.
    """
    from . import hooks

    check_compatible(model, sae)
    fn = edit if edit is not None else FeatureEdit(sae)
    with hooks.edit(model, _cfg(sae).hook_name, fn):
        yield fn


# --------------------------------------------------------------------------------------------------
# Steering.
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None
) -> torch.Tensor:
    """Greedy decoding with a KV cache; returns the new token ids [n_new] (stops early at EOS).

    Written out (rather than ``model.generate``) so the prefill/one-token-per-step pattern that the
    position-tracking edits rely on is explicit.
    """
    out = model(input_ids=input_ids, use_cache=True)
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        new.append(int(nxt))
        if len(new) == max_new_tokens or (eos_token_id is not None and int(nxt) == eos_token_id):
            break
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return torch.tensor(new, dtype=torch.long)


def index_dir_for(sae_dir: str | Path) -> Path:
    """The index folder of an SAE folder (:func:`saecore.run.sae_index_dir`: ``runs/NAME/index/SAE``)."""
    return sae_index_dir(sae_dir)


def max_activations_from_index(index_dir: str | Path, features: Sequence[int]) -> dict[int, float] | None:
    """Max activation of each feature from the index's stats table; None when the index has none."""
    return tables.max_activations(index_dir, list(features))


@torch.no_grad()
def feature_activations(model: torch.nn.Module, sae: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """SAE feature activations f [B, T, d_sae] at the SAE's hook point (stops the forward there)."""
    from . import hooks

    check_compatible(model, sae)
    hook = _cfg(sae).hook_name
    x = hooks.run_to_hooks(model, input_ids, [hook])[hook]  # [B, T, d_in]
    return sae.encode(x.to(_sae_dtype(sae)))


@dataclass
class SteerResult:
    """Baseline and steered greedy completions of one prompt."""

    prompt: str
    baseline: str
    steered: str
    clamps: dict[int, float]
    """feature id -> the activation value it was clamped to"""
    max_activations: dict[int, float]
    """feature id -> the max activation used for scaling (empty when values were given directly)"""
    max_source: str
    """where max activations came from: "index", "prompt", "explicit" or "" (absolute values)"""
    positions: list[int] | None
    baseline_ids: list[int] = field(default_factory=list)
    steered_ids: list[int] = field(default_factory=list)


def resolve_clamp_values(
    model: torch.nn.Module,
    sae: Any,
    input_ids: torch.Tensor,
    features: Sequence[int],
    scale: float | None,
    value: float | None,
    max_activations: Mapping[int, float] | None,
    index_dir: str | Path | None,
) -> tuple[dict[int, float], dict[int, float], str]:
    """Clamp value per feature: ``value`` as given, or ``scale`` × the feature's max activation.

    The max activation comes from ``max_activations`` if given, else the index's stats table, else the
    feature's max over this prompt (the paper clamps to multiples of the max over the dataset, so an
    index is the better source).
    """
    feats = check_features(sae, features)
    if (scale is None) == (value is None):
        raise ValueError("give exactly one of scale (a multiple of the max activation) or value")
    if value is not None:
        return {f: float(value) for f in feats}, {}, ""
    if max_activations is not None:
        maxes, source = {f: float(max_activations[f]) for f in feats}, "explicit"
    else:
        found = max_activations_from_index(index_dir, feats) if index_dir is not None else None
        if found is not None:
            maxes, source = found, "index"
        else:
            f = feature_activations(model, sae, input_ids)[0]  # [T, d_sae]
            maxes, source = {g: float(f[:, g].max()) for g in feats}, "prompt"
    dead = [g for g in feats if not maxes[g] > 0]
    if dead:
        where = {"index": "in the index", "prompt": "anywhere on this prompt", "explicit": "as given"}[source]
        raise ValueError(
            f"features {dead} have max activation 0 {where}, so a multiple of it is 0; give an absolute value"
        )
    return {g: float(scale) * maxes[g] for g in feats}, maxes, source  # type: ignore[arg-type]


def steer(
    model: torch.nn.Module,
    tokenizer: Any,
    sae: Any,
    prompt: str,
    features: Sequence[int] | int,
    *,
    scale: float | None = None,
    value: float | None = None,
    positions: Sequence[int] | None = None,
    max_new_tokens: int = 30,
    max_activations: Mapping[int, float] | None = None,
    index_dir: str | Path | None = None,
    directions: torch.Tensor | None = None,
) -> SteerResult:
    """Greedy completions of ``prompt`` without and with ``features`` clamped.

    Clamp to ``value``, or to ``scale`` × max activation (see :func:`resolve_clamp_values`). The
    clamp applies at every position — the prompt's and each generated token's — or only at
    ``positions`` (absolute; negative counts back from the end of the prompt). ``directions``
    ``[n_features, d_in]`` (:func:`steering_directions`) makes the clamp write along those rows instead
    of the decoder's (:class:`DirectionEdit`).
    """
    feats = check_features(sae, features)
    check_compatible(model, sae)
    ids = tokenize(model, tokenizer, prompt, max_new_tokens)
    clamps, maxes, source = resolve_clamp_values(model, sae, ids, feats, scale, value, max_activations, index_dir)
    eos = getattr(tokenizer, "eos_token_id", None)
    base = greedy_generate(model, ids, max_new_tokens, eos)
    edit = (ClampEdit(sae, clamps, positions=positions, prompt_length=int(ids.shape[1])) if directions is None
            else DirectionEdit(sae, clamps, directions, positions=positions, prompt_length=int(ids.shape[1])))
    with splice(model, sae, edit):
        steered = greedy_generate(model, ids, max_new_tokens, eos)
    return SteerResult(
        prompt=prompt,
        baseline=tokenizer.decode(base.tolist()),
        steered=tokenizer.decode(steered.tolist()),
        clamps=clamps,
        max_activations=maxes,
        max_source=source,
        positions=None if positions is None else list(positions),
        baseline_ids=base.tolist(),
        steered_ids=steered.tolist(),
    )


# --------------------------------------------------------------------------------------------------
# Attribution and ablation.
# --------------------------------------------------------------------------------------------------


def _logit_diff(logits: torch.Tensor, target: int, baseline: int) -> torch.Tensor:
    """logit[target] - logit[baseline] at the last position, per batch row: [B]."""
    last = logits[:, -1].double()  # [B, vocab]; float64 so small edits' effects are not lost to rounding
    return last[:, target] - last[:, baseline]


class _GradEdit(FeatureEdit):
    """Pass x through unchanged in value while making it depend on f: x + decode(f) - decode(f).detach()."""

    def __init__(self, sae: Any) -> None:
        super().__init__(sae)
        self.f: torch.Tensor | None = None

    def __call__(self, act: torch.Tensor) -> torch.Tensor:
        x = act.detach().to(_sae_dtype(self.sae))
        with torch.no_grad():
            f = self.sae.encode(x)
        self.f = f.requires_grad_(True)
        recon = self.sae.decode(self.f)
        return act + (recon - recon.detach()).to(act.dtype)


@dataclass
class Attribution:
    """Features at every position of a prompt and their linear effect on a logit difference.

    ``attribution[p, i] = f[p, i] * d(logit_diff)/d f[p, i]`` estimates ``logit_diff(clean) -
    logit_diff(f[p, i] set to 0)``: positive means the feature pushes towards ``target``.
    """

    tokens: list[str]
    target: int
    baseline: int
    logit_diff: float
    activations: torch.Tensor
    """[T, d_sae] feature activations"""
    attribution: torch.Tensor
    """[T, d_sae] gradient x activation"""
    gradient: torch.Tensor
    """[T, d_sae] d(logit_diff)/d f"""


def attribution(
    model: torch.nn.Module, tokenizer: Any, sae: Any, prompt: str, target: str | int, baseline: str | int
) -> Attribution:
    """Gradient × activation of every feature at every position for logit[target] − logit[baseline]."""
    check_compatible(model, sae)
    t_id, b_id = single_token_id(tokenizer, target), single_token_id(tokenizer, baseline)
    ids = tokenize(model, tokenizer, prompt)
    grad_edit = _GradEdit(sae)
    with torch.enable_grad(), splice(model, sae, grad_edit):
        logits = model(input_ids=ids).logits  # [1, T, vocab]
        diff = _logit_diff(logits, t_id, b_id)[0]
        assert grad_edit.f is not None
        (grad,) = torch.autograd.grad(diff, grad_edit.f)  # [1, T, d_sae]
    f = grad_edit.f.detach()[0]
    g = grad[0].detach()
    return Attribution(
        tokens=[tokenizer.decode([i]) for i in ids[0].tolist()],
        target=t_id,
        baseline=b_id,
        logit_diff=float(diff.detach()),
        activations=f,
        attribution=f * g,
        gradient=g,
    )


@torch.no_grad()
def ablation_effects(
    model: torch.nn.Module,
    tokenizer: Any,
    sae: Any,
    prompt: str,
    target: str | int,
    baseline: str | int,
    units: Sequence[tuple[int, int]],
    *,
    factor: float = 0.0,
    batch_size: int = 16,
) -> np.ndarray:
    """Exact effect of each (position, feature) edit: ``logit_diff(clean) - logit_diff(edited)``.

    The edit multiplies that one activation by ``factor`` (0 = ablation) and keeps the SAE error term.
    Units are measured ``batch_size`` at a time, one per batch row.
    """
    check_compatible(model, sae)
    t_id, b_id = single_token_id(tokenizer, target), single_token_id(tokenizer, baseline)
    ids = tokenize(model, tokenizer, prompt)
    clean = float(_logit_diff(model(input_ids=ids).logits, t_id, b_id)[0])
    effects = np.zeros(len(units), dtype=np.float64)
    for start in range(0, len(units), batch_size):
        chunk = units[start : start + batch_size]
        edit = PointEdit(sae, [p for p, _ in chunk], [f for _, f in chunk], factor)
        with splice(model, sae, edit):
            logits = model(input_ids=ids.expand(len(chunk), -1)).logits  # [b, T, vocab]
        effects[start : start + len(chunk)] = clean - _logit_diff(logits, t_id, b_id).double().cpu().numpy()
    return effects


@dataclass
class Ranked:
    """One (position, feature) unit in a ranking."""

    position: int
    token: str
    feature: int
    activation: float
    attribution: float
    ablation: float | None


@dataclass
class AttributeReport:
    """Rankings of (position, feature) units by activation, attribution and exact ablation effect."""

    prompt: str
    target: str
    baseline: str
    logit_diff: float
    by_activation: list[Ranked]
    by_attribution: list[Ranked]
    by_ablation: list[Ranked]
    overlaps: dict[str, int]
    """'activation∩ablation', 'attribution∩ablation', 'activation∩attribution' among the top ``top``"""
    top: int
    n_active: int
    """active (position, feature) units considered"""
    n_ablated: int
    """units whose ablation was measured exactly"""


def _default_positions(n_tokens: int) -> list[int]:
    # The first token is the attention sink (a BOS token, or without one whatever token comes first):
    # its activations are outliers tens of times larger than elsewhere, so it tops every ranking, and
    # ablating its features disturbs every later position through attention rather than answering
    # which features carry the prompt's meaning.
    return list(range(1, n_tokens))


def attribute(
    model: torch.nn.Module,
    tokenizer: Any,
    sae: Any,
    prompt: str,
    target: str | int,
    baseline: str | int,
    *,
    top: int = 10,
    candidates: int = 30,
    exhaustive: bool = False,
    batch_size: int = 16,
    positions: Sequence[int] | None = None,
) -> AttributeReport:
    """Which features drive logit[target] − logit[baseline] at the prompt's last position?

    Ranks the active (position, feature) units by activation, by |attribution| and by |exact ablation
    effect|. Ablation is measured for the union of the top ``candidates`` by |attribution| and by
    activation, or for every active unit with ``exhaustive=True``. ``positions`` restricts the units
    (default: every position but the first, the attention sink).
    """
    att = attribution(model, tokenizer, sae, prompt, target, baseline)
    allowed = list(positions) if positions is not None else _default_positions(len(att.tokens))
    units = _active_units(att.activations, allowed)
    by_act = _rank(units, att.activations)
    by_att = _rank(units, att.attribution.abs())
    measure = units if exhaustive else _union(by_act[:candidates], by_att[:candidates])
    effects = (
        ablation_effects(model, tokenizer, sae, prompt, target, baseline, measure, batch_size=batch_size)
        if measure
        else np.zeros(0)
    )
    abl = dict(zip(measure, effects.tolist()))
    by_abl = sorted(measure, key=lambda u: -abs(abl[u]))

    def row(u: tuple[int, int]) -> Ranked:
        p, i = u
        return Ranked(p, att.tokens[p], i, float(att.activations[p, i]), float(att.attribution[p, i]), abl.get(u))

    k_act, k_att, k_abl = (set(r[:top]) for r in (by_act, by_att, by_abl))
    return AttributeReport(
        prompt=prompt,
        target=target if isinstance(target, str) else tokenizer.decode([target]),
        baseline=baseline if isinstance(baseline, str) else tokenizer.decode([baseline]),
        logit_diff=att.logit_diff,
        by_activation=[row(u) for u in by_act[:top]],
        by_attribution=[row(u) for u in by_att[:top]],
        by_ablation=[row(u) for u in by_abl[:top]],
        overlaps={
            "activation∩ablation": len(k_act & k_abl),
            "attribution∩ablation": len(k_att & k_abl),
            "activation∩attribution": len(k_act & k_att),
        },
        top=top,
        n_active=len(units),
        n_ablated=len(measure),
    )


def _active_units(f: torch.Tensor, positions: Sequence[int]) -> list[tuple[int, int]]:
    mask = torch.zeros_like(f, dtype=torch.bool)
    pos = [p for p in positions if 0 <= p < f.shape[0]]
    mask[pos] = f[pos] > 0
    return [(int(p), int(i)) for p, i in mask.nonzero().tolist()]


def _rank(units: list[tuple[int, int]], score: torch.Tensor) -> list[tuple[int, int]]:
    return sorted(units, key=lambda u: -float(score[u[0], u[1]]))


def _union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return list(dict.fromkeys(a + b))


# --------------------------------------------------------------------------------------------------
# Concept probe.
# --------------------------------------------------------------------------------------------------


@dataclass
class ProbeRow:
    """One of the top features on the final token of a prompt."""

    prompt: str
    rank: int
    feature: int
    activation: float
    fraction_of_max: float | None
    """activation / the feature's max over the indexed dataset (None without an index)"""
    promotes: str | None
    """the feature's most promoted tokens from the logit-lens table (None without one)"""


def probe(
    model: torch.nn.Module,
    tokenizer: Any,
    sae: Any,
    prompts: Sequence[str],
    *,
    top: int = 5,
    index_dir: str | Path | None = None,
) -> list[ProbeRow]:
    """The paper's completeness probe: the top ``top`` features on the final token of each prompt."""
    check_compatible(model, sae)
    rows: list[ProbeRow] = []
    for prompt in prompts:
        ids = tokenize(model, tokenizer, prompt)
        f = feature_activations(model, sae, ids)[0, -1]  # [d_sae]
        vals, feats = f.topk(min(top, f.shape[0]))
        for r, (v, i) in enumerate(zip(vals.tolist(), feats.tolist())):
            if v <= 0:
                break
            rows.append(ProbeRow(prompt, r, int(i), float(v), None, None))
    if index_dir is not None:
        _annotate(rows, Path(index_dir))
    return rows


def _annotate(rows: list[ProbeRow], index_dir: Path) -> None:
    feats = sorted({r.feature for r in rows})
    if not feats:
        return
    maxes = tables.max_activations(index_dir, feats)
    if maxes is not None:
        for r in rows:
            m = maxes.get(r.feature, 0.0)
            r.fraction_of_max = r.activation / m if m > 0 else None
    lens = tables.LOGIT_LENS.path(index_dir)
    if lens.exists():
        tokens = read_logit_lens(lens, feats, kind="promote", top=5)
        for r in rows:
            r.promotes = " ".join(repr(t) for t in tokens.get(r.feature, []))


# --------------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------------


def _side_by_side(left_title: str, left: str, right_title: str, right: str, width: int = 100) -> str:
    col = (width - 3) // 2
    lw = textwrap.wrap(left.replace("\n", " ⏎ "), col) or [""]
    rw = textwrap.wrap(right.replace("\n", " ⏎ "), col) or [""]
    lines = [f"{left_title[:col]:<{col}} | {right_title[:col]}", f"{'-' * col}-+-{'-' * col}"]
    for i in range(max(len(lw), len(rw))):
        a = lw[i] if i < len(lw) else ""
        b = rw[i] if i < len(rw) else ""
        lines.append(f"{a:<{col}} | {b}")
    return "\n".join(lines)


@dataclass(kw_only=True)
class SteerConfig(SAEModelOptions):
    """Options of ``saecore steer``."""

    feature: list[int] = option(append=True, ge=0, lt=1 << 32)
    """Feature id to clamp."""

    prompt: str
    """Prompt to continue."""

    scale: float | None = option(None, gt=0, le=1e6)
    """Clamp to SCALE x the feature's max activation (10 when neither --scale nor --value is given)."""

    value: float | None = option(None, ge=-1e6, le=1e6)
    """Clamp to this absolute activation value (instead of --scale)."""

    max_act: float | None = option(None, gt=0, le=1e6)
    """Max activation to scale; unset: the index's, else the prompt's."""

    max_new_tokens: int = option(30, ge=1, le=100_000)
    """Tokens generated for each completion."""

    positions: list[int] | None = None
    """Clamp only at these prompt positions (negative: from the end)."""

    direction: str = "decoder"
    """Steer along the feature's decoder row (decoder), its encoder column (encoder), or the vectors in a
    .npy file ([d_in] for one --feature, else one row per --feature); encoder and file vectors are
    rescaled to the decoder row's norm."""

    def __post_init__(self) -> None:
        validate(self)
        if self.scale is not None and self.value is not None:
            raise ValueError("give --scale or --value, not both")


def cli_configure_steer(parser: argparse.ArgumentParser) -> None:
    """Options of ``saecore steer``."""
    add_arguments(parser, SteerConfig)


def cli_run_steer(args: argparse.Namespace) -> int:
    """Run ``saecore steer``: print the baseline and steered completions side by side."""
    args = from_args(SteerConfig, args)  # checked; the same attribute names
    sae = SAE.load(args.sae).eval()
    check_features(sae, args.feature)  # before the model load: a bad id or direction costs no model load
    directions = steering_directions(sae, args.feature, args.direction)
    model, tokenizer = load_model_for(sae, args.model, args.device)
    sae = sae.to(_device(model))
    scale = None if args.value is not None else (args.scale if args.scale is not None else 10.0)
    maxes = {f: args.max_act for f in args.feature} if args.max_act is not None else None
    res = steer(
        model,
        tokenizer,
        sae,
        args.prompt,
        args.feature,
        scale=scale,
        value=args.value,
        positions=args.positions,
        max_new_tokens=args.max_new_tokens,
        max_activations=maxes,
        index_dir=index_dir_for(args.sae),
        directions=directions,
    )
    clamp = ", ".join(f"#{f}={v:.4g}" for f, v in res.clamps.items())
    how = f"{scale:g}x max ({res.max_source})" if scale is not None else "absolute value"
    where = "all positions" if res.positions is None else f"positions {res.positions}"
    print(f"prompt: {res.prompt!r}")
    print(f"clamp: {clamp} ({how}; {where})")
    print(f"direction: {_describe_direction(sae, args.feature, args.direction, directions)}\n")
    print(_side_by_side("baseline", res.baseline, "steered", res.steered))
    return 0


def _describe_direction(sae: Any, features: Sequence[int], direction: str, rows: torch.Tensor | None) -> str:
    """The steering direction in words, with each row's cosine to the feature's decoder row."""
    if rows is None:
        return "decoder rows"
    dec = sae.W_dec.detach()[list(features)].double()
    cos = torch.nn.functional.cosine_similarity(rows.to(dec.device).double(), dec, dim=1).tolist()
    what = "encoder columns" if direction == "encoder" else f"vectors of {direction}"
    shown = ", ".join(f"#{f} {c:.3f}" for f, c in zip(features, cos))
    return f"{what}, rescaled to the decoder rows' norms (cosine with the decoder row: {shown})"


@dataclass(kw_only=True)
class AttributeConfig(SAEModelOptions):
    """Options of ``saecore attribute``."""

    prompt: str
    """Prompt whose last position is explained."""

    target: str
    """A single token, e.g. ' sad' (mind the leading space)."""

    baseline: str
    """A single token, e.g. ' happy'."""

    top: int = option(10, ge=1, le=10_000)
    """Rows per ranking and size of the overlap sets."""

    candidates: int = option(30, ge=1, le=100_000)
    """Ablate the top N by |attribution| and by activation."""

    exhaustive: bool = False
    """Ablate every active (position, feature) unit."""

    batch_size: int = option(16, ge=1, le=4096)
    """Ablated prompts per forward pass."""

    positions: list[int] | None = None
    """Positions whose features count; unset: all but the first."""

    def __post_init__(self) -> None:
        validate(self)


def cli_configure_attribute(parser: argparse.ArgumentParser) -> None:
    """Options of ``saecore attribute``."""
    add_arguments(parser, AttributeConfig)


def _print_ranking(title: str, rows: list[Ranked]) -> None:
    print(f"\n{title}")
    print(f"  {'pos':>4} {'token':<14} {'feature':>8} {'activation':>11} {'attribution':>12} {'ablation':>10}")
    for r in rows:
        abl = f"{r.ablation:>10.4f}" if r.ablation is not None else f"{'-':>10}"
        print(f"  {r.position:>4} {r.token!r:<14} {r.feature:>8} {r.activation:>11.4f} {r.attribution:>12.4f} {abl}")


def cli_run_attribute(args: argparse.Namespace) -> int:
    """Run ``saecore attribute``: the three rankings and their overlaps."""
    args = from_args(AttributeConfig, args)  # checked; the same attribute names
    model, tokenizer, sae = _load(args)
    rep = attribute(
        model,
        tokenizer,
        sae,
        args.prompt,
        args.target,
        args.baseline,
        top=args.top,
        candidates=args.candidates,
        exhaustive=args.exhaustive,
        batch_size=args.batch_size,
        positions=args.positions,
    )
    print(f"prompt: {rep.prompt!r}")
    print(f"logit[{rep.target!r}] - logit[{rep.baseline!r}] at the last position: {rep.logit_diff:.4f}")
    print(f"active (position, feature) units: {rep.n_active}; ablated exactly: {rep.n_ablated}")
    print("attribution = activation x gradient (linear estimate); ablation = clean - ablated logit difference")
    _print_ranking(f"top {rep.top} by activation", rep.by_activation)
    _print_ranking(f"top {rep.top} by |attribution|", rep.by_attribution)
    _print_ranking(f"top {rep.top} by |ablation effect|", rep.by_ablation)
    print(f"\noverlap of the top {rep.top}:")
    for name, n in rep.overlaps.items():
        print(f"  {name}: {n}/{rep.top}")
    return 0


@dataclass(kw_only=True)
class ProbeConfig(SAEModelOptions):
    """Options of ``saecore probe``."""

    prompt: list[str] = option(default_factory=list, append=True)
    """A prompt."""

    prompts: Path | None = None
    """File with one prompt per line."""

    top: int = option(5, ge=1, le=10_000)
    """Features per prompt (the paper uses 5)."""

    logit_lens: bool = False
    """Also (re)write index/SAE/logit_lens.parquet: the tokens each feature promotes/suppresses."""

    logit_lens_top: int = option(10, ge=1, le=100_000)
    """Tokens per feature and direction in the logit-lens table."""

    def __post_init__(self) -> None:
        validate(self)


def cli_configure_probe(parser: argparse.ArgumentParser) -> None:
    """Options of ``saecore probe``."""
    add_arguments(parser, ProbeConfig)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts is not None:
        if not args.prompts.exists():
            raise ValueError(f"prompts file {args.prompts} does not exist")
        prompts += [ln.rstrip("\n") for ln in args.prompts.read_text().splitlines() if ln.strip()]
    return prompts


def cli_run_probe(args: argparse.Namespace) -> int:
    """Run ``saecore probe``: top features on the final token of each prompt, as a table."""
    args = from_args(ProbeConfig, args)  # checked; the same attribute names
    prompts = _read_prompts(args)
    if not prompts and not args.logit_lens:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts FILE")
    model, tokenizer, sae = _load(args)
    index_dir = index_dir_for(args.sae)
    if args.logit_lens:
        path = write_logit_lens(sae, model, tokenizer, tables.LOGIT_LENS.path(index_dir), top=args.logit_lens_top)
        print(f"wrote {path}")
    rows = probe(model, tokenizer, sae, prompts, top=args.top, index_dir=index_dir)
    if prompts:
        print(f"{'prompt':<40} {'rank':>4} {'feature':>8} {'activation':>11} {'of max':>7}  promotes")
        for r in rows:
            frac = f"{r.fraction_of_max:>7.2f}" if r.fraction_of_max is not None else f"{'-':>7}"
            text = r.prompt if len(r.prompt) <= 40 else "…" + r.prompt[-39:]
            print(f"{text:<40} {r.rank:>4} {r.feature:>8} {r.activation:>11.4f} {frac}  {r.promotes or ''}")
    return 0


__all__ = [
    "AttributeReport",
    "Attribution",
    "ClampEdit",
    "DirectionEdit",
    "FeatureEdit",
    "PointEdit",
    "ProbeRow",
    "Ranked",
    "SteerResult",
    "ablation_effects",
    "attribute",
    "attribution",
    "check_compatible",
    "check_context",
    "check_features",
    "greedy_generate",
    "index_dir_for",
    "load_model_for",
    "probe",
    "splice",
    "steer",
    "steering_directions",
]
