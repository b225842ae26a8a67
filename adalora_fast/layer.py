"""AdaLoraLayer, what every adapted layer shares, and AdaLoraLinear, an adapted ``nn.Linear`` or
transformers ``Conv1D`` (PEFT's ``SVDLinear``). The other base kinds (bitsandbytes 4-bit and 8-bit,
Conv2d, custom linear layers) and the dispatch by kind are in ``bases.py``.

Same parameter names, shapes and init as PEFT's ``AdaLoraLayer``, so state dicts map one to one:
``base_layer`` (the frozen original), ``lora_A[adapter]`` [r, k] (right singular vectors),
``lora_E[adapter]`` [r, 1] (singular values, init 0), ``lora_B[adapter]`` [d, r] (left singular
vectors), ``ranknum[adapter]`` [1] (the rank the scaling divides by; no gradient). With E = 0 at
init the wrapped layer starts as the identity of the base layer. Like PEFT's layers, an adapted
layer exposes its base's ``weight`` and ``bias`` (model code reads them: T5's MLP reads
``wo.weight.dtype``), ``in_features``, ``out_features``, ``base_layer`` and ``get_base_layer()``.

AdaLoraLinear's forward calls one op, ``ops.adapter_linear``, which owns the whole layer (base
matmul, bias, dropout and adapter, forward and backward).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from . import ops
from .ops.layout import RANKNUM_EPS

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but keep the layer importable without it
    Conv1D = None


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` itself (a subclass may compute something else): a linear layer whose
    weight is stored [in, out] (``fan_in_fan_out``)."""
    return Conv1D is not None and type(module) is Conv1D


def has_dense_weight(module: nn.Module) -> bool:
    """``module.weight`` is a plain float tensor of shape [out_features, in_features]: no packed,
    quantized (bitsandbytes' ``Params4bit``/``Int8Params``, float8) or sharded (``DTensor``) weight."""
    w = getattr(module, "weight", None)
    return (
        type(w) in (nn.Parameter, torch.Tensor)
        and w.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        and tuple(w.shape) == (getattr(module, "out_features", None), getattr(module, "in_features", None))
    )


def is_plain_linear(module: nn.Module) -> bool:
    """A layer that computes exactly ``F.linear(x, weight, bias)``: ``nn.Linear``, or a subclass that
    keeps ``nn.Linear.forward`` (torch's ``NonDynamicallyQuantizableLinear``), with a dense weight.
    Only these (and ``Conv1D``) go through the fused op."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and has_dense_weight(module)


def resize_triplets(layer: nn.Module, adapter_name: str, keep: torch.Tensor) -> None:
    """Keep only the triplets of ``layer`` where ``keep`` (bool [r]) is True: new ``lora_A`` [r', k],
    ``lora_E`` [r', 1] and ``lora_B`` [d, r'] parameters (copies of the kept rows/columns) and
    ``r[adapter_name] = r'``; ``ranknum`` keeps its value, as in PEFT's ``resize_modules_by_rank_pattern``.
    Any layer with PEFT's AdaLoRA attributes (``lora_A``/``lora_E``/``lora_B`` ParameterDicts, ``r``):
    ours and PEFT's own."""
    keep = torch.as_tensor(keep, dtype=torch.bool, device=layer.lora_A[adapter_name].device).view(-1)
    r_old = layer.r[adapter_name]
    if keep.numel() != r_old:
        raise ValueError(f"rank pattern has {keep.numel()} entries, the layer has rank {r_old}")
    rg = layer.lora_A[adapter_name].requires_grad
    with torch.no_grad():
        A = layer.lora_A[adapter_name][keep].clone()
        B = layer.lora_B[adapter_name][:, keep].clone()
        E = layer.lora_E[adapter_name][keep].clone()
    layer.r[adapter_name] = int(keep.sum().item())
    layer.lora_A[adapter_name] = nn.Parameter(A, requires_grad=rg)
    layer.lora_B[adapter_name] = nn.Parameter(B, requires_grad=rg)
    layer.lora_E[adapter_name] = nn.Parameter(E, requires_grad=rg)


_MISSING = object()


def read_param(module: nn.Module, name: str):
    """``getattr(module, name)`` for a parameter (or None, as an unset bias is registered): read from
    the module's parameter dict, without ``nn.Module.__getattr__``'s Python fallback (of the order of
    a microsecond a read, a dozen reads per layer call on the training step's host path: ours, the
    unfused bases' and PEFT's patched layers'). Anything not in that dict (a parametrized tensor,
    FSDP1's views, a plain attribute) goes through ``getattr``."""
    p = module._parameters.get(name, _MISSING)
    return getattr(module, name) if p is _MISSING else p


class AdaLoraLayer(nn.Module):
    """What every adapted layer shares: PEFT's adapter parameters, their init (PEFT's draws, in
    PEFT's order), ``resize``, merge/unmerge, enabling and disabling, and the attributes of PEFT's
    tuner layers. ``in_features``/``out_features`` are PEFT's (Conv2d: the channels);
    ``lora_in_features`` is the number of columns of ``lora_A`` (Conv2d: in_channels * kh * kw).

    A subclass sets its shapes through ``__init__``, calls ``update_layer`` and implements
    ``_adapted_forward(x, adapter)`` (and ``_add_to_base_weight`` when its weight is not dense)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        in_features: int,
        out_features: int,
        lora_in_features: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.lora_in_features = self.in_features if lora_in_features is None else int(lora_in_features)
        # Registration order matches PEFT's (A, B, E, ranknum), so named_parameters() agree.
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.scaling: dict = {}
        self.lora_dropout: dict = {}
        self.merged_adapters: list = []
        self.disable_adapters = False
        self.active_adapter = adapter_name
        base_layer.weight.requires_grad_(False)

    # ------------------------------------------------------------------ PEFT's attributes
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (as PEFT's layers: model code reads ``.weight.dtype`` of a target)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def active_adapters(self) -> list:
        return [self.active_adapter]

    # ------------------------------------------------------------------ parameters
    def update_layer(self, adapter_name, r, lora_alpha, lora_dropout=0.0, init_lora_weights=True):
        if not isinstance(r, int) or r < 0:
            raise ValueError(f"r={r!r}: the rank must be an int >= 0")
        if not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) or lora_alpha < 0:
            # PEFT's `lora_alpha if lora_alpha > 0 else r` would scale a NaN alpha as r, silently
            raise ValueError(f"lora_alpha={lora_alpha!r}: must be a finite number >= 0")
        w = self.base_layer.weight
        dev = w.device if w.device.type != "meta" else torch.device("cpu")
        # PEFT's dtype: the base weight's (_move_adapter_to_device_of_base_layer), fp16/bf16 upcast to fp32
        # (cast_adapter_dtype): an fp64 model trains fp64 adapters, everything else fp32.
        dt = torch.float64 if w.dtype == torch.float64 else torch.float32
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        self.lora_dropout[adapter_name] = float(lora_dropout)
        # PEFT's draws in PEFT's order, on the CPU generator, then moved (AdaLoraLayer.update_layer:
        # A, E, B, a randn(1) for ranknum that is then filled, the reset; _move_adapter_to_device_of_base_layer):
        # the same seed gives PEFT's initial weights on any device.
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.lora_in_features))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r))
        self.ranknum[adapter_name] = nn.Parameter(torch.randn(1).fill_(float(r)), requires_grad=False)
        if init_lora_weights:
            self.reset_lora_parameters(adapter_name)
        if dev.type != "cpu":
            for pd in (self.lora_A, self.lora_B, self.lora_E, self.ranknum):
                p = pd[adapter_name]
                pd[adapter_name] = nn.Parameter(p.detach().to(dev), requires_grad=p.requires_grad)
        if dt != torch.float32:  # drawn in fp32 and cast afterwards, as PEFT: the same seed gives the same values
            for pd in (self.lora_A, self.lora_B, self.lora_E, self.ranknum):
                p = pd[adapter_name]
                pd[adapter_name] = nn.Parameter(p.detach().to(dt), requires_grad=p.requires_grad)

    def reset_lora_parameters(self, adapter_name: str) -> None:
        nn.init.zeros_(self.lora_E[adapter_name])
        nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)

    def resize(self, adapter_name: str, keep: torch.Tensor) -> None:
        """Keep only the triplets where ``keep`` (bool [r]) is True; ranknum keeps its value, as in PEFT."""
        resize_triplets(self, adapter_name, keep)

    # ------------------------------------------------------------------ forward
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        a = self.active_adapter
        # the training step's case first, by plain dict reads (this runs once per layer per step)
        if not (self.disable_adapters or self.merged_adapters or args or kwargs) and self.r.get(a):
            return self._adapted_forward(x, a)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs:
            raise TypeError(f"{type(self).__name__}.forward takes the input tensor only")
        return self.base_layer(x)  # merged, or no adapter (or rank 0) under the active name

    def _adapted_forward(self, x: torch.Tensor, a: str) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """B (A*E) * scaling / (ranknum + RANKNUM_EPS) [d, lora_in_features] (subclasses lay it out as their weight)."""
        return (
            self.lora_B[adapter]
            @ (self.lora_A[adapter] * self.lora_E[adapter])
            * self.scaling[adapter]
            / (self.ranknum[adapter] + RANKNUM_EPS)
        )

    def _add_to_base_weight(self, delta: torch.Tensor, safe_merge: bool, adapter: str) -> None:
        """Add ``delta`` (laid out as the base weight) to the dense base weight."""
        w = self.base_layer.weight
        delta = delta.to(w.dtype)
        if safe_merge:
            new = w.data + delta
            if not torch.isfinite(new).all():
                raise ValueError(f"NaNs detected in the merged weights: adapter {adapter!r} seems to be broken")
            w.data = new
        else:
            w.data += delta

    def merge(self, safe_merge: bool = False) -> None:
        a = self.active_adapter
        if a in self.merged_adapters:
            warnings.warn(f"adapter {a!r} is already merged; nothing to do", stacklevel=2)
            return
        with torch.no_grad():
            self._add_to_base_weight(self.get_delta_weight(a), safe_merge, a)
        self.merged_adapters.append(a)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        with torch.no_grad():
            while self.merged_adapters:
                a = self.merged_adapters.pop()
                self._add_to_base_weight(-self.get_delta_weight(a), False, a)

    def extra_repr(self) -> str:
        a = self.active_adapter
        return f"r={self.r.get(a)}, lora_alpha={self.lora_alpha.get(a)}, dropout={self.lora_dropout.get(a)}"


class AdaLoraLinear(AdaLoraLayer):
    """One adapted linear layer through the fused op: ``nn.Linear`` (or a subclass that keeps its
    forward, with a dense weight) or transformers' ``Conv1D``. ``in_features`` = k, ``out_features`` = d.

    ``fan_in_fan_out`` is taken for PEFT's ``SVDLinear`` signature and not read: the layout is the
    base layer's (Conv1D: [in, out]; nn.Linear: [out, in]). AdaLoraModel warns when the config's
    ``fan_in_fan_out`` disagrees with a target module."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        r: int = 12,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        fan_in_fan_out: Optional[bool] = None,
        init_lora_weights: bool = True,
    ) -> None:
        if not (is_plain_linear(base_layer) or is_conv1d(base_layer)):
            t = type(base_layer)
            raise ValueError(
                f"AdaLoraLinear adapts torch.nn.Linear and transformers' Conv1D through the fused op, got "
                f"{t.__module__}.{t.__qualname__}; adalora_fast.bases.adapter_layer picks the path for other kinds"
            )
        w = base_layer.weight
        conv1d = is_conv1d(base_layer)
        k, d = (w.shape[0], w.shape[1]) if conv1d else (w.shape[1], w.shape[0])
        super().__init__(base_layer, adapter_name, k, d)
        self.fan_in_fan_out = conv1d
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights)

    def _adapted_forward(self, x: torch.Tensor, a: str) -> torch.Tensor:
        mods = self._modules
        base = mods["base_layer"]
        return ops.adapter_linear(
            x,
            read_param(base, "weight"),
            read_param(base, "bias"),
            read_param(mods["lora_A"], a),
            read_param(mods["lora_E"], a),
            read_param(mods["lora_B"], a),
            self.scaling[a],
            read_param(mods["ranknum"], a),
            self.lora_dropout[a],
            self.training,
            self.fan_in_fan_out,
        )

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """B (A*E) * scaling / (ranknum + RANKNUM_EPS), laid out like the base weight."""
        delta = super().get_delta_weight(adapter)
        return delta.t() if self.fan_in_fan_out else delta
