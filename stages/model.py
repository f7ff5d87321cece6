"""Load a diffusers pipeline (local folder or hub id; SD 1.x/2.x by default, any family's class through
``pipeline_class``: stages/families/); schedulers by name; the model's identity: stages/identity.py."""
from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

# the model's identity (content digests, name) is torch-free and lives in stages/identity.py; re-exported here
from .identity import EXPECTED as _EXPECTED
from .identity import local_folder as _local_folder
from .identity import model_identity, short_id  # noqa: F401

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: scheduler name -> (class, overrides applied on top of the checkpoint's scheduler config)
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "euler": (EulerDiscreteScheduler, {}),
    # Stable Diffusion's own PNDM setting: PLMS steps only, one UNet call per step
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}
DEFAULT_SCHEDULER = "default"  # keep the checkpoint's scheduler


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> str:
    """"auto" → "cuda" when a GPU is visible, else "cpu"; other names pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def scheduler_from_config(name: str, config) -> Any:
    """The ``SCHEDULERS`` entry ``name`` built on a noise-schedule config (a checkpoint's scheduler config)."""
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def load_pipeline(model: str, dtype: str = "float32", device: str = "cpu",
                  scheduler: str | None = None, pipeline_class: type = StableDiffusionPipeline,
                  **extra: Any) -> Any:
    """A ``pipeline_class`` (default StableDiffusionPipeline) from a local folder or hub id (safetensors
    only; no safety checker where the class has one) on ``device`` ("cpu", "cuda", "cuda:N" or "auto").

    ``scheduler`` names an entry of ``SCHEDULERS`` (built from the checkpoint's scheduler config);
    None or "default" keeps the checkpoint's own.
    """
    torch_dtype = _torch_dtype(dtype)
    name = scheduler or DEFAULT_SCHEDULER
    if name != DEFAULT_SCHEDULER and name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted([DEFAULT_SCHEDULER, *SCHEDULERS])}")
    folder = _local_folder(model)
    kwargs = dict(dtype=torch_dtype, use_safetensors=True, **extra)
    if pipeline_class is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if folder is not None:
        pipe = pipeline_class.from_pretrained(folder, **kwargs)
    else:
        try:
            pipe = pipeline_class.from_pretrained(model, **kwargs)
        except OSError as e:
            raise FileNotFoundError(f"{model!r} is not a local folder and could not be loaded as a hub id "
                                    f"({e}): {_EXPECTED}") from e
    if name != DEFAULT_SCHEDULER:
        pipe.scheduler = scheduler_from_config(name, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    # every weighted component in the dtype asked for: without accelerate, diffusers may load a component
    # (seen: SD3's transformer in bfloat16 jobs) in float32, and the first mixed-dtype layer stops the run
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and getattr(component, "dtype", torch_dtype) != torch_dtype:
            component.to(dtype=torch_dtype)
    pipe = pipe.to(resolve_device(device))
    if pipe.device.type == "cuda":
        convolutions_channels_last(pipe)
    return pipe


#: the components whose convolutions run faster in channels_last on a GPU (a transformer has none that matter)
CONV_COMPONENTS = ("unet", "vae")


def convolutions_channels_last(pipe: Any) -> None:
    """The UNet's and VAE's weights in channels_last (NHWC), where cuDNN's tensor-core convolutions want them (the
    published SD recipe: with compile, 1.59 → 1.07 s per image on an A100); on CUDA only: on a CPU the bytes stay
    as they were. The attention capture reads (B, N, C) sequences, which the layout does not change."""
    for name in CONV_COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(memory_format=torch.channels_last)
