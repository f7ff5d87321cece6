"""Where a Stable Diffusion UNet's attention layers sit, from its config alone.

The rule that names capture levels, shared by the attention capture (``stages/attention.py``, on a
loaded UNet) and the pre-flight checks (``pipeline/preflight.py``, on ``unet/config.json``):
level 0 is the latent resolution, level i is i halvings below it, and a capture resolution names
the level whose grid has that size at the model's native square latent size
(``config.sample_size``): [16, 32] for SD 1.x at 512², [16, 8] for the bundled tiny model.

Must not: import torch or diffusers (pre-flight reads configs without loading any weights).
"""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

#: self-attention probabilities are N×N per head: refuse levels above 48×48 (64² would need
#: 512 MB per image per layer for SD's 8 heads)
MAX_SELF_ATTENTION_TOKENS = 48 * 48

_CROSS_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_CROSS_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_CROSS_MID = {"UNetMidBlock2DCrossAttn": True, None: False}

#: diffusers' UNet2DConditionModel defaults for the keys read here (a config.json may omit them)
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
}


def unet_config(data: dict) -> SimpleNamespace:
    """The layout keys of a parsed ``unet/config.json``, with diffusers' defaults where absent."""
    return SimpleNamespace(**{key: data.get(key, default) for key, default in UNET_DEFAULTS.items()})


def _per_block(value: Any, n: int, field: str) -> list[int]:
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n or not all(isinstance(v, int) for v in values):
        raise ValueError(f"unsupported UNet config {field}={value!r} (expected an int or {n} ints)")
    return values


def _block_has_cross(table: dict, block_type: str | None, where: str) -> bool:
    if block_type not in table:
        raise ValueError(f"unsupported UNet {where} block {block_type!r} (supported: {sorted(map(str, table))})")
    return table[block_type]


def expected_layers(config: Any) -> Counter:
    """Attention layers a Stable Diffusion UNet config implies, counted per ("attn1"|"attn2", level).

    Level 0 is the latent resolution, level i is i halvings below it.
    """
    n = len(config.down_block_types)
    layers = _per_block(config.layers_per_block, n, "layers_per_block")
    transformers = _per_block(config.transformer_layers_per_block, n, "transformer_layers_per_block")
    up_transformers = (list(reversed(transformers)) if config.reverse_transformer_layers_per_block is None
                       else _per_block(config.reverse_transformer_layers_per_block, n,
                                       "reverse_transformer_layers_per_block"))
    counts: Counter = Counter()

    def add(level: int, blocks: int) -> None:
        counts[("attn1", level)] += blocks
        counts[("attn2", level)] += blocks

    for i, block in enumerate(config.down_block_types):
        if _block_has_cross(_CROSS_DOWN, block, "down"):
            add(i, layers[i] * transformers[i])
    if _block_has_cross(_CROSS_MID, config.mid_block_type, "mid"):
        add(n - 1, transformers[-1])
    for j, block in enumerate(config.up_block_types):
        if _block_has_cross(_CROSS_UP, block, "up"):
            add(n - 1 - j, (layers[n - 1 - j] + 1) * up_transformers[j])
    return counts


def level_grid(height: int, width: int, level: int) -> tuple[int, int]:
    """Grid shape of a UNet level: ceil-halve the latent shape ``level`` times (as stride-2 convs do)."""
    for _ in range(level):
        height, width = (height + 1) // 2, (width + 1) // 2
    return height, width


def native_grids(config: Any) -> dict[int, int]:
    """{level: grid size} at the UNet's native square latent size ``config.sample_size``."""
    size = config.sample_size
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"unsupported UNet config sample_size={size!r} (capture resolutions are named by the "
                         "grid sizes at this native latent size)")
    return {level: level_grid(size, size, level)[0] for level in range(len(config.down_block_types))}


def capture_level(kind: str, resolution: int, config: Any, expected: Counter | None = None) -> int:
    """The level of ``kind`` ("attn1" self-, "attn2" cross-attention) layers that ``resolution`` names:
    the level whose native grid size is ``resolution`` and that has such layers; ValueError listing the
    resolutions the UNet has otherwise."""
    expected = expected_layers(config) if expected is None else expected
    native = native_grids(config)
    for level, size in native.items():
        if size == resolution and expected[(kind, level)] > 0:
            return level
    available = {native[level]: n for (k, level), n in sorted(expected.items()) if k == kind}
    raise ValueError(f"no {kind} layers at resolution {resolution}; this UNet has {available} "
                     f"(grid size: layer count, at its native sample_size {config.sample_size})")
