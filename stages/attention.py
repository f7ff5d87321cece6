"""Cross-attention capture for Stable Diffusion UNets, reduced on the fly to per-class maps.

``AttentionCapture(unet, config)`` installs ``CaptureProcessor`` (by processor name) on the
``attn2`` layers of the chosen UNet levels, and on the ``attn1`` layers of one level when
self-attention refinement is on; every other layer keeps its processor. Each capture layer still
computes its output with ``F.scaled_dot_product_attention`` (as diffusers' ``AttnProcessor2_0``)
and additionally, inside the step window, computes softmax(QKᵀ·scale) in fp32 on the conditional
half of the CFG batch (whole batch without guidance), keeps only the prompt tokens that name a
class, means over heads and adds into a preallocated running sum per level.

One pipeline call::

    capture.begin(token_index, num_classes, latent_hw, num_steps, context_length)
    pipe(..., callback_on_step_end=capture.on_step_end)
    maps = capture.finish()   # {"attn_raw": (B,K,h,w), "attn": (B,K,h,w)} float32, latent grid

Resolutions name UNet levels as ``stages/unet_layout.py`` rules (config only, no torch; the pre-flight
checks share it): an integer is the grid's shorter side, a string "1/2**i" a fraction of the latent
side, both at ``latent_hw`` (the job's latent size; the synthesis stage passes it) or, without one,
at the UNet's native square latent size (``unet.config.sample_size``). Other image sizes capture
the resolved levels at their actual shapes, computed from the latent shape by ceil-halving.
"""
from __future__ import annotations

import functools
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .unet_layout import (MAX_SELF_ATTENTION_TOKENS, capture_level, expected_layers, level_grid,  # noqa: F401
                          native_grids)

_NAME = re.compile(r"^(?:down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))"
                   r"\.attentions\.\d+\.transformer_blocks\.\d+\.(attn[12])\.processor$")


@dataclass(frozen=True)
class CaptureConfig:
    """What to capture: cross-attention levels, optional self-attention refinement, step window."""

    resolutions: tuple[int | str, ...] = (16, 32)  # grid sides (16) or fractions of the latent side ("1/4")
    self_resolution: int | str | None = None  # used only when refine_power > 0
    refine_power: int = 0  # τ in attn = A^τ · attn_raw; 0 = no refinement, no self-attention
    step_window: tuple[float, float] = (0.0, 1.0)  # fraction of the denoising steps, [start, end)

    def __post_init__(self):
        if not self.resolutions:
            raise ValueError("capture needs at least one cross-attention resolution")
        start, end = self.step_window
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"step_window {self.step_window} must satisfy 0 <= start < end <= 1")
        if self.refine_power < 0:
            raise ValueError(f"refine_power must be >= 0, got {self.refine_power}")
        if self.refine_power > 0 and self.self_resolution is None:
            raise ValueError("refine_power > 0 needs a self_attention_resolution")

    def captured_steps(self, num_steps: int) -> range:
        """The step indices inside the window: start·n <= i < end·n."""
        lo, hi = math.ceil(self.step_window[0] * num_steps), math.ceil(self.step_window[1] * num_steps)
        if hi <= lo:
            raise ValueError(f"step_window {self.step_window} contains none of {num_steps} steps")
        return range(lo, hi)


def layer_of(name: str, n_levels: int) -> tuple[str, int]:
    """("attn1"|"attn2", level) of an attention processor name from ``unet.attn_processors``."""
    m = _NAME.match(name)
    if m is None:
        raise RuntimeError(f"unrecognised attention processor {name!r}: the UNet's module layout is not the "
                           "Stable Diffusion one this capture knows (diffusers changed?)")
    down, up, kind = m.groups()
    level = int(down) if down is not None else n_levels - 1 - int(up) if up is not None else n_levels - 1
    return kind, level


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B,K,h,w) → (B,K,*size): bicubic when upsampling, area averaging when downsampling."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if size[0] >= h and size[1] >= w:
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp_min(0)
    return F.interpolate(x, size=size, mode="area")


def _max_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


#: a map whose range (max - min) is below this fraction of its max is min-max stretched to [0, 1] in float32
#: before it travels as float16: fp16 keeps 11 bits relative to the max, so every map keeps at least 8 bits
#: (256 steps) of its own range, and a low-contrast map cannot collapse to one or two fp16 values
NARROW_RANGE = 1 / 8


def fp16_safe(x: torch.Tensor) -> torch.Tensor:
    """``x`` (..., h, w) float32 with every narrow map (range < NARROW_RANGE x max) min-max stretched to [0, 1].

    The mask stage min-max normalises each map anyway (stages/masks.py), so a stretched map gives the same
    mask while its float16 copy keeps its shape; maps with a wide range pass bit for bit (all maps of the
    bundled model's jobs), flat and all-zero (padding) maps too."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    narrow = (span < NARROW_RANGE * hi) & (span > 0)
    if not bool(narrow.any()):
        return x
    return torch.where(narrow, (x - lo) / span.clamp_min(torch.finfo(torch.float32).tiny), x)


def token_weights(token_index: Sequence[Sequence[Sequence[int]]], num_classes: int,
                  length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (B, S) long, weights (B, K, S)): the token positions naming each class of each image, packed
    into S slots, and per class the weight 1/len(group) on its own slots (a class map = mean of its tokens).
    ``token_index[b][k]`` lists the positions (in a text of ``length`` tokens) naming class k of image b."""
    batch = len(token_index)
    slots = max(1, max(sum(len(g) for g in groups) for groups in token_index))
    positions = torch.zeros(batch, slots, dtype=torch.long)
    weights = torch.zeros(batch, num_classes, slots)
    for b, groups in enumerate(token_index):
        if len(groups) > num_classes:
            raise ValueError(f"image {b} names {len(groups)} classes, more than {num_classes}")
        t = 0
        for k, group in enumerate(groups):
            if not group or not all(0 <= p < length for p in group):
                raise ValueError(f"image {b} class {k}: token positions {list(group)} must be a non-empty "
                                 f"list within [0, {length})")
            positions[b, t:t + len(group)] = torch.tensor(list(group))
            weights[b, k, t:t + len(group)] = 1.0 / len(group)
            t += len(group)
    return positions, weights


class CaptureProcessor:
    """``AttnProcessor2_0``'s computation (SDPA output) plus an fp32 probability capture."""

    def __init__(self, capture: "AttentionCapture", kind: str, level: int):
        self.capture, self.kind, self.level = capture, kind, level

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        if hidden_states.ndim != 3:
            raise RuntimeError(f"capture expects (B, N, C) hidden states in transformer blocks, "
                               f"got {tuple(hidden_states.shape)}")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        self.capture.record(self.kind, self.level, query, key, attn.scale, attention_mask)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AttentionCapture:
    """Installs capture processors on a UNet and turns one pipeline call into per-class maps."""

    def __init__(self, unet, config: CaptureConfig, latent_hw: tuple[int, int] | None = None):
        self.unet, self.config = unet, config
        cfg = unet.config
        n_levels = len(cfg.down_block_types)
        self._original = unet.attn_processors
        if any(isinstance(p, CaptureProcessor) for p in self._original.values()):
            raise RuntimeError("this UNet already has an attention capture installed: remove() it first")
        found = Counter(layer_of(name, n_levels) for name in self._original)
        self.expected = expected_layers(cfg)
        if found != self.expected:
            raise RuntimeError(f"UNet attention layers {dict(sorted(found.items()))} differ from what its config "
                               f"implies {dict(sorted(self.expected.items()))}: diffusers' layout changed?")
        self.latent_hw = None if latent_hw is None else tuple(latent_hw)
        native = native_grids(cfg)
        self.native = native
        names: dict[int, str] = {}
        for r in config.resolutions:
            names.setdefault(capture_level("attn2", r, cfg, self.expected, self.latent_hw), str(r))
        self.cross_levels = sorted(names)
        self.names = names
        self.self_level = (capture_level("attn1", config.self_resolution, cfg, self.expected, self.latent_hw)
                           if config.refine_power > 0 else None)
        if self.self_level is not None:
            h, w = (level_grid(*self.latent_hw, self.self_level) if self.latent_hw is not None
                    else 2 * (native[self.self_level],))
            if h * w > MAX_SELF_ATTENTION_TOKENS:
                raise ValueError(f"self-attention at {h}×{w} is too large to capture "
                                 f"(at most {MAX_SELF_ATTENTION_TOKENS} tokens); pick a coarser level")
        captured = {("attn2", level) for level in self.cross_levels}
        if self.self_level is not None:
            captured.add(("attn1", self.self_level))
        processors = dict(self._original)
        for name in processors:
            kind, level = layer_of(name, n_levels)
            if (kind, level) in captured:
                processors[name] = CaptureProcessor(self, kind, level)
        unet.set_attn_processor(processors)
        self._run: dict[str, Any] | None = None
        #: True when some window steps may skip a level (generation.cache_interval reuses the deep blocks'
        #: outputs): each level is then averaged over the steps it ran, not over the whole window
        self.partial_steps = False

    @property
    def layer_counts(self) -> dict[str, dict[str, int]]:
        """Hooked layers per level, keyed by the level's name in the config, for the record's ``gen`` JSON."""
        counts = {"cross": {self.names[lv]: self.expected[("attn2", lv)] for lv in self.cross_levels}}
        if self.self_level is not None:
            counts["self"] = {str(self.config.self_resolution): self.expected[("attn1", self.self_level)]}
        return counts

    def grids(self, latent_hw: tuple[int, int]) -> dict[str, dict[str, list[int]]]:
        """The actual [h, w] map grid of each captured level at ``latent_hw``, keyed as ``layer_counts``."""
        out = {"cross": {self.names[lv]: list(level_grid(*latent_hw, lv)) for lv in self.cross_levels}}
        if self.self_level is not None:
            out["self"] = {str(self.config.self_resolution): list(level_grid(*latent_hw, self.self_level))}
        return out

    def remove(self) -> None:
        """Restore the processors the UNet had before."""
        self.unet.set_attn_processor(self._original)

    def begin(self, token_index: Sequence[Sequence[Sequence[int]]], num_classes: int,
              latent_hw: tuple[int, int], num_steps: int, context_length: int) -> None:
        """Allocate the running sums for one pipeline call over ``len(token_index)`` images.

        ``token_index[b][k]`` lists the prompt token positions naming class k of image b.
        """
        batch = len(token_index)
        device = self.unet.device
        positions, weights = token_weights(token_index, num_classes, context_length)
        slots = positions.shape[1]
        grids = {level: level_grid(*latent_hw, level) for level in range(len(self.native))}
        if self.self_level is not None:
            h, w = grids[self.self_level]
            if h * w > MAX_SELF_ATTENTION_TOKENS:
                raise ValueError(f"self-attention grid {h}×{w} exceeds {MAX_SELF_ATTENTION_TOKENS} tokens")
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=device)
        self._run = {
            "batch": batch, "latent_hw": tuple(latent_hw), "grids": grids, "num_steps": num_steps,
            "window": self.config.captured_steps(num_steps), "step": 0, "calls": Counter(), "ran": {},
            "positions": positions.to(device), "weights": weights.to(device),
            "cross": {lv: zeros(batch, slots, math.prod(grids[lv])) for lv in self.cross_levels},
            "self": (zeros(batch, *(2 * [math.prod(grids[self.self_level])]))
                     if self.self_level is not None else None),
        }

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` hook: the next UNet call belongs to step ``step + 1``."""
        if self._run is not None:
            self._run["step"] = step + 1
        return callback_kwargs

    @torch.compiler.disable  # model.compile: the bookkeeping stays eager (a graph break), the layers compile
    @torch.no_grad()
    def record(self, kind: str, level: int, query: torch.Tensor, key: torch.Tensor, scale: float,
               mask: torch.Tensor | None) -> None:
        run = self._run
        if run is None:
            raise RuntimeError("attention capture is installed but begin() was not called for this pipeline call")
        if run["step"] not in run["window"]:
            return
        batch = run["batch"]
        if query.shape[0] not in (batch, 2 * batch):
            raise RuntimeError(f"UNet batch {query.shape[0]} is neither {batch} images nor their CFG pair")
        if mask is not None:
            raise NotImplementedError("attention capture does not support attention masks")
        h, w = run["grids"][level]
        if query.shape[2] != h * w:
            raise RuntimeError(f"{kind} at level {level} saw {query.shape[2]} tokens, expected {h}×{w}")
        # the conditional half is the second half of a CFG batch: [uncond, cond]
        query, key = query[-batch:].float(), key[-batch:].float()
        probs = (torch.matmul(query, key.transpose(-1, -2)) * scale).softmax(dim=-1)  # (B, heads, N, L)
        if kind == "attn2":
            index = run["positions"][:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
            run["cross"][level] += probs.gather(-1, index).mean(dim=1).transpose(1, 2)  # (B, slots, N)
        else:
            run["self"] += probs.mean(dim=1)  # (B, N, N)
        run["calls"][(kind, level)] += 1
        run["ran"].setdefault((kind, level), set()).add(run["step"])

    @torch.no_grad()
    def finish(self) -> dict[str, torch.Tensor]:
        """Per-class maps on the latent grid: ``attn_raw`` (cross-attention) and ``attn`` (refined).

        Per level: mean over layers·heads·steps, class = mean of its tokens, upsample to the latent
        grid, clamp ≥ 0, divide by the max; then average the levels. Refinement propagates the
        raw maps τ times with the mean self-attention matrix (Dataset Diffusion's A^τ·c). All in
        float32; the synthesis stage stretches narrow maps (``fp16_safe``) before its float16 cast.
        """
        run, self._run = self._run, None
        if run is None:
            raise RuntimeError("finish() without begin()")
        if run["step"] != run["num_steps"]:
            raise RuntimeError(f"saw {run['step']} of {run['num_steps']} step-end callbacks: pass "
                               "callback_on_step_end=capture.on_step_end to the pipeline")
        return self._maps(run, run["window"])

    @torch.no_grad()
    def so_far(self) -> dict[str, torch.Tensor]:
        """The maps :meth:`finish` would give if the call ended now: the window's steps seen so far (all zeros
        when none was); the running sums go on (generation.early_check reads them mid-call)."""
        run = self._run
        if run is None:
            raise RuntimeError("so_far() without begin()")
        window = run["window"]
        seen = range(window.start, max(window.start, min(window.stop, run["step"])))
        if not len(seen):
            k = run["weights"].shape[1]
            zeros = torch.zeros(run["batch"], k, *run["latent_hw"], device=run["weights"].device)
            return {"attn_raw": zeros, "attn": zeros}
        return self._maps(run, seen)

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every image of the call but ``rows`` (their order) from the running sums: the pipeline goes on
        with those rows only (generation.early_check stops the others)."""
        run = self._run
        index = torch.as_tensor(list(rows), dtype=torch.long, device=run["positions"].device)
        run["batch"] = len(rows)
        run["positions"], run["weights"] = run["positions"][index], run["weights"][index]
        run["cross"] = {lv: v[index] for lv, v in run["cross"].items()}
        if run["self"] is not None:
            run["self"] = run["self"][index]

    def _maps(self, run: dict, window: range) -> dict[str, torch.Tensor]:
        steps = {}  # (kind, level) -> the window steps it ran
        for key, n in sorted(self._captured_counts().items()):
            steps[key] = len(run["ran"].get(key, ())) if self.partial_steps else len(window)
            if run["calls"][key] != n * steps[key] or not steps[key]:
                raise RuntimeError(f"{key[0]} capture at level {key[1]} ran {run['calls'][key]} times, expected "
                                   f"{n} layers × {steps[key] or len(window)} steps: were the UNet's attention "
                                   "processors replaced" + (", or did feature reuse skip it on every step of "
                                                            "masks.step_window?" if self.partial_steps else "?"))
        batch, latent_hw, weights = run["batch"], run["latent_hw"], run["weights"]
        levels = []
        for level in self.cross_levels:
            tokens = run["cross"][level] / (self.expected[("attn2", level)] * steps[("attn2", level)])
            classes = torch.bmm(weights, tokens).view(batch, -1, *run["grids"][level])
            levels.append(_max_normalise(_resize(classes, latent_hw).clamp_min(0)))
        raw = torch.stack(levels).mean(dim=0)
        refined = raw
        if self.self_level is not None:
            affinity = run["self"] / (self.expected[("attn1", self.self_level)] * steps[("attn1", self.self_level)])
            grid = run["grids"][self.self_level]
            maps = _resize(raw, grid).flatten(2).transpose(1, 2)  # (B, N, K)
            for _ in range(self.config.refine_power):
                maps = torch.bmm(affinity, maps)
            refined = _resize(maps.transpose(1, 2).reshape(batch, -1, *grid), latent_hw).clamp_min(0)
        return {"attn_raw": raw, "attn": refined}

    def _captured_counts(self) -> dict[tuple[str, int], int]:
        keys = [("attn2", level) for level in self.cross_levels]
        if self.self_level is not None:
            keys.append(("attn1", self.self_level))
        return {key: self.expected[key] for key in keys}
