"""Which base layers get an adapter, and how: one dispatch point (:func:`base_kind`) deciding the
path by the layer's exact kind, and the adapted layers of the kinds that have no fused op.

==================  ==================================================  ========================  ======================
kind                base layer                                          adapted by                PEFT 0.21's layer
==================  ==================================================  ========================  ======================
``linear``          ``nn.Linear`` (or a subclass that keeps its         ``AdaLoraLinear``         ``SVDLinear``
                    ``forward``, with a dense weight)                   (the fused op)
``conv1d``          transformers' ``Conv1D``                            ``AdaLoraLinear``         ``SVDLinear``
``linear_custom``   a subclass of ``nn.Linear`` with its own            ``AdaLoraLinearUnfused``  ``SVDLinear``
                    ``forward`` and a dense weight (``FalconLinear``)
``linear4bit``      bitsandbytes ``Linear4bit`` (QLoRA)                 ``AdaLoraLinear4bit``     ``SVDLinear4bit``
``linear8bitlt``    bitsandbytes ``Linear8bitLt``                       ``AdaLoraLinear8bitLt``   ``SVDLinear8bitLt``
``conv2d``          ``nn.Conv2d`` with ``groups=1``                     ``AdaLoraConv2d``         ``SVDConv2d``
==================  ==================================================  ========================  ======================

Anything else raises, naming its type (:func:`unsupported_reason` says why): a subclass of
``nn.Linear`` whose weight is not a plain dense [out, in] float tensor (quantized, sharded) is never
taken for a plain linear layer, GPTQ layers are refused (GPTQModel, the library PEFT adapts them
with, does not install beside this package's torch builds), grouped convolutions too (PEFT's
``SVDConv2d`` has one ``lora_A`` row of ``in_channels * kh * kw`` for all groups and fails on them).

Where no fused op exists, the base computes its own output (bitsandbytes' 4-bit or 8-bit matmul,
a custom forward, the convolution) and the adapter adds its term to it: for the linear kinds in
one autograd function (:class:`_AdapterAdd`: the dropout mask regenerated from a seed instead of
a saved N x k copy, E and the scale folded into an r-vector, the term added by one ``addmm``; its
input gradient is summed by autograd with the base's); for Conv2d with torch ops, as two
convolutions through the rank (x * A, then a 1x1 convolution with B·e) instead of PEFT's full
convolution with the rebuilt d x k delta.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .layer import AdaLoraLayer, AdaLoraLinear, has_dense_weight, is_conv1d, is_plain_linear, read_param
from .ops.layout import RANKNUM_EPS

__all__ = [
    "LAYER_CLASSES",
    "AdaLoraConv2d",
    "AdaLoraLinear4bit",
    "AdaLoraLinear8bitLt",
    "AdaLoraLinearUnfused",
    "adapter_layer",
    "add_adapter_term",
    "base_kind",
    "dequantize_4bit",
    "dequantize_8bit",
    "is_adaptable",
    "is_linear_like",
    "unsupported_reason",
]

SUPPORTED = (
    "torch.nn.Linear, transformers' Conv1D, torch.nn.Conv2d (groups=1) and bitsandbytes' Linear4bit / Linear8bitLt"
)


# ---------------------------------------------------------------------------------- the dispatch
def _bnb_nn(module: nn.Module):
    """``bitsandbytes.nn`` when ``module`` is one of its layers (imported only then: a model with
    bitsandbytes layers has imported it already, and nobody else pays for the import)."""
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    import bitsandbytes as bnb

    return bnb.nn


def base_kind(module: nn.Module) -> Optional[str]:
    """The kind of base layer ``module`` is (the table in this module's docstring), or None when
    no path adapts it. Decided by the exact class, never by ``isinstance(module, nn.Linear)``
    alone: bitsandbytes' layers subclass ``nn.Linear`` and hold packed weights."""
    t = type(module)
    if is_conv1d(module):
        return "conv1d"
    if t is nn.Conv2d:
        return "conv2d" if module.groups == 1 else None
    bnn = _bnb_nn(module)
    if bnn is not None:
        if t in (bnn.Linear4bit, bnn.LinearFP4, bnn.LinearNF4):
            return "linear4bit"
        if t is bnn.Linear8bitLt:
            return "linear8bitlt"
        return None
    if is_plain_linear(module):
        return "linear"
    if isinstance(module, nn.Linear) and has_dense_weight(module) and not _is_gptq(module):
        return "linear_custom"
    return None


def is_adaptable(module: nn.Module) -> bool:
    return base_kind(module) is not None


def is_linear_like(module: nn.Module) -> bool:
    """What ``target_modules="all-linear"`` selects, as PEFT: every ``nn.Linear`` (its subclasses
    included, so that one we cannot adapt raises instead of being skipped) and ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _is_gptq(module: nn.Module) -> bool:
    return hasattr(module, "qweight") and "QuantLinear" in type(module).__name__


def _type_name(module: nn.Module) -> str:
    t = type(module)
    return f"{t.__module__}.{t.__qualname__}"


def unsupported_reason(module: nn.Module) -> str:
    """Why ``module`` cannot be adapted, in a sentence that names its type (for error messages)."""
    name = _type_name(module)
    if _is_gptq(module):
        return (
            f"{name} is a GPTQ layer; adalora_fast has no GPTQ path (GPTQModel, the GPTQ library PEFT adapts, "
            "brings its own torch and CUDA builds, so no path could be tested against it). Quantize with "
            "bitsandbytes instead (pip install bitsandbytes; transformers' BitsAndBytesConfig(load_in_4bit=True)), "
            "or use PEFT's AdaLoRA"
        )
    if type(module) is nn.Conv2d and module.groups != 1:
        return (
            f"{name} with groups={module.groups}: PEFT's SVDConv2d adapts groups=1 only (its lora_A is "
            "[r, in_channels * kh * kw] for all groups)"
        )
    if _bnb_nn(module) is not None:
        return f"{name}: of bitsandbytes' layers, adalora_fast adapts Linear4bit (and LinearNF4/FP4) and Linear8bitLt"
    if isinstance(module, nn.Linear):
        w = getattr(module, "weight", None)
        what = (
            f"its weight is a {type(w).__module__}.{type(w).__qualname__}"
            if w is not None and not has_dense_weight(module) and type(w) not in (nn.Parameter, torch.Tensor)
            else f"its weight (shape {tuple(getattr(w, 'shape', ()))}, {getattr(w, 'dtype', None)}) is no dense float "
            f"[out_features, in_features] = [{module.out_features}, {module.in_features}] tensor"
        )
        kind = "is a torch.nn.Linear" if type(module) is nn.Linear else "subclasses torch.nn.Linear"
        return (
            f"{name} {kind} but {what} (quantized or sharded?): it is not adapted as a linear layer. "
            f"adalora_fast adapts {SUPPORTED}; wrap the model before sharding it"
        )
    return f"{name}: adalora_fast adapts {SUPPORTED}"


def adapter_layer(
    base: nn.Module,
    adapter_name: str = "default",
    r: int = 12,
    lora_alpha: float = 8,
    lora_dropout: float = 0.0,
    init_lora_weights: bool = True,
) -> AdaLoraLayer:
    """The adapted layer for ``base``, by its kind (:func:`base_kind`); raises ``ValueError`` naming
    the type when there is none."""
    kind = base_kind(base)
    if kind is None:
        raise ValueError(unsupported_reason(base))
    cls = LAYER_CLASSES[kind]
    return cls(
        base, adapter_name, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, init_lora_weights=init_lora_weights
    )


# ---------------------------------------------------------------------------------- the adapter term
def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """dropout(x) [N, k] with the keep mask the fused op draws for ``seed`` (``ops.dropout_keep_mask``:
    the C++ hash for fp32 on the CPU, Philox on CUDA, a seeded ``bernoulli_`` otherwise), so the
    same mask comes back in the backward. Regenerating it costs a fraction of one ``bernoulli_``
    draw where the hash or Philox runs; it spares saving an N x k mask or dropped copy."""
    if p == 0.0:
        return x
    keep = ops.dropout_keep_mask(seed, tuple(x.shape), p, x.device, x.dtype)
    return x.mul(keep).mul_(1.0 / (1.0 - p))


class _AdapterAdd(torch.autograd.Function):
    """``out = result + ((dropout(x) Aᵀ) ⊙ e) Bᵀ``, e = E · s (s = scaling / (ranknum + eps)), for a
    base whose output ``result`` [N, d] some other layer computed. x [N, k] is in the adapters'
    dtype. Saves x, t = dropout(x) Aᵀ [N, r] and the seed; never A*E, dropout(x) or the N x d term.

    Backward, g = dout: the base's output gets g as is; gB = g B; dB = gᵀ (t ⊙ e);
    dE = s Σₙ gB ⊙ t; ge = gB ⊙ e; dA = geᵀ dropout(x); dx = dropout'(ge A) (autograd adds it to
    the base's dx)."""

    @staticmethod
    def forward(ctx, result, x, lora_A, lora_E, lora_B, s, dropout_p: float, seed: int):
        e = (lora_E.view(-1) * s).to(lora_A.dtype)
        t = _dropped(x, dropout_p, seed) @ lora_A.t()  # [N, r]
        u = t * e
        if result.dtype == u.dtype:
            out = torch.addmm(result, u, lora_B.t())
        else:  # a half base output: the term in the adapters' dtype, rounded once on the add (PEFT's .to(expected_dtype))
            out = result + (u @ lora_B.t()).to(result.dtype)
        ctx.save_for_backward(x, t, lora_A, lora_E, lora_B, s)
        ctx.dropout_p, ctx.seed = dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, g):
        x, t, lora_A, lora_E, lora_B, s = ctx.saved_tensors
        need = ctx.needs_input_grad
        ga = g if g.dtype == lora_A.dtype else g.to(lora_A.dtype)
        e = (lora_E.view(-1) * s).to(lora_A.dtype)
        gB = ga @ lora_B  # [N, r]
        dx = dA = dE = dB = None
        if need[4]:
            dB = ga.t() @ (t * e)
        if need[3]:
            dE = ((gB * t).sum(0) * s).view(-1, 1).to(lora_E.dtype)
        ge = gB * e
        if need[2]:
            dA = ge.t() @ _dropped(x, ctx.dropout_p, ctx.seed)
        if need[1]:
            dx = ge @ lora_A
            if ctx.dropout_p > 0.0:  # dropout' is dropout with the same mask
                dx = _dropped(dx, ctx.dropout_p, ctx.seed)
        return g if need[0] else None, dx, dA, dE, dB, None, None, None


def add_adapter_term(
    result: torch.Tensor,
    x: torch.Tensor,
    lora_A,
    lora_E,
    lora_B,
    scaling: float,
    ranknum,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    """``result + (dropout(x) @ (A*E).T @ B.T) * scaling / (ranknum + 1e-5)`` (PEFT's term), as
    :class:`_AdapterAdd` computes it. x [..., k] is cast to the adapters' dtype (PEFT's
    ``_cast_input_dtype``); under autocast everything runs in the autocast dtype, as PEFT's matmuls
    do there. Returns [..., d] in ``result``'s dtype."""
    p = float(dropout_p) if training else 0.0
    seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0.0 else 0  # the default CPU generator: reproducible
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev)
    cdt = torch.get_autocast_dtype(dev) if autocast else lora_A.dtype
    A, E, B = (v if v.dtype == cdt else v.to(cdt) for v in (lora_A, lora_E, lora_B))
    xa = x if x.dtype == cdt else x.to(cdt)
    s = (ranknum.detach() + RANKNUM_EPS).reciprocal_().mul_(scaling)  # ops' _scale: scaling / tensor, bitwise
    lead = result.shape[:-1]
    with torch.autocast(dev, enabled=False) if autocast else contextlib.nullcontext():
        out = _AdapterAdd.apply(result.reshape(-1, result.shape[-1]), xa.reshape(-1, xa.shape[-1]), A, E, B, s, p, seed)
    return out.view(*lead, out.shape[-1])


# ---------------------------------------------------------------------------------- linear kinds, unfused
class AdaLoraLinearUnfused(AdaLoraLayer):
    """A linear layer whose forward is its own (a subclass of ``nn.Linear`` with a custom forward and
    a dense weight, e.g. transformers' ``FalconLinear``): the base's output plus the adapter term
    (PEFT's ``SVDLinear`` on such a layer). Merging adds the delta to the dense weight."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        r: int = 12,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights: bool = True,
    ) -> None:
        self._check_base(base_layer)
        super().__init__(base_layer, adapter_name, base_layer.in_features, base_layer.out_features)
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights)

    def _check_base(self, base_layer: nn.Module) -> None:
        if base_kind(base_layer) != "linear_custom":
            raise ValueError(
                f"{type(self).__name__} adapts subclasses of nn.Linear with their own forward and a dense "
                f"weight; {_type_name(base_layer)} is not one (adapter_layer() picks the right class)"
            )

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not isinstance(out, torch.Tensor) or out.shape[-1:] != (self.out_features,):
            what = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a tensor of shape {tuple(out.shape)}"
            raise TypeError(
                f"{_type_name(self.base_layer)} returned {what}, not [..., {self.out_features}]: "
                "it cannot be adapted as a linear layer (exclude it from target_modules)"
            )
        return out

    def _adapted_forward(self, x: torch.Tensor, a: str) -> torch.Tensor:
        mods = self._modules
        return add_adapter_term(
            self._base_output(x),
            x,
            read_param(mods["lora_A"], a),
            read_param(mods["lora_E"], a),
            read_param(mods["lora_B"], a),
            self.scaling[a],
            read_param(mods["ranknum"], a),
            self.lora_dropout[a],
            self.training,
        )


class AdaLoraLinear4bit(AdaLoraLinearUnfused):
    """bitsandbytes ``Linear4bit`` (QLoRA), PEFT's ``SVDLinear4bit``: bitsandbytes' 4-bit matmul
    (its CPU or CUDA kernel) plus the adapter term; ``in_features``/``out_features`` are the
    module's, never the packed weight's shape. Merging dequantizes, adds the delta and quantizes
    again, as PEFT's LoRA does for 4-bit layers (PEFT's AdaLoRA cannot merge them)."""

    def _check_base(self, base_layer: nn.Module) -> None:
        if base_kind(base_layer) != "linear4bit":
            raise ValueError(f"{type(self).__name__} adapts bitsandbytes' Linear4bit, got {_type_name(base_layer)}")

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def _add_to_base_weight(self, delta: torch.Tensor, safe_merge: bool, adapter: str) -> None:
        import bitsandbytes as bnb

        base = self.base_layer
        w = base.weight
        new = dequantize_4bit(base) + delta
        _check_finite(new, safe_merge, adapter)
        kwargs = {k: v for k, v in w.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs["bnb_quantized"] = False
        kwargs["requires_grad"] = False
        base.weight = bnb.nn.Params4bit(new.to("cpu"), **kwargs).to(w.device)


class AdaLoraLinear8bitLt(AdaLoraLinearUnfused):
    """bitsandbytes ``Linear8bitLt``, PEFT's ``SVDLinear8bitLt``: bitsandbytes' int8 matmul plus the
    adapter term in fp32 (PEFT casts x to float32). Its output is never changed in place
    (bitsandbytes' autograd forbids it). Merging dequantizes, adds the delta and quantizes again, as
    PEFT's LoRA does for 8-bit layers."""

    def _check_base(self, base_layer: nn.Module) -> None:
        if base_kind(base_layer) != "linear8bitlt":
            raise ValueError(f"{type(self).__name__} adapts bitsandbytes' Linear8bitLt, got {_type_name(base_layer)}")

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def _add_to_base_weight(self, delta: torch.Tensor, safe_merge: bool, adapter: str) -> None:
        import bitsandbytes as bnb

        base = self.base_layer
        w, state = base.weight, base.state
        new = dequantize_8bit(base).to(delta.dtype) + delta
        _check_finite(new, safe_merge, adapter)
        base.weight = bnb.nn.Int8Params(new.to("cpu"), requires_grad=False, has_fp16_weights=w.has_fp16_weights).to(
            w.device
        )
        state.reset_grads()


def dequantize_4bit(base: nn.Module) -> torch.Tensor:
    """The float weight [out, in] of a bitsandbytes ``Linear4bit`` (PEFT's ``dequantize_bnb_weight``).

    bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first forward in eval
    mode without gradients (nibbles reordered, absmax transposed to [in/blocksize, out] in bf16);
    its inverse restores the nibbles but leaves a non-nested absmax transposed, so it is put back
    here (in the bf16 the packed kernel computed with). The layer is left unpacked (it repacks on
    its next such forward)."""
    import bitsandbytes as bnb

    w = base.weight
    qs = w.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        w.data, qs = _convert_weight_packed_for_cpu_inverse(w.data, qs)
        if not qs.nested and qs.absmax.dim() == 2:
            qs.absmax = qs.absmax.t().reshape(-1).float()
        w.quant_state = qs
    return bnb.functional.dequantize_4bit(w.data, qs)


def dequantize_8bit(base: nn.Module) -> torch.Tensor:
    """The float weight [out, in] of a bitsandbytes ``Linear8bitLt`` (PEFT's ``dequantize_bnb_weight``)."""
    import bitsandbytes as bnb

    w, state = base.weight, base.state
    if state.SCB is None:
        state.SCB = w.SCB
    return bnb.functional.int8_vectorwise_dequant(w.data, state.SCB.to(w.device))


def _check_finite(w: torch.Tensor, safe_merge: bool, adapter: str) -> None:
    if safe_merge and not torch.isfinite(w).all():
        raise ValueError(f"NaNs detected in the merged weights: adapter {adapter!r} seems to be broken")


# ---------------------------------------------------------------------------------- Conv2d
class AdaLoraConv2d(AdaLoraLayer):
    """``nn.Conv2d`` (groups=1), PEFT's ``SVDConv2d``: ``lora_A`` [r, in_channels * kh * kw],
    ``lora_E`` [r, 1], ``lora_B`` [out_channels, r], PEFT's keys; ``in_features``/``out_features``
    are the channels (PEFT's), ``lora_in_features`` the columns of A.

    The term is PEFT's ``conv2d(dropout(x), (B (A*E)).reshape(W.shape)) * s`` computed through the
    rank: ``t = conv2d(dropout(x), A as r filters)`` with the base's stride, padding and dilation,
    then a 1x1 convolution of t with ``B * e`` (r x (k + d) multiply-adds per output pixel instead of
    d x k), added in place into the base's output."""

    def __init__(
        self,
        base_layer: nn.Conv2d,
        adapter_name: str = "default",
        r: int = 12,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights: bool = True,
    ) -> None:
        if base_kind(base_layer) != "conv2d":
            raise ValueError(
                unsupported_reason(base_layer)
                if type(base_layer) is nn.Conv2d
                else f"AdaLoraConv2d adapts torch.nn.Conv2d, got {_type_name(base_layer)}"
            )
        kh, kw = base_layer.kernel_size
        super().__init__(
            base_layer,
            adapter_name,
            base_layer.in_channels,
            base_layer.out_channels,
            lora_in_features=base_layer.in_channels * kh * kw,
        )
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights)

    def _adapted_forward(self, x: torch.Tensor, a: str) -> torch.Tensor:
        base = self.base_layer
        result = base(x)
        A, E, B = self.lora_A[a], self.lora_E[a], self.lora_B[a]
        r = A.shape[0]
        s = (self.ranknum[a].detach() + RANKNUM_EPS).reciprocal_().mul_(self.scaling[a])
        xa = x if x.dtype == A.dtype else x.to(A.dtype)
        xa = F.dropout(xa, self.lora_dropout[a], self.training)
        padding = base.padding
        if base.padding_mode != "zeros":  # the base pads with its mode before a padding-free convolution
            xa = F.pad(xa, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        kh, kw = base.kernel_size
        t = F.conv2d(xa, A.view(r, self.in_features, kh, kw), None, base.stride, padding, base.dilation)
        term = F.conv2d(t, (B * (E.view(1, -1) * s).to(B.dtype)).view(self.out_features, r, 1, 1))
        result += term  # in place, in the base's dtype (PEFT's SVDConv2d)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return super().get_delta_weight(adapter).reshape(self.base_layer.weight.shape)


LAYER_CLASSES = {
    "linear": AdaLoraLinear,
    "conv1d": AdaLoraLinear,
    "linear_custom": AdaLoraLinearUnfused,
    "linear4bit": AdaLoraLinear4bit,
    "linear8bitlt": AdaLoraLinear8bitLt,
    "conv2d": AdaLoraConv2d,
}
