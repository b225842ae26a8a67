"""AdaLoraConfig: PEFT's AdaLoRA fields, defaults and validation, plus the checks PEFT misses.

The field names, defaults and the on-disk JSON (``adapter_config.json``) follow
``peft.AdaLoraConfig`` 0.21.x so that a checkpoint written here loads with
``peft.PeftModel.from_pretrained`` and vice versa.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .fileio import CheckpointError, atomic_write, read_json

CONFIG_NAME = "adapter_config.json"
# The PEFT version whose on-disk format we write (peft reads "peft_version" only for information).
PEFT_FORMAT_VERSION = "0.21.2"


class PeftType(str, enum.Enum):
    """PEFT's ``PeftType`` for the one type we have: a ``str`` enum, so ``PeftType.ADALORA == "ADALORA"``
    and ``== peft.PeftType.ADALORA`` (the same value, hash and ``str()`` as PEFT's member)."""

    ADALORA = "ADALORA"


def _err(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"AdaLoraConfig.{name}={value!r}: {why}")


@dataclass
class AdaLoraConfig:
    """Configuration of an AdaLoRA adapter (PEFT's ``AdaLoraConfig`` fields and defaults).

    Phases (as PEFT): steps ``<= tinit`` warm up at the initial budget ``init_r`` per layer; steps
    in ``(tinit, total_step - tfinal)`` shrink the budget with a cubic schedule and re-mask every
    ``deltaT`` steps; from ``total_step - tfinal`` on the mask is frozen at ``target_r`` per layer.

    Besides PEFT's checks, this class rejects ``target_r > init_r``, ``beta`` outside (0, 1),
    ``deltaT < 1``, ``init_r < 1``, and a NaN, infinite or negative ``orth_reg_weight`` or
    ``lora_alpha`` (PEFT drops a NaN penalty weight, ``w > 0`` being False, and scales a NaN alpha as
    ``init_r``); every error names the field and the value.
    """

    # AdaLoRA's own fields
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None
    # The LoRA fields AdaLoRA uses
    r: int = 8
    target_modules: Optional[Union[list, set, str]] = None
    exclude_modules: Optional[Union[list, set, str]] = None
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_lora_weights: bool = True
    modules_to_save: Optional[list] = None
    inference_mode: bool = False
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None
    # Fields we write for PEFT's loader but do not act on.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        self.validate()

    def validate(self) -> None:
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if self.total_step is None or not is_int(self.total_step) or self.total_step <= 0:
            raise _err("total_step", self.total_step, "AdaLoRA needs the total number of training steps, an int > 0")
        for name in ("init_r", "target_r", "tinit", "tfinal", "deltaT"):
            if not is_int(getattr(self, name)):
                raise _err(name, getattr(self, name), "must be an int")
        if self.init_r < 1:
            raise _err("init_r", self.init_r, "must be >= 1")
        if self.target_r < 0:
            raise _err("target_r", self.target_r, "must be >= 0")
        if self.target_r > self.init_r:
            raise _err("target_r", self.target_r, f"must be <= init_r ({self.init_r}): AdaLoRA only prunes ranks")
        if self.tinit < 0:
            raise _err("tinit", self.tinit, "must be >= 0")
        if self.tfinal < 0:
            raise _err("tfinal", self.tfinal, "must be >= 0")
        if self.deltaT < 1:
            raise _err("deltaT", self.deltaT, "must be >= 1 (the interval between two masking steps)")
        if self.tinit >= self.total_step - self.tfinal:
            raise _err(
                "tinit",
                self.tinit,
                f"tinit must be < total_step - tfinal ({self.total_step} - {self.tfinal}) so that there is a "
                "budgeting phase; decrease tfinal/tinit or increase total_step",
            )
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
                raise _err(name, v, "must lie strictly between 0 and 1")
        for name in ("orth_reg_weight", "lora_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise _err(name, v, "must be a finite number >= 0")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise _err("lora_dropout", self.lora_dropout, "must lie in [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            raise _err("bias", self.bias, "must be one of 'none', 'all', 'lora_only'")
        if self.layers_pattern and self.layers_to_transform is None:
            raise _err("layers_pattern", self.layers_pattern, "needs layers_to_transform to be set too")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise _err(
                "layers_to_transform", self.layers_to_transform, "cannot be used when target_modules is a regex str"
            )
        if self.modules_to_save is not None:
            mts = self.modules_to_save
            if (
                isinstance(mts, str)
                or not isinstance(mts, (list, tuple, set))
                or not all(isinstance(m, str) for m in mts)
            ):
                raise _err("modules_to_save", mts, "must be a list of module names (str), as in PEFT")
            self.modules_to_save = list(mts)
        if self.r != 8:
            warnings.warn(
                "Note that `r` is not used in AdaLora and will be ignored. "
                "If you intended to set the initial rank, use `init_r` instead.",
                stacklevel=3,
            )

    @property
    def peft_type(self) -> PeftType:
        """``PeftType.ADALORA``, as ``peft.AdaLoraConfig.peft_type``."""
        return PeftType.ADALORA

    # ---------------------------------------------------------------- conversion and I/O
    @classmethod
    def from_dict(cls, d: dict) -> "AdaLoraConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        pt = extra.pop("peft_type", "ADALORA")
        if str(pt).upper() not in ("ADALORA", "PEFTTYPE.ADALORA"):
            raise ValueError(f"peft_type={pt!r}: adalora_fast loads AdaLoRA adapters only")
        extra.pop("peft_version", None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the `r` warning is noise when loading a saved config
            cfg = cls(**known)
        cfg.extra = extra
        return cfg

    @classmethod
    def from_peft(cls, peft_config: Any) -> "AdaLoraConfig":
        """Convert a ``peft.AdaLoraConfig`` (or anything with ``to_dict()``) into ours."""
        d = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(vars(peft_config))
        pt = d.get("peft_type")
        pt = getattr(pt, "value", pt)
        if pt is not None and str(pt).upper() != "ADALORA":
            raise ValueError(f"peft_type={pt!r}: get_peft_model in adalora_fast takes an AdaLoRA config")
        d["peft_type"] = "ADALORA"
        tt = d.get("task_type")
        d["task_type"] = getattr(tt, "value", tt)
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if isinstance(v, set):
                v = sorted(v)
            d[f.name] = v
        d["peft_type"] = "ADALORA"
        d["peft_version"] = PEFT_FORMAT_VERSION
        # Fields PEFT's LoraConfig expects with these values for an AdaLoRA adapter.
        d.setdefault("use_dora", False)
        d.setdefault("use_rslora", False)
        d.setdefault("lora_bias", False)
        d.setdefault("alpha_pattern", {})
        d.setdefault("loftq_config", {})
        return d

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode("utf-8")

    def save_pretrained(self, directory: str) -> None:
        """Write ``adapter_config.json`` atomically: a kill leaves the old file or the new one, never an empty one."""
        os.makedirs(directory, exist_ok=True)
        atomic_write(os.path.join(directory, CONFIG_NAME), self.to_json_bytes())

    @classmethod
    def from_pretrained(cls, directory: str) -> "AdaLoraConfig":
        """Read ``adapter_config.json``; an empty, truncated or invalid file raises ``CheckpointError``
        (a ``ValueError``) naming it."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
        d = read_json(path, "adapter config")
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: the adapter config must be a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: {exc}") from exc


def as_config(config: Any) -> AdaLoraConfig:
    """Our config as is; a ``peft.AdaLoraConfig`` (or anything with ``to_dict()``) converted."""
    if isinstance(config, AdaLoraConfig):
        return config
    if type(config).__name__ == "AdaLoraConfig" or hasattr(config, "to_dict"):
        return AdaLoraConfig.from_peft(config)
    raise TypeError(
        f"config must be an adalora_fast.AdaLoraConfig or a peft.AdaLoraConfig, got {type(config).__name__}"
    )
