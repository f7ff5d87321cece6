"""What the MM-DiT families (SD3 / SD3.5, Flux) share: flow-matching loading, capture blocks, token mapping.

Capture is by transformer block index, never by a resolution name: ``masks.capture_blocks`` (when the
spec has it) or the family's default middle blocks (``default_blocks``). Every block's map has the
image-token grid, the latent grid over the patch size (2 for both families): a 1024² image gives 64×64
maps. The capture itself is ``stages/families/joint_attention.py``; ``masks.capture_resolutions`` and
``self_attention_resolution`` name UNet levels and are not used here (refinement, ``refine_power``,
uses the image→image block of the captured blocks' own joint attention).

The sampler's class token positions are CLIP positions (``tokenizer``, BOS = 0);
``capture_token_index`` turns each group into the character span its CLIP tokens cover and maps it to
the capture's text sequence: SD3's joint text is [77 CLIP tokens, T5 tokens], so the CLIP positions
stay and each T5 token covering the span adds ``77 + position``; Flux's joint text is T5 only. T5 pads
to ``max_sequence_length`` (SD3 256, Flux 512: the pipelines' defaults); padding positions are never a
class token, and a class word past the T5 limit is an error.

Torch and diffusers are imported inside the methods (pre-flight imports the class level).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ..prompt_words import grouped_positions
from .base import CaptureLevel, ModelFamily, read_json

#: the image-image affinity for refinement is N×N per image: at most 64×64 tokens (64 MB fp32 per image)
MAX_AFFINITY_TOKENS = 64 * 64
#: job scheduler names an MM-DiT family accepts: the checkpoint's own, or flow-matching Euler
SCHEDULER_NAMES = ("default", "euler")


def middle_blocks(count: int, share: float) -> tuple[int, ...]:
    """``max(1, round(count·share))`` consecutive block indices centred on the middle of ``count`` blocks."""
    n = max(1, min(count, round(count * share)))
    start = (count - n) // 2
    return tuple(range(start, start + n))


def default_blocks(layout: str, num_layers: int, num_single_layers: int = 0) -> tuple[int, ...]:
    """Per-family default capture blocks: the middle ones (the literature finds them ground best).

    SD3 / SD3.5: the middle quarter of ``transformer_blocks`` (24 blocks → 9..14; 38 → 14..23).
    Flux: the middle sixth of all 19 + 38 blocks (→ 23..32, single-stream blocks 4..13).
    """
    if layout == "sd3":
        return middle_blocks(num_layers, 0.25)
    if layout == "flux":
        return middle_blocks(num_layers + num_single_layers, 1 / 6)
    raise ValueError(f"unknown MM-DiT layout {layout!r}")


class JointCapture:
    """``JointAttentionCapture`` bound to one job's token grid and text length (the family capture protocol)."""

    def __init__(self, capture, grid: tuple[int, int], text_length: int, info: dict):
        self.capture, self.grid, self.text_length, self.info = capture, grid, text_length, info
        self.on_step_end = capture.on_step_end

    def begin(self, token_index, num_classes: int, num_steps: int) -> None:
        self.capture.begin(token_index, num_classes, self.grid, num_steps, self.text_length)

    def finish(self):
        return self.capture.finish()

    def remove(self) -> None:
        self.capture.remove()


class MMDiTFamily(ModelFamily):
    """A text-to-image pipeline around an MM-DiT transformer with joint text-image attention."""

    denoiser = "transformer"
    layout: ClassVar[str] = ""
    schedulers: ClassVar[tuple[str, ...]] = SCHEDULER_NAMES
    t5_tokenizer: ClassVar[str] = ""  # the T5 tokenizer's subfolder
    max_sequence_length: ClassVar[int] = 256  # T5 tokens the pipeline pads / truncates to
    pipeline_class_name: ClassVar[str] = ""
    img2img_class_name: ClassVar[str] = ""

    # --- class level: configs only ------------------------------------------------------------------
    @classmethod
    def token_limit(cls, tokenizer: str, model_max_length: int) -> int:
        return cls.max_sequence_length if tokenizer == cls.t5_tokenizer else model_max_length

    @classmethod
    def patch(cls, config: dict) -> int:
        """Latent pixels per image token along each side."""
        return int(config.get("patch_size", 2))

    @classmethod
    def block_count(cls, config: dict) -> int:
        return int(config.get("num_layers", 0))

    @classmethod
    def blocks(cls, config: dict, masks: Any) -> tuple[int, ...]:
        """The capture blocks a job names (``masks.capture_blocks``), or the family default; ValueError naming
        the field when one is out of range."""
        count = cls.block_count(config)
        named = getattr(masks, "capture_blocks", None)
        if not named:
            return default_blocks(cls.layout, int(config.get("num_layers", 0)), int(config.get("num_single_layers", 0)))
        bad = [b for b in named if not 0 <= int(b) < count]
        if bad:
            raise ValueError(f"capture_blocks: {bad} out of range: this {cls.title} transformer has {count} "
                             f"joint-attention blocks (0..{count - 1})")
        return tuple(sorted({int(b) for b in named}))

    @classmethod
    def token_grid(cls, folder: Path, height: int, width: int) -> tuple[int, int]:
        config = read_json(Path(folder) / cls.denoiser / "config.json")
        side = cls.vae_scale_factor(folder) * cls.patch(config)
        if height % side or width % side:
            raise ValueError(f"generation: height and width must be multiples of {side} for {cls.title} (VAE "
                             f"scale × patch size), got {height}×{width}")
        return height // side, width // side

    @classmethod
    def capture_plan(cls, folder: Path, masks: Any, height: int, width: int) -> list[CaptureLevel]:
        """One ``CaptureLevel`` per captured block ("block 12"), each on the image-token grid at the job's size."""
        folder = Path(folder)
        config = read_json(folder / cls.denoiser / "config.json")
        grid = cls.token_grid(folder, height, width)
        if getattr(masks, "refine_power", 0) > 0 and grid[0] * grid[1] > MAX_AFFINITY_TOKENS:
            raise ValueError(f"refine_power: refinement needs the {grid[0]}×{grid[1]} image-token affinity at "
                             f"{height}×{width} ({grid[0] * grid[1]} tokens, at most {MAX_AFFINITY_TOKENS}); set "
                             "refine_power: 0 or use smaller images")
        return [CaptureLevel("joint", f"block {b}", b, grid, 1) for b in cls.blocks(config, masks)]

    # --- loading ------------------------------------------------------------------------------------
    def _pipeline_classes(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name), getattr(diffusers, self.img2img_class_name)

    def _img2img_class(self):
        return self._pipeline_classes()[1]

    def _load_kwargs(self, path: str) -> dict[str, Any]:
        """Components a local folder lists as ``[null, null]`` (``optional``) are passed as None, as diffusers
        wants them (``from_pretrained`` refuses a folder that merely omits them)."""
        from ..identity import local_folder

        folder = local_folder(path)
        if folder is None or not self.optional:
            return {}
        index = read_json(Path(folder) / "model_index.json")
        return {name: None for name in self.optional if index.get(name, [None, None])[0] is None}

    def _load(self, path: str, dtype: str, device: str, scheduler: str | None):
        from ..model import load_pipeline

        name = scheduler or "default"
        if name not in self.schedulers:
            raise ValueError(f"generation.scheduler {name!r} is not a flow-matching scheduler; {self.title} takes "
                             f"{' or '.join(repr(s) for s in self.schedulers)} (flow-matching Euler)")
        pipe = load_pipeline(path, dtype, device, None, pipeline_class=self._pipeline_classes()[0],
                             **self._load_kwargs(path))
        if name == "euler":
            from diffusers import FlowMatchEulerDiscreteScheduler

            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        return pipe

    @property
    def vae_scale(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        side = self.vae_scale * self.patch(dict(self.pipe.transformer.config))
        if height % side or width % side:
            raise ValueError(f"generation: height and width must be multiples of {side} for {self.title}, got "
                             f"{height}×{width}")
        return height // side, width // side

    def loop_steps(self, steps: int, strength: float | None = None) -> int:
        """Step-end callbacks of one call: flow-matching Euler runs ``steps``; img2img skips the first
        ``int(steps - steps x strength)`` as the SD3 / Flux img2img pipelines' ``get_timesteps`` does."""
        order = int(getattr(self.pipe.scheduler, "order", 1))
        if strength is None:
            return steps * order
        start = int(max(steps - min(steps * strength, steps), 0))
        if steps - start <= 0:
            raise ValueError(f"strength {strength} leaves no denoising step of {steps}")
        return (steps - start) * order

    # --- prompts ------------------------------------------------------------------------------------
    def token_positions(self, prompt: str, spans: Sequence[tuple[int, int]]) -> dict[str, list[list[int]]]:
        """{tokenizer subfolder: positions of the tokens overlapping each span}, for the tokenizers the folder has
        (SD3's T5 is optional)."""
        out = super().token_positions(prompt, spans)
        for (start, end), hit in zip(spans, out.get(self.t5_tokenizer, ())):
            if max(hit) >= self.max_sequence_length:
                raise ValueError(f"{prompt!r}: the T5 tokens of characters {start}:{end} are past the "
                                 f"{self.max_sequence_length}-token limit")
        return out

    def spans_of(self, prompt: str, token_index: list[list[int]]) -> list[list[tuple[int, int]]]:
        """The character spans each group of ``tokenizer`` (CLIP) positions covers in ``prompt``: one per run of
        consecutive positions (a class named twice, 'a ring and a ring', is two words, not the text between)."""
        enc = self.pipe.tokenizer(prompt, return_offsets_mapping=True, truncation=False)
        offsets = enc.offset_mapping
        out = []
        for group in token_index:
            covered = [offsets[p] for p in group if 0 <= p < len(offsets) and offsets[p][1] > offsets[p][0]]
            if len(covered) != len(group):
                raise ValueError(f"token positions {group} are not word tokens of {prompt!r}")
            runs: list[list[int]] = []
            for i, p in enumerate(sorted(group)):
                if runs and p == runs[-1][-1] + 1:
                    runs[-1].append(p)
                else:
                    runs.append([p])
            out.append([(offsets[r[0]][0], offsets[r[-1]][1]) for r in runs])
        return out

    def t5_positions(self, prompt: str, token_index: list[list[int]]) -> list[list[int]]:
        """The T5 positions of the words the sampler's CLIP positions name, per class."""
        return grouped_positions(lambda flat: self.token_positions(prompt, flat)[self.t5_tokenizer],
                                 self.spans_of(prompt, token_index))

    def text_length(self) -> int:
        raise NotImplementedError

    # --- running ------------------------------------------------------------------------------------
    def run(self, kwargs: dict[str, Any], generators: list, steps: int, guidance_scale: float, height: int,
            width: int, callback: Callable | None = None, image=None, strength: float | None = None,
            mask=None, guidance_cutoff: float | None = None):
        """One call; unlike SD's img2img, SD3's and Flux's take the size too (else they use the model default).
        ``guidance_cutoff``: CFG stops after that fraction of the steps (``step_end``; not on Flux)."""
        call = dict(kwargs, generator=generators, height=height, width=width,
                    max_sequence_length=self.max_sequence_length)
        pipe = self.pipe
        if image is not None:
            pipe = self.img2img() if mask is None else self.inpaint()
            call.update(image=image, strength=strength, **({} if mask is None else {"mask_image": mask}))
        call.update(self.step_end(pipe, callback, guidance_cutoff))
        return pipe(num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np", **call).images

    def attach_capture(self, masks: Any, height: int, width: int) -> JointCapture:
        from .joint_attention import JointAttentionCapture, JointCaptureConfig

        grid = self.grid(height, width)
        blocks = self.blocks(dict(self.pipe.transformer.config), masks)
        config = JointCaptureConfig(blocks=blocks, refine_power=int(getattr(masks, "refine_power", 0)),
                                    step_window=tuple(masks.step_window))
        capture = JointAttentionCapture(self.pipe.transformer, config)
        names = [f"block {b}" for b in capture.blocks]
        info = {"blocks": list(capture.blocks), "refine_power": config.refine_power,
                "step_window": list(config.step_window), "text_tokens": self.text_length(),
                "layers": {"joint": {n: 1 for n in names}}, "grids": {"joint": {n: list(grid) for n in names}},
                "map_grid": list(grid)}
        return JointCapture(capture, grid, self.text_length(), info)
