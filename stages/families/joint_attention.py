"""Joint-attention capture for MM-DiT transformers (SD3 / SD3.5 and Flux), reduced on the fly to per-class maps.

An MM-DiT block attends over one joint sequence of image and text tokens. ``JointAttentionCapture``
installs a capture processor on the joint attention of the chosen blocks; the processor computes
the layer's output exactly as diffusers' own processor does (same projections, same q/k norms, same
RoPE for Flux, the fused ``scaled_dot_product_attention`` / ``dispatch_attention_fn`` call), so the
output is bitwise the same with capture on or off. From the same q/k (after RoPE) it computes the
image-query rows of softmax(QKᵀ/√d) over the WHOLE joint key set (text, T5 padding and image keys, as
the model attends), but only in the text columns that name a class: those few logits in fp32, minus
the row normaliser logsumexp_j(q·k_j/√d) over every joint key, exponentiated, meaned over heads and
added into a preallocated running sum per block (memory does not grow with steps). The (N × N+L)
probability matrix is never formed. The normaliser comes from the layer's own attention call where the
fused kernel SDPA picks returns it (``attention_with_lse``: CPU flash; CUDA flash, memory-efficient,
cuDNN), so that call gives both the layer's output (the same kernel call SDPA makes: bitwise the same)
and the normaliser, and the capture adds only the class columns. Elsewhere (the math kernel, another
diffusers attention backend on Flux) ``joint_logsumexp`` computes it in chunks of heads and keys with
fp32 accumulation (TF32 for half-precision inputs on CUDA, exact for their values): as many FLOPs as
the QKᵀ of the image rows, but never the whole score matrix at once. Self-attention refinement still
needs the image→image probabilities, one head chunk at a time (small grids only).

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

import contextlib
import functools
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..attention import token_weights
from .mmdit import MAX_AFFINITY_TOKENS, default_blocks, middle_blocks  # noqa: F401  (torch-free half)

#: the row normaliser computed without a fused kernel's logsumexp, and the refinement's image columns, are computed
#: this many bytes (fp32 scores) at a time: a chunk of heads, and of keys within a head
CHUNK_BYTES = 256 * 2**20
#: a fused kernel's logsumexp must match the chunked one within this (natural log) on its first use
LSE_TOLERANCE = 1e-3

_HALF = (torch.float16, torch.bfloat16)


def _sdpa_choice(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str:
    """The fused kernel ``F.scaled_dot_product_attention`` picks for these inputs (no mask, no dropout), by name."""
    from torch.nn.attention import SDPBackend

    try:
        return SDPBackend(torch._fused_sdp_choice(query, key, value)).name
    except (AttributeError, RuntimeError, ValueError):  # a torch without the private chooser, or a new backend
        return "UNKNOWN"


def _flash_cpu(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]


def _flash_cuda(q, k, v):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]


def _efficient_cuda(q, k, v):
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]


def _cudnn_cuda(q, k, v):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]


#: (device type, SDPA's choice) → the aten op F.scaled_dot_product_attention calls there, returning (out, logsumexp)
_LSE_OPS = {("cpu", "FLASH_ATTENTION"): _flash_cpu, ("cuda", "FLASH_ATTENTION"): _flash_cuda,
            ("cuda", "EFFICIENT_ATTENTION"): _efficient_cuda, ("cuda", "CUDNN_ATTENTION"): _cudnn_cuda}
#: (device type, dtype, choice, head dim) → whether the op's output was bitwise SDPA's and its logsumexp right
_LSE_OK: dict[tuple, bool] = {}


def attention_with_lse(query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.scaled_dot_product_attention(query, key, value)`` on (B, H, L, D) tensors, and the row normaliser of its
    softmax, logsumexp_j(q·k_j/√d) (B, H, L) float32, where the fused kernel SDPA picks returns one (CPU flash;
    CUDA flash, memory-efficient, cuDNN); None otherwise. The output is the very kernel call SDPA makes, so it is
    bitwise SDPA's: the first use of each (device, dtype, kernel, head size) checks that against SDPA itself, and
    the logsumexp against ``joint_logsumexp``, and falls back to SDPA without a normaliser if either differs."""
    choice = _sdpa_choice(query, key, value)
    op = _LSE_OPS.get((query.device.type, choice))
    dim = query.shape[-1]
    signature = (query.device.type, query.dtype, choice, dim)
    if op is None or _LSE_OK.get(signature) is False or (query.is_cuda and dim % 8):  # SDPA pads odd head sizes
        return F.scaled_dot_product_attention(query, key, value), None
    out, lse = op(query, key, value)
    lse = (lse.squeeze(-1) if lse.dim() == 4 else lse)[..., :query.shape[-2]].float()  # mem-efficient pads rows
    if signature not in _LSE_OK:
        reference = F.scaled_dot_product_attention(query, key, value)
        ok = (out.shape == reference.shape and torch.equal(out, reference) and lse.shape == query.shape[:-1]
              and bool((lse - joint_logsumexp(query, key)).abs().max() <= LSE_TOLERANCE))
        _LSE_OK[signature] = ok
        if not ok:
            warnings.warn(f"joint-attention capture: {choice} on {query.device.type} {query.dtype} does not give "
                          "SDPA's output and logsumexp: computing the row normaliser separately", stacklevel=2)
            return reference, None
    return out, lse


@contextlib.contextmanager
def _tf32_for(dtype: torch.dtype, device: torch.device):
    """TF32 matmuls inside, on CUDA for half-precision inputs only: their values are exact in TF32, and products
    accumulate in fp32, so the fp32 scores lose nothing; fp32 inputs keep full fp32 matmuls."""
    matmul = torch.backends.cuda.matmul
    try:
        before = matmul.allow_tf32 if device.type == "cuda" and dtype in _HALF else None
    except (AttributeError, RuntimeError):
        before = None
    if before is None:
        yield
        return
    matmul.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32 = before


def _scores(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """query·keyᵀ·scale in fp32, (B, h, N, D) × (B, h, M, D) → (B, h, N, M), from inputs of any float dtype."""
    with _tf32_for(query.dtype, query.device):
        return torch.matmul(query.float() * scale, key.float().transpose(-1, -2))


#: devices with an fp32-output batched matmul on half-precision inputs (``aten::baddbmm.dtype``; not the CPU)
_FP32_OUT_DEVICES = ("cuda",)
#: dtype → whether that matmul ran and agreed with the fp32 path on its first use
_FP32_OUT_OK: dict[torch.dtype, bool] = {}


def _baddbmm_fp32_out(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, out: torch.Tensor) -> None:
    torch.ops.aten.baddbmm.dtype_out(bias, a, b, torch.float32, alpha=alpha, out=out)


def _class_log_probs_fp32(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    batch, heads, n, dim = query.shape
    return torch.baddbmm(-lse.reshape(batch * heads, 1, n), key.float().reshape(batch * heads, -1, dim),
                         query.float().reshape(batch * heads, n, dim).transpose(-1, -2),
                         alpha=scale).view(batch, heads, -1, n)


def _class_log_probs(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """log softmax at a few keys: key·queryᵀ·scale − lse in fp32, (B, H, N, D) image queries × (B, H, M, D) keys,
    lse (B, H, N) → (B, H, M, N). On CUDA with half-precision inputs one fp32-output matmul per image reads the
    queries as they are (no fp32 copy) and writes the result once; elsewhere via fp32 copies."""
    if query.device.type in _FP32_OUT_DEVICES and query.dtype in _HALF and _FP32_OUT_OK.get(query.dtype, True):
        out = torch.empty(*key.shape[:3], query.shape[2], dtype=torch.float32, device=query.device)
        try:
            for q, k, row, o in zip(query, key, lse, out):
                _baddbmm_fp32_out((-row[:, None, :]).expand(o.shape), k, q.transpose(-1, -2), scale, o)
        except RuntimeError:  # no such matmul for this device / dtype
            _FP32_OUT_OK[query.dtype] = False
        else:
            if query.dtype not in _FP32_OUT_OK:  # first use: the same numbers as the fp32 path
                reference = _class_log_probs_fp32(query, key, lse, scale)
                _FP32_OUT_OK[query.dtype] = bool((out - reference).abs().max() <= 1e-4 * (1 + reference.abs().max()))
            if _FP32_OUT_OK[query.dtype]:
                return out
    return _class_log_probs_fp32(query, key, lse, scale)


def joint_logsumexp(query: torch.Tensor, key: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """logsumexp_j(q·k_j/√d) over every key, (B, H, N, D) × (B, H, S, D) → (B, H, N) float32, without the whole
    (N × S) score matrix: chunks of heads and keys of at most ``chunk_bytes`` fp32 scores each, combined exactly
    (running max and sum). Inputs of any float dtype; products accumulate in fp32 (TF32 for half inputs on CUDA)."""
    batch, heads, n, dim = query.shape
    seq = key.shape[2]
    scale = 1.0 / math.sqrt(dim)
    row = 4 * batch * n  # bytes of one key column of one head's scores
    h_chunk = max(1, min(heads, chunk_bytes // max(1, row * seq)))
    k_chunk = max(1, min(seq, chunk_bytes // max(1, row * h_chunk)))
    out = torch.empty(batch, heads, n, dtype=torch.float32, device=query.device)
    with _tf32_for(query.dtype, query.device):
        for h in range(0, heads, h_chunk):
            q = query[:, h:h + h_chunk].float() * scale
            top = total = None
            for j in range(0, seq, k_chunk):
                s = torch.matmul(q, key[:, h:h + h_chunk, j:j + k_chunk].float().transpose(-1, -2))
                m = s.amax(dim=-1)
                if top is None:
                    top, total = m, s.sub_(m[..., None]).exp_().sum(dim=-1)
                else:
                    new = torch.maximum(top, m)
                    total = total * (top - new).exp() + s.sub_(new[..., None]).exp_().sum(dim=-1)
                    top = new
            out[:, h:h + h_chunk] = top + total.log()
    return out

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
        if self.capture.recording():
            hidden_states, lse = attention_with_lse(query, key, value)
            self.capture.record(self.block, query[:, :, :n_image], key, image_start=0, text_start=n_image,
                                text_length=key.shape[2] - n_image, lse=None if lse is None else lse[:, :, :n_image])
        else:
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

    def _native(self) -> bool:
        """Whether ``dispatch_attention_fn`` would run diffusers' native backend (plain SDPA) on one device."""
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        if self._parallel_config is not None:
            return False
        backend = self._attention_backend
        name = (_AttentionBackendRegistry.get_active_backend()[0] if backend is None
                else AttentionBackendName(backend))
        return name == AttentionBackendName.NATIVE

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
        if not self.capture.recording():
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                                  backend=self._attention_backend,
                                                  parallel_config=self._parallel_config)
        elif self._native():
            # diffusers' native backend: SDPA on (B, H, S, D) views, permuted back; here with its normaliser
            hidden_states, lse = attention_with_lse(*(t.permute(0, 2, 1, 3) for t in (query, key, value)))
            hidden_states = hidden_states.permute(0, 2, 1, 3)
        else:
            hidden_states, lse = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                                       backend=self._attention_backend,
                                                       parallel_config=self._parallel_config), None
        if self.capture.recording():
            # (B, S, H, D) → (B, H, S, D) views of the q/k the attention call got
            self.capture.record(self.block, query[:, text_length:].transpose(1, 2), key.transpose(1, 2),
                                image_start=text_length, text_start=0, text_length=text_length,
                                lse=None if lse is None else lse[:, :, text_length:])
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

    @torch.compiler.disable  # model.compile: read eagerly, not guarded on (a graph break, no recompiles per step)
    def recording(self) -> bool:
        """Whether the current transformer call is captured: inside the step window, and the step's first call."""
        run = self._require_run()
        return run["step"] in run["window"] and run["call"] <= 1

    @torch.compiler.disable  # model.compile: the bookkeeping stays eager (a graph break), the blocks compile
    @torch.no_grad()
    def record(self, block: int, query: torch.Tensor, key: torch.Tensor, image_start: int, text_start: int,
               text_length: int, lse: torch.Tensor | None = None) -> None:
        """Add one layer call: ``query`` (B', H, N, D) the image queries, ``key`` (B', H, S, D) every joint key;
        the text keys are ``key[:, :, text_start:text_start + text_length]``, the image keys start at
        ``image_start``. ``lse`` (B', H, N): the image rows' logsumexp of the scaled scores over all S keys, from
        the attention call (``attention_with_lse``); None: computed here (``joint_logsumexp``)."""
        run = self._require_run()
        if not self.recording():
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
        heads, dim = query.shape[1], query.shape[3]
        scale = 1.0 / math.sqrt(dim)  # scaled_dot_product_attention's default
        lse = joint_logsumexp(query, key, self.chunk_bytes) if lse is None else lse[-batch:].float()
        # the class tokens' keys only: (B, H, slots, D)
        index = (run["positions"] + text_start)[:, None, :, None].expand(-1, heads, -1, dim)
        log_probs = _class_log_probs(query, key.gather(2, index), lse, scale)  # (B, H, slots, N)
        run["sums"][block] += log_probs.exp_().sum(dim=1)
        affinity = run["affinity"]
        if affinity is not None:  # the image→image probabilities, a chunk of heads at a time
            chunk = max(1, min(heads, self.chunk_bytes // max(1, 4 * batch * n * n)))
            for h in range(0, heads, chunk):
                scores = _scores(query[:, h:h + chunk], key[:, h:h + chunk, image_start:image_start + n], scale)
                affinity += scores.sub_(lse[:, h:h + chunk, :, None]).exp_().sum(dim=1)
        # mean over heads, accumulated per call
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
