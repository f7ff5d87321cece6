"""Joint-attention capture for MM-DiT transformers (SD3 / SD3.5 and Flux), reduced on the fly to per-class maps.

An MM-DiT block attends over one joint sequence of image and text tokens. ``JointAttentionCapture``
installs a capture processor on the joint attention of the chosen blocks; the processor computes
the layer's output exactly as diffusers' own processor does (same projections, same q/k norms, same
RoPE for Flux, the fused ``scaled_dot_product_attention`` / ``dispatch_attention_fn`` call), so the
output is bitwise the same with capture on or off. From the same q/k (after RoPE) it computes, in
fp32 and per chunk of heads, the image-query rows of softmax(QKᵀ/√d) over the WHOLE joint key set
(text, T5 padding and image keys, as the model attends), keeps only the text columns that name a
class, means over heads and adds into a preallocated running sum per block: memory does not grow with
steps, and the (N × N+L) probability matrix exists only one head chunk at a time.

Joint sequence layouts (diffusers 0.42):

* SD3 / SD3.5 ``SD3Transformer2DModel``: ``transformer_blocks.{i}.attn`` (``JointAttnProcessor2_0``),
  image tokens first, then the text tokens (77 CLIP-L+G tokens, then the T5 tokens). SD3.5's extra
  image-only ``attn2`` (dual attention) has no text keys and keeps its processor.
* Flux ``FluxTransformer2DModel``: text tokens (T5) first, then image tokens, RoPE on q and k.
  Double-stream ``transformer_blocks.{i}.attn`` get image and text streams separately and concatenate
  ``[text, image]``; single-stream ``single_transformer_blocks.{j}.attn`` get the concatenated sequence
  (the text length is the sequence minus the image tokens).

Blocks are named by index: SD3 ``transformer_blocks`` 0..n-1; Flux the double-stream blocks 0..n-1,
then the single-stream blocks n..n+m-1. ``default_blocks`` picks the middle blocks per family.

One pipeline call::

    capture.begin(token_index, num_classes, grid_hw, num_steps, text_length)
    pipe(..., callback_on_step_end=capture.on_step_end)
    maps = capture.finish()   # {"attn_raw": (B,K,h,w), "attn": (B,K,h,w)} float32 on the token grid

``token_index[b][k]`` lists the positions, in the joint TEXT segment (0..text_length-1), of the tokens
naming class k of image b: the family maps each tokenizer's positions there (SD3: CLIP position p → p,
T5 position q → 77 + q; Flux: the T5 position). Only the conditional transformer call of a step is
captured: the second half of a CFG batch (SD3: one call on [uncond, cond]), or the first transformer
call of the step (Flux's true CFG calls the transformer twice per step, the conditional one first).
"""
from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..attention import token_weights
from .mmdit import MAX_AFFINITY_TOKENS, default_blocks, middle_blocks  # noqa: F401  (torch-free half)

#: image-query × joint-key probabilities are computed this many bytes (fp32) at a time, a chunk of heads each
CHUNK_BYTES = 256 * 2**20

SD3_CLASSES = ("SD3Transformer2DModel",)
FLUX_CLASSES = ("FluxTransformer2DModel",)


def layout_of(transformer) -> str:
    """"sd3" or "flux" from the transformer's class (or one of its bases)."""
    names = {cls.__name__ for cls in type(transformer).__mro__}
    if names & set(SD3_CLASSES):
        return "sd3"
    if names & set(FLUX_CLASSES):
        return "flux"
    raise ValueError(f"joint-attention capture supports {SD3_CLASSES + FLUX_CLASSES}, not {type(transformer).__name__}")


def block_names(transformer) -> list[str]:
    """The processor name of each capturable block's joint attention, in block-index order."""
    cfg = transformer.config
    names = [f"transformer_blocks.{i}.attn.processor" for i in range(cfg.num_layers)]
    if layout_of(transformer) == "flux":
        names += [f"single_transformer_blocks.{j}.attn.processor" for j in range(cfg.num_single_layers)]
    return names


def token_grid(transformer, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The image-token grid of a latent of ``latent_hw`` (VAE grid): both families patchify by 2."""
    h, w = latent_hw
    patch = 2 if layout_of(transformer) == "flux" else int(transformer.config.patch_size)
    if h % patch or w % patch:
        raise ValueError(f"latent {h}×{w} is not a multiple of the transformer's patch size {patch}")
    return h // patch, w // patch


@dataclass(frozen=True)
class JointCaptureConfig:
    """Which blocks (None: the family default), optional self-attention refinement, the step window."""

    blocks: tuple[int, ...] | None = None
    refine_power: int = 0  # τ in attn = A^τ · attn_raw, A = the image→image block of the same layers' attention
    step_window: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if self.blocks is not None and (not self.blocks or any(int(b) != b or b < 0 for b in self.blocks)):
            raise ValueError(f"capture blocks must be a non-empty list of block indices >= 0, got {self.blocks}")
        start, end = self.step_window
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"step_window {self.step_window} must satisfy 0 <= start < end <= 1")
        if self.refine_power < 0:
            raise ValueError(f"refine_power must be >= 0, got {self.refine_power}")

    def captured_steps(self, num_steps: int) -> range:
        """The step indices inside the window: start·n <= i < end·n."""
        lo, hi = math.ceil(self.step_window[0] * num_steps), math.ceil(self.step_window[1] * num_steps)
        if hi <= lo:
            raise ValueError(f"step_window {self.step_window} contains none of {num_steps} steps")
        return range(lo, hi)


class SD3CaptureProcessor:
    """``JointAttnProcessor2_0``'s computation (image tokens first) plus the capture of the joint q/k."""

    def __init__(self, capture: "JointAttentionCapture", block: int):
        self.capture, self.block = capture, block

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs) -> Any:
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is None:
            raise RuntimeError(f"block {self.block}: joint attention called without text tokens")
        shape = (batch_size, -1, attn.heads, head_dim)
        context_query = attn.add_q_proj(encoder_hidden_states).view(*shape).transpose(1, 2)
        context_key = attn.add_k_proj(encoder_hidden_states).view(*shape).transpose(1, 2)
        context_value = attn.add_v_proj(encoder_hidden_states).view(*shape).transpose(1, 2)
        if attn.norm_added_q is not None:
            context_query = attn.norm_added_q(context_query)
        if attn.norm_added_k is not None:
            context_key = attn.norm_added_k(context_key)
        query = torch.cat([query, context_query], dim=2)
        key = torch.cat([key, context_key], dim=2)
        value = torch.cat([value, context_value], dim=2)

        n_image = residual.shape[1]
        self.capture.record(self.block, query[:, :, :n_image], key, image_start=0,
                            text_start=n_image, text_length=key.shape[2] - n_image)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states, encoder_hidden_states = hidden_states[:, :n_image], hidden_states[:, n_image:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


def _flux_projections(attn, hidden_states, encoder_hidden_states):
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    return _get_qkv_projections(attn, hidden_states, encoder_hidden_states)


class FluxCaptureProcessor:
    """``FluxAttnProcessor``'s computation (text tokens first, RoPE on q/k, ``dispatch_attention_fn``)
    plus the capture of the joint q/k after RoPE. ``single``: a single-stream block (one sequence)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, capture: "JointAttentionCapture", block: int, single: bool, original: Any = None):
        self.capture, self.block, self.single = capture, block, single
        # keep the backend the layer was set to (set_attention_backend stores it on the processor)
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> Any:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        query, key, value, encoder_query, encoder_key, encoder_value = _flux_projections(
            attn, hidden_states, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if self.single:
            text_length = self.capture.text_length_of(query.shape[1], self.block)
        elif encoder_hidden_states is None:
            raise RuntimeError(f"block {self.block}: double-stream joint attention called without text tokens")
        else:
            text_length = encoder_hidden_states.shape[1]
        if attention_mask is not None:
            raise NotImplementedError("joint-attention capture does not support attention masks")
        # (B, S, H, D) → (B, H, S, D) views: the capture reads them, the attention call below gets the originals
        self.capture.record(self.block, query[:, text_length:].transpose(1, 2), key.transpose(1, 2),
                            image_start=text_length, text_start=0, text_length=text_length)

        hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                              backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def _max_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


class JointAttentionCapture:
    """Installs capture processors on an MM-DiT transformer and turns one pipeline call into per-class maps."""

    def __init__(self, transformer, config: JointCaptureConfig, chunk_bytes: int = CHUNK_BYTES):
        self.transformer, self.config, self.chunk_bytes = transformer, config, chunk_bytes
        self.layout = layout_of(transformer)
        cfg = transformer.config
        names = block_names(transformer)
        self.num_blocks = len(names)
        self._original = transformer.attn_processors
        if any(isinstance(p, (SD3CaptureProcessor, FluxCaptureProcessor)) for p in self._original.values()):
            raise RuntimeError("this transformer already has a joint-attention capture installed: remove() it first")
        missing = [n for n in names if n not in self._original]
        if missing:
            raise RuntimeError(f"attention processors {missing[:3]} not found in {type(transformer).__name__}: "
                               "diffusers' module layout changed?")
        blocks = config.blocks if config.blocks is not None else default_blocks(
            self.layout, cfg.num_layers, getattr(cfg, "num_single_layers", 0))
        bad = [b for b in blocks if b >= self.num_blocks]
        if bad:
            raise ValueError(f"capture blocks {bad} out of range: this {type(transformer).__name__} has "
                             f"{self.num_blocks} joint-attention blocks (0..{self.num_blocks - 1})")
        self.blocks = tuple(sorted(set(int(b) for b in blocks)))
        processors = dict(self._original)
        for b in self.blocks:
            name = names[b]
            if self.layout == "sd3":
                processors[name] = SD3CaptureProcessor(self, b)
            else:
                processors[name] = FluxCaptureProcessor(self, b, single=name.startswith("single_"),
                                                        original=self._original[name])
        transformer.set_attn_processor(processors)
        self._hook = transformer.register_forward_pre_hook(self._on_forward)
        self._run: dict[str, Any] | None = None

    @property
    def layer_counts(self) -> dict[str, Any]:
        """The hooked blocks, for the record's ``gen`` JSON and the manifest."""
        return {"joint": {"blocks": list(self.blocks), "of": self.num_blocks}}

    def remove(self) -> None:
        """Restore the processors the transformer had before and drop the call counter."""
        self.transformer.set_attn_processor(dict(self._original))
        self._hook.remove()

    def begin(self, token_index: Sequence[Sequence[Sequence[int]]], num_classes: int,
              grid_hw: tuple[int, int], num_steps: int, text_length: int) -> None:
        """Allocate the running sums for one pipeline call over ``len(token_index)`` images on an image-token
        grid ``grid_hw`` (``token_grid``), with ``text_length`` text tokens in the joint sequence."""
        batch = len(token_index)
        device = self.transformer.device
        positions, weights = token_weights(token_index, num_classes, text_length)
        slots = positions.shape[1]
        n = math.prod(grid_hw)
        if self.config.refine_power > 0 and n > MAX_AFFINITY_TOKENS:
            raise ValueError(f"refinement needs the {grid_hw[0]}×{grid_hw[1]} image-token affinity; at most "
                             f"{MAX_AFFINITY_TOKENS} tokens: turn refine_power off or use smaller images")
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=device)
        self._run = {
            "batch": batch, "grid": tuple(grid_hw), "n_image": n, "text_length": text_length,
            "num_steps": num_steps, "window": self.config.captured_steps(num_steps), "step": 0,
            "call": 0, "calls": Counter(), "positions": positions.to(device), "weights": weights.to(device),
            "sums": {b: zeros(batch, slots, n) for b in self.blocks},
            "affinity": zeros(batch, n, n) if self.config.refine_power > 0 else None,
        }

    def _on_forward(self, module, args) -> None:
        if self._run is not None:
            self._run["call"] += 1

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` hook: the next transformer call belongs to step ``step + 1``."""
        if self._run is not None:
            self._run["step"] = step + 1
            self._run["call"] = 0
        return callback_kwargs

    def text_length_of(self, sequence: int, block: int) -> int:
        """Text tokens in a single-stream block's joint sequence of ``sequence`` tokens (the rest are image)."""
        run = self._require_run()
        length = sequence - run["n_image"]
        if length <= 0:
            raise RuntimeError(f"block {block}: joint sequence of {sequence} tokens has no room for "
                               f"{run['n_image']} image tokens")
        return length

    def _require_run(self) -> dict[str, Any]:
        if self._run is None:
            raise RuntimeError("joint-attention capture is installed but begin() was not called for this call")
        return self._run

    @torch.no_grad()
    def record(self, block: int, query: torch.Tensor, key: torch.Tensor, image_start: int, text_start: int,
               text_length: int) -> None:
        """Add one layer call: ``query`` (B', H, N, D) the image queries, ``key`` (B', H, S, D) every joint key;
        the text keys are ``key[:, :, text_start:text_start + text_length]``, the image keys start at
        ``image_start``."""
        run = self._require_run()
        if run["step"] not in run["window"] or run["call"] > 1:
            return  # outside the window, or a second (unconditional / guidance-layer) call of this step
        batch = run["batch"]
        if query.shape[0] not in (batch, 2 * batch):
            raise RuntimeError(f"transformer batch {query.shape[0]} is neither {batch} images nor their CFG pair")
        n = run["n_image"]
        if query.shape[2] != n:
            raise RuntimeError(f"block {block} saw {query.shape[2]} image tokens, expected {run['grid']}")
        if text_length != run["text_length"]:
            raise RuntimeError(f"block {block} saw {text_length} text tokens, begin() was told "
                               f"{run['text_length']}")
        # the conditional half is the second half of a CFG batch: [uncond, cond]
        query, key = query[-batch:], key[-batch:]
        heads, seq, dim = query.shape[1], key.shape[2], query.shape[3]
        scale = 1.0 / math.sqrt(dim)  # scaled_dot_product_attention's default
        index = (run["positions"] + text_start)[:, None, None, :]
        chunk = max(1, min(heads, self.chunk_bytes // max(1, 4 * batch * n * seq)))
        total = run["sums"][block]
        affinity = run["affinity"]
        for h in range(0, heads, chunk):
            q, k = query[:, h:h + chunk].float(), key[:, h:h + chunk].float()
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, h, N, S)
            lse = scores.logsumexp(dim=-1, keepdim=True)
            cols = scores.gather(-1, index.expand(-1, scores.shape[1], n, -1))  # (B, h, N, slots)
            total += (cols - lse).exp().sum(dim=1).transpose(1, 2)
            if affinity is not None:
                affinity += (scores[..., image_start:image_start + n] - lse).exp().sum(dim=1)
        # mean over heads, accumulated per head chunk
        run["calls"][block] += 1
        run["heads"] = heads

    @torch.no_grad()
    def finish(self) -> dict[str, torch.Tensor]:
        """Per-class maps on the image-token grid: ``attn_raw`` and ``attn`` (refined, or = raw).

        Per block: mean over heads·steps, class = mean of its tokens, clamp ≥ 0; mean over blocks; divide by
        the max. Refinement propagates the raw maps τ times with the image→image block of the captured
        attention (mean over blocks·heads·steps, rows renormalised to sum 1).
        """
        run, self._run = self._run, None
        if run is None:
            raise RuntimeError("finish() without begin()")
        if run["step"] != run["num_steps"]:
            raise RuntimeError(f"saw {run['step']} of {run['num_steps']} step-end callbacks: pass "
                               "callback_on_step_end=capture.on_step_end to the pipeline")
        steps = len(run["window"])
        for b in self.blocks:
            if run["calls"][b] != steps:
                raise RuntimeError(f"joint capture at block {b} ran {run['calls'][b]} times, expected once in each "
                                   f"of {steps} steps: were the transformer's attention processors replaced?")
        batch, grid, weights, heads = run["batch"], run["grid"], run["weights"], run["heads"]
        tokens = torch.stack([run["sums"][b] for b in self.blocks]).mean(dim=0) / (heads * steps)
        raw = _max_normalise(torch.bmm(weights, tokens).clamp_min(0).view(batch, -1, *grid))
        refined = raw
        if run["affinity"] is not None:
            affinity = run["affinity"]
            affinity = affinity / affinity.sum(dim=-1, keepdim=True).clamp_min(1e-12)
            maps = raw.flatten(2).transpose(1, 2)  # (B, N, K)
            for _ in range(self.config.refine_power):
                maps = torch.bmm(affinity, maps)
            refined = _max_normalise(maps.transpose(1, 2).reshape(batch, -1, *grid).clamp_min(0))
        return {"attn_raw": raw, "attn": refined}
