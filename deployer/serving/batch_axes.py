"""Where a model's batch axis is, in every input and output, or why it has none.

The batch axis is not always the first: a recurrent model's state input is
``[layers, batch, hidden]``. It is found from the graph's symbolic dimension names
(the one name every input carries exactly once), else from the free first
dimensions. What is found here is only a guess until a run confirms it: the runner
checks with real inputs that rows run together give what each gives alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Dimension names that say "batch" in the exporters' and people's usage.
_BATCH_WORDS = ("batch",)
_BATCH_NAMES = frozenset({"n", "b", "bs", "bsz", "num_samples"})


@dataclass(frozen=True)
class Dims:
    """One tensor's shape (-1 where free) and its dimension names ("" where none)."""

    name: str
    shape: tuple[int, ...]
    names: tuple[str, ...]


@dataclass(frozen=True)
class BatchAxes:
    """The batch axis of each input (by name) and each output (in order)."""

    inputs: dict[str, int]
    outputs: tuple[int, ...]
    symbol: str = ""


def _names(dims: Dims) -> tuple[str, ...]:
    if len(dims.names) == len(dims.shape):
        return dims.names
    return ("",) * len(dims.shape)


def _free_axes_named(dims: Dims, symbol: str) -> list[int]:
    names = _names(dims)
    return [i for i, d in enumerate(dims.shape) if d < 0 and names[i] == symbol]


def _batch_like(symbol: str) -> bool:
    low = symbol.lower()
    return any(word in low for word in _BATCH_WORDS) or low in _BATCH_NAMES


def _pick_symbol(inputs: Sequence[Dims]) -> str:
    """The dimension name every input carries exactly once (preferring one that says batch)."""
    common: set[str] | None = None
    for dims in inputs:
        seen = [n for n, d in zip(_names(dims), dims.shape, strict=True) if n and d < 0]
        once = {n for n in seen if seen.count(n) == 1}
        common = once if common is None else common & once
    if not common:
        return ""
    first = inputs[0]

    def rank(symbol: str) -> tuple[int, int, str]:
        return (0 if _batch_like(symbol) else 1, _free_axes_named(first, symbol)[0], symbol)

    return min(common, key=rank)


def _fallback_axis(dims: Dims) -> int | None:
    """Without a shared name: the free first dimension, else the only free one."""
    if dims.shape and dims.shape[0] < 0:
        return 0
    free = [i for i, d in enumerate(dims.shape) if d < 0]
    return free[0] if len(free) == 1 else None


def find_batch_axes(inputs: Sequence[Dims], outputs: Sequence[Dims]) -> BatchAxes | str:
    """The batch axes of every tensor, or a sentence saying why the model has none."""
    if not inputs:
        return "the model has no inputs"
    for kind, group in (("input", inputs), ("output", outputs)):
        for dims in group:
            if not dims.shape:
                return f"{kind} {dims.name!r} is a scalar, so it has no batch axis"
    symbol = _pick_symbol(inputs)
    input_axes: dict[str, int] = {}
    for dims in inputs:
        axis = _free_axes_named(dims, symbol)[0] if symbol else _fallback_axis(dims)
        if axis is None:
            return f"input {dims.name!r} {list(dims.shape)} has no recognizable batch axis"
        input_axes[dims.name] = axis
    output_axes: list[int] = []
    for dims in outputs:
        named = _free_axes_named(dims, symbol) if symbol else []
        axis = named[0] if len(named) == 1 else _fallback_axis(dims)
        if axis is None:
            return f"output {dims.name!r} {list(dims.shape)} has no recognizable batch axis"
        output_axes.append(axis)
    return BatchAxes(inputs=input_axes, outputs=tuple(output_axes), symbol=symbol)
