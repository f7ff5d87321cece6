"""Token grounding loss for training the bundled model (TokenCompose, Wang et al., CVPR 2024).

Trained on denoising alone, the tiny model learned to draw some classes through *inverted*
cross-attention: its "triangle" and "star" tokens attended to the background, not the object
(measured: 0.2 mean normalised attention inside the object vs 0.7 outside). Real Stable Diffusion's
noun tokens attend to their objects (DAAM); the miniature should too. TokenCompose adds, for every
grounded token, ``(1 - attention mass inside the token's object / total attention mass)²`` averaged
over the cross-attention layers, using the training images' object masks, which the shapes world
knows exactly. Only the training script uses this module; inference keeps diffusers' own processors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ProbabilityProcessor:
    """Cross-attention that keeps its (head-averaged) probabilities for the loss; same output as SDPA."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is None or attention_mask is not None or hidden_states.ndim != 3:
            raise RuntimeError("ProbabilityProcessor handles plain cross-attention on (B, N, C) inputs only")
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        h = attn.heads
        d = k.shape[-1] // h
        q, k, v = (x.view(b, -1, h, d).transpose(1, 2) for x in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # B, heads, N, T
        out = (probs @ v).transpose(1, 2).reshape(b, n, h * d)
        self.store.append(probs.mean(1))  # B, N, T
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def install(unet) -> list:
    """Put ProbabilityProcessor on every cross-attention layer (attn2); return the list it fills."""
    store: list = []
    procs = {}
    for name, proc in unet.attn_processors.items():
        procs[name] = ProbabilityProcessor(store) if name.endswith("attn2.processor") else proc
    unet.set_attn_processor(procs)
    return store


def _layer_columns(store: list, positions: torch.Tensor, masks: torch.Tensor, height: int, width: int):
    """Per captured layer: (the grounded tokens' attention columns, their objects' coverage), both (B, N, K)."""
    idx = positions.clamp(min=0)
    for probs in store:
        n = probs.shape[1]
        scale = int(round((height * width / n) ** 0.5))
        if (height // scale) * (width // scale) != n:
            raise RuntimeError(f"attention over {n} positions does not match a {height}×{width} latent")
        cols = torch.gather(probs, 2, idx[:, None, :].expand(-1, n, -1))
        m = (F.avg_pool2d(masks, scale) if scale > 1 else masks).flatten(2).transpose(1, 2)
        yield cols, m


def token_loss(store: list, positions: torch.Tensor, masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """TokenCompose's token loss over every captured layer.

    ``positions`` (B, K) long: a prompt token position per grounded token, -1 for padding;
    ``masks`` (B, K, H, W) float: that token's object coverage at latent resolution ``H×W``.
    """
    valid = positions >= 0
    if not valid.any():
        return torch.zeros((), device=masks.device)
    losses = []
    for cols, m in _layer_columns(store, positions, masks, height, width):
        inside = (cols * m).sum(1) / cols.sum(1).clamp(min=1e-8)  # B, K
        losses.append(((1 - inside) ** 2)[valid])
    return torch.cat(losses).mean()


def pixel_loss(store: list, positions: torch.Tensor, masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """TokenCompose's pixel loss: binary cross-entropy of each grounded token's per-pixel attention
    probability against its object's coverage, over every captured layer (same arguments as token_loss).
    It asks the map to cover the whole object, where token_loss only asks its mass to fall inside."""
    valid = positions >= 0
    if not valid.any():
        return torch.zeros((), device=masks.device)
    losses = []
    for cols, m in _layer_columns(store, positions, masks, height, width):
        bce = F.binary_cross_entropy(cols.clamp(1e-6, 1 - 1e-6), m, reduction="none").mean(1)  # B, K
        losses.append(bce[valid])
    return torch.cat(losses).mean()
