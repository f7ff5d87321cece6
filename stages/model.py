"""Load a Stable Diffusion 1.x / 2.x pipeline (local folder or hub id) and describe its identity."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

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

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_EXPECTED = "expected a local Stable Diffusion folder (containing model_index.json) or a Hugging Face hub id"


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> str:
    """"auto" → "cuda" when a GPU is visible, else "cpu"; other names pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _local_folder(model: str) -> Path | None:
    """The model's local folder, None for a hub id; raises for a missing or malformed local path."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{str(path)!r} has no model_index.json: {_EXPECTED}")
        return path
    if not _HUB_ID.match(model) or model.startswith((".", "~")):
        raise FileNotFoundError(f"model path {model!r} does not exist: {_EXPECTED}")
    return None


def scheduler_from_config(name: str, config) -> Any:
    """The ``SCHEDULERS`` entry ``name`` built on a noise-schedule config (a checkpoint's scheduler config)."""
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def load_pipeline(model: str, dtype: str = "float32", device: str = "cpu",
                  scheduler: str | None = None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from a local folder or hub id (safetensors only, no safety checker)
    on ``device`` ("cpu", "cuda", "cuda:N" or "auto").

    ``scheduler`` names an entry of ``SCHEDULERS`` (built from the checkpoint's scheduler config);
    None or "default" keeps the checkpoint's own.
    """
    torch_dtype = _torch_dtype(dtype)
    name = scheduler or DEFAULT_SCHEDULER
    if name != DEFAULT_SCHEDULER and name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted([DEFAULT_SCHEDULER, *SCHEDULERS])}")
    folder = _local_folder(model)
    kwargs = dict(dtype=torch_dtype, use_safetensors=True, safety_checker=None,
                  requires_safety_checker=False)
    if folder is not None:
        pipe = StableDiffusionPipeline.from_pretrained(folder, **kwargs)
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(model, **kwargs)
        except OSError as e:
            raise FileNotFoundError(f"{model!r} is not a local folder and could not be loaded as a hub id "
                                    f"({e}): {_EXPECTED}") from e
    if name != DEFAULT_SCHEDULER:
        pipe.scheduler = scheduler_from_config(name, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weights(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*.safetensors"))}


def model_identity(model: str) -> dict[str, Any]:
    """What the manifest records about a model: its path and the sha256 of each weights file, or,
    for a hub id, the id and the cached snapshot's revision (with weight hashes when cached)."""
    folder = _local_folder(model)
    if folder is not None:
        folder = folder.resolve()
        return {"source": "local", "model": str(folder), "weights": _weights(folder)}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "model_index.json")
    if not isinstance(cached, str):  # not in the local cache: only the id is known
        return {"source": "hub", "model": model, "revision": None, "weights": {}}
    snapshot = Path(cached).parent  # .../snapshots/<commit>/model_index.json
    return {"source": "hub", "model": model, "revision": snapshot.name, "weights": _weights(snapshot)}
