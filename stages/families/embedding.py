"""Embedding-space conditioning shared by every family: slerp / lerp per token vector and seeded jitter."""
from __future__ import annotations

import torch


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation per token vector (last dim), lerp where the vectors are parallel."""
    a64, b64 = a.double(), b.double()
    cos = (a64 * b64).sum(-1, keepdim=True) / (a64.norm(dim=-1, keepdim=True) * b64.norm(dim=-1, keepdim=True))
    omega = cos.clamp(-1.0, 1.0).nan_to_num(1.0).acos()
    sin = omega.sin()
    curved = (torch.sin((1 - weight) * omega) * a64 + torch.sin(weight * omega) * b64) / sin.clamp_min(1e-12)
    return torch.where(sin > 1e-6, curved, torch.lerp(a64, b64, weight)).to(a.dtype)


def jitter(embeds: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """``embeds`` plus CPU-seeded Gaussian noise, ``sigma`` x each token vector's RMS."""
    noise = torch.randn(embeds.shape, generator=torch.Generator("cpu").manual_seed(seed)).to(embeds.device)
    rms = embeds.float().pow(2).mean(-1, keepdim=True).sqrt()
    return (embeds.float() + sigma * rms * noise).to(embeds.dtype)
