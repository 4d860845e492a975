"""LoRALinear: a frozen linear map plus a trainable low-rank update."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratrf import kernels
from loratrf._torch_internals import hold_unregistered
from loratrf.base_checkpoints import keep_absent_adapter_tensors
from loratrf.config import DEFAULT_ADAPTER, Init, LoRASpec, dtype_name, torch_dtype
from loratrf.errors import MergeError
from loratrf.low_rank import LowRankTransform
from loratrf.rows import AdapterRows

LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in float32 beside half-precision weights, else in the weight's dtype."""
    return torch.float32 if weight_dtype in LOW_PRECISION else weight_dtype


def merge_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Merges are computed in at least float32 and never below the weight's own precision."""
    return torch.promote_types(weight_dtype, torch.float32)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's `Conv1D` (GPT-2): a linear map whose weight is stored `[in, out]`."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


class LoRAAdapter(nn.Module):
    """The parts of one named adapter on a `LoRALinear`: `lora` (its `LowRankTransform`),
    DoRA's `magnitude [out_features]` (None for plain LoRA) and its `dropout`. The default
    adapter's parts are the layer's own attributes of these names (`LoRALinear.parts`)."""

    def __init__(self, lora: LowRankTransform, magnitude: nn.Parameter | None, dropout: float) -> None:
        super().__init__()
        self.lora = lora
        self.register_parameter("magnitude", magnitude)
        self.dropout = dropout

    @property
    def dora(self) -> bool:
        return self.magnitude is not None


def parts_spec(parts: LoRALinear | LoRAAdapter) -> LoRASpec:
    """The options of one adapter's parts, as `inject` plans them and adapter files store them."""
    t = parts.lora
    return LoRASpec(t.rank, t.alpha, parts.dropout, t.init, t.rslora, dtype_name(t.U.dtype), parts.dora)


def parts_parameters(parts: LoRALinear | LoRAAdapter) -> list[tuple[str, nn.Parameter]]:
    """One adapter's tensors, named as on a `LoRALinear` (`lora.U`, `lora.V`, `magnitude`)."""
    named = [(f"lora.{k}", p) for k, p in parts.lora.named_parameters()]
    return named + [("magnitude", parts.magnitude)] * parts.dora


class LoRALinear(nn.Module):
    """`y = x W0ᵀ + b + scale · B A dropout(x)` with `W0`, `b` frozen and `scale = alpha / r`.

    Shapes: `x [..., in_features] -> y [..., out_features]`; `W0 [out, in]`
    (`[in, out]` when `fan_in_fan_out`, as in GPT-2's Conv1D). The update lives in
    `self.lora`, a `LowRankTransform` with `U = Aᵀ [in, r]` and `V = Bᵀ [r, out]`; `V` starts
    at zero, so a fresh layer computes exactly its base map.

    `merge()` folds the update into `W0` (the paper's `W_ft = W0 + BA`), after which the
    forward is the plain base map; `unmerge()` takes it out again. Both compute in at least
    float32 and write back in the weight's dtype.

    With `dora=True` (DoRA, Liu et al. 2024) the layer also holds `magnitude`, a trainable
    vector `m [out_features]` that starts at the row norms of `W0` (one per output feature),
    and computes `y = x Wᵀ + b` with `W = m ⊙ (W0 + scale · B A) / ‖W0 + scale · B A‖`, the
    norm taken per output feature and treated as a constant in backward (DoRA's section 4.3).
    See `_dora_forward`; `merge` folds `W` into the weight and `unmerge` restores `W0`.

    Several adapters (docs/adapters.md): the default adapter's parts are `lora`, `magnitude`
    and `dropout` (None, None, 0 when the layer holds no default adapter), every other
    adapter's are `adapters[name]`, a `LoRAAdapter`; `parts(name)` finds either. The layer
    computes the adapter named `active_adapter` (None: the base map), or, while `rows` is set
    (`loratrf.use_adapters`), each row's own adapter.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    lora: LowRankTransform | None  # the default adapter's; None on a layer without one
    magnitude: nn.Parameter | None  # DoRA's `m [out_features]`; None for plain LoRA
    base_parameter_names = ("weight", "bias")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = LoRASpec.rank,
        alpha: float = LoRASpec.alpha,
        *,
        bias: bool = True,
        dropout: float = LoRASpec.dropout,
        init: Init = LoRASpec.init,
        rslora: bool = LoRASpec.rslora,
        fan_in_fan_out: bool = False,
        adapter_dtype: torch.dtype | str | None = None,
        dora: bool = LoRASpec.dora,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(adapter_dtype, torch.dtype):
            adapter_dtype = dtype_name(adapter_dtype)
        spec = LoRASpec(rank, alpha, dropout, init, rslora, adapter_dtype, dora)  # validates every option
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = fan_in_fan_out
        self.merged = False
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._reset_base()
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

    # --- the adapters' parts -------------------------------------------------------------------

    def parts(self, name: str | None) -> LoRALinear | LoRAAdapter | None:
        """Adapter `name`'s parts (`lora`, `magnitude`, `dropout`), or None where it has none
        here: the default adapter's are this layer's own attributes (so its state-dict keys stay
        `lora.U`, `lora.V`, `magnitude`), any other's `adapters[name]`."""
        if name == DEFAULT_ADAPTER:
            return self if self.lora is not None else None
        return self.adapters[name] if name in self.adapters else None

    def adapter_names(self) -> list[str]:
        return [DEFAULT_ADAPTER] * (self.lora is not None) + list(self.adapters)

    def add_adapter(self, name: str, spec: LoRASpec) -> None:
        """Give adapter `name` (not yet on this layer) fresh parts as `spec` describes, on the
        weight's device: a zero update, so the layer computes its base map with it."""
        device = self.weight.device
        dtype = torch_dtype(spec.adapter_dtype) or default_adapter_dtype(self.weight.dtype)
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
            magnitude_dtype = torch.promote_types(dtype, merge_dtype(self.weight.dtype))
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
        if isinstance(parts, LoRALinear):
            parts = LoRAAdapter(parts.lora, parts.magnitude, parts.dropout)
        self.put_parts(name, None)
        return parts

    def _active(self) -> LoRALinear | LoRAAdapter | None:
        return self.parts(self.active_adapter)

    @property
    def spec(self) -> LoRASpec:
        """The default adapter's options, as `inject` plans them and adapter files store them."""
        return parts_spec(self)

    @property
    def dora(self) -> bool:
        """Whether the default adapter is a DoRA adapter (it holds a `magnitude`)."""
        return self.magnitude is not None

    @torch.no_grad()
    def _reset_base(self) -> None:
        """nn.Linear's own initialisation, for layers built from scratch."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        self.weight.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    @classmethod
    def from_linear(
        cls,
        base: nn.Module,
        rank: int = LoRASpec.rank,
        alpha: float = LoRASpec.alpha,
        *,
        adapter: str = DEFAULT_ADAPTER,
        **options,
    ) -> LoRALinear:
        """Wrap an `nn.Linear` (or HF `Conv1D`), keeping its very weight and bias Parameters.

        No base tensor is copied or allocated; the adapter (named `adapter`) is created on the
        weight's device. `unload` puts `base` itself back. `options` are the keyword options of
        the constructor (`LoRALinear.from_linear(base, **dataclasses.asdict(spec))` builds a `LoRASpec`).
        """
        fan_in_fan_out = is_conv1d(base)
        weight = base.weight
        in_features, out_features = weight.shape if fan_in_fan_out else weight.shape[::-1]
        layer = cls(
            in_features,
            out_features,
            rank,
            alpha,
            bias=base.bias is not None,
            fan_in_fan_out=fan_in_fan_out,
            device="meta",
            dtype=weight.dtype,
            **options,
        )
        layer.weight, layer.bias = weight, base.bias
        for p in (weight, base.bias):
            if p is not None:
                p.requires_grad_(False)
        spec = layer.spec
        layer.put_parts(DEFAULT_ADAPTER, None)  # the constructor's, on the meta device
        layer.add_adapter(adapter, spec)
        layer.active_adapter = adapter
        layer.train(base.training)
        hold_unregistered(layer, "base_module", base)  # for `unload`
        return layer

    def base_forward(self, x: Tensor) -> Tensor:
        """The frozen map `x W0ᵀ + b`, computed exactly as the wrapped module computes it."""
        return kernels.base_linear(x, self.weight, self.bias, self.fan_in_fan_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.rows is not None:
            return self._forward_rows(x, self.rows)
        parts = self._active()
        if parts is None:
            return self.base_forward(x)
        if self.merged:
            out = self.base_forward(x)
            if self.training and torch.is_grad_enabled() and parts.lora.U.requires_grad:
                out = _RefuseBackwardWhileMerged.apply(out, parts.lora.U)
            return out
        if parts.dora:
            return self._dora_forward(x, self.base_forward(x), parts)
        lora = parts.lora
        dropout = parts.dropout if self.training else 0.0
        return kernels.lora_linear(
            x,
            self.weight,
            self.bias,
            lora.U,
            lora.V,
            lora.scale,
            self.fan_in_fan_out,
            dropout=dropout,
            fused=self.fast_path_applies(x),
        )

    def fast_path_applies(self, x: Tensor) -> bool:
        """Whether `x` runs `loratrf.kernels.LoRALinearFunction` with the active adapter
        (`kernels.lora_fast_path_applies`: float32/float64, one dtype, frozen base, no active
        dropout, autocast off, the right width); otherwise the plain formula runs."""
        parts = self._active()
        dropout = parts.dropout if self.training else 0.0
        return kernels.lora_fast_path_applies(x, self.weight, self.bias, parts.lora.U, parts.lora.V, dropout)

    def _forward_rows(self, x: Tensor, rows: AdapterRows) -> Tensor:
        """`use_adapters`: the base map on the whole batch `x [B, ..., in]`, then each adapter's
        update on its own rows (the plain formula); rows of no adapter here keep the base."""
        if self.merged:
            raise MergeError(f"use_adapters on a merged model: {SWITCH_WHILE_MERGED}")
        out = self.base_forward(x)
        for name, index in rows.indices(x):
            parts = self.parts(name)
            if parts is None:
                continue
            xs, base = x.index_select(0, index), out.index_select(0, index)
            if parts.dora:
                ys = self._dora_forward(xs, base, parts)
            else:
                if parts.dropout and self.training:
                    xs = F.dropout(xs, parts.dropout, training=True)
                ys = parts.lora(xs, residual=base, inplace=True)
            out.index_copy_(0, index, ys)
        return out

    # --- DoRA ----------------------------------------------------------------------------------

    # `parts` below is one adapter's (`parts(name)`); None: the active adapter's.
    # `m` is kept in at least float32 and in the precision its norm is computed in (`merge_dtype`
    # of the weight), so that a fresh layer's `m / ‖W0‖` is exactly 1 (see `add_adapter`).

    @torch.no_grad()
    def reset_magnitude(self, parts: LoRALinear | LoRAAdapter | None = None) -> None:
        """`m <- ‖W0 + scale · B A‖` per output feature: with a fresh adapter (`B = 0`), the row
        norms of `W0`, and then the layer computes exactly its base map."""
        parts = self._active() if parts is None else parts
        if not parts.magnitude.is_meta:  # a meta tensor holds no values to set
            parts.magnitude.copy_(self.dora_weight_norm(parts))

    @torch.no_grad()
    def dora_weight_norm(self, parts: LoRALinear | LoRAAdapter | None = None) -> Tensor:
        """`‖W0 + scale · B A‖` per output feature, `[out_features]`, in `merge_dtype` of the
        weight (at least float32). Computed without a graph: DoRA treats it as a constant."""
        dtype = merge_dtype(self.weight.dtype)
        w = self.weight if self.fan_in_fan_out else self.weight.T  # [in, out]
        parts = self._active() if parts is None else parts
        return torch.linalg.vector_norm(w.to(dtype) + parts.lora.delta_weight(dtype), dim=0)

    def dora_factor(self, norm: Tensor | None = None, parts: LoRALinear | LoRAAdapter | None = None) -> Tensor:
        """`m / ‖W0 + scale · B A‖`, `[out_features]`: differentiable in `m`, the norm a
        constant (`norm`, when the caller has it). A row whose norm is 0 (a zero row of `W0`
        with a fresh adapter) gets `m / tiny` (0 while `m` is its norm, 0), never NaN."""
        parts = self._active() if parts is None else parts
        norm = self.dora_weight_norm(parts) if norm is None else norm
        return parts.magnitude.to(norm.dtype) / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def _dora_forward(self, x: Tensor, out: Tensor, parts: LoRALinear | LoRAAdapter) -> Tensor:
        """From `out = x W0ᵀ + b` (owned: it is overwritten), DoRA's
        `y = f ⊙ (x W0ᵀ + scale · B A x) + b` with `f = m / ‖W0 + scale · B A‖`,
        computed as `f ⊙ (x W0ᵀ + b + scale · B A x) + (1 - f) ⊙ b`, so a fresh layer
        (`f = 1` exactly, `B = 0`) returns exactly its base map's output.

        With dropout (training), as PEFT computes it: the DoRA terms take `x_d = dropout(x)`,
        `y = x W0ᵀ + b + (f - 1) ⊙ (x_d W0ᵀ) + f ⊙ scale · B A x_d`, which is the formula above
        when nothing is dropped.
        """
        factor = self.dora_factor(parts=parts).to(out.dtype)
        if parts.dropout and self.training:
            xd = F.dropout(x, parts.dropout, training=True)
            base_d = kernels.base_linear(xd, self.weight.to(xd.dtype), None, self.fan_in_fan_out)
            return out + (factor - 1) * base_d + factor * parts.lora(xd).to(out.dtype)
        out = parts.lora(x, residual=out, inplace=True)
        if self.bias is None:
            return out * factor
        return torch.addcmul((1 - factor) * self.bias.to(out.dtype), out, factor)

    # --- merging the active adapter ---------------------------------------------------------

    def _dora_merged_weight(self, factor: Tensor, sign: int) -> Tensor:
        """`f ⊙ (W0 + scale · B A)` (`sign=+1`, from `W0`) or `W / f - scale · B A` (`sign=-1`,
        from a merged `W`), in `factor`'s dtype, in the layout of `weight`. Rows with `f = 0`
        (zero rows, see `merge`) come back as `-scale · B A`, the `W0` they had."""
        dtype = factor.dtype
        f = factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)
        delta = self.delta_weight(dtype)
        if sign > 0:
            return f * (self.weight.to(dtype) + delta)
        return self.weight.to(dtype) / torch.where(f == 0, torch.ones_like(f), f) - delta

    @torch.no_grad()
    def _dora_merge_factor(self) -> Tensor:
        """The `f` that `merge` folds in; refuses when `unmerge` could not divide it out again."""
        norm = self.dora_weight_norm()
        factor = self.dora_factor(norm)
        lost = (factor == 0) & (norm != 0)
        if self.weight.device.type != "meta" and bool(lost.any()):
            rows = lost.nonzero().flatten().tolist()
            raise MergeError(
                f"cannot merge a DoRA layer whose magnitude is 0 on a non-zero row (output features "
                f"{rows[:5]}{'...' if len(rows) > 5 else ''}): the merged weight would hold zeros there and "
                "unmerge could not restore W0; the weight was left unchanged"
            )
        return factor

    def delta_weight(self, dtype: torch.dtype) -> Tensor:
        """The active adapter's `scale · B A` in the layout of `weight`, computed in `dtype`."""
        delta = self._active().lora.delta_weight(dtype)  # [in, out]
        return delta if self.fan_in_fan_out else delta.T

    @torch.no_grad()
    def merged_weight(self, sign: int = 1) -> Tensor:
        """`W0 ± scale · B A` of the active adapter, computed in at least float32, rounded once
        to the weight's dtype; `weight` itself is untouched. DoRA: `f ⊙ (W0 + scale · B A)`, or
        (`sign=-1`, on a merged layer) `W / f - scale · B A` with the `f` folded in at merge time."""
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

    def extra_repr(self) -> str:
        default = (
            "" if self.lora is None else f"rank={self.lora.rank}, alpha={self.lora.alpha:g}, dropout={self.dropout:g}, "
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {default}"
            f"bias={self.bias is not None}, merged={self.merged}" + (", dora=True" if self.dora else "")
        )


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
    "backward through a merged LoRALinear: its adapter would receive no gradient. "
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


class _RefuseBackwardWhileMerged(torch.autograd.Function):
    """Identity on a merged layer's output whose backward refuses: training through a merged
    layer would give its adapter no gradient, so it would silently train nothing."""

    @staticmethod
    def forward(ctx, out: Tensor, adapter_weight: Tensor) -> Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return refuse_merged_backward(grad), None
