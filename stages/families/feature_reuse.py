"""DeepCache-style feature reuse on a UNet: ``generation.cache_interval: N`` (issue 35's speed options).

The UNet's deep path (every down block but the first, the middle block, every up block but the last) runs fully
on every N-th denoiser call of a pipeline call: the first, the (N+1)-th, ... On the calls between, each deep block
returns what it returned on the last full call, and only the outermost blocks (the first down block, the last up
block, and the convolutions around them) run on the new input: the high-level features change slowly from one
step to the next, the shallow ones carry the detail (Ma et al., "DeepCache", CVPR 2024, uniform schedule).

Built on diffusers' own hook mechanism (``diffusers.hooks.ModelHook`` / ``HookRegistry``): a hook on the UNet
counts its calls and decides, and one hook per deep block replays or refreshes that block's output. A change of
the denoiser's batch (a guidance cut-off dropping the unconditional half) or of its latent size makes that call a
full one. Each pipeline call starts full (``reset``), so an image depends only on its own call, as without reuse.

Attention capture sees the deep blocks' layers only on full calls: ``AttentionCapture`` averages each level over
the steps it ran (``partial_steps``). Only the UNet families take the option; the MM-DiT families refuse it at
validate (``ModelFamily.cache_interval_problem``).
"""
from __future__ import annotations

from typing import Any

HOOK = "synthgen_feature_reuse"


class ReuseSchedule:
    """Which denoiser calls of the current pipeline call run the deep blocks: call k is full when k % interval == 0,
    or when the UNet's input shape differs from the last full call's."""

    def __init__(self, interval: int):
        if interval < 2:
            raise ValueError(f"cache_interval must be >= 2 (1 reuses nothing), got {interval}")
        self.interval = interval
        self.reset()

    def reset(self) -> None:
        """A new pipeline call: its first denoiser call is full."""
        self.calls, self.full, self.shape = 0, True, None

    def next_call(self, shape: tuple[int, ...]) -> None:
        self.full = self.calls % self.interval == 0 or shape != self.shape
        if self.full:
            self.shape = shape
        self.calls += 1


def _hooks():
    from diffusers.hooks import ModelHook

    class Decide(ModelHook):
        """On the UNet: one decision per denoiser call."""

        def __init__(self, schedule: ReuseSchedule):
            super().__init__()
            self.schedule = schedule

        def pre_forward(self, module, *args, **kwargs):
            sample = args[0] if args else kwargs["sample"]
            self.schedule.next_call(tuple(sample.shape))
            return args, kwargs

    class Replay(ModelHook):
        """On a deep block: its output of the last full call, or a new one on a full call."""

        def __init__(self, schedule: ReuseSchedule):
            super().__init__()
            self.schedule, self.output = schedule, None

        def new_forward(self, module, *args, **kwargs):
            if self.schedule.full or self.output is None:
                self.output = self.fn_ref.original_forward(*args, **kwargs)
            return self.output

        def reset_state(self, module):
            self.output = None
            return module

    return Decide, Replay


def deep_blocks(unet: Any) -> list:
    """The blocks a reuse call skips: down blocks 1.., the middle block, up blocks ..-2."""
    return [*unet.down_blocks[1:], unet.mid_block, *unet.up_blocks[:-1]]


def install(unet: Any, interval: int) -> ReuseSchedule:
    """Hook ``unet`` for reuse every ``interval`` calls; returns the schedule (``reset`` it before each call)."""
    from diffusers.hooks import HookRegistry

    if len(unet.down_blocks) < 2 or len(unet.up_blocks) < 2:
        raise ValueError("generation.cache_interval: the UNet has a single level, so it has no deep blocks to reuse")
    Decide, Replay = _hooks()
    schedule = ReuseSchedule(interval)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(Decide(schedule), HOOK)
    for block in deep_blocks(unet):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(Replay(schedule), HOOK)
    return schedule


def uninstall(unet: Any) -> None:
    from diffusers.hooks import HookRegistry

    for module in (unet, *deep_blocks(unet)):
        HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK, recurse=False)
