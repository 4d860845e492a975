"""What every kind of LoRA layer shares (`LoRALinear`, `LoRAEmbedding`): the named adapters it
holds and which of them runs (one per row inside `loratrf.use_adapters`), DoRA's terms
(`loratrf.dora`), and folding the active adapter into the base weight and out again. A kind
adds only what it computes (`forward`) and how it wraps its base module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loratrf import quantized
from loratrf._torch_internals import hold_unregistered
from loratrf.base_checkpoints import keep_absent_adapter_tensors
from loratrf.config import DEFAULT_ADAPTER, LoRASpec, default_adapter_dtype, dtype_name, merge_dtype, torch_dtype
from loratrf.dora import DoRAWeights
from loratrf.errors import InjectionError, MergeError
from loratrf.low_rank import LowRankTransform
from loratrf.rows import AdapterRows


class LoRAAdapter(nn.Module):
    """The parts of one named adapter on a LoRA layer: `lora` (its `LowRankTransform`),
    DoRA's `magnitude [out_features]` (None for plain LoRA) and its `dropout`. The default
    adapter's parts are the layer's own attributes of these names (`LoRALayer.parts`)."""

    def __init__(self, lora: LowRankTransform, magnitude: nn.Parameter | None, dropout: float) -> None:
        super().__init__()
        self.lora = lora
        self.register_parameter("magnitude", magnitude)
        self.dropout = dropout

    @property
    def dora(self) -> bool:
        return self.magnitude is not None


def parts_spec(parts: LoRALayer | LoRAAdapter) -> LoRASpec:
    """The options of one adapter's parts, as `inject` plans them and adapter files store them."""
    t = parts.lora
    return LoRASpec(t.rank, t.alpha, parts.dropout, t.init, t.rslora, dtype_name(t.U.dtype), parts.dora)


def parts_parameters(parts: LoRALayer | LoRAAdapter) -> list[tuple[str, nn.Parameter]]:
    """One adapter's tensors, named as on a LoRA layer (`lora.U`, `lora.V`, `magnitude`)."""
    named = [(f"lora.{k}", p) for k, p in parts.lora.named_parameters()]
    return named + [("magnitude", parts.magnitude)] * parts.dora


class LoRALayer(DoRAWeights, nn.Module):
    """A frozen base `weight`, read as a linear map from `in_features` to `out_features` stored
    `[out, in]` (`[in, out]` when `fan_in_fan_out`; an embedding table `[num_embeddings, dim]` is
    the `[in, out]` map of one-hot rows), and the named adapters that each add `scale · U V`
    (`U [in, r]`, `V [r, out]`, a `LowRankTransform`) to it.

    Adapters (docs/adapters.md): the default adapter's parts are the layer's own `lora`,
    `magnitude` and `dropout` (None, None, 0 when it holds no default adapter), so that its
    state-dict and parameter names stay `lora.U`, `lora.V`, `magnitude` as in every saved file
    and checkpoint; every other adapter's are `adapters[name]`, a `LoRAAdapter`. `parts(name)`
    finds either, and nothing else tells them apart. The layer computes the adapter named
    `active_adapter` (None: the base), or, while `rows` is set, each row's own adapter.

    `merge()` folds the active adapter into `weight` (`W0 + scale · (U V)` in the weight's
    layout; DoRA: `f ⊙ (W0 + scale · (U V))`), computed in at least float32 and rounded once;
    `unmerge()` takes it out again. A kind defines `forward`, `base_forward(x)` (the frozen map)
    and `_adapted(x, out, parts)` (one adapter's output from the base output `out`, which
    `use_adapters` runs on each adapter's rows).
    """

    weight: nn.Parameter
    lora: LowRankTransform | None  # the default adapter's; None on a layer without one
    magnitude: nn.Parameter | None  # DoRA's `m [out_features]`; None for plain LoRA
    in_features: int
    out_features: int
    fan_in_fan_out: bool
    base_parameter_names: tuple[str, ...] = ("weight", "bias")

    def _init_adapters(self, spec: LoRASpec) -> None:
        """The store of a layer whose `weight` is set: no adapter but `spec`'s default one."""
        self.merged = False
        self._base_shape = tuple(self.weight.shape)  # what the adapters are built for; `forward` checks it
        self.register_module("lora", None)
        self.register_parameter("magnitude", None)
        # DoRA's `m / ‖W0 + scale · B A‖` at merge time, which `unmerge` divides out again
        self.register_buffer("_merged_dora_factor", None, persistent=False)
        self.adapters = nn.ModuleDict()  # every adapter but the default: name -> LoRAAdapter
        self.active_adapter: str | None = DEFAULT_ADAPTER
        self.rows: AdapterRows | None = None  # set inside loratrf.use_adapters
        self.add_adapter(DEFAULT_ADAPTER, spec)
        self.register_load_state_dict_pre_hook(keep_absent_adapter_tensors)
        hold_unregistered(self, "base_module", None)

    def _adopt(self, base: nn.Module, adapter: str) -> None:
        """The end of wrapping `base`, whose Parameters this layer (built on the meta device) now
        holds: the constructor's default adapter is rebuilt on their device as `adapter`."""
        self._base_shape = tuple(self.weight.shape)
        hold_unregistered(self, "base_module", base)  # for `unload` (and DoRA's norm of a bitsandbytes int8 base)
        spec = self.spec
        self.put_parts(DEFAULT_ADAPTER, None)
        self.add_adapter(adapter, spec)
        self.active_adapter = adapter
        self.train(base.training)

    # --- the adapters' parts -------------------------------------------------------------------

    def parts(self, name: str | None) -> LoRALayer | LoRAAdapter | None:
        """Adapter `name`'s parts (`lora`, `magnitude`, `dropout`), or None where it has none here."""
        if name == DEFAULT_ADAPTER:
            return self if self.lora is not None else None
        return self.adapters[name] if name in self.adapters else None

    def adapter_names(self) -> list[str]:
        return [DEFAULT_ADAPTER] * (self.lora is not None) + list(self.adapters)

    def add_adapter(self, name: str, spec: LoRASpec) -> None:
        """Give adapter `name` (not yet on this layer) fresh parts as `spec` describes, on the
        weight's device: a zero update, so the layer computes its base map with it."""
        device = self.weight.device
        weight_dtype = quantized.float_dtype(self.weight)  # a quantized weight's: the dtype it reads as
        dtype = torch_dtype(spec.adapter_dtype) or default_adapter_dtype(weight_dtype)
        lora = LowRankTransform(
            self.in_features,
            self.out_features,
            spec.rank,
            spec.alpha,
            init=spec.init,
            rslora=spec.rslora,
            device=device,
            dtype=dtype,
        )
        magnitude = None
        if spec.dora:
            magnitude_dtype = torch.promote_types(dtype, merge_dtype(weight_dtype))
            magnitude = nn.Parameter(torch.empty(self.out_features, device=device, dtype=magnitude_dtype))
        self.put_parts(name, LoRAAdapter(lora, magnitude, float(spec.dropout)))
        if spec.dora:
            self.reset_magnitude(self.parts(name))

    def put_parts(self, name: str, parts: LoRAAdapter | None) -> None:
        """Make `parts` adapter `name`'s on this layer (None: remove that adapter from it)."""
        if name != DEFAULT_ADAPTER:
            if parts is None:
                del self.adapters[name]
            else:
                self.adapters[name] = parts
            return
        self.lora = None if parts is None else parts.lora
        self.magnitude = None if parts is None else parts.magnitude
        self.dropout = 0.0 if parts is None else parts.dropout

    def pop_parts(self, name: str) -> LoRAAdapter:
        """Remove adapter `name`'s parts from this layer and return them."""
        parts = self.parts(name)
        if isinstance(parts, LoRALayer):
            parts = LoRAAdapter(parts.lora, parts.magnitude, parts.dropout)
        self.put_parts(name, None)
        return parts

    def _active(self) -> LoRALayer | LoRAAdapter | None:
        return self.parts(self.active_adapter)

    @property
    def spec(self) -> LoRASpec:
        """The default adapter's options, as `inject` plans them and adapter files store them."""
        return parts_spec(self)

    @property
    def dora(self) -> bool:
        """Whether the default adapter is a DoRA adapter (it holds a `magnitude`)."""
        return self.magnitude is not None

    # --- computing ----------------------------------------------------------------------------

    def _check_base_shape(self) -> None:
        if tuple(self.weight.shape) != self._base_shape:
            kind = type(self).__name__
            raise InjectionError(
                f"this {kind}'s base weight is now {list(self.weight.shape)}, but its adapters were built for "
                f"{list(self._base_shape)}: the weight was replaced after inject (resize_token_embeddings on a "
                "model with LoRA on its embeddings or a tied lm_head, say). Resize before loratrf.inject, or "
                "loratrf.unload(model), resize, then inject again"
            )

    def _forward_rows(self, x: Tensor, rows: AdapterRows) -> Tensor:
        """`use_adapters`: the base map on the whole batch `x [B, ...]`, then each adapter's
        `_adapted` on its own rows; rows of no adapter here keep the base."""
        if self.merged:
            raise MergeError(f"use_adapters on a merged model: {SWITCH_WHILE_MERGED}")
        out = self.base_forward(x)
        for name, index in rows.indices(x):
            parts = self.parts(name)
            if parts is not None:
                out.index_copy_(0, index, self._adapted(x.index_select(0, index), out.index_select(0, index), parts))
        return out

    # --- merging the active adapter -----------------------------------------------------------

    def delta_weight(self, dtype: torch.dtype) -> Tensor:
        """The active adapter's `scale · U V` in the layout of `weight`, computed in `dtype`."""
        delta = self._active().lora.delta_weight(dtype)  # [in, out]
        return delta if self.fan_in_fan_out else delta.T

    @torch.no_grad()
    def merged_weight(self, sign: int = 1) -> Tensor:
        """`W0 ± scale · B A` of the active adapter, computed in at least float32, rounded once
        to the weight's dtype; `weight` itself is untouched. DoRA: `f ⊙ (W0 + scale · B A)`, or
        (`sign=-1`, on a merged layer) `W / f - scale · B A` with the `f` folded in at merge time."""
        quantized.check_mergeable(self, f"this {type(self).__name__}")
        if self._active().dora:
            factor = self._dora_merge_factor() if sign > 0 else self._merged_dora_factor
            return self._dora_merged_weight(factor, sign).to(self.weight.dtype)
        dtype = merge_dtype(self.weight.dtype)
        return self.weight.to(dtype).add(self.delta_weight(dtype), alpha=sign).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """`W0 <- W0 + scale · B A` of the active adapter (DoRA: `W0 <- f ⊙ (W0 + scale · B A)`,
        keeping `f` for `unmerge`); a second call, or a layer that does not hold the active
        adapter, does nothing.

        With `safe` (the default) a non-finite result raises `MergeError` and leaves `W0`
        untouched; `safe=False` skips that check. A DoRA layer whose magnitude is 0 on a
        non-zero row is always refused (`unmerge` could not divide the 0 out again).
        """
        parts = self._active()
        if self.merged or parts is None:
            return
        quantized.check_mergeable(self, f"this {type(self).__name__}")  # never rounds into a quantized weight
        factor = self._dora_merge_factor() if parts.dora else None
        new = self._dora_merged_weight(factor, +1).to(self.weight.dtype) if parts.dora else self.merged_weight(+1)
        if safe:
            check_finite(new, "merge")
        self.weight.copy_(new)
        self._merged_dora_factor = factor
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """`W0 <- W0 - scale · B A` (DoRA: `W0 <- W / f - scale · B A`); does nothing on an
        unmerged layer. (While merged, the active adapter cannot change: it is the merged one.)"""
        if not self.merged:
            return
        self.weight.copy_(self.merged_weight(-1))
        self._merged_dora_factor = None
        self.merged = False

    def reset_adapter(self) -> None:
        """Back to the initial state: every adapter's update is zero and the layer equals its base."""
        self.unmerge()
        for name in self.adapter_names():
            parts = self.parts(name)
            parts.lora.reset_parameters()
            if parts.dora:
                self.reset_magnitude(parts)


def check_finite(weight: Tensor, what: str) -> None:
    if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
        raise MergeError(
            f"{what} would write non-finite values into a base weight (the adapter holds NaN/Inf, "
            "or the result overflows the weight's dtype); the weight was left unchanged"
        )


# why a merged model cannot switch adapters or compute one adapter per row
SWITCH_WHILE_MERGED = (
    "a merged layer's weight holds the active adapter's update, which any other adapter (or row) "
    "would compute with too; call loratrf.unmerge(model) first"
)

MERGED_BACKWARD_MESSAGE = (
    "backward through a merged LoRA layer: its adapter would receive no gradient. "
    "Call loratrf.unmerge(model) before training (or run merged models in eval mode)"
)


@torch.library.custom_op("loratrf::refuse_merged_backward", mutates_args=())
def refuse_merged_backward(grad: Tensor) -> Tensor:
    """Raises `MergeError` when run. An operator rather than a Python `raise` in `backward`, so
    that `torch.compile` can trace the backward graph ahead of time and the refusal happens
    when a backward actually runs."""
    raise MergeError(MERGED_BACKWARD_MESSAGE)


@refuse_merged_backward.register_fake
def _(grad: Tensor) -> Tensor:
    return torch.empty_like(grad)


def merged_output(out: Tensor, training: bool, adapter_tensor: Tensor) -> Tensor:
    """The output `out` of a module whose adapter is merged into its weight: while that adapter
    trains (`adapter_tensor` requires grad, in training mode with grad enabled), its backward
    refuses, since the adapter would get no gradient; otherwise `out` itself."""
    if training and torch.is_grad_enabled() and adapter_tensor.requires_grad:
        return _RefuseBackwardWhileMerged.apply(out, adapter_tensor)
    return out


class _RefuseBackwardWhileMerged(torch.autograd.Function):
    """Identity on a merged layer's output whose backward refuses: training through a merged
    layer would give its adapter no gradient, so it would silently train nothing."""

    @staticmethod
    def forward(ctx, out: Tensor, adapter_weight: Tensor) -> Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return refuse_merged_backward(grad), None
