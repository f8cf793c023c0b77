"""Per-stage and per-layer gradient diagnostics.

Everything here is a pure function of the model's stages and their current
``.grad`` tensors: no logging, no TensorBoard. The statistics are computed with
batched norms on the parameters' device and brought to the host in a single
transfer, so measuring gradients every few steps does not stall the GPU once per
layer.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

# Weight norms are clamped to this before dividing, so a layer initialised to
# zero (e.g. a zero-init residual BatchNorm) yields a huge ratio, not inf/nan.
_EPS = 1e-12


@dataclass(frozen=True)
class GradStats:
    """Gradient statistics of one optimisation step.

    Only trainable stages and layers appear as keys; frozen ones are absent
    rather than reported as zero. Layer keys are ``<stage>.<module path>`` and
    all dicts are ordered by depth.
    """

    stage_norm: dict[str, float]
    stage_ratio: dict[str, float]
    total: float
    layer_norm: dict[str, float] = field(default_factory=dict)
    layer_ratio: dict[str, float] = field(default_factory=dict)
    layer_mean_abs: dict[str, float] = field(default_factory=dict)
    nonfinite: bool = False


def _trainable(module: nn.Module, recurse: bool = True) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=recurse) if p.requires_grad]


def weight_bearing_layers(stages: Mapping[str, nn.Module]) -> dict[str, list[nn.Parameter]]:
    """Map ``<stage>.<module path>`` to the trainable parameters that module owns.

    Every module owning trainable parameters directly (convolutions, linear and
    normalisation layers, capsule transformation modules, ...) is found from the
    module tree, so new or renamed layers are picked up without name lists. A
    stage that is itself such a module is keyed by the stage name alone.
    Entries are ordered by stage order, then module registration order; stages
    without trainable parameters contribute nothing.
    """
    layers: dict[str, list[nn.Parameter]] = {}
    for stage_name, stage in stages.items():
        for path, module in stage.named_modules():
            params = _trainable(module, recurse=False)
            if params:
                layers[f"{stage_name}.{path}" if path else stage_name] = params
    return layers


def trainable_stages(stages: Mapping[str, nn.Module]) -> list[str]:
    """Stages with at least one parameter that requires a gradient, in order."""
    return [name for name, stage in stages.items() if _trainable(stage)]


def frozen_stages(stages: Mapping[str, nn.Module]) -> list[str]:
    """Stages that have parameters, none of which requires a gradient."""
    return [
        name
        for name, stage in stages.items()
        if any(True for _ in stage.parameters()) and not _trainable(stage)
    ]


def _segment_norm(per_item: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Combine norms of disjoint pieces into the norm of each group of pieces."""
    squared = torch.zeros(size, dtype=per_item.dtype, device=per_item.device)
    return squared.index_add_(0, index, per_item.square()).sqrt()


@functools.lru_cache(maxsize=16)
def _segment_indices(
    layout: tuple[tuple[str, int, int], ...], stage_keys: tuple[str, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Parameter->layer and layer->stage indices plus element counts per layer.

    ``layout`` holds ``(layer key, parameter count, element count)``. Copying
    these to an accelerator is a blocking host-to-device transfer, so they are
    built once per model layout and device and reused by every logging step.
    """
    param_layer = [i for i, (_, n_params, _) in enumerate(layout) for _ in range(n_params)]
    layer_stage = [stage_keys.index(key.split(".", 1)[0]) for key, _, _ in layout]
    numel = [float(n) for _, _, n in layout]
    return (
        torch.tensor(param_layer, dtype=torch.long).to(device),
        torch.tensor(layer_stage, dtype=torch.long).to(device),
        torch.tensor(numel, dtype=torch.float32).to(device),
    )


def _norms(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...], order: int, device: torch.device) -> torch.Tensor:
    """Norm of every tensor in one batched call, stacked on ``device`` as float32."""
    # At least float32 accumulation, so the squares of half-precision values cannot overflow;
    # float64 tensors keep float64 (the norm refuses to narrow a dtype), only the result is rounded.
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    out = torch._foreach_norm(tensors, order, dtype=wide)
    return torch.stack([n.to(device, torch.float32) for n in out])


def gradient_stats(stages: Mapping[str, nn.Module], per_layer: bool = True,
                   mean_abs: bool = True, grad_norms: Mapping[int, torch.Tensor] | None = None,
                   total_norm: torch.Tensor | None = None) -> GradStats:
    """Gradient norms, gradient/weight ratios and mean |grad| of trainable stages.

    Parameters whose ``.grad`` is None count as a zero gradient. With
    ``per_layer=False`` the layer dicts are left empty (cheaper), stage values
    and the total are still computed; with ``mean_abs=False`` only the mean |grad|
    per layer is left out (it costs one more pass over every gradient). ``nonfinite``
    is True when any gradient holds a NaN or an infinity. ``grad_norms`` (L2 norm of
    each parameter's gradient, keyed by ``id(parameter)``) saves the pass over the
    gradients when the caller has them already; it is used only if it covers every
    parameter that has a gradient.
    """
    layers = weight_bearing_layers(stages)
    if not layers:
        return GradStats(stage_norm={}, stage_ratio={}, total=0.0)
    layer_keys = list(layers)
    stage_keys = list(dict.fromkeys(key.split(".", 1)[0] for key in layer_keys))
    params = [p for key in layer_keys for p in layers[key]]
    device = params[0].device
    param_layer, layer_stage, numel = _segment_indices(
        tuple((key, len(layers[key]), sum(p.numel() for p in layers[key])) for key in layer_keys),
        tuple(stage_keys),
        device,
    )
    # A missing grad is a zero gradient; a 0-d zero has the same norm without
    # allocating a parameter-sized buffer.
    grads = [p.grad if p.grad is not None else p.new_zeros(()) for p in params]

    known = grad_norms if grad_norms is not None and all(
        id(p) in grad_norms or p.grad is None for p in params) else None
    if known is not None:
        zero = torch.zeros((), dtype=torch.float32, device=device)
        grad_p = torch.stack([known[id(p)].to(device, torch.float32) if id(p) in known else zero for p in params])
    else:
        grad_p = _norms(grads, 2, device)
    weight_p = _norms([p.detach() for p in params], 2, device)
    grad_l = _segment_norm(grad_p, param_layer, len(layer_keys))
    weight_l = _segment_norm(weight_p, param_layer, len(layer_keys))
    grad_s = _segment_norm(grad_l, layer_stage, len(stage_keys))
    weight_s = _segment_norm(weight_l, layer_stage, len(stage_keys))
    # the caller's total (every optimised parameter, e.g. a learned loss scale: the clipping norm)
    # or the stages' own; carried in the same host transfer
    total = (grad_s.square().sum().sqrt() if total_norm is None else total_norm.to(device, torch.float32)).reshape(1)
    # A NaN or inf anywhere in a gradient makes its L2 norm non-finite.
    nonfinite = (~torch.isfinite(grad_p)).any().to(torch.float32).reshape(1)
    parts = [grad_s, grad_s / weight_s.clamp_min(_EPS), total, nonfinite]
    if per_layer:
        parts += [grad_l, grad_l / weight_l.clamp_min(_EPS)]
        if mean_abs:  # one more pass over every gradient: only when a flow figure will use it
            abs_sum = torch.zeros(len(layer_keys), device=device)
            abs_sum.index_add_(0, param_layer, _norms(grads, 1, device))
            parts.append(abs_sum / numel)

    # note: this is the one device-to-host sync of a logging step
    values = torch.cat(parts).tolist()
    return _unpack(values, stage_keys, layer_keys if per_layer else [])


def _unpack(values: list[float], stage_keys: list[str], layer_keys: list[str]) -> GradStats:
    """Split the flat host-side list built by :func:`gradient_stats` into dicts."""
    n_s, n_l = len(stage_keys), len(layer_keys)
    stage_part, rest = values[: 2 * n_s + 2], values[2 * n_s + 2 :]
    layer = [dict(zip(layer_keys, rest[i * n_l : (i + 1) * n_l])) for i in range(3)]  # absent: {}
    return GradStats(
        stage_norm=dict(zip(stage_keys, stage_part[:n_s])),
        stage_ratio=dict(zip(stage_keys, stage_part[n_s : 2 * n_s])),
        total=stage_part[2 * n_s],
        layer_norm=layer[0],
        layer_ratio=layer[1],
        layer_mean_abs=layer[2],
        nonfinite=stage_part[2 * n_s + 1] > 0.0,
    )


@dataclass(frozen=True)
class UpdateStats:
    """``||w_after - w_before|| / ||w_before||`` of one optimizer step, per stage (and per layer)."""

    stage_ratio: dict[str, float]
    layer_ratio: dict[str, float] = field(default_factory=dict)
    extra: list[float] = field(default_factory=list)  # values the caller asked to ride along


def parameter_layout(stages: Mapping[str, nn.Module]) -> tuple[dict[str, list[nn.Parameter]], list[str]]:
    """(layer -> trainable parameters, stage keys), in depth order: the order of every batched norm."""
    layers = weight_bearing_layers(stages)
    return layers, list(dict.fromkeys(key.split(".", 1)[0] for key in layers))


def snapshot(params: list[nn.Parameter]) -> tuple[torch.Tensor, ...]:
    """Copies of the parameters' values (one batched copy), to diff against after the step."""
    return torch._foreach_mul([p.detach() for p in params], 1.0)


def update_stats(stages: Mapping[str, nn.Module], before: list[torch.Tensor] | tuple[torch.Tensor, ...],
                 per_layer: bool = True, extra: list[torch.Tensor] | None = None) -> UpdateStats:
    """Update/weight ratios of the step just taken, from ``before = snapshot(params)``.

    The real step, whatever the optimizer did (momentum, Adam's normalisation, weight decay,
    clipping, the current learning rate): both norms are measured, nothing is inferred. Batched
    norms; ``extra`` 0-d or 1-d tensors are appended to the one device-to-host transfer.
    """
    layers, stage_keys = parameter_layout(stages)
    layer_keys = list(layers)
    after = [p.detach() for key in layer_keys for p in layers[key]]
    if not after:
        return UpdateStats(stage_ratio={})
    device = after[0].device
    param_layer, layer_stage, _ = _segment_indices(
        tuple((key, len(layers[key]), 0) for key in layer_keys), tuple(stage_keys), device)
    step_p = _norms(torch._foreach_sub(after, before), 2, device)
    weight_p = _norms(before, 2, device)
    step_l = _segment_norm(step_p, param_layer, len(layer_keys))
    weight_l = _segment_norm(weight_p, param_layer, len(layer_keys))
    step_s = _segment_norm(step_l, layer_stage, len(stage_keys))
    weight_s = _segment_norm(weight_l, layer_stage, len(stage_keys))
    parts = [step_s / weight_s.clamp_min(_EPS)]
    if per_layer:
        parts.append(step_l / weight_l.clamp_min(_EPS))
    tail = [t.detach().float().flatten().to(device) for t in (extra or [])]
    # note: this is the one extra device-to-host sync of a logging step
    values = torch.cat(parts + tail).tolist()
    n_s, n_l = len(stage_keys), len(layer_keys) if per_layer else 0
    return UpdateStats(stage_ratio=dict(zip(stage_keys, values[:n_s])),
                       layer_ratio=dict(zip(layer_keys if per_layer else [], values[n_s:n_s + n_l])),
                       extra=values[n_s + n_l:])


def nonfinite_stage(stages: Mapping[str, nn.Module]) -> str | None:
    """Name of the first stage whose gradients contain a NaN or an infinity.

    Meant for diagnosing a step that already went bad, so it checks every
    element exactly (rather than via norms) and may synchronise the device.
    """
    for name, stage in stages.items():
        grads = [p.grad for p in _trainable(stage) if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            return name
    return None


def median_over_run(history: list[dict[str, float]]) -> dict[str, float]:
    """Per-key median over logged steps.

    A key missing from some steps is summarised over the steps that have it;
    NaN values are ignored (a key with only NaNs yields NaN). Keys keep the
    order in which they first appear.
    """
    values: dict[str, list[float]] = {}
    for record in history:
        for key, value in record.items():
            values.setdefault(key, []).append(float(value))
    medians: dict[str, float] = {}
    for key, seq in values.items():
        finite = [v for v in seq if not math.isnan(v)]
        medians[key] = statistics.median(finite) if finite else math.nan
    return medians
