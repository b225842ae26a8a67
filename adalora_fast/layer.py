"""AdaLoraLinear: an adapted ``nn.Linear`` or transformers ``Conv1D`` (PEFT's ``SVDLinear``).

Same parameter names, shapes and init as PEFT's ``SVDLinear``, so state dicts map one to one:
``base_layer`` (the frozen original), ``lora_A[adapter]`` [r, k] (right singular vectors),
``lora_E[adapter]`` [r, 1] (singular values, init 0), ``lora_B[adapter]`` [d, r] (left singular
vectors), ``ranknum[adapter]`` [1] (the rank the scaling divides by; no gradient). With E = 0 at
init the wrapped layer starts as the identity of the base layer.

The forward calls one op, ``ops.adapter_linear``, which owns the whole layer (base matmul, bias,
dropout and adapter, forward and backward).
"""

from __future__ import annotations

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
    """transformers' ``Conv1D``: a linear layer whose weight is stored [in, out] (``fan_in_fan_out``)."""
    return Conv1D is not None and isinstance(module, Conv1D)


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


class AdaLoraLinear(nn.Module):
    """One adapted linear layer. ``in_features`` = k, ``out_features`` = d.

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
        super().__init__()
        if not is_adaptable(base_layer):
            raise ValueError(
                f"AdaLoraLinear adapts torch.nn.Linear and transformers' Conv1D, got {type(base_layer).__name__}"
            )
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.base_layer = base_layer
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
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
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights)

    # ------------------------------------------------------------------ parameters
    def update_layer(self, adapter_name, r, lora_alpha, lora_dropout=0.0, init_lora_weights=True):
        if not isinstance(r, int) or r < 0:
            raise ValueError(f"r={r!r}: the rank must be an int >= 0")
        w = self.base_layer.weight
        dev = w.device if w.device.type != "meta" else torch.device("cpu")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.lora_A[adapter_name] = nn.Parameter(torch.randn(r, self.in_features, device=dev))
        self.lora_B[adapter_name] = nn.Parameter(torch.randn(self.out_features, r, device=dev))
        self.lora_E[adapter_name] = nn.Parameter(torch.randn(r, 1, device=dev))
        self.ranknum[adapter_name] = nn.Parameter(torch.full((1,), float(r), device=dev), requires_grad=False)
        if init_lora_weights:
            self.reset_lora_parameters(adapter_name)

    def reset_lora_parameters(self, adapter_name: str) -> None:
        nn.init.zeros_(self.lora_E[adapter_name])
        nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B[adapter_name], mean=0.0, std=0.02)

    def resize(self, adapter_name: str, keep: torch.Tensor) -> None:
        """Keep only the triplets where ``keep`` (bool [r]) is True; ranknum keeps its value, as in PEFT."""
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.lora_A[adapter_name].device).view(-1)
        r_old = self.r[adapter_name]
        if keep.numel() != r_old:
            raise ValueError(f"rank pattern has {keep.numel()} entries, the layer has rank {r_old}")
        rg = self.lora_A[adapter_name].requires_grad
        with torch.no_grad():
            A = self.lora_A[adapter_name][keep].clone()
            B = self.lora_B[adapter_name][:, keep].clone()
            E = self.lora_E[adapter_name][keep].clone()
        self.r[adapter_name] = int(keep.sum().item())
        self.lora_A[adapter_name] = nn.Parameter(A, requires_grad=rg)
        self.lora_B[adapter_name] = nn.Parameter(B, requires_grad=rg)
        self.lora_E[adapter_name] = nn.Parameter(E, requires_grad=rg)

    # ------------------------------------------------------------------ forward
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged or args or kwargs:
            if args or kwargs:
                raise TypeError("AdaLoraLinear.forward takes the input tensor only")
            return self.base_layer(x)
        a = self.active_adapter
        if a not in self.lora_A or self.r[a] == 0:
            return self.base_layer(x)
        base = self.base_layer
        return ops.adapter_linear(
            x,
            base.weight,
            base.bias,
            self.lora_A[a],
            self.lora_E[a],
            self.lora_B[a],
            self.scaling[a],
            self.ranknum[a],
            self.lora_dropout[a],
            self.training,
            self.fan_in_fan_out,
        )

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """B (A*E) * scaling / (ranknum + RANKNUM_EPS), laid out like the base weight."""
        delta = (
            self.lora_B[adapter] @ (self.lora_A[adapter] * self.lora_E[adapter])
            * self.scaling[adapter]
            / (self.ranknum[adapter] + RANKNUM_EPS)
        )
        return delta.t() if self.fan_in_fan_out else delta

    def merge(self, safe_merge: bool = False) -> None:
        a = self.active_adapter
        if a in self.merged_adapters:
            warnings.warn(f"adapter {a!r} is already merged; nothing to do", stacklevel=2)
            return
        w = self.base_layer.weight
        with torch.no_grad():
            delta = self.get_delta_weight(a).to(w.dtype)
            if safe_merge:
                new = w.data + delta
                if not torch.isfinite(new).all():
                    raise ValueError(f"NaNs detected in the merged weights: adapter {a!r} seems to be broken")
                w.data = new
            else:
                w.data += delta
        self.merged_adapters.append(a)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        w = self.base_layer.weight
        with torch.no_grad():
            while self.merged_adapters:
                a = self.merged_adapters.pop()
                w.data -= self.get_delta_weight(a).to(w.dtype)

    def extra_repr(self) -> str:
        a = self.active_adapter
        return f"r={self.r.get(a)}, lora_alpha={self.lora_alpha.get(a)}, dropout={self.lora_dropout.get(a)}"
