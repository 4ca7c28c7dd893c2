"""Named hook points on plain Hugging Face causal LMs, with TransformerLens/SAELens names.

=============================  ===============================================================
``blocks.{L}.hook_resid_pre``   residual stream entering block ``L`` (input of decoder layer L)
``blocks.{L}.hook_resid_post``  residual stream leaving block ``L`` (output of decoder layer L)
``blocks.{L}.hook_attn_out``    attention output of block ``L`` (before it is added to the stream)
``blocks.{L}.hook_mlp_out``     MLP output of block ``L`` (before it is added to the stream)
=============================  ===============================================================

Works for any model whose decoder layers sit in one ``nn.ModuleList`` (Llama, Mistral, Qwen, Gemma,
GPT-2, GPT-NeoX …) with attention and MLP submodules under their usual names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
_NAME_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out)$")
_LAYER_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def _get(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part, None)  # type: ignore[assignment]
        if module is None:
            return None
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks."""
    for dotted in _LAYER_LISTS:
        layers = _get(model, dotted)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (looked for {', '.join(_LAYER_LISTS)})")


def _child(layer: nn.Module, names: Sequence[str]) -> nn.Module | None:
    for n in names:
        m = getattr(layer, n, None)
        if isinstance(m, nn.Module):
            return m
    return None


def valid_hook_names(model: nn.Module) -> list[str]:
    """Every hook name this model supports, block by block."""
    names = []
    for i, layer in enumerate(decoder_layers(model)):
        names += [f"blocks.{i}.hook_resid_pre", f"blocks.{i}.hook_resid_post"]
        if _child(layer, _ATTN_NAMES) is not None:
            names.append(f"blocks.{i}.hook_attn_out")
        if _child(layer, _MLP_NAMES) is not None:
            names.append(f"blocks.{i}.hook_mlp_out")
    return names


@dataclass(frozen=True)
class HookPoint:
    """Where a hook name lives in the module tree."""

    name: str
    layer: int
    kind: str
    module: nn.Module
    #: True when the activation is the module's *input* (resid_pre), else its output.
    on_input: bool


def _describe_valid(model: nn.Module) -> str:
    n = len(decoder_layers(model))
    kinds = sorted({name.split(".", 2)[2] for name in valid_hook_names(model)}, key=KINDS.index)
    return f"valid names are blocks.{{L}}.{{{'|'.join(kinds)}}} with L in 0..{n - 1}"


def resolve(model: nn.Module, name: str) -> HookPoint:
    """Look up a hook name; a wrong name raises ``ValueError`` listing the valid ones."""
    m = _NAME_RE.match(name)
    layers = decoder_layers(model)
    if m is None or int(m.group(1)) >= len(layers):
        raise ValueError(f"unknown hook {name!r} for {type(model).__name__}: {_describe_valid(model)}")
    i, kind = int(m.group(1)), m.group(2)
    layer = layers[i]
    if kind in ("hook_resid_pre", "hook_resid_post"):
        return HookPoint(name, i, kind, layer, on_input=kind == "hook_resid_pre")
    child = _child(layer, _ATTN_NAMES if kind == "hook_attn_out" else _MLP_NAMES)
    if child is None:
        raise ValueError(f"unknown hook {name!r}: block {i} has no such submodule; {_describe_valid(model)}")
    return HookPoint(name, i, kind, child, on_input=False)


def _first(x: Any) -> torch.Tensor:
    # Some modules return (hidden, attn_weights, ...) tuples; the activation is always first.
    return x[0] if isinstance(x, (tuple, list)) else x


def _replace_first(x: Any, new: torch.Tensor) -> Any:
    if isinstance(x, tuple):
        return (new, *x[1:])
    if isinstance(x, list):
        return [new, *x[1:]]
    return new


class _StopForward(Exception):
    """Raised inside a hook once every requested activation is captured, to skip the later layers."""


@contextmanager
def _capture(
    model: nn.Module, points: Sequence[HookPoint], stop: bool, detach: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    captured: dict[str, torch.Tensor] = {}
    wanted = len(points)

    def record(name: str, act: torch.Tensor) -> None:
        captured[name] = act.detach() if detach else act
        if stop and len(captured) == wanted:
            raise _StopForward

    handles = []
    for p in points:
        if p.on_input:

            def pre_hook(_m: nn.Module, args: tuple, kwargs: dict, _name: str = p.name) -> None:
                record(_name, args[0] if args else kwargs["hidden_states"])

            handles.append(p.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:

            def post_hook(_m: nn.Module, _args: tuple, out: Any, _name: str = p.name) -> None:
                record(_name, _first(out))

            handles.append(p.module.register_forward_hook(post_hook))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def run_to_hooks(
    model: nn.Module,
    input_ids: torch.Tensor,
    hook_names: Sequence[str],
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Activations ``[B, T, d]`` at each named hook; the forward stops once the last one is captured."""
    if not hook_names:
        raise ValueError("run_to_hooks: give at least one hook name")
    points = [resolve(model, n) for n in dict.fromkeys(hook_names)]
    with _capture(model, points, stop=True) as captured:
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
    missing = [p.name for p in points if p.name not in captured]
    if missing:
        raise RuntimeError(f"hooks {missing} never fired during the forward pass of {type(model).__name__}")
    return {n: captured[n] for n in hook_names}


def forward_to_hook(
    model: nn.Module, hook_name: str, *, input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None, full: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(activation [B, T, d] at hook_name, logits [B, T, vocab] or None)`` with autograd left on.

    Give ``input_ids`` or ``inputs_embeds`` (to differentiate with respect to the input). The forward
    stops at the hook unless ``full`` (then the logits come too, e.g. for a likelihood term).
    """
    point = resolve(model, hook_name)
    with _capture(model, [point], stop=not full, detach=False) as captured:
        try:
            out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False)
        except _StopForward:
            out = None
    if hook_name not in captured:
        raise RuntimeError(f"hook {hook_name!r} never fired during the forward pass of {type(model).__name__}")
    return captured[hook_name], (out.logits if out is not None else None)


@contextmanager
def edit(model: nn.Module, hook_name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, the activation at ``hook_name`` is replaced by ``fn(act [B, T, d])`` on every forward."""
    p = resolve(model, hook_name)

    def apply(act: torch.Tensor) -> torch.Tensor:
        new = fn(act)
        if new.shape != act.shape:
            raise ValueError(f"edit({hook_name!r}): fn returned shape {tuple(new.shape)}, expected {tuple(act.shape)}")
        return new.to(act.dtype)

    if p.on_input:

        def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (apply(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": apply(kwargs["hidden_states"])}

        handle = p.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def post_hook(_m: nn.Module, _args: tuple, out: Any) -> Any:
            return _replace_first(out, apply(_first(out)))

        handle = p.module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()
