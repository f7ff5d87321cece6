"""The model seam: one ``ModelFamily`` subclass per diffusers text-to-image family.

The synthesis stage (stages/synthesis.py) talks only to this interface; pre-flight
(pipeline/preflight.py) talks only to its torch-free class-level half. A family knows:

Class level, from the model folder's JSON files alone (no torch, no diffusers, no weights):
  * ``name`` (the ``model.family`` value), ``title`` (for messages), ``pipeline_classes`` (the
    ``model_index.json`` ``_class_name`` values it accepts), ``denoiser`` ("unet" / "transformer")
    and ``denoiser_classes`` (that component's ``_class_name``), ``components`` (component → config
    file, every component the loader needs), ``weighted`` (those whose weights load: safetensors
    only), ``optional`` (components a folder may list as ``[null, null]``, e.g. SD3's T5);
  * ``tokenizers``: the tokenizer subfolders whose prompts the model reads. Pre-flight checks every
    class word and the longest prompt against each of them; ``token_limit`` gives each one's limit
    (CLIP: ``model_max_length`` = 77; a T5 family returns its ``max_sequence_length``);
  * ``mismatch(index, denoiser_config)``: why a folder is *not* this family (None when it is), used
    for an explicit ``model.family`` override that contradicts the folder;
  * ``capture_plan(folder, masks, height, width)``: the capture levels a job's ``masks`` section
    names at the job's image size, each with its actual map grid and layer count (``CaptureLevel``);
    ValueError (one line, what the model has) when it names a level the model lacks.

Instance level (loads the weights; torch and diffusers imported inside the methods):
  * ``__init__(path, dtype, device, scheduler)`` loads the text-to-image pipeline (``self.pipe``);
    ``img2img()`` builds the image-to-image pipeline from the same components (same weights);
  * ``encode(text) -> dict[str, Tensor]``: one prompt's conditioning, every text encoder's output
    (SD: ``prompt_embeds``; SDXL: ``prompt_embeds`` of both encoders concatenated and
    ``pooled_prompt_embeds``), as the pipeline's ``__call__`` takes it. ``conditioning(prompts,
    conds)`` turns a batch into pipeline kwargs: the prompts as text, or, when a row carries a
    ``cond["embedding"]``, each tensor of ``encode`` interpolated (slerp / lerp per token vector,
    pooled vectors included) or jittered (seeded noise × each vector's RMS; ``prompt_embeds`` uses
    the row's seed, the other tensors ``seed + 1``, ``seed + 2``, ... in sorted key order);
  * ``token_positions(prompt, spans)``: for each tokenizer, the positions of the tokens covering
    each character span (a multi-token word such as "traffic light" maps to all its tokens);
    ``capture_token_index(prompt, token_index)`` maps the sampler's positions (in ``tokenizer``,
    BOS = 0) to positions in the key sequence the capture sees (identity for the UNet families);
  * ``run(kwargs, generators, steps, guidance_scale, height, width, callback, image=None,
    strength=None, guidance_cutoff=None)``: one batch, text-to-image (``image`` None) or img2img, one CPU
    generator per row, ``callback`` as ``callback_on_step_end``; returns float images (B, H, W, 3) in
    [0, 1]. ``guidance_cutoff`` (``generation.guidance_cutoff``) chains a :class:`GuidanceCutoff` after
    ``callback``: CFG stops after that fraction of the steps (``cfg_tensors``: what it halves);
  * ``loop_steps(steps, strength=None)``: step-end callbacks one call makes;
  * ``excitation(excite, masks, height, width)`` (``generation.excite``, UNet families): the Attend-and-Excite
    step-end callback (stages/families/excite.py) that ``run(..., excite=)`` chains before ``callback``;
  * ``compile_denoiser()`` (``model.compile``): ``torch.compile`` of the denoiser, in place;
  * ``reuse_features(interval)`` (``generation.cache_interval``, UNet families): DeepCache-style reuse of the
    denoiser's deep blocks (stages/families/feature_reuse.py), reset at the start of every ``run``;
  * ``attach_capture(masks, height, width)``: installs the attention capture and returns an object
    with ``begin(token_index, num_classes, num_steps)``, ``on_step_end`` (the callback),
    ``finish() -> {"attn_raw": (B, K, h, w), "attn": ...}`` float32 maps, min-max normalised per
    map in float32, and ``info`` (the ``gen`` JSON's ``capture`` entry, stating each captured
    level's actual map grid).

How an MM-DiT family (SD3, Flux) plugs in: ``denoiser = "transformer"``; ``capture_plan`` returns
one ``CaptureLevel`` per captured block, named by block index (``kind="joint"``, ``name="block
12"``, ``grid`` = the latent grid divided by the patch size), never by a resolution; its capture
processor computes the image-query × text-key block of the joint attention (SD3: image tokens
first then text; Flux: text tokens first, RoPE applied to q/k as the model applies it), softmax over
the whole joint key set, keeps the text columns, and still returns the fused SDPA output.
``capture_token_index`` maps the sampler's CLIP positions to the capture's text sequence: SD3's
joint text is [CLIP-L/G 77 tokens, T5 tokens], so CLIP positions stay and T5 positions are
``77 + position``; Flux's text sequence is T5 only, so positions come from the T5 tokenizer over
the same character spans (``token_positions``), padding ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

if TYPE_CHECKING:  # torch is imported inside methods: pre-flight imports this module without it
    import numpy as np
    import torch


#: torch.compile's backend for ``model.compile`` (PyTorch's default; tests on CPU use "aot_eager", which traces
#: the same graphs and breaks without generating C++)
COMPILE_BACKEND = "inductor"


class FamilyError(ValueError):
    """A model folder that no family accepts, or that contradicts ``model.family``: one line."""


@dataclass(frozen=True)
class CaptureLevel:
    """One captured attention level as a job resolves it on a model at the job's image size."""

    kind: str  # "cross" (UNet attn2), "self" (UNet attn1), "joint" (MM-DiT block)
    name: str  # as the job names it: "16", "1/4", "block 12"
    index: int  # the family's own index: UNet level (0 = latent grid) or transformer block
    grid: tuple[int, int]  # the map's actual (h, w) at the job's size
    layers: int  # attention layers averaged at this level


def read_json(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


#: callback tensors that an inpainting pipeline doubles for CFG besides the family's ``cfg_tensors``
INPAINT_CFG_TENSORS = ("mask", "masked_image_latents")


def chain(*callbacks: "Callable | None") -> "Callable | None":
    """One ``callback_on_step_end`` that calls each given callback in turn on the dict the previous one returned."""
    given = [c for c in callbacks if c is not None]
    if len(given) <= 1:
        return given[0] if given else None

    def chained(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        for callback in given:
            callback_kwargs = callback(pipe, step, timestep, callback_kwargs)
        return callback_kwargs
    return chained


class GuidanceCutoff:
    """``callback_on_step_end`` that stops classifier-free guidance, diffusers' documented pattern: at the end of
    step ``int(pipe.num_timesteps × cutoff)`` it sets ``pipe._guidance_scale = 0.0`` (the pipeline's
    ``do_classifier_free_guidance`` turns false: the denoiser then sees the B latents, not their [uncond, cond]
    pair) and keeps the conditional (second) half of every CFG-batched tensor in ``tensors``. A call that runs
    without CFG from the start (guidance_scale ≤ 1) is left alone; ``cutoff`` 1 never stops it."""

    def __init__(self, cutoff: float, tensors: Sequence[str]):
        self.cutoff, self.tensors = float(cutoff), tuple(tensors)

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if step == int(pipe.num_timesteps * self.cutoff) and pipe.do_classifier_free_guidance:
            for name in self.tensors:
                callback_kwargs[name] = callback_kwargs[name].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return callback_kwargs


class ModelFamily:
    """Base class (see the module docstring). Subclasses set the class attributes and implement
    ``encode``, ``_load``, ``_img2img_class``, ``capture_plan`` and ``attach_capture``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    denoiser: ClassVar[str] = "unet"
    denoiser_classes: ClassVar[tuple[str, ...]] = ()
    components: ClassVar[dict[str, str]] = {}
    weighted: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    vae: ClassVar[str] = "vae"
    inpaint_class_name: ClassVar[str] = ""  # diffusers' inpainting pipeline on the same components
    #: the step-end callback tensors that carry the [uncond, cond] CFG batch (halved by a guidance cut-off);
    #: None: the family has no CFG batch (``generation.guidance_cutoff`` is refused)
    cfg_tensors: ClassVar[tuple[str, ...] | None] = ("prompt_embeds",)

    # --- class level: configs only, no torch ------------------------------------------------------
    @classmethod
    def mismatch(cls, index: dict, denoiser_config: dict | None) -> str | None:
        """Why a folder (its model_index.json and denoiser config) is not this family; None when it is."""
        if denoiser_config is None:
            return f"it has no {cls.denoiser}/config.json"
        got = denoiser_config.get("_class_name")
        if cls.denoiser_classes and got not in cls.denoiser_classes:
            return f"its {cls.denoiser} is a {got}, not a {' / '.join(cls.denoiser_classes)}"
        return None

    @classmethod
    def token_limit(cls, tokenizer: str, model_max_length: int) -> int:
        """The longest prompt (tokens, BOS/EOS included) the pipeline reads through ``tokenizer``."""
        return model_max_length

    @classmethod
    def vae_scale_factor(cls, folder: Path) -> int:
        """diffusers' ``vae_scale_factor``: 2 ** (VAE blocks - 1)."""
        vae = read_json(Path(folder) / cls.vae / "config.json")
        return 2 ** (len(vae.get("block_out_channels", [64] * 4)) - 1)

    @classmethod
    def capture_plan(cls, folder: Path, masks: Any, height: int, width: int) -> list[CaptureLevel]:
        raise NotImplementedError

    @classmethod
    def guidance_cutoff_problem(cls, image_guided: bool = False) -> str | None:
        """Why this family cannot take ``generation.guidance_cutoff`` (``image_guided``: the job's img2img /
        inpainting calls too); None when it can."""
        if cls.cfg_tensors is None:
            return f"{cls.title} ({cls.name}) has no classifier-free guidance batch to cut; remove the option"
        return None

    @classmethod
    def cache_interval_problem(cls) -> str | None:
        """Why this family cannot take ``generation.cache_interval`` (feature reuse); None when it can."""
        if cls.denoiser != "unet":
            return (f"{cls.title} ({cls.name}) has a transformer, not a UNet with deep blocks to reuse "
                    "(stages/families/feature_reuse.py); remove the option")
        return None

    @classmethod
    def excite_problem(cls) -> str | None:
        """Why this family cannot take ``generation.excite`` (attention excitation); None when it can."""
        if cls.denoiser != "unet":
            return (f"{cls.title} ({cls.name}) has joint attention, not the UNet cross-attention the excitation "
                    "reads (stages/families/excite.py)")
        return None

    @classmethod
    def early_check_problem(cls) -> str | None:
        """Why this family cannot take ``generation.early_check`` (stages/early_check.py); None when it can."""
        if cls.denoiser != "unet":
            return (f"{cls.title} ({cls.name}) is not supported: the check drops stopped rows from a UNet call's "
                    "batch, and the MM-DiT pipelines' per-call state is not sliced")
        return None

    @classmethod
    def class_tokens_problem(cls) -> str | None:
        """Why this family cannot take ``model.class_tokens`` (tuned class-name tokens, stages/class_tokens.py); None
        when it can: they are tuned for the single CLIP text encoder of SD 1.x/2.x."""
        if tuple(cls.tokenizers) != ("tokenizer",):
            return (f"{cls.title} ({cls.name}) encodes prompts with {len(cls.tokenizers)} text encoders; class tokens "
                    "are tuned for the one CLIP text encoder of SD 1.x/2.x")
        return None

    # --- instance level: weights --------------------------------------------------------------------
    def __init__(self, path: str, dtype: str = "float32", device: str = "cpu", scheduler: str | None = None):
        self.path, self.dtype_name = path, dtype
        self.pipe = self._load(path, dtype, device, scheduler)
        self._img2img = None
        self.reuse = None  # generation.cache_interval's schedule (reuse_features)

    def _load(self, path: str, dtype: str, device: str, scheduler: str | None):
        raise NotImplementedError

    def _img2img_class(self):
        raise NotImplementedError

    @property
    def device(self):
        return self.pipe.device

    @property
    def vae_scale(self) -> int:
        return int(self.pipe.vae_scale_factor)

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale, width // self.vae_scale

    def img2img(self):
        """The image-to-image pipeline on the same components (same weights, same capture)."""
        if self._img2img is None:
            self._img2img = self._on_components(self._img2img_class())
        return self._img2img

    def inpaint(self):
        """The inpainting pipeline (``inpaint_class_name``) on the same components: a plain text-to-image
        denoiser inpaints by blending the reference's latents outside the mask at every step."""
        if getattr(self, "_inpaint", None) is None:
            import diffusers

            self._inpaint = self._on_components(getattr(diffusers, self.inpaint_class_name))
        return self._inpaint

    def _on_components(self, cls):
        import inspect

        params = inspect.signature(cls.__init__).parameters
        extra = {"requires_safety_checker": False} if "requires_safety_checker" in params else {}
        pipe = cls(**{k: v for k, v in self.pipe.components.items() if k in params}, **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode(self, text: str) -> dict[str, "torch.Tensor"]:
        raise NotImplementedError

    def embed(self, cond: dict | None, prompt: str) -> dict[str, "torch.Tensor"]:
        """One row's conditioning: ``prompt`` encoded, or ``cond``'s interpolation / jitter of every tensor."""
        import torch

        from .embedding import jitter, slerp

        if cond is None:
            return self.encode(prompt)
        if cond["mode"] == "jitter":
            encoded = self.encode(cond["prompt"])
            order = sorted(encoded, key=lambda k: (k != "prompt_embeds", k))
            return {k: jitter(encoded[k], float(cond["sigma"]), int(cond["seed"]) + j) for j, k in enumerate(order)}
        first, second = (self.encode(p) for p in cond["prompts"])
        weight = float(cond["weight"])
        if cond["method"] == "lerp":
            return {k: torch.lerp(first[k], second[k], weight) for k in first}
        return {k: slerp(first[k], second[k], weight) for k in first}

    def conditioning(self, prompts: Sequence[str], conds: Sequence[dict]) -> dict[str, Any]:
        """Pipeline kwargs for a batch: ``prompt`` as text, or embeddings when any row has ``cond["embedding"]``."""
        import torch

        if not any("embedding" in c for c in conds):
            return {"prompt": list(prompts)}
        with torch.no_grad():
            rows = [self.embed(c.get("embedding"), p) for c, p in zip(conds, prompts)]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def token_positions(self, prompt: str, spans: Sequence[tuple[int, int]]) -> dict[str, list[list[int]]]:
        """{tokenizer subfolder: positions (BOS = 0) of the tokens overlapping each character span}, for the
        tokenizers the folder has (an optional one it leaves out, e.g. SD3's T5, is skipped)."""
        out = {}
        for name in self.tokenizers:
            tok = getattr(self.pipe, name, None)
            if tok is None:
                continue
            enc = tok(prompt, return_offsets_mapping=True, truncation=False)
            groups = []
            for start, end in spans:
                hit = [i for i, (a, b) in enumerate(enc.offset_mapping) if b > a and a < end and b > start]
                if not hit:
                    raise ValueError(f"no {name} token of {prompt!r} covers characters {start}:{end}")
                groups.append(hit)
            out[name] = groups
        return out

    def capture_token_index(self, prompt: str, token_index: list[list[int]]) -> list[list[int]]:
        """The sampler's class token positions (``tokenizer``, BOS = 0) in the capture's key sequence."""
        return token_index

    def loop_steps(self, steps: int, strength: float | None = None) -> int:
        """Denoising-loop iterations (= step-end callbacks) of one call; img2img counts as diffusers'
        ``get_timesteps``: the timesteps after skipping the first ``steps - int(steps x strength)``."""
        import copy

        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(steps)
        if strength is None:
            return len(scheduler.timesteps)
        start = max(steps - min(int(steps * strength), steps), 0)
        return len(scheduler.timesteps[start * scheduler.order:])

    def step_end(self, pipe, callback: Callable | None, guidance_cutoff: float | None,
                 excite: Callable | None = None, early: Callable | None = None) -> dict[str, Any]:
        """The call's step-end kwargs: ``excite`` (``generation.excite``: it moves the latents, reading the
        conditional embeddings), ``callback`` (the capture's), then with ``guidance_cutoff`` a
        :class:`GuidanceCutoff` over the CFG-batched tensors ``pipe`` lists, then ``early``
        (``generation.early_check``: it drops rows from the latents and those tensors), with the tensor inputs
        they need. ValueError (one line) when ``pipe`` does not hand every CFG-batched tensor to its callback."""
        if early is not None:
            kwargs = self.step_end(pipe, callback, guidance_cutoff, excite)
            listed = list(getattr(pipe, "_callback_tensor_inputs", ()))
            inputs = list(kwargs.get("callback_on_step_end_tensor_inputs", []))
            inputs += [t for t in ("latents", *(self.cfg_tensors or ())) if t in listed and t not in inputs]
            return {"callback_on_step_end": chain(kwargs.get("callback_on_step_end"), early),
                    "callback_on_step_end_tensor_inputs": inputs}
        if excite is not None:
            listed = list(getattr(pipe, "_callback_tensor_inputs", ()))
            inputs = ["latents", "prompt_embeds", *(t for t in ("add_text_embeds", "add_time_ids") if t in listed)]
            kwargs = self.step_end(pipe, callback, guidance_cutoff)
            inputs += [t for t in kwargs.get("callback_on_step_end_tensor_inputs", []) if t not in inputs]
            return {"callback_on_step_end": chain(excite, kwargs.get("callback_on_step_end")),
                    "callback_on_step_end_tensor_inputs": inputs}
        if guidance_cutoff is None:
            return {} if callback is None else {"callback_on_step_end": callback}
        if self.cfg_tensors is None:
            raise ValueError(f"generation.guidance_cutoff: {self.guidance_cutoff_problem()}")
        listed = list(getattr(pipe, "_callback_tensor_inputs", ()))
        tensors = [*self.cfg_tensors, *(t for t in INPAINT_CFG_TENSORS if t in listed)]
        missing = [t for t in tensors if t not in listed]
        if missing:
            raise ValueError(f"generation.guidance_cutoff: {type(pipe).__name__} does not pass {', '.join(missing)} "
                             "to its step-end callback, so its CFG batch cannot be cut")
        return {"callback_on_step_end": chain(callback, GuidanceCutoff(guidance_cutoff, tensors)),
                "callback_on_step_end_tensor_inputs": ["latents", *tensors]}

    def decode_latents(self, latents: "torch.Tensor") -> "np.ndarray":
        """Float images (B, H, W, 3) in [0, 1] of (clean) latents, decoded as the pipeline decodes its last ones
        (the VAE's scaling, its latents mean / std where its config has them, fp16 VAEs that need it upcast)."""
        import torch

        vae = self.pipe.vae
        config = vae.config
        upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            z = latents.to(device=vae.device, dtype=vae.dtype)
            mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
            if mean is not None and std is not None:
                shape = (1, -1, 1, 1)
                z = z * torch.tensor(std, dtype=z.dtype, device=z.device).view(shape) / config.scaling_factor \
                    + torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape)
            else:
                z = z / config.scaling_factor
            with torch.no_grad():
                image = vae.decode(z, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        return self.pipe.image_processor.postprocess(image.float(), output_type="np")

    def reuse_features(self, interval: int) -> None:
        """``generation.cache_interval``: the denoiser's deep blocks run on every ``interval``-th call of each
        pipeline call (stages/families/feature_reuse.py); the img2img / inpainting pipelines share the UNet."""
        problem = self.cache_interval_problem()
        if problem:
            raise ValueError(f"generation.cache_interval: {problem}")
        from .feature_reuse import install

        self.reuse = install(self.pipe.unet, interval)

    def compile_denoiser(self) -> None:
        """``model.compile``: ``torch.compile`` the denoiser in place (``nn.Module.compile``: the pipeline keeps the
        same module, its capture processors and hooks); ``COMPILE_BACKEND`` chooses the backend."""
        getattr(self.pipe, self.denoiser).compile(backend=COMPILE_BACKEND)

    def run(self, kwargs: dict[str, Any], generators: list, steps: int, guidance_scale: float, height: int,
            width: int, callback: Callable | None = None, image: "np.ndarray | None" = None,
            strength: float | None = None, mask: "np.ndarray | None" = None,
            guidance_cutoff: float | None = None, excite: Callable | None = None,
            early: Callable | None = None) -> "np.ndarray":
        """One pipeline call; float images (B, H, W, 3) in [0, 1] as the pipeline returns them. ``image``:
        img2img from it; with ``mask`` (float (B, H, W), 1 = repaint) inpainting inside the mask;
        ``guidance_cutoff``: CFG stops after that fraction of the steps (``step_end``)."""
        call = dict(kwargs, generator=generators)
        if image is None:
            pipe = self.pipe
            call.update(height=height, width=width)
        elif mask is not None:
            pipe = self.inpaint()
            call.update(image=image, mask_image=mask, strength=strength, height=height, width=width)
        else:
            pipe = self.img2img()
            call.update(image=image, strength=strength)
        call.update(self.step_end(pipe, callback, guidance_cutoff, excite, early))
        if self.reuse is not None:  # every call starts with a full denoiser pass: an image depends on its call only
            self.reuse.reset()
        return pipe(num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np", **call).images

    def attach_capture(self, masks: Any, height: int, width: int):
        raise NotImplementedError
