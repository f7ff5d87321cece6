"""Where a Stable Diffusion UNet's attention layers sit, from its config alone.

The rule that names capture levels, shared by the attention capture (``stages/attention.py``, on a
loaded UNet), the UNet families (``stages/families/unet.py``) and the pre-flight checks
(``pipeline/preflight.py``, on ``unet/config.json``): level 0 is the latent grid, level i is i
(ceil-)halvings below it. A job names a level in one of two ways, resolved at the job's own latent
size (image size / the VAE's factor), so one job means the same maps on every UNet model:

* an integer N: the level whose grid's shorter side is N at the job's size ("16": a 16×16 grid of a
  square image, whatever the model's native size; SD 1.5, SD 2.1-768 and SDXL all have 16 and 32 at
  512² and 1024² alike where cross-attention exists there);
* a fraction of the latent side, ``"1"``, ``"1/2"``, ``"1/4"``, ``"1/8"``: level 0, 1, 2, 3.

Without a job size (``latent_hw=None``) integers name grids at the UNet's native square latent size
(``config.sample_size``), the rule before levels were resolved per job: at the native size both agree.

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


def parse_level(value: Any) -> tuple[str, int]:
    """("abs", N) for an integer grid side, ("rel", i) for ``"1/2**i"`` (``"1"``: i = 0); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"capture level {value!r} is neither a grid side (16) nor a fraction of the latent side ('1/4')")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"capture level {value} must be a positive grid side")
        return "abs", value
    text = str(value).strip()
    if text == "1":
        return "rel", 0
    if text.isdigit():
        return parse_level(int(text))
    num, _, den = text.partition("/")
    if num == "1" and den.isdigit() and int(den) >= 1 and int(den) & (int(den) - 1) == 0:
        return "rel", int(den).bit_length() - 1
    raise ValueError(f"capture level {value!r} is neither a grid side (e.g. 16) nor a fraction of the latent side "
                     "('1', '1/2', '1/4', '1/8')")


def level_sides(config: Any, latent_hw: tuple[int, int] | None) -> dict[int, int]:
    """{level: the shorter side of its grid} at ``latent_hw`` (None: the native square ``sample_size``)."""
    if latent_hw is None:
        return native_grids(config)
    return {level: min(level_grid(*latent_hw, level)) for level in range(len(config.down_block_types))}


def capture_level(kind: str, resolution: Any, config: Any, expected: Counter | None = None,
                  latent_hw: tuple[int, int] | None = None) -> int:
    """The level of ``kind`` ("attn1" self-, "attn2" cross-attention) layers that ``resolution`` names
    (``parse_level``) at ``latent_hw`` (None: the native size); ValueError listing the grid sides the
    UNet has there otherwise."""
    expected = expected_layers(config) if expected is None else expected
    how, value = parse_level(resolution)
    sides = level_sides(config, latent_hw)
    for level, side in sides.items():
        hit = side == value if how == "abs" else level == value
        if hit and expected[(kind, level)] > 0:
            return level
    available = {sides[level]: n for (k, level), n in sorted(expected.items()) if k == kind and n}
    relative = {f"1/{2 ** level}" if level else "1": n for (k, level), n in sorted(expected.items()) if k == kind and n}
    where = (f"at its native sample_size {config.sample_size}" if latent_hw is None
             else f"at a {latent_hw[0]}×{latent_hw[1]} latent")
    raise ValueError(f"no {kind} layers at resolution {resolution}; this UNet has {available} "
                     f"(grid side: layer count, {where}; as fractions of the latent side: {relative})")
