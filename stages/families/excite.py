"""Attention-based subject excitation on the UNet families: ``generation.excite`` (issue 34).

Attend-and-Excite (Chefer et al., SIGGRAPH 2023): a prompted subject the model neglects has a weak cross-attention
peak in the first denoising steps. At the end of each of the first ``excite.steps`` (a fraction) of the steps, the
latent the next step will denoise is nudged down the gradient of

    loss = max over the row's prompted classes of (1 - peak of the class's attention map)

where a class's map is the conditional cross-attention of its tokens at the job's first capture level (every
layer and head averaged), each pixel's attention over the prompt's own tokens (BOS and EOS excluded) taken as a
softmax of 100 x the probabilities, as the paper does, smoothed by a 3x3 Gaussian (sigma 0.5). The step size is
``excite.scale`` x sqrt of a ramp from 1 to 0.5 over the steps. The extra UNet call that computes the gradient runs
with plain SDPA processors (the capture and its bookkeeping are not in it). Each row's loss at every excited step
goes into its ``gen`` (``excite.loss``), so a job shows whether the neglected subjects were woken.

A ``callback_on_step_end`` (chained before the capture's and the guidance cut-off's): the pipeline's own loop, no
copy of it. The first step's latent is the seeded noise itself; the update starts after it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

#: the paper's softmax temperature over the prompt tokens and its smoothing kernel
TEMPERATURE = 100.0
SMOOTH_SIGMA, SMOOTH_SIZE = 0.5, 3


def _gaussian(device, dtype) -> torch.Tensor:
    x = torch.arange(SMOOTH_SIZE, dtype=dtype, device=device) - (SMOOTH_SIZE - 1) / 2
    g = torch.exp(-x ** 2 / (2 * SMOOTH_SIGMA ** 2))
    k = torch.outer(g, g)
    return (k / k.sum())[None, None]


class _Probe:
    """An SDPA attention processor that also keeps the conditional half's cross-attention probabilities (with their
    graph, for the gradient)."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        context = encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        probs = (query @ key.transpose(-1, -2) * attn.scale).softmax(dim=-1)  # (B, heads, N, L)
        self.store.append(probs.mean(dim=1))
        out = (probs @ value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class Excite:
    """The step-end callback of one pipeline call (``begin`` it with the rows' class token positions)."""

    def __init__(self, unet: Any, level: int, n_levels: int, steps: float, scale: float):
        from diffusers.models.attention_processor import AttnProcessor2_0

        from ..attention import layer_of

        self.unet, self.fraction, self.scale = unet, float(steps), float(scale)
        names = list(unet.attn_processors)
        self.probed = [n for n in names if layer_of(n, n_levels) == ("attn2", level)]
        if not self.probed:
            raise ValueError(f"generation.excite: the UNet has no cross-attention at capture level {level}")
        self.plain = {n: AttnProcessor2_0() for n in names}
        self.run: dict | None = None

    def begin(self, token_index: Sequence[Sequence[Sequence[int]]], prompt_lengths: Sequence[int],
              num_steps: int, grid: tuple[int, int]) -> None:
        """``token_index[b][k]``: the positions of class k's tokens in row b's prompt; ``prompt_lengths[b]``: its
        token count with BOS and EOS; ``grid``: the probed level's (h, w)."""
        excited = max(1, math.ceil(self.fraction * num_steps)) if self.fraction > 0 else 0
        self.run = {"groups": [list(map(list, g)) for g in token_index], "lengths": list(prompt_lengths),
                    "steps": num_steps, "excited": min(excited, num_steps - 1), "grid": grid,
                    "loss": [[] for _ in token_index], "alive": list(range(len(token_index)))}

    def losses(self, latents: torch.Tensor, timestep, embeds: torch.Tensor, added: dict | None) -> torch.Tensor:
        """Each row's loss (B,), differentiable in ``latents``."""
        store: list[torch.Tensor] = []
        saved = self.unet.attn_processors
        probes = dict(self.plain)
        for name in self.probed:
            probes[name] = _Probe(store)
        self.unet.set_attn_processor(probes)
        try:
            self.unet(latents, timestep, encoder_hidden_states=embeds, added_cond_kwargs=added)
        finally:
            self.unet.set_attn_processor(saved)
        attn = torch.stack(store).mean(dim=0)  # (B, N, L)
        h, w = self.run["grid"]
        kernel = _gaussian(attn.device, attn.dtype)
        rows = []
        for b, (groups, length) in enumerate(zip(self.run["groups"], self.run["lengths"])):
            text = attn[b, :, 1:length - 1] * TEMPERATURE  # the prompt's own tokens, without BOS and EOS
            text = text.softmax(dim=-1)
            peaks = []
            for group in groups:
                cols = [p - 1 for p in group if 1 <= p < length - 1]
                if not cols:
                    continue
                m = text[:, cols].mean(dim=-1).view(1, 1, h, w)
                m = F.conv2d(F.pad(m, (1, 1, 1, 1), mode="reflect"), kernel)
                peaks.append(m.max())
            rows.append(max(1 - p for p in peaks) if peaks else latents.new_zeros(()))
        return torch.stack(rows)

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        run = self.run
        if run is None or step >= run["excited"]:
            return callback_kwargs
        latents = callback_kwargs["latents"]
        batch = latents.shape[0]
        embeds = callback_kwargs["prompt_embeds"][-batch:]  # the conditional half (all of it after a cut-off)
        added = None
        if "add_text_embeds" in callback_kwargs:  # SDXL's added conditioning, conditional half
            added = {"text_embeds": callback_kwargs["add_text_embeds"][-batch:],
                     "time_ids": callback_kwargs["add_time_ids"][-batch:]}
        t_next = pipe.scheduler.timesteps[step + 1]
        with torch.enable_grad():
            z = latents.detach().float().requires_grad_(True)
            model_in = pipe.scheduler.scale_model_input(z, t_next).to(latents.dtype)
            loss = self.losses(model_in, t_next, embeds, added)
            for b, value in zip(run["alive"], loss.detach().tolist()):
                run["loss"][b].append(round(value, 4))
            if self.scale > 0:
                (grad,) = torch.autograd.grad(loss.sum(), z)
                ramp = 1.0 - 0.5 * step / max(run["steps"] - 1, 1)
                latents = (z - self.scale * math.sqrt(ramp) * grad).detach().to(latents.dtype)
        callback_kwargs["latents"] = latents
        return callback_kwargs

    def keep(self, rows: Sequence[int]) -> None:
        """Go on with these rows of the call only (generation.early_check stopped the others); every row's losses so
        far stay for :meth:`finish`."""
        run = self.run
        if run is None:
            return
        run["groups"] = [run["groups"][b] for b in rows]
        run["lengths"] = [run["lengths"][b] for b in rows]
        run["alive"] = [run["alive"][b] for b in rows]

    def finish(self) -> list[list[float]]:
        """Each row of the call's loss at every excited step, in step order."""
        run, self.run = self.run, None
        return [] if run is None else run["loss"]
