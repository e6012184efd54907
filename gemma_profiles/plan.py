"""Profile -> `Plan`: what will be done to one model, and why.

Planning never imports torch: it works from the profile and the variant name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import schema
from .profile import Profile
from .variants import VARIANTS, float16_unsafe

FAMILY_OF = {name: shape.family for name, shape in VARIANTS.items()}


@dataclass(frozen=True)
class Setting:
    """A resolved value and where it came from (``file:line``, or a reason)."""

    value: Any
    origin: str


@dataclass(frozen=True)
class Plan:
    """What the active profile does to one model.

    :param config: GemmaConfig field -> `Setting`, only fields the profile sets.
    :param device: where the model runs, or None to keep the script's choice.
    :param placement: the profile's whole placement section.
    :param quantization: ``"none"`` or ``"int8"``.
    :param warnings: things that will likely go wrong (logged at activation).
    """

    profile: str
    profile_path: str
    variant: str | None
    family: str | None
    config: dict[str, Setting]
    device: Setting | None
    placement: schema.Placement
    quantization: str
    overrides: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def dtype(self) -> str | None:
        setting = self.config.get("dtype")
        return None if setting is None else str(setting.value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "profile_path": self.profile_path,
            "variant": self.variant,
            "family": self.family,
            "overrides_applied": list(self.overrides),
            "config": {k: {"value": s.value, "from": s.origin} for k, s in self.config.items()},
            "device": None if self.device is None else {"value": self.device.value, "from": self.device.origin},
            "placement": self.placement.model_dump(exclude_unset=True),
            "quantization": self.quantization,
            "warnings": list(self.warnings),
        }


def make_plan(profile: Profile, variant: str | None = None, family: str | None = None) -> Plan:
    """Resolve ``profile`` for one model (variant and family overrides folded in)."""
    if family is None and variant is not None:
        family = FAMILY_OF.get(variant)
    resolved = profile.resolve(variant, family)
    model = resolved.model

    def origin(*key: str) -> str:
        found = resolved.origin(*key)
        return str(found) if found else f"profile {profile.name}"

    config = {
        name: Setting(value, origin("config", name))
        for name, value in model.config.model_dump(exclude_unset=True).items()
    }
    if "weights" in model.quantization.model_fields_set:
        config["quant"] = Setting(model.quantization.weights == "int8", origin("quantization", "weights"))
    device = None
    if model.placement.device is not None:
        device = Setting(model.placement.device, origin("placement", "device"))
    warnings = []
    dtype = config.get("dtype")
    if dtype is not None and dtype.value == "float16" and float16_unsafe(variant, family):
        warnings.append(
            f"float16 compute overflows for {variant or family} (activations reach ~1e5); "
            f"use float32 or bfloat16 via variants.{family or variant} (set at {dtype.origin})"
        )
    return Plan(
        profile=profile.name,
        profile_path=str(profile.path),
        variant=variant,
        family=family,
        config=config,
        device=device,
        placement=model.placement,
        quantization=model.quantization.weights,
        overrides=resolved.applied_overrides,
        warnings=tuple(warnings),
    )
