"""Registry of model families and resolution of a concrete model's sites."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import CastloraError

from .base import (ROLE_COUNTERPARTS, ROLE_READS, ROLE_WRITES, ROLES, FamilySpec, Fused, Site,
                   SiteSpec, head_dim_of, linear_shape)
from .specs import BUILTIN_FAMILIES

__all__ = ["FamilySpec", "Fused", "SiteSpec", "Site", "ModelSites", "ROLES", "ROLE_READS",
           "ROLE_WRITES", "ROLE_COUNTERPARTS", "UnsupportedArchitectureError", "register_family",
           "family_for", "model_sites", "supported_model_types", "head_dim_of"]

_REGISTRY: dict[str, FamilySpec] = {}


class UnsupportedArchitectureError(CastloraError, ValueError):
    """No family spec for this model_type (a CastloraError: the CLI prints it without a traceback)."""


def register_family(spec: FamilySpec, *, replace: bool = False) -> None:
    """Make `spec` available for every `model_type` it lists."""
    for mt in spec.model_types:
        if mt in _REGISTRY and not replace:
            raise ValueError(f"model_type {mt!r} already has a spec ({_REGISTRY[mt].name}); pass replace=True")
        _REGISTRY[mt] = spec


for _spec in BUILTIN_FAMILIES:
    register_family(_spec)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def family_for(config) -> FamilySpec:
    """The spec for a Hugging Face config (or a model_type string)."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    raise UnsupportedArchitectureError(
        f"castlora has no family spec for model_type {model_type!r}. Supported: "
        f"{', '.join(supported_model_types())}. To add one, describe where its decoder layers and "
        "q/k/v/o/gate/up/down projections live in a castlora.families.FamilySpec and call "
        "castlora.families.register_family(spec) (see docs/families.md)."
    )


@dataclass
class ModelSites:
    """The canonical sites of one loaded model, resolved from its family spec."""

    family: FamilySpec
    config: object
    num_layers: int
    layer_paths: list[str]
    sites: dict[tuple[int, str], Site]

    @property
    def roles(self) -> tuple[str, ...]:
        return self.family.roles

    def site(self, layer: int, role: str) -> Site:
        return self.sites[(layer, role)]

    def norm_path(self, layer: int, which: str) -> str:
        return f"{self.layer_paths[layer]}.{self.family.norms[which]}"

    def locate(self, module_path: str) -> list[Site]:
        """Sites computed by the module at `module_path` (several when it is fused)."""
        return [s for s in self.sites.values() if s.path == module_path]

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size


def _unwrap(model: nn.Module) -> nn.Module:
    # A PeftModel wraps the transformers model as base_model.model; resolve paths on the latter.
    while hasattr(model, "base_model") and hasattr(model.base_model, "model") and model.base_model is not model:
        inner = model.base_model.model
        if inner is model:
            break
        model = inner
    return model


def model_sites(model: nn.Module) -> ModelSites:
    """Resolve every (layer, role) site of a loaded transformers causal LM."""
    model = _unwrap(model)
    config = model.config
    spec = family_for(config)
    try:
        layers = model.get_submodule(spec.layers)
    except AttributeError as e:
        raise UnsupportedArchitectureError(
            f"model_type {config.model_type!r} matched family {spec.name!r} but has no module "
            f"{spec.layers!r}: the spec does not fit this model") from e
    layer_paths = [f"{spec.layers}.{i}" for i in range(len(layers))]
    sites: dict[tuple[int, str], Site] = {}
    for i, lp in enumerate(layer_paths):
        for role, ss in spec.sites.items():
            path = f"{lp}.{ss.path}"
            module = model.get_submodule(path)
            d_in, d_out = linear_shape(module, spec.transposed)
            rows = ss.fused.rows(role, d_out, config) if ss.fused else None
            sites[(i, role)] = Site(layer=i, role=role, path=path, d_in=d_in,
                                    d_out=len(rows) if rows is not None else d_out,
                                    module_out=d_out, rows=rows, transposed=spec.transposed)
    return ModelSites(family=spec, config=config, num_layers=len(layers),
                      layer_paths=layer_paths, sites=sites)
