"""Non-finite synthesis outputs: found per row, recorded, never labelled.

A denoiser that overflows (fp16 in the MM-DiT transformers above all) returns NaN / inf pixels or
attention maps. Cast to uint8 such an image becomes noise; min-max normalised, such a map becomes all
background: a wrong label, silently. So the synthesis stage checks every row of the float image and of
every captured map (:func:`bad_rows`), replaces the non-finite values by 0 (:func:`zeroed`: masks and
labels then run on the row without error) and marks the row's ``gen`` with ``"non_finite": true``
(:func:`mark`); the filter stage rejects a marked row with the reason :data:`NON_FINITE` before any other
check (stages/filters.py), and the run's summary counts it with the other reasons. A row without a
non-finite value is left exactly as it was (same bytes).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

#: the filters' reject reason for a row with a non-finite image or map
NON_FINITE = "non-finite"
#: the key a marked row's ``gen`` JSON holds (true)
GEN_KEY = "non_finite"


def bad_rows(x: Any) -> np.ndarray:
    """(B,) bool: the rows of ``x`` (a numpy array or torch tensor, rows first) holding a NaN or an inf."""
    if isinstance(x, np.ndarray):
        return ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
    import torch

    return (~torch.isfinite(x).flatten(1).all(dim=1)).cpu().numpy()


def zeroed(x: Any) -> Any:
    """``x`` with its non-finite values replaced by 0; ``x`` itself when it has none."""
    if isinstance(x, np.ndarray):
        return x if np.isfinite(x).all() else np.where(np.isfinite(x), x, 0).astype(x.dtype)
    import torch

    return x if bool(torch.isfinite(x).all()) else torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def mark(gen: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """The ``gen`` column (JSON strings) with ``"non_finite": true`` added to the ``bad`` rows."""
    if not bad.any():
        return gen
    return np.array([json.dumps({**json.loads(g), GEN_KEY: True}) if b else g for g, b in zip(gen, bad)], dtype=str)


def is_marked(gen: Any) -> bool:
    """Whether one row's ``gen`` JSON says its synthesis output was non-finite."""
    return bool(gen) and bool(json.loads(str(gen)).get(GEN_KEY, False))
