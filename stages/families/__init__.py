"""Model families behind one seam (stages/families/base.py: ``ModelFamily``).

``FAMILIES`` maps a ``model.family`` name to where its class lives (``module:Class``); a class is
imported only when asked for, and family modules import no torch at module level, so resolving a
folder's family (:func:`resolve_family`, from ``model_index.json`` and the denoiser's config) stays
weight-free and torch-free for pre-flight. Adding a family is one module plus one line here.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from .base import CaptureLevel, FamilyError, ModelFamily  # noqa: F401

#: model.family name -> "module:Class" (imported lazily)
FAMILIES: dict[str, str] = {
    "sd": "stages.families.sd:SDFamily",
    "sdxl": "stages.families.sdxl:SDXLFamily",
    "sd3": "stages.families.sd3:SD3Family",
    "flux": "stages.families.flux:FluxFamily",
}
AUTO = "auto"


def family_class(name: str) -> type[ModelFamily]:
    """The family class registered under ``name`` (imports its module)."""
    if name not in FAMILIES:
        raise FamilyError(f"unknown model family {name!r}; choose one of {', '.join([AUTO, *FAMILIES])}")
    module, _, attr = FAMILIES[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if cls.name != name:
        raise TypeError(f"{FAMILIES[name]} is named {cls.name!r}, registered as {name!r}")
    return cls


def all_families() -> list[type[ModelFamily]]:
    return [family_class(name) for name in FAMILIES]


def supported_classes() -> str:
    """'StableDiffusionPipeline (sd), StableDiffusionXLPipeline (sdxl), ...' for error messages."""
    return ", ".join(f"{c} ({f.name})" for f in all_families() for c in f.pipeline_classes)


def _denoiser_config(folder: Path, family: type[ModelFamily]) -> dict | None:
    path = folder / family.denoiser / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise FamilyError(f"{path} is not readable JSON ({type(e).__name__}); restore it from the model's source") \
            from None
    if not isinstance(data, dict):
        raise FamilyError(f"{path} holds a JSON {type(data).__name__}, not an object; restore it from the model's source")
    return data


def resolve_family(folder: str | Path, override: str = AUTO, index: dict | None = None) -> type[ModelFamily]:
    """The family of a local diffusers folder: by ``model_index.json``'s ``_class_name``, checked against the
    denoiser's config; ``override`` (``model.family``) names it explicitly and must not contradict the folder.
    FamilyError (one line, what was found and what is supported) otherwise."""
    folder = Path(folder)
    if index is None:
        index = json.loads((folder / "model_index.json").read_text())
    name = index.get("_class_name")
    by_class = next((f for f in all_families() if name in f.pipeline_classes), None)
    if override != AUTO:
        family = family_class(override)
        if by_class is not None and by_class is not family:
            raise FamilyError(f"model.family is {override!r} but the folder's model_index.json names {name!r}, a "
                              f"{by_class.name} ({by_class.title}) pipeline; remove model.family or set it to "
                              f"{by_class.name!r}")
        why = family.mismatch(index, _denoiser_config(folder, family))
        if why is not None:
            raise FamilyError(f"model.family is {override!r} but the folder is not a {family.title} model: {why}; "
                              "remove model.family (auto) or point model.path at a matching folder")
        return family
    if by_class is None:
        raise FamilyError(f"model_index.json has _class_name {name!r}, which synthgen does not support; supported: "
                          f"{supported_classes()} (or set model.family for a folder saved under another pipeline "
                          "class)")
    why = by_class.mismatch(index, _denoiser_config(folder, by_class))
    if why is not None:
        raise FamilyError(f"model_index.json names {name!r} ({by_class.title}) but {why}")
    return by_class
