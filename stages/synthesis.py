"""Diffusion synthesis: batched pipeline calls with attention capture, through the model seam.

The stage talks only to a ``ModelFamily`` (stages/families/): the family is resolved from the model
folder (``model_index.json``'s ``_class_name`` and the denoiser config, or ``model.family``), loads the
text-to-image pipeline and, for rows whose ``cond`` names a reference image, the image-to-image
pipeline on the same components (same weights, same capture), one call per strength. A
``cond["embedding"]`` is turned into embeddings by the family: each prompt encoded alone (every text
encoder, pooled embeddings too), then interpolated (slerp / lerp per token) or jittered (seeded noise
scaled by each token vector's RMS). Each row's ``gen`` names the model by its content (``model_id``,
16 hex digits of ``model_identity``'s ``id``) and by the path the user gave (``model``,
``stages.identity.public_path``), never by where it lies on this machine, the family, and under
``capture.grids`` the actual [h, w] grid of every captured level (``capture.map_grid``: the grid the
levels are combined on, the ``attn`` columns' shape).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from . import finite
from .attention import fp16_safe
from .base import Batch, Stage, passthrough
from .families import AUTO, FamilyError, all_families, family_class, resolve_family, supported_classes
from .families.base import ModelFamily
from .families.embedding import jitter, slerp  # noqa: F401  (re-exported: tests, benchmarks)
from .identity import local_folder, model_identity, public_path, short_id
from .references import ReferenceImages, list_references


def img2img_loop_steps(scheduler: Any, steps: int, strength: float) -> int:
    """Denoising-loop iterations (= step-end callbacks) of an img2img call, as diffusers' ``get_timesteps``
    counts them: the scheduler's timesteps after skipping the first ``steps - int(steps x strength)``."""
    import copy

    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    start = max(steps - min(int(steps * strength), steps), 0)
    return len(scheduler.timesteps[start * scheduler.order:])


def model_family(model: Any) -> type[ModelFamily]:
    """The family of a job's ``model`` section: resolved from a local folder; for a hub id (whose files only
    the workers download) ``model.family``, or with ``auto`` by the hub's ``model_index.json`` ``_class_name``."""
    override = getattr(model, "family", AUTO) or AUTO
    folder = local_folder(model.path)
    if folder is not None:
        return resolve_family(folder, override)
    if override != AUTO:
        return family_class(override)
    from diffusers import DiffusionPipeline

    name = DiffusionPipeline.load_config(model.path).get("_class_name")
    found = next((f for f in all_families() if name in f.pipeline_classes), None)
    if found is None:
        raise FamilyError(f"hub model {model.path!r} is a {name!r}, which synthgen does not support; supported: "
                          f"{supported_classes()}")
    return found


class SynthesisStage(Stage):
    """Generates ``image`` and the per-class maps ``attn`` / ``attn_raw`` (zero-padded to K classes).

    Every row gets its own CPU ``torch.Generator`` seeded from ``seed``, so an image does not
    depend on its batch neighbours or on the device. ``capture=False`` (benchmarks) skips the
    attention capture and outputs only ``image`` and ``gen``. An optional ``cond`` column (JSON,
    written by the sampling stage) selects img2img and embedding conditioning per row.
    """

    name = "synthesis"
    kind = "actor"
    fusable = False  # its own actor pool: resources.synthesis sizes it and reserves the GPUs
    reads = ("model", "generation", "prompts", "masks", "references", "classes", "judge", "filters")
    inputs = ("prompt", "seed", "token_index", "class_names")
    outputs = ("image", "attn", "attn_raw", "gen")

    def __init__(self, spec: Any, capture: bool = True):
        super().__init__(spec)
        spec = self.spec
        model, gen = spec.model, spec.generation
        self.family = model_family(model)(model.path, model.dtype, model.device, gen.scheduler)
        self.pipe = self.family.pipe
        tokens = getattr(model, "class_tokens", None)
        if tokens is not None:  # tuned class-name tokens (stages/class_tokens.py), before anything encodes a prompt
            from . import class_tokens

            vectors, meta = class_tokens.read(tokens)
            class_tokens.apply(self.pipe.text_encoder, vectors, meta["token_ids"])
        self.max_classes = spec.prompts.max_classes_per_image
        self.loop_steps = self.family.loop_steps(gen.steps)  # callbacks per call (PNDM runs steps + 1)
        self.capture = self.family.attach_capture(spec.masks, gen.height, gen.width) if capture else None
        interval = getattr(gen, "cache_interval", None)
        if interval is not None:  # DeepCache-style reuse of the UNet's deep blocks (stages/families/feature_reuse.py)
            self.family.reuse_features(interval)
            if self.capture is not None:
                self.capture.allow_partial_steps()
        self.excite = None
        if getattr(gen, "excite", None) is not None:  # Attend-and-Excite (stages/families/excite.py)
            self.excite, self.excite_grid = self.family.excitation(gen.excite, spec.masks, gen.height, gen.width)
        if getattr(model, "compile", False):  # after the capture and the hooks: the compiled call runs them all
            self.family.compile_denoiser()
        # the model by content and by the name the user gave it: no local path, so two checkouts write the same bytes
        name = getattr(spec, "model_name", None) or public_path(model.path)
        record = {
            "model": name, "model_id": short_id(model_identity(model.path, name)), "dtype": model.dtype,
            "scheduler": gen.scheduler or "default",
            "scheduler_class": type(self.pipe.scheduler).__name__, "steps": gen.steps,
            "guidance_scale": gen.guidance_scale, "height": gen.height, "width": gen.width,
            "capture": None if self.capture is None else self.capture.info,
        }
        if self.family.name != "sd":  # SD 1.x/2.x records stay as they were before families
            record["family"] = self.family.name
        if getattr(gen, "guidance_cutoff", None) is not None:  # only when set: records without it stay as before
            record["guidance_cutoff"] = gen.guidance_cutoff
        if interval is not None:
            record["cache_interval"] = interval
        if getattr(model, "compile", False):
            record["compiled"] = True
        if tokens is not None:
            record["class_tokens"] = class_tokens.digest(tokens)
        if self.excite is not None:
            record["excite"] = gen.excite.model_dump(mode="json")
        early = getattr(gen, "early_check", None)
        if early is not None:
            record["early_check"] = early.model_dump(mode="json")
        self.gen_json = json.dumps(record)
        from .judges import load_judge

        self.judge = load_judge(spec)
        self.early = None
        if early is not None:  # the judge on each row's predicted clean image part-way (stages/early_check.py)
            from .early_check import EarlyCheck

            if self.judge is None:
                raise ValueError("generation.early_check is the judge's check part-way: the job needs a judge")
            self.early = EarlyCheck(self.family, self.judge, early.step, early.min_score)
        self.redraws = None
        if getattr(gen, "redraws", 0):
            from .redraw import SampleChecks

            self.redraws = SampleChecks(spec)
        refs = getattr(spec, "references", None)
        if refs is not None:
            self.reference_images = ReferenceImages(list_references(spec), gen.height, gen.width)
            self.img2img_steps = {s: self.family.loop_steps(gen.steps, s) for s in [*refs.strengths, *refs.redraw_ladder]}
            if refs.mode == "inpaint":
                from .masks import inpaint_outlines

                self.outlines = inpaint_outlines(spec)

    @property
    def img2img(self):
        return self.family.img2img()

    @torch.no_grad()
    def embed(self, cond: dict | None, prompt: str) -> torch.Tensor:
        """(1, L, D) ``prompt_embeds`` of one row (the family's ``embed`` gives every tensor)."""
        return self.family.embed(cond, prompt)["prompt_embeds"]

    def _generate(self, batch: Batch, rows: list[int], conds: list[dict], strength: float | None,
                  inpaint: bool = False) -> Batch:
        """Images, ``gen`` and (with capture) maps of ``rows``: one text-to-image call, or one img2img
        (``inpaint``: inpainting, stages/inpaint.py) call at ``strength``."""
        gen = self.spec.generation
        prompts = [str(batch["prompt"][i]) for i in rows]
        classes = [json.loads(batch["class_names"][i]) for i in rows]
        generators = [torch.Generator("cpu").manual_seed(int(batch["seed"][i])) for i in rows]
        kwargs = self.family.conditioning(prompts, [conds[i] for i in rows])
        image = outlines = None
        if strength is None:
            steps, gen_json = self.loop_steps, self.gen_json
        else:
            if strength not in self.img2img_steps:
                raise ValueError(f"reference strength {strength} is not in the job's references.strengths")
            steps = self.img2img_steps[strength]
            gen_json = json.dumps({**json.loads(self.gen_json), "strength": strength,
                                   **({"pipeline": "inpaint"} if inpaint else {})})
            originals = [self.reference_images(conds[i]["reference"]["key"]) for i in rows]
            images, repaint = originals, None
            if inpaint:
                from .inpaint import call_views, prepare

                outlines = [self.outlines.outline(conds[i]["reference"]) for i in rows]
                prepared = [prepare(im, outline, conds[i]["reference"])
                            for im, outline, i in zip(originals, outlines, rows)]
                repaint = np.stack([p[1] for p in prepared])
                images, call_mask, boxes = call_views(prepared, [conds[i]["reference"].get("crop_padding")
                                                                 for i in rows])
            image = np.stack(images).astype(np.float32) / 255.0
        callback = excite = None
        token_index = []
        tokens_needed = self.capture is not None or self.excite is not None
        for i, prompt, names in zip(rows, prompts, classes) if tokens_needed else ():
            groups = json.loads(batch["token_index"][i])
            if len(groups) != len(names):
                raise ValueError(f"row {i}: {len(names)} class names but {len(groups)} token groups")
            if inpaint:  # only the repainted class is prompted (the others are labels): its map, if named
                groups = [g for g in groups[:1] if g]
            token_index.append(self.family.capture_token_index(prompt, groups))
        if self.capture is not None:
            self.capture.begin(token_index, self.max_classes, steps)
            callback = self.capture.on_step_end
        if self.excite is not None and strength is None:
            lengths = [len(self.pipe.tokenizer(p, truncation=True).input_ids) for p in prompts]
            self.excite.begin(token_index, lengths, steps, self.excite_grid)
            excite = self.excite
        early = None
        if self.early is not None and strength is None:  # generation.early_check: rows may stop part-way
            early = self.early
            early.begin(prompts, classes, steps, generators, self.capture, excite)
        cutoff = getattr(gen, "guidance_cutoff", None)  # chained after the capture's callback (family.step_end)
        from .early_check import AllStopped

        try:
            out = self.family.run(kwargs, generators, gen.steps, gen.guidance_scale, gen.height, gen.width,
                                  callback, image=image, strength=strength,
                                  mask=None if not inpaint else call_mask.astype(np.float32),
                                  **({} if cutoff is None else {"guidance_cutoff": cutoff}),
                                  **({} if excite is None else {"excite": excite}),
                                  **({} if early is None else {"early": early}))
        except AllStopped:
            out = None
        maps = self.capture.finish() if self.capture is not None and out is not None else None
        stopped: dict[int, tuple] = {}
        if early is not None:  # the stopped rows' previews in their places
            out, maps, stopped = early.finish(out, maps)
        bad, out = finite.bad_rows(out), finite.zeroed(out)  # non-finite rows: marked in gen, never labelled
        images = (np.clip(out, 0.0, 1.0) * 255).round().astype(np.uint8)
        if inpaint:  # outside the repaint mask: the reference's own pixels, exactly
            from .inpaint import from_crop, paste_back

            images = np.stack([from_crop(im, box) for im, box in zip(images, boxes)])
            images = paste_back(images, np.stack(originals), repaint)
        new = {"image": images, "gen": np.full(len(rows), gen_json)}
        if excite is not None:  # each row's loss at every excited step: did its neglected subjects wake?
            record = json.loads(gen_json)
            new["gen"] = np.array([json.dumps({**record, "excite": {**record["excite"], "loss": loss}})
                                   for loss in excite.finish()], dtype=str)
        if self.capture is not None:
            if inpaint:  # maps of a crop (references.inpaint.crop_padding) on the whole image's grid
                from .inpaint import maps_from_crop

                maps = {k: maps_from_crop(v, boxes, gen.height, gen.width) for k, v in maps.items()}
            for v in maps.values():
                bad |= finite.bad_rows(v)
            maps = {k: finite.zeroed(v) for k, v in maps.items()}
            # float32 maps, narrow ones stretched to [0, 1] before the float16 hand-over (stages/attention.py)
            new.update({k: fp16_safe(v.float()).to(torch.float16).cpu().numpy() for k, v in maps.items()})
        new["gen"] = finite.mark(new["gen"], bad)
        if stopped:  # the step each stopped row ran to and why (the filters reject it with that reason)
            new["gen"] = np.array([json.dumps({**json.loads(g), "stopped": {"step": stopped[j][0],
                                                                            "reason": stopped[j][1]}})
                                   if j in stopped else g for j, g in enumerate(new["gen"])], dtype=str)
        if self.judge is not None:  # each prompted class's score, in class order (the filters' verdict reads it)
            judged, maps, region = classes, new.get("attn"), None
            if inpaint:  # the repainted instance on the crop around its outline; the others are the reference's
                judged, region = [c[:1] for c in classes], "mask"
                maps = np.stack(outlines)[:, None]
            scores = self.judge.scores(images, prompts, judged, maps, region=region)
            new["gen"] = np.array([json.dumps({**json.loads(g), "judge": [round(x, 4) for x in sc]})
                                   for g, sc in zip(new["gen"], scores)], dtype=str)
        return new

    def __call__(self, batch: Batch) -> Batch:
        drawn = self.draw(batch)
        if self.redraws is not None:  # generation.redraws: rejected rows drawn again (stages/redraw.py)
            from .redraw import redraw

            drawn = redraw(self.spec, batch, drawn, self.draw, self.redraws)
        return passthrough(batch, **drawn)

    def draw(self, batch: Batch) -> Batch:
        """The synthesis outputs of every row of ``batch`` (one attempt, each row from its ``seed``)."""
        n = len(batch["prompt"])
        conds = [json.loads(str(c)) if str(c) else {} for c in batch.get("cond", [""] * n)]
        # (strength (None: text-to-image), inpainting) -> rows, in row order
        groups: dict[tuple[float | None, bool], list[int]] = {}
        for i, cond in enumerate(conds):
            ref = cond.get("reference", {})
            groups.setdefault((ref.get("strength"), ref.get("mode") == "inpaint"), []).append(i)
        parts = [(rows, self._generate(batch, rows, conds, strength, inpaint))
                 for (strength, inpaint), rows in groups.items()]
        inverse = np.argsort(np.concatenate([rows for rows, _ in parts]), kind="stable")
        return {col: np.concatenate([out[col] for _, out in parts])[inverse] for col in parts[0][1]}

