"""Early rejection: ``generation.early_check`` stops a sample whose judge check fails part-way through its draw.

After ``early_check.step`` (a fraction) of a text-to-image call's denoising steps, each row's predicted clean image
(the scheduler's own x0 prediction at that step, decoded by the VAE) is read by the job's judge on the crops of the
attention maps captured so far. A row that a prompted class scores below ``early_check.min_score`` stops there: it
is dropped from the call's batch (its latents, its CFG-batched tensors, the scheduler's per-row state, its
generator, the capture's and the excitation's running sums), so the rest of the call runs on the other rows only,
and with ``generation.redraws`` its next attempt is drawn as for any rejected sample. The stopped row is delivered
as drawn so far: its preview image and maps, ``gen.stopped`` ({step, reason}; the filters copy it into ``scores``,
so the index tells a part-way draw's scores from a finished one's) and the judge's scores on the preview; the filters
reject it with the reason ``early:`` + the judge's (``early:judge:star``).

A step-end callback chained after the capture's (``ModelFamily.step_end``): the pipeline's own loop, no copy of it.
The other rows' draws are those of the call without the check up to float rounding (each row has its own
generator and noise; only the batch they are computed in shrinks: at most 1 of 255 per pixel on the bundled model),
and the same on every run, in-process or under Ray, since a call's rows do not depend on the worker. On the UNet families and schedulers that predict the clean latent at every
step (``clean_problem``); validate refuses the rest with one line.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

#: the reject reason's prefix of a stopped sample
STOPPED = "early:"

#: scheduler classes whose ``step`` returns the clean latent it predicts (``pred_original_sample``)
RETURN_CLEAN = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")


def clean_problem(class_name: str, config: dict) -> str | None:
    """Why a scheduler (its class name and config) gives no clean-latent prediction at each step; None when it does:
    the ``RETURN_CLEAN`` classes, DPM-Solver++ (its model outputs are x0) and UniPC predicting x0."""
    if class_name in RETURN_CLEAN:
        return None
    if class_name == "DPMSolverMultistepScheduler" and config.get("algorithm_type", "dpmsolver++") in (
            "dpmsolver++", "sde-dpmsolver++"):
        return None
    if class_name == "UniPCMultistepScheduler" and config.get("predict_x0", True):
        return None
    return (f"the scheduler {class_name} does not predict the clean image at each step; use generation.scheduler "
            "dpm++, ddim or euler")


class CleanLatents:
    """Wraps a scheduler's ``step`` to keep the clean latent it predicted last (``latest``, (B, C, h, w))."""

    def __init__(self, scheduler: Any):
        self.scheduler, self.latest = scheduler, None
        self._step = scheduler.step
        scheduler.step = self.step

    def step(self, *args, **kwargs):
        out = self._step(*args, **kwargs)
        clean = getattr(out, "pred_original_sample", None)
        if clean is None and isinstance(out, tuple) and len(out) > 1:
            clean = out[1]
        if clean is None:  # the multistep solvers keep their x0 predictions
            outputs = getattr(self.scheduler, "model_outputs", None)
            clean = outputs[-1] if outputs else None
        self.latest = clean
        return out


class AllStopped(Exception):
    """Every row of the call stopped at the check: the call ends there."""


def shrink(t: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` with only ``rows`` of a batch of ``batch`` images: a CFG pair [uncond, cond] keeps them in both halves."""
    if t.shape[0] == 2 * batch:
        return torch.cat([t[:batch][rows], t[batch:][rows]])
    if t.shape[0] == batch:
        return t[rows]
    raise RuntimeError(f"a step-end tensor of batch {t.shape[0]} is neither {batch} images nor their CFG pair")


class EarlyCheck:
    """The step-end callback of one text-to-image call (``begin`` it with the call's rows)."""

    def __init__(self, family: Any, judge: Any, fraction: float, min_score: float):
        self.family, self.judge, self.fraction, self.min_score = family, judge, float(fraction), float(min_score)
        self.clean = CleanLatents(family.pipe.scheduler)
        self.run: dict | None = None

    def at_step(self, loop_steps: int) -> int:
        """The loop step after which the check runs: ``fraction`` of the steps, at least 1, before the last."""
        return min(max(1, math.ceil(self.fraction * loop_steps)), loop_steps - 1)

    def begin(self, prompts: Sequence[str], classes: Sequence[Sequence[str]], loop_steps: int, generators: list,
              capture: Any, excite: Any) -> None:
        self.run = {"prompts": list(prompts), "classes": [list(c) for c in classes], "at": self.at_step(loop_steps),
                    "alive": list(range(len(prompts))), "stopped": {}, "generators": generators,
                    "capture": capture, "excite": excite}

    def __call__(self, pipe, step: int, timestep, kwargs: dict) -> dict:
        run = self.run
        if run is None or step + 1 != run["at"]:
            return kwargs
        from . import finite
        from .attention import fp16_safe
        from .judges import verdict

        latents = kwargs["latents"]
        batch = latents.shape[0]
        clean = self.clean.latest
        if clean is None or clean.shape[0] != batch:
            raise RuntimeError("generation.early_check: the scheduler gave no clean-latent prediction for this step")
        images = self.family.decode_latents(clean)  # float (B, H, W, 3) in [0, 1]
        bad = finite.bad_rows(images)
        pixels = (np.clip(np.nan_to_num(images), 0.0, 1.0) * 255).round().astype(np.uint8)
        maps = run["capture"].so_far() if run["capture"] is not None else {}
        half = {k: fp16_safe(v.float()).to(torch.float16).cpu().numpy() for k, v in maps.items()}
        alive = run["alive"]
        scores = self.judge.scores(pixels, [run["prompts"][i] for i in alive], [run["classes"][i] for i in alive],
                                   half.get("attn"))
        keep = []
        for j, (i, sc) in enumerate(zip(alive, scores)):
            reason = finite.NON_FINITE if bad[j] else verdict(sc, run["classes"][i], self.min_score)
            if not reason:
                keep.append(j)
                continue
            run["stopped"][i] = {"image": images[j], "maps": {k: v[j] for k, v in maps.items()},
                                 "reason": STOPPED + reason}
        if len(keep) == batch:
            return kwargs
        if not keep:
            raise AllStopped()
        rows = torch.as_tensor(keep, dtype=torch.long, device=latents.device)
        for name in ("latents", *(self.family.cfg_tensors or ())):
            if name in kwargs:
                kwargs[name] = shrink(kwargs[name], rows, batch)
        scheduler = pipe.scheduler
        for attr, value in list(vars(scheduler).items()):  # the solvers' per-row history (DPM-Solver's model outputs)
            if torch.is_tensor(value) and value.shape == latents.shape:
                setattr(scheduler, attr, value[rows])
            elif isinstance(value, list) and any(torch.is_tensor(v) and v.shape == latents.shape for v in value):
                setattr(scheduler, attr, [v[rows] if torch.is_tensor(v) and v.shape == latents.shape else v
                                          for v in value])
        run["generators"][:] = [run["generators"][j] for j in keep]  # the pipeline's own list (ancestral steps)
        for part in (run["capture"], run["excite"]):
            if part is not None:
                part.keep(keep)
        run["alive"] = [alive[j] for j in keep]
        return kwargs

    def finish(self, images: np.ndarray | None, maps: dict[str, torch.Tensor] | None) -> tuple:
        """(images, maps, stopped) of every row of the call: the call's outputs for the rows that ran to the end
        (``images`` / ``maps`` of those rows, None when all stopped), the preview for the stopped ones, and
        {row: (step, reason)} of the stopped rows (their judge scores: the synthesis stage reads the preview as any
        image)."""
        run, self.run = self.run, None
        ran = {i: j for j, i in enumerate(run["alive"])} if images is not None else {}
        parts = [(images[ran[i]], {k: v[ran[i]] for k, v in (maps or {}).items()}) if i in ran
                 else (run["stopped"][i]["image"], run["stopped"][i]["maps"]) for i in range(len(run["prompts"]))]
        full = np.stack([image for image, _ in parts]).astype(np.float32)
        full_maps = {k: torch.stack([m[k] for _, m in parts]) for k in parts[0][1]}
        stopped = {i: (run["at"], s["reason"]) for i, s in run["stopped"].items()}
        return full, full_maps, stopped
