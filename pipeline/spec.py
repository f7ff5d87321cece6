"""The job spec: one YAML file, validated into a frozen pydantic model before any Ray or model work.

``load_spec(path, overrides)`` reads the file, applies ``--set key.sub=value`` overrides (values
parsed as YAML), resolves paths and validates. Every failure is a :class:`SpecError` whose message
is one line: ``<file>: <field path>: <reason>``.

Paths: a relative ``model.path`` or ``output.dir`` written in the job file is resolved against the
job file's directory (so a job file works from any working directory); one given on the command
line (``--set``, ``--out``) against the current directory. A ``model.path`` is local when it starts
with ``/``, ``.`` or ``~`` or names an existing folder; anything else is a Hugging Face hub id.
The spec keeps each path field as the user gave it too: ``JobSpec.public_dump()`` (what a manifest
records) and ``JobSpec.model_name`` (what samples record) never hold an absolute local path.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import re
import string
import typing
import unicodedata
from pathlib import Path
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag,
                      ValidationError, create_model, field_validator, model_serializer, model_validator)

from stages import registry
from stages.identity import public_path

from .plan import shard_count_problem

PositiveInt = Annotated[int, Field(ge=1)]
#: path fields: resolved to absolute local paths to be used; recorded as given (``JobSpec.public_dump``)
PATH_FIELDS = ("model.path", "output.dir", "masks.calibration", "references.path", "references.select.path",
               "judge.path", "model.class_tokens")
#: job fields no fingerprint covers (``JobSpec.fingerprint``): a run may change them on a dataset it resumes
#: (the references' locations: their content is covered, by its digest)
UNFINGERPRINTED = ("resources", "samples", "retries", "output.dir", "output.index", "model.path", "masks.calibration",
                   "references.path", "references.select.path", "judge.path", "model.class_tokens")
#: path fields that may be null (unset)
OPTIONAL_PATHS = ("masks.calibration", "judge.path", "model.class_tokens")
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
STAGES = registry.stage_names()


class UsageError(Exception):
    """Bad input (job file, output dir, cluster size): ``str(err)`` is the one-line message shown."""


class SpecError(UsageError):
    """A job file problem."""


class FieldError(ValueError):
    """A cross-field check's error, naming the field to fix (pydantic would locate it at the root)."""

    def __init__(self, loc: str, msg: str):
        super().__init__(f"{loc}: {msg}")
        self.loc, self.msg = loc, msg


def _no_control(value: str) -> str:
    """``value`` without control characters (a newline or tab in a name would become a label name, a
    shard-unsafe key or a path nobody typed), else ValueError naming the first one."""
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise ValueError(f"holds the control character {bad!r} at position {value.index(bad)}; remove it")
    return value


#: a path or URI as the job gives it: not empty, no control characters
PathText = Annotated[str, Field(min_length=1), AfterValidator(_no_control)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    path: PathText = Field(description="local Stable Diffusion folder or hub id")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(default="float32", description="weights' dtype "
                                                             "(float32 on cpu)")
    device: Literal["cpu", "cuda", "auto"] = Field(default="auto", description="auto: cuda when a GPU is "
                                                   "visible, else cpu")
    family: Literal["auto", "sd", "sdxl", "sd3", "flux"] = Field(
        default="auto", description="model family (stages/families/): auto: from the folder's model_index.json "
        "_class_name and its unet/transformer config; sd (1.x/2.x), sdxl, sd3, flux: explicit, must not "
        "contradict the folder")
    compile: bool = Field(default=False, description="torch.compile the denoiser (UNet or transformer) in each "
                          "synthesis worker; its first batch pays the compilation; the capture's bookkeeping runs "
                          "outside the compiled graphs; images and maps equal eager's within float tolerance")
    class_tokens: PathText | None = Field(
        default=None, description="file of class-name token embeddings tuned with the job's judge (`synthgen "
        "tune-tokens`, discriminative class tokens): written into the text encoder before the first draw; SD 1.x/2.x")

    @model_serializer(mode="wrap")
    def _omit_auto_family(self, handler: Any) -> dict[str, Any]:
        """``family: auto``, ``compile: false`` and ``class_tokens: null`` are left out of dumps, so jobs written
        before those fields keep their fingerprint."""
        data = handler(self)
        if isinstance(data, dict) and data.get("family") == "auto":
            data.pop("family")
        if isinstance(data, dict) and data.get("compile") is False:
            data.pop("compile")
        if isinstance(data, dict) and "class_tokens" in data and data["class_tokens"] is None:
            data.pop("class_tokens")
        return data


def _trimmed(value: str) -> str:
    """A class word or template as written: not blank, no leading or trailing whitespace (a blank word
    names no token; stray spaces would double the prompt's spaces and make the class name differ
    from the one references, thresholds and datasets use)."""
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    _no_control(value)
    if value != value.strip():
        raise ValueError(f"has leading or trailing whitespace; write {value.strip()!r}")
    return value


#: a class name, synonym, attribute or prompt template (checked item by item, so errors name the item)
Text = Annotated[str, AfterValidator(_trimmed)]


class ClassSpec(_Strict):
    name: Text = Field(description="the class as prompts, masks and labels name it")
    synonyms: list[Text] = Field(default=[], description="other words for it, drawn at random into prompts")
    attributes: list[Text] = Field(default=[], description="adjectives drawn into prompts, e.g. colours "
                                   "(\"a red circle\")")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class EmbeddingSpec(_Strict):
    """Conditioning in text-embedding space, computed in the synthesis actor from each sample's ``cond``.

    ``interpolate``: the prompt's embedding moved towards a partner prompt (its first class swapped
    for a class not in the image) by a weight drawn uniformly from ``weight`` (slerp or lerp per
    token); the label stays the prompt's class, so the weight is at most 0.5. ``jitter``: seeded
    Gaussian noise added to every token vector, ``sigma`` times that vector's RMS.
    """

    mode: Literal["interpolate", "jitter"] = Field(description="interpolate: towards a partner prompt; "
                                                   "jitter: seeded noise")
    method: Literal["slerp", "lerp"] = Field(default="slerp", description="interpolate: per token")
    weight: tuple[Fraction, Fraction] = Field(default=(0.1, 0.4), description="interpolate: the partner's "
                                              "weight, uniform in [low, high], high ≤ 0.5")
    sigma: float = Field(default=0.1, gt=0, description="jitter: noise × each token vector's RMS")

    @model_validator(mode="after")
    def _mode_fields(self) -> EmbeddingSpec:
        own = {"interpolate": ["method", "weight"], "jitter": ["sigma"]}[self.mode]
        stray = sorted(self.model_fields_set - {"mode", *own})
        if stray:
            raise ValueError(f"{stray[0]} does not apply to mode {self.mode!r} (its fields: {', '.join(own)})")
        low, high = self.weight
        if not low <= high <= 0.5:
            raise ValueError(f"weight {list(self.weight)} must be [low, high] with low <= high <= 0.5 (the "
                             "partner class must not outweigh the class the sample is labelled with)")
        return self


class PromptSpec(_Strict):
    templates: list[Text] = Field(default=["a photo of {objects}"], min_length=1,
                                  description="each holds {objects} once; one is drawn per sample")
    min_classes_per_image: PositiveInt = Field(default=1, description="fewest classes a prompt names")
    max_classes_per_image: PositiveInt = Field(default=1, description="most classes a prompt names")
    max_instances_per_class: PositiveInt = Field(default=1, description="most instances of one class a prompt "
                                                 "asks for ('two red circles'): text prompts draw 1..this per "
                                                 "class, image-guided variations name the reference's count of its "
                                                 "class (up to this); 1: every class named once ('a circle')")
    count_style: Literal["number", "repeat"] = Field(default="number", description="how a prompt asks for several "
                                                     "instances of a class: 'number' ('two red circles') or "
                                                     "'repeat' ('a red circle and a red circle', for a tokenizer "
                                                     "without plural and number words, like the bundled "
                                                     "model's, where 'number' is refused)")
    embedding: EmbeddingSpec | None = Field(default=None, description="conditioning in text-embedding "
                                            "space; null: the prompt as written")

    @field_validator("templates")
    @classmethod
    def _placeholders(cls, templates: list[str]) -> list[str]:
        for t in templates:
            fields = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
            if fields != {"objects"} or t.count("{objects}") != 1:  # the sampler splits on '{objects}'
                raise ValueError(f"template {t!r} must contain '{{objects}}' exactly once and no other {{...}} "
                                 "field")
        return templates

    @model_validator(mode="after")
    def _range(self) -> PromptSpec:
        if self.min_classes_per_image > self.max_classes_per_image:
            raise ValueError(f"min_classes_per_image ({self.min_classes_per_image}) is larger than "
                             f"max_classes_per_image ({self.max_classes_per_image})")
        return self


class PerClass(_Strict):
    per_class: PositiveInt


#: ``samples: N`` (total) or ``samples: {per_class: N}`` (= N x number of classes); the tags keep
#: errors to the branch the user wrote (they are not identifiers, so messages skip them)
Samples = Annotated[
    Annotated[PositiveInt, Tag("samples:total")] | Annotated[PerClass, Tag("samples:per-class")],
    Discriminator(lambda v: "samples:per-class" if isinstance(v, (dict, PerClass)) else "samples:total"),
]


class ExciteSpec(_Strict):
    steps: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        default=0.25, description="fraction of the denoising steps, from the first, after which the latent is "
        "nudged (0.25 of 20 steps: after steps 1 to 5)")
    scale: Annotated[float, Field(ge=0.0)] = Field(
        default=20.0, description="step size of the nudge: the paper's 20 for SD 1.5; the bundled model wants 5 "
        "(20 overshoots it); 0 measures the loss (gen's excite.loss) without nudging")


class EarlyCheckSpec(_Strict):
    step: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        default=0.7, description="fraction of the denoising steps after which each sample is checked (0.7 of 20: "
        "after step 14)")
    min_score: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.05, description="a sample stops when the judge scores a prompted class below this on its "
        "predicted clean image (looser than judge.min_score: that image is still blurred)")


class GenerationSpec(_Strict):
    steps: PositiveInt = Field(default=25, description="denoising steps")
    guidance_scale: float = Field(default=7.5, ge=0.0, description="classifier-free guidance scale")
    height: PositiveInt = Field(default=512, description="image height in pixels, a multiple of 8")
    width: PositiveInt = Field(default=512, description="image width in pixels, a multiple of 8")
    scheduler: Literal["default", "ddim", "dpm++", "euler", "pndm"] = Field(
        default="default", description="default: the model folder's own scheduler")
    batch_size: PositiveInt | Literal["auto"] = Field(
        default=8, description="images per pipeline call; auto: the most that fit the synthesis device's free "
        "memory (measured at the first run's start, a divisor of output.shard_size, at most 64; recorded in the "
        "manifest, which later runs take it from)")
    guidance_cutoff: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        default=None, description="stop CFG after this fraction of the steps (then only the conditional half runs: "
        "fewer denoiser calls); null: CFG throughout; not on flux")
    cache_interval: Annotated[int, Field(ge=2, le=50)] | None = Field(
        default=None, description="DeepCache-style feature reuse: the UNet's deep blocks run on every N-th denoiser "
        "call and the calls between reuse their outputs (faster, slightly different images; "
        "stages/families/feature_reuse.py); null: every block on every call; UNet families only")
    excite: ExciteSpec | None = Field(
        default=None, description="Attend-and-Excite: each prompted class's cross-attention peak is raised in the "
        "first steps (stages/families/excite.py); true: the defaults; text-to-image on the UNet families; each "
        "sample's gen records excite.loss, 1 - its weakest class's peak at each nudged step")

    early_check: EarlyCheckSpec | None = Field(
        default=None, description="early rejection: part-way through each text-to-image draw the judge reads the "
        "predicted clean image on the attention crops so far; a sample it fails stops there (its redraw starts; "
        "stages/early_check.py); true: the defaults; needs a judge; UNet families; a scheduler that predicts the clean "
        "image each step (dpm++, ddim, euler; the bundled model's default is DPM-Solver++)")

    @field_validator("excite", "early_check", mode="before")
    @classmethod
    def _section_shorthand(cls, v: Any) -> Any:
        """``excite: true`` / ``early_check: true`` turn it on with the defaults, ``false`` leaves it off."""
        return {} if v is True else None if v is False else v
    redraws: Annotated[int, Field(ge=0, le=100)] = Field(
        default=0, description="a sample the checks reject (judge, masks, labels, filters but dedup) is drawn "
        "again from new noise, up to this many times; every attempt is recorded (stages/redraw.py)")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size_word(cls, v: Any) -> Any:
        """``auto`` in any case; another word (or a bool, a float) is refused with the two forms it can take."""
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        if isinstance(v, (str, bool, float)) or v is None:
            raise ValueError("must be an integer at least 1 or auto; e.g. batch_size: 8")
        return v

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8 (the VAE downsamples by 8)")
        return v


#: a capture level: a grid side at the job's image size (16: a 16×16 map of a square image, the shorter
#: side otherwise) or a fraction of the latent side ("1", "1/2", "1/4", ...): stages/unet_layout.py
Level = Annotated[PositiveInt, Tag("level:side")] | Annotated[
    str, Field(pattern=r"^1(/(2|4|8|16|32|64))?$"), Tag("level:fraction")]
Level = Annotated[Level, Discriminator(lambda v: "level:fraction" if isinstance(v, str) else "level:side")]


class MasksSpec(_Strict):
    capture_resolutions: list[Level] = Field(default=[16, 32], min_length=1, description="attention levels "
                                             "captured, at the job's size: grid sides (16: 16×16) or "
                                             "fractions of the latent side ('1/4')")
    self_attention_resolution: Level | None = Field(default=None, description="self-attention level for "
                                                    "refine_power on a UNet model (as capture_resolutions; MM-DiT "
                                                    "models refine with their captured blocks' own attention)")
    capture_blocks: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, description="sd3 / flux: transformer blocks captured, by index (flux: double-stream "
        "blocks first, then single-stream); null: the family's middle blocks. UNet families use capture_resolutions")
    refine_power: int = Field(default=0, ge=0, description="τ: maps refined as A^τ · maps (A: self-"
                              "attention); 0: off")
    step_window: tuple[Fraction, Fraction] = Field(default=(0.0, 1.0), description="[start, end): the "
                                                   "fraction of denoising steps captured")
    threshold: Literal["fixed", "otsu", "calibrated"] = Field(default="fixed", description="fixed: "
                                                              "fg_threshold; otsu: per map; calibrated: "
                                                              "class_thresholds")
    fg_threshold: Fraction = Field(default=0.5, description="a normalised map at or above it: the class")
    ignore_threshold: Fraction = Field(default=0.35, description="from here up to the class threshold: "
                                       "ignore (255); scaled in proportion for otsu / calibrated")
    class_thresholds: dict[str, Fraction] | None = Field(default=None, description="per-class "
                                                         "thresholds for threshold: calibrated")
    calibration: PathText | None = Field(default=None, description="JSON file written by `synthgen eval --calibrate`; "
                                    "its class_thresholds are loaded into this spec")
    ambiguity_margin: float = Field(default=0.0, ge=0.0, description="two best maps this close: ignore "
                                    "(255)")
    use_raw: bool = Field(default=False, description="masks from the raw cross-attention, not the "
                          "self-attention-refined maps")
    image_refine: Literal["none", "superpixels"] = Field(
        default="none", description="superpixels: average each class map over Felzenszwalb segments of the "
        "generated image before thresholding, so masks follow the image's edges (stages/masks.py)")
    superpixel_scale: float = Field(default=10.0, gt=0.0, description="Felzenszwalb scale (larger: bigger segments)")
    superpixel_min_area: Fraction = Field(default=0.005, description="smallest segment, as a fraction of the image")

    @model_validator(mode="after")
    def _consistent(self) -> MasksSpec:
        if self.step_window[0] >= self.step_window[1]:
            raise ValueError(f"step_window {list(self.step_window)} must be [start, end) with start < end")
        if self.ignore_threshold > self.fg_threshold:
            raise ValueError(f"ignore_threshold ({self.ignore_threshold}) must not exceed "
                             f"fg_threshold ({self.fg_threshold})")
        return self


class FiltersSpec(_Strict):
    min_area_fraction: Fraction = Field(default=0.005, description="smallest instance, fraction of the image")
    max_area_fraction: Fraction = Field(default=0.95, description="largest instance, fraction of the image")
    min_contrast: float = Field(default=0.1, description="reject when a class's inside/outside attention "
                                "contrast is lower")
    max_extra_instances: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="reject a sample when a class has more than (times prompted + this) "
        "instances (reason 'count:<class>'); null = off")
    max_missing_instances: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="reject a sample when a class has fewer than (times prompted - this) "
        "instances (reason 'fewer:<class>'); null = off")
    dedup_threshold: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="phash Hamming distance to a kept image that marks a duplicate; null = off")

    @model_validator(mode="after")
    def _bounds(self) -> FiltersSpec:
        if self.min_area_fraction > self.max_area_fraction:
            raise ValueError(f"min_area_fraction ({self.min_area_fraction}) is larger than "
                             f"max_area_fraction ({self.max_area_fraction})")
        return self


class JudgeSpec(_Strict):
    """What judges a sample's image (stages/judges.py); below ``min_score`` the filters reject it."""

    kind: Literal["classifier", "clip", "shapes-oracle"] = Field(default="classifier", description="classifier: a "
        "transformers image classifier; clip: a transformers CLIP, zero-shot; shapes-oracle: the shapes oracle (a bound)")
    path: PathText | None = Field(default=None, description="the model's folder (config.json, model.safetensors, "
                                  "preprocessor_config.json; a classifier's id2label, a CLIP's tokenizer)")
    min_score: Fraction = Field(default=0.5, description="reject ('judge:<class>') a prompted class scored below it")
    region: Literal["image", "attention"] = Field(default="image", description="image: the whole image, once; "
        "attention: each prompted class on the crop around its own attention (a classifier of single objects); "
        "inpainting: the repainted instance on the crop around its outline, either way")
    labels: dict[str, str] | None = Field(default=None, description="job class -> the classifier's label (clip: "
                                          "the words in 'a photo of a ...'), where they differ")

    @model_validator(mode="after")
    def _path(self) -> JudgeSpec:
        if self.kind in ("classifier", "clip") and not self.path:
            raise ValueError(f"kind {self.kind} needs path: the model's folder")
        if self.kind == "shapes-oracle" and (self.path or self.labels):
            raise ValueError(f"kind {self.kind} takes no path or labels")
        return self


class OutputSpec(_Strict):
    dir: PathText = Field(description="output directory")
    shard_size: PositiveInt = Field(default=1000, description="indices per shard, a multiple of "
                                    "generation.batch_size")
    split: str = Field(default="train", pattern=r"^[a-z0-9]+$", description="shard name prefix")
    jpeg_quality: int = Field(default=95, ge=1, le=100, description="quality of key.jpg")
    index: bool = Field(default=True, description="also write index.parquet at the end of a run (streamed from the "
                        "parts); false for very large jobs: the manifest's parts are the index (one Parquet dataset)")


Strength = Annotated[float, Field(gt=0.0, le=1.0)]


class SelectSpec(_Strict):
    """Which references get variations: the keys listed in a CSV / Parquet file, or with ``top_k`` /
    ``top_fraction`` the ones with the highest ``loss_column`` (ties by key)."""

    path: PathText = Field(description="CSV or Parquet file with a key column (and a loss column)")
    key_column: str = Field(default="key", description="column of reference keys")
    loss_column: str = Field(default="loss", description="column that top_k / top_fraction rank by")
    top_k: PositiveInt | None = Field(default=None, description="the k highest losses")
    top_fraction: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(default=None, description="this "
                                                                         "fraction, highest losses first")
    instance_column: str | None = Field(default=None, description="mode inpaint: column of annotation ids; "
                                        "each row picks one instance (null: every instance of a picked image)")

    @model_validator(mode="after")
    def _one_rule(self) -> SelectSpec:
        if self.top_k is not None and self.top_fraction is not None:
            raise ValueError("give top_k or top_fraction, not both")
        if self.instance_column is not None and (self.top_k is not None or self.top_fraction is not None):
            raise ValueError("instance_column lists the instances to inpaint; top_k / top_fraction rank whole "
                             "images: give one or the other")
        return self


RGB = tuple[Annotated[int, Field(ge=0, le=255)], Annotated[int, Field(ge=0, le=255)],
            Annotated[int, Field(ge=0, le=255)]]


class InpaintSpec(_Strict):
    """Outline-guided inpainting (``references.mode: inpaint``): each annotated instance of a reference is
    repainted inside its outline; the reference's masks are the labels."""

    dilation: Annotated[int, Field(ge=0, le=64)] = Field(default=2, description="pixels (at the generation size) "
                                                          "around an instance's outline that are repainted too")
    crop_padding: Annotated[int, Field(ge=0, le=4096, strict=True)] | None = Field(
        default=None, description="repaint a crop instead of the whole image: the repaint mask's box grown by "
        "this many pixels (and to the image's aspect ratio), at the generation size, then resized back (a small "
        "outline gets the model's full resolution); null: the whole image")
    prompt: Literal["template", "empty"] = Field(default="template", description="template: the job's templates "
                                                 "with the instance's class (and a new attribute); empty: no text, "
                                                 "the outline alone (no attention check)")
    fill: Literal["keep", "palette"] = Field(default="keep", description="what the outline holds before inpainting: "
                                             "the reference's pixels, or the colour of the prompt's attribute "
                                             "(palette) as a silhouette")
    palette: dict[str, RGB] | None = Field(default=None, description="attribute -> [r, g, b], for fill: palette")
    min_mass_inside: Fraction = Field(default=0.5, description="reject ('outline:<class>') when less of the "
                                      "class's attention mass lies inside the dilated outline")
    min_iou: Fraction = Field(default=0.0, description="... or when the class's attention mask (masks.threshold "
                              "rule) overlaps the outline less (IoU)")
    redraw_strengths: list[Annotated[float, Field(gt=0.0, le=1.0)]] | None = Field(
        default=None, min_length=1, description="with generation.redraws: redraw k of a rejected sample uses the "
        "k-th strength (the last for later ones), e.g. [0.45, 0.35]: a lower one keeps more of the outline's "
        "silhouette; null: the sample's own strength")

    @model_validator(mode="after")
    def _palette(self) -> InpaintSpec:
        if self.fill == "palette" and not self.palette:
            raise ValueError("fill: palette needs palette: {attribute: [r, g, b], ...}")
        return self


class ReferencesSpec(_Strict):
    """Real images as img2img starting points (or, with ``mode: inpaint``, their annotated instances as outlines
    to repaint): every reference (instance) x strength x seed is one sample, so ``samples`` must equal
    references (instances) x len(strengths) x seeds_per_level (checked against the folder)."""

    path: PathText = Field(description="COCO folder (annotations.json) or a synthgen output dir")
    mode: Literal["img2img", "inpaint"] = Field(default="img2img", description="img2img: the whole image at each "
                                                "strength; inpaint: every annotated instance repainted inside its "
                                                "outline, the reference's masks kept as labels")
    inpaint: InpaintSpec = Field(default=InpaintSpec(), description="options of mode: inpaint")
    strengths: list[Strength] = Field(default=[0.1, 0.3, 0.5, 0.7, 0.9], min_length=1, description="img2img "
                                      "strengths, each with int(steps × strength) ≥ 1")
    seeds_per_level: PositiveInt = Field(default=1, description="variations per reference and strength")
    select: SelectSpec | None = Field(default=None, description="which references get variations; "
                                      "null: all")

    @model_validator(mode="after")
    def _mode(self) -> ReferencesSpec:
        if self.mode != "inpaint" and "inpaint" in self.model_fields_set:
            raise ValueError("inpaint options are set but mode is img2img; add mode: inpaint")
        if self.mode != "inpaint" and self.select is not None and self.select.instance_column is not None:
            raise ValueError("select.instance_column picks instances to inpaint; add mode: inpaint")
        return self

    @field_validator("strengths")
    @classmethod
    def _distinct(cls, strengths: list[float]) -> list[float]:
        if len(set(strengths)) != len(strengths):
            raise ValueError(f"strengths {strengths} repeat a value")
        return strengths

    @property
    def redraw_ladder(self) -> list[float]:
        """The strengths redraws 1, 2, ... of an inpainting sample use (``inpaint.redraw_strengths``); [] for none."""
        return list(self.inpaint.redraw_strengths or []) if self.mode == "inpaint" else []


class StageResources(_Strict):
    num_cpus: float = Field(default=1.0, gt=0, description="per actor or task; on CPU also its torch threads")
    num_gpus: float = Field(default=0.0, ge=0, description="per actor (synthesis only)")
    actors: PositiveInt | Literal["auto"] = Field(
        default=1, description="actor pool size (model stages) or concurrent tasks; auto: one per GPU the Ray "
        "cluster has at start (its GPUs / num_gpus; GPU nodes an autoscaler has not started yet do not count), 1 "
        "for a stage without a GPU or with --no-ray")

    @field_validator("actors", mode="before")
    @classmethod
    def _actors(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "auto" and not value.strip().isdigit():
            raise ValueError("must be a whole number ≥ 1 or 'auto' (one actor per GPU of the cluster)")
        return value


class _Resources(_Strict):
    def for_stage(self, name: str) -> StageResources:
        return getattr(self, name)


#: ``resources``: one entry per registered stage (stages/registry.py), in pipeline order
ResourcesSpec = create_model(
    "ResourcesSpec", __base__=_Resources,
    **{e.name: (StageResources, Field(default=StageResources(**e.defaults), description=f"the {e.name} stage"))
       for e in registry.STAGES})


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="used in sample keys")
    seed: int = Field(default=0, description="job seed: each sample's seed is a blake2 hash of (seed, index)")
    model: ModelSpec
    classes: list[ClassSpec] = Field(min_length=1, description="an item is a name or {name, synonyms, "
                                     "attributes}")
    prompts: PromptSpec = PromptSpec()
    samples: Samples = Field(description="how many: a total, or {per_class: N} for N × the classes")
    generation: GenerationSpec = GenerationSpec()
    masks: MasksSpec = MasksSpec()
    filters: FiltersSpec = FiltersSpec()
    output: OutputSpec
    resources: ResourcesSpec = Field(default=ResourcesSpec(), description="per stage; consecutive CPU "
                                     "stages with equal resources share one worker")
    references: ReferencesSpec | None = Field(default=None, description="img2img variations of real "
                                              "images; null: text-to-image")
    judge: JudgeSpec | None = Field(default=None, description="judges each image (stages/judges.py); null: none")
    retries: int = Field(default=3, ge=0, description="recoveries within one Ray run from a lost node, actor, "
                         "worker or object: the pipeline is rebuilt over the shards not yet committed (same bytes); "
                         "0: stop at the first")
    #: PATH_FIELDS as the user gave them (job file or command line), before resolving; set by load_spec
    _given: dict[str, str] = PrivateAttr(default_factory=dict)
    _on_command_line: set[str] = PrivateAttr(default_factory=set)  # path fields set by --set / --out

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "labels" in data:
            raise FieldError("labels", "this section was removed: every dataset has semantic masks, COCO instances "
                             "and boxes; delete it from the job file")
        return data

    @field_validator("classes")
    @classmethod
    def _unique(cls, classes: list[ClassSpec]) -> list[ClassSpec]:
        names = [c.name for c in classes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"class names must be unique, repeated: {dupes}")
        return classes

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        if isinstance(self.samples, PerClass):  # normalise: spec.samples is always the total
            object.__setattr__(self, "samples", self.samples.per_class * len(self.classes))
        if self.prompts.max_classes_per_image > len(self.classes):
            raise FieldError("prompts.max_classes_per_image", f"{self.prompts.max_classes_per_image} is more than "
                           f"the {len(self.classes)} classes")
        too_many = shard_count_problem(self.samples, self.output.shard_size)
        if too_many:
            raise FieldError("samples", too_many)
        if self.generation.batch_size != "auto" and self.output.shard_size % self.generation.batch_size:
            raise FieldError("output.shard_size", f"{self.output.shard_size} is not a multiple of "
                           f"generation.batch_size ({self.generation.batch_size}); shards must hold whole "
                           "batches so a resumed run batches samples exactly as an uninterrupted one")
        synth = self.resources.synthesis
        if self.model.device == "cuda" and synth.num_gpus <= 0:
            raise FieldError("resources.synthesis.num_gpus", "model.device is cuda but the synthesis stage "
                           "reserves no GPU; set resources.synthesis.num_gpus: 1")
        if self.model.device == "cpu" and synth.num_gpus > 0:
            raise FieldError("resources.synthesis.num_gpus", f"{synth.num_gpus} GPUs reserved but model.device "
                           "is cpu; set num_gpus: 0 or device: cuda")
        if self.model.device == "cpu" and self.model.dtype != "float32":
            raise FieldError("model.dtype", f"{self.model.dtype} on device cpu is slow or unsupported; use float32")
        for entry in registry.STAGES:
            if not entry.gpu and self.resources.for_stage(entry.name).num_gpus > 0:
                gpu = ", ".join(e.name for e in registry.STAGES if e.gpu)
                raise FieldError(f"resources.{entry.name}.num_gpus", f"only the {gpu} stage uses a GPU; set it to 0")
        if self.filters.dedup_threshold is not None and self.resources.filters.actors != 1:
            raise FieldError("resources.filters.actors", "near-duplicate removal (filters.dedup_threshold) "
                             "compares each image with those kept before it, in index order: use 1 actor")
        if self.masks.threshold == "calibrated":
            missing = [c.name for c in self.classes if c.name not in (self.masks.class_thresholds or {})]
            if missing:
                raise FieldError("masks.class_thresholds", f"threshold is 'calibrated' but classes {missing} "
                               "have no threshold; fit them with `synthgen eval JOB --calibrate FILE` (masks."
                               "calibration: FILE) or use masks.threshold: fixed or otsu")
        self._check_variations()
        return self

    def _check_variations(self) -> None:
        """Img2img strengths that run at least one step; a partner class for embedding interpolation."""
        steps = self.generation.steps
        ladder = self.references.redraw_ladder if self.references else []
        for field, values in (("references.strengths", self.references.strengths if self.references else ()),
                              ("references.inpaint.redraw_strengths", ladder)):
            for s in values:
                if int(s * steps) < 1:  # diffusers' img2img runs int(steps x strength) steps
                    raise FieldError(field, f"strength {s} x generation.steps {steps} is less than one denoising "
                                     f"step; use generation.steps >= {math.ceil(1 / s)} or a larger strength")
        if ladder and not self.generation.redraws:
            raise FieldError("references.inpaint.redraw_strengths", "only redraws use it, and generation.redraws is "
                             "0; set generation.redraws (e.g. to the list's length) or remove it")
        embedding = self.prompts.embedding
        per_image = 1 if self.references else self.prompts.max_classes_per_image
        if embedding and embedding.mode == "interpolate" and len(self.classes) <= per_image:
            raise FieldError("prompts.embedding.mode", f"interpolate swaps a class for one not in the image, but "
                             f"images may name all {len(self.classes)} classes; add classes or lower "
                             "prompts.max_classes_per_image")

    @property
    def shard_size(self) -> int:
        """Samples per shard (stages see it in their run context: a shard's samples reach one worker in order)."""
        return self.output.shard_size

    def given(self, field: str) -> str | None:
        """A path field (``PATH_FIELDS``, dotted) as the user gave it; the resolved value when the spec
        was not made by ``load_spec``; None when unset."""
        node: Any = self
        for part in field.split("."):
            node = getattr(node, part, None)
        return self._given.get(field, node) if isinstance(node, str) else None

    def origin(self, field: str) -> str:
        """Where a path field's relative value was resolved: words for an error message."""
        return ORIGIN[field in self._on_command_line]

    @property
    def model_name(self) -> str:
        """The model as datasets name it: the hub id or the folder path as written (relative to the job
        file, or to the working directory for ``--set``); an absolute one only by its folder's name."""
        return public_path(self.given("model.path"))

    def model_identity(self) -> dict[str, Any]:
        """The model by content under the name the user gave it (``stages.identity.model_identity``): what
        the manifest's ``model`` entry records and ``fingerprint`` takes. Hashes the model's files
        (cached by path, size and mtime; see stages/identity.py)."""
        from stages.identity import model_identity

        return model_identity(self.model.path, self.model_name)

    def public_dump(self) -> dict[str, Any]:
        """``model_dump(mode="json")`` with every path field as the user gave it (``public_path``: relative
        as written, absolute reduced to its last component): what a manifest records, so no local path
        leaks into a dataset and two checkouts of one job record the same spec."""
        dump = self.model_dump(mode="json")
        for field in PATH_FIELDS:
            *parents, leaf = field.split(".")
            node: Any = dump
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and isinstance(node.get(leaf), str):
                node[leaf] = public_path(self.given(field))
        return dump

    def fingerprint(self, model_identity: dict, samples: int | None = None) -> str:
        """sha256 over everything that changes the samples, by content and never by location: the spec
        without its path fields and resources, the model as its name (``model_name``, which samples
        record) and content ``id`` (local folder: weights, configs, tokenizer) or its hub id (whose
        cached revision is recorded in the manifest but may only be known after the first download),
        and the references by content (``references_digest``).

        ``samples`` is not in it: sample i is the same whatever the count, so a dataset grows or shrinks
        by rerunning with another count (the manifest's ``layout`` records it). ``samples=N`` gives the
        fingerprint synthgen wrote before that, which covered the count N: a resume accepts it."""
        # masks.calibration is a location: the thresholds it holds are copied into masks.class_thresholds
        exclude: dict[str, Any] = {}
        for field in UNFINGERPRINTED:
            section, _, leaf = field.partition(".")
            if leaf:
                exclude[section] = {*exclude.get(section, ()), leaf}
            elif section != "references":  # references: its content is, by references_digest (below)
                exclude[section] = True
        if self.prompts.embedding is None:  # new, unset sections leave older jobs' fingerprints as they were
            exclude["prompts"] = {"embedding"}
        if self.prompts.max_instances_per_class == 1:  # new fields at their defaults: fingerprints as before
            exclude["prompts"] = {*exclude.get("prompts", ()), "max_instances_per_class", "count_style"}
        elif self.prompts.count_style == "number":
            exclude["prompts"] = {*exclude.get("prompts", ()), "count_style"}
        if self.masks.capture_blocks is None:
            exclude["masks"] = {*exclude["masks"], "capture_blocks"}
        if self.generation.guidance_cutoff is None:  # new field at its default: fingerprints as before
            exclude["generation"] = {*exclude.get("generation", ()), "guidance_cutoff"}
        if self.generation.redraws == 0:
            exclude["generation"] = {*exclude.get("generation", ()), "redraws"}
        if self.generation.cache_interval is None:
            exclude["generation"] = {*exclude.get("generation", ()), "cache_interval"}
        if self.generation.excite is None:
            exclude["generation"] = {*exclude.get("generation", ()), "excite"}
        if self.generation.early_check is None:
            exclude["generation"] = {*exclude.get("generation", ()), "early_check"}
        if self.judge is None:
            exclude["judge"] = True
        if self.filters.max_missing_instances is None:
            exclude["filters"] = {*exclude.get("filters", ()), "max_missing_instances"}
        if self.references is None:
            exclude["references"] = True
        else:
            exclude["references"] = {"path": True, "select": {"path"}}
            if self.references.mode == "img2img":  # new fields at their defaults: fingerprints as before
                exclude["references"].update(mode=True, inpaint=True)
            else:  # options left null: jobs written before them keep their fingerprint
                exclude["references"]["inpaint"] = {name for name in ("redraw_strengths", "crop_padding")
                                                    if getattr(self.references.inpaint, name) is None}
            if self.references.select is not None and self.references.select.instance_column is None:
                exclude["references"]["select"] = {"path", "instance_column"}
        spec = self.model_dump(mode="json", exclude=exclude)
        if samples is not None:
            spec["samples"] = samples
        # the removed labels section (always all true) stays in the payload: datasets keep their fingerprints
        spec["labels"] = {"semantic": True, "instances": True, "boxes": True}
        if model_identity.get("source") == "local":
            model = {"name": self.model_name, "id": model_identity["id"]}
        else:
            model = {"hub_id": self.model.path}
        payload = {"spec": spec, "model": model}
        if self.references is not None:  # the reference data by content, not by location
            from stages.references import references_digest

            payload["references"] = references_digest(self.references)
        if self.judge is not None and self.judge.path:  # the classifier by content, not by location
            from stages.identity import judge_identity

            payload["judge"] = judge_identity(self.judge.path)
        if self.model.class_tokens is not None:  # the tuned tokens by content, not by location
            from stages.identity import cached_sha256

            payload["class_tokens"] = cached_sha256(self.model.class_tokens)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


#: where a relative path was resolved (set on the command line or not): words for error messages
ORIGIN = {True: "set on the command line: a relative path there resolves against the current directory",
          False: "a relative path in a job file resolves against the job file's folder"}


#: a Hugging Face hub id: ``org/name`` and nothing else (no leading dot, no second slash, no backslash)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def looks_local(path: str, base: Path) -> bool:
    """Whether a model path names a local folder (vs a hub id): it starts with ``/``, ``.`` or ``~``, names a
    folder that exists (against ``base``, or the current directory: found there but not against ``base``,
    it is still a local path, which pre-flight then reports as missing where it is looked for), or is
    not of the hub's ``org/name`` form. Only an ``org/name`` that exists nowhere is a hub id."""
    return path.startswith(("/", ".", "~")) or (base / path).exists() or Path(path).exists() \
        or HUB_ID.fullmatch(path) is None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'generation.steps=10' -> (['generation', 'steps'], 10); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {item}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise SpecError(f"--set {item}: value is not valid YAML ({_yaml_problem(e)})") from None
    if raw.strip() == "~" and key.strip() in PATH_FIELDS:
        value = "~"  # YAML's null, but a path field means the home folder (expanded like any '~/...')
    return key.strip().split("."), value


def _apply(data: dict, keys: list[str], value: Any, item: str) -> None:
    """Set ``data[k1][k2]... = value``, creating mappings on the way (list items by number)."""
    node: Any = data
    for i, k in enumerate(keys):
        where = ".".join(keys[:i]) or "the job"
        if isinstance(node, list):
            if not (k.isdigit() and int(k) < len(node)):
                raise SpecError(f"--set {item}: {where} has no item {k!r} (it has {len(node)})")
            k = int(k)
        elif not isinstance(node, dict):
            raise SpecError(f"--set {item}: {where} is not a mapping")
        if i == len(keys) - 1:
            node[k] = value
        else:
            if not isinstance(node[k] if isinstance(node, list) else node.get(k), (dict, list)):
                node[k] = {}
            node = node[k]


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    return where + str(getattr(e, "problem", None) or e).replace("\n", " ")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not part.isidentifier():
            continue  # union branch tags and validator names add nothing for the user
        else:
            out += ("." if out else "") + str(part)
    return out


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The first pydantic model inside a field's annotation (through unions and ``Annotated``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for arg in typing.get_args(annotation) if (m := _model_in(arg)) is not None), None)


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names of the model at ``loc`` (for 'unknown key' messages)."""
    model: Any = JobSpec
    for part in loc[:-1]:
        if isinstance(part, int) or model is None or not part.isidentifier():
            continue  # list items, union branch tags
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        model = _model_in(field.annotation) if field else None
    return list(model.model_fields) if model is not None else []


def _format_error(err: ValidationError) -> str:
    # an unknown key first: a misspelled field is also reported missing, and the typo is the cause
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    # a union (samples: N | {per_class: N}) reports one error per branch: count fields, not branches
    others = {_loc(e["loc"]) for e in errors[1:]} - {_loc(first["loc"])}
    more = f" (and {len(others)} more)" if others else ""
    ctx_err = first.get("ctx", {}).get("error")
    if isinstance(ctx_err, FieldError):
        return f"{ctx_err.loc}: {ctx_err.msg}{more}"
    loc = _loc(first["loc"])
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(first["loc"])
        near = difflib.get_close_matches(str(first["loc"][-1]), allowed, n=1)
        hint = (f" (did you mean {near[0]}?)" if near else "") + \
            (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
        return f"{loc}: unknown key{hint}{more}"
    if first["type"] == "missing":
        return f"{loc}: required field is missing{more}"
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    if first["type"] in RANGE_WORDS:  # a number out of range: say the range and the fix
        word, key = RANGE_WORDS[first["type"]]
        limit = first.get("ctx", {}).get(key)
        return f"{loc}: must be {word} {limit}{shown}; set {loc} to a number {word} {limit}{more}"
    return f"{loc or 'job'}: {msg}{shown}{more}"


#: pydantic's range error types -> (words, its ctx key)
RANGE_WORDS = {"greater_than_equal": ("at least", "ge"), "greater_than": ("above", "gt"),
               "less_than_equal": ("at most", "le"), "less_than": ("below", "lt")}


def validate_spec(data: Any, source: str = "job") -> JobSpec:
    """A JobSpec from parsed YAML data, or SpecError with a one-line message."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the job file must be a YAML mapping (key: value), got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{source}: {_format_error(e)}") from None


def _lookup(data: Any, field: str) -> Any:
    """``data[k1][k2]...`` for a dotted field, None where a level is missing."""
    for part in field.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def sets(key: str, field: str) -> bool:
    """Whether an override of dotted ``key`` sets ``field``: the field itself, or a section holding it."""
    return field == key or field.startswith(key + ".")


def given_paths(data: Any, overrides: Sequence[tuple[list[str], Any]], job_dir: Path,
                override_dir: Path) -> dict[str, tuple[str, Path]]:
    """The path fields (``PATH_FIELDS``) a job sets, as written: dotted field -> (value, the folder a
    relative value is resolved against: ``job_dir`` for the job file's, ``override_dir`` for a value
    set by an override ``(keys, value)`` of the field or of a section holding it)."""
    found = {field: (value, job_dir) for field in PATH_FIELDS if isinstance(value := _lookup(data, field), str)}
    for keys, value in overrides:
        key = ".".join(keys)
        for field in PATH_FIELDS:
            if sets(key, field):
                found.pop(field, None)
                inner = value if field == key else _lookup(value, field[len(key) + 1:])
                if isinstance(inner, str):
                    found[field] = (inner, override_dir)
    return found


def _resolve_paths(data: dict, base: Path) -> None:
    """Make relative model.path / output.dir absolute against ``base`` (in place)."""
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str) and looks_local(model["path"], base):
        model["path"] = str((base / Path(model["path"]).expanduser()).resolve())
    if isinstance(model, dict) and isinstance(model.get("class_tokens"), str):
        model["class_tokens"] = str((base / Path(model["class_tokens"]).expanduser()).resolve())
    output = data.get("output")
    if isinstance(output, dict) and isinstance(output.get("dir"), str) and not _is_uri(output["dir"]):
        output["dir"] = str((base / Path(output["dir"]).expanduser()).resolve())  # s3://... stays a URI
    masks = data.get("masks")
    if isinstance(masks, dict) and isinstance(masks.get("calibration"), str):
        masks["calibration"] = str((base / Path(masks["calibration"]).expanduser()).resolve())
    judge = data.get("judge")
    if isinstance(judge, dict) and isinstance(judge.get("path"), str):
        judge["path"] = str((base / Path(judge["path"]).expanduser()).resolve())


def _is_uri(text: str) -> bool:
    """``scheme://...`` other than ``file://`` (pipeline/storage.py opens it; it is no local path)."""
    from .storage import is_uri

    return is_uri(text)


#: file paths inside ``references`` (resolved like output.dir: job file's folder, or cwd for --set)
REFERENCE_PATHS = (["references", "path"], ["references", "select", "path"])


def _resolve_reference_paths(data: dict, base: Path) -> None:
    for keys in REFERENCE_PATHS:
        node: Any = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            node[keys[-1]] = str((base / Path(node[keys[-1]]).expanduser()).resolve())


def check_references(spec: JobSpec, source: str) -> None:
    """The reference folder and selection file are readable, name only the job's classes, and give
    exactly ``samples`` variations (references x strengths x seeds_per_level)."""
    from stages.references import ReferenceDataError, list_references

    try:
        refs = list_references(spec)
    except ReferenceDataError as e:
        raise SpecError(f"{source}: {e}") from None
    cfg = spec.references
    units, what = len(refs), "references"
    if cfg.mode == "inpaint":
        from stages.references import inpaint_references

        try:
            units, what = len(inpaint_references(spec).instances), "instances"
        except ReferenceDataError as e:
            raise SpecError(f"{source}: {e}") from None
    total = units * len(cfg.strengths) * cfg.seeds_per_level
    if spec.samples != total:
        raise SpecError(f"{source}: samples: {spec.samples}, but {units} {what} x {len(cfg.strengths)} "
                        f"strengths x {cfg.seeds_per_level} seeds_per_level = {total} variations; set samples: {total}")


def load_calibration(data: dict, source: str, on_command_line: bool = False) -> None:
    """Copy the per-class thresholds of ``masks.calibration`` (a JSON file) into ``masks.class_thresholds``."""
    masks = data.get("masks")
    if not isinstance(masks, dict) or not isinstance(masks.get("calibration"), str):
        return
    path = Path(masks["calibration"])
    if masks.get("class_thresholds") is not None:
        raise SpecError(f"{source}: masks: give class_thresholds or calibration, not both")
    try:
        thresholds = json.loads(path.read_text())["class_thresholds"]
    except FileNotFoundError:
        raise SpecError(f"{source}: masks.calibration: {path} does not exist ({ORIGIN[on_command_line]}); point "
                        f"it at the file, or write one with "
                        f"`synthgen eval JOB --calibrate {path}`") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpecError(f"{source}: masks.calibration: cannot read class_thresholds from {path} "
                        f"({type(e).__name__}: {e}); write it with `synthgen eval JOB --calibrate {path}`") from None
    masks["class_thresholds"] = thresholds


def check_paths(spec: JobSpec, source: str) -> None:
    """Filesystem checks: the local model folder and what the job asks of it (pipeline/preflight.py: layout,
    safetensors, tokenizer and prompt lengths, capture levels; no weights loaded), the output dir is not
    a file, the references fit."""
    from .preflight import check_model

    check_model(spec, source)
    out = Path(spec.output.dir)
    if _is_uri(spec.output.dir):
        from .storage import redact, uri_problem

        if uri_problem(spec.output.dir):  # credentials or options in the job file: refused, never recorded
            raise SpecError(f"{source}: output.dir: {redact(spec.output.dir)}: {uri_problem(spec.output.dir)}")
    elif out.exists() and not out.is_dir():
        raise SpecError(f"{source}: output.dir: {out} is a file, not a directory; choose another output.dir")
    if spec.references is not None:
        check_references(spec, source)
    check_judge(spec, source)
    check_class_tokens(spec, source)


def check_class_tokens(spec: JobSpec, source: str) -> None:
    """``model.class_tokens`` is a class-token file for this job's classes and model (stages/class_tokens.py)."""
    if spec.model.class_tokens is None:
        return
    from stages.class_tokens import problem

    from .preflight import job_family, load_tokenizer, model_folder

    folder = model_folder(spec)
    tokenizer = load_tokenizer(folder / "tokenizer", source) if folder is not None else None
    found = problem(spec, job_family(spec), folder,
                    None if tokenizer is None else lambda name: tokenizer.encode(name, False))
    if found:
        raise SpecError(f"{source}: {found}")


def check_judge(spec: JobSpec, source: str) -> None:
    """The judge's folder is a classifier whose weights fit its config and which names every job class."""
    from stages.judges import judge_problem

    problem = judge_problem(spec)
    if problem:
        raise SpecError(f"{source}: {problem}")


def load_spec(path: str | Path, overrides: Sequence[str] = (), out: str | None = None,
              check_files: bool = True) -> JobSpec:
    """Read, override, resolve and validate a job file. Raises SpecError (one line).

    ``check_files=False`` skips the filesystem checks (for a job that runs on another machine).
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{source}: cannot read job file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{source}: malformed YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: the job file must be a YAML mapping (key: value), got {type(data).__name__}")
    cli = [parse_override(item) + (item,) for item in overrides]
    if out is not None:
        cli.append((["output", "dir"], out, f"--out {out}"))
    found = given_paths(data, [(keys, value) for keys, value, _ in cli], path.parent, Path.cwd())
    given = {field: value for field, (value, _) in found.items()}
    on_command_line = {field for field in found if any(sets(".".join(keys), field) for keys, _, _ in cli)}
    _resolve_paths(data, path.resolve().parent)
    _resolve_reference_paths(data, path.resolve().parent)
    for keys, value, item in cli:
        if any(sets(".".join(keys), field) for field in PATH_FIELDS):
            holder: dict = {}  # a path the override sets (itself, or inside a section it sets): against the cwd
            _apply(holder, keys, copy.deepcopy(value), item)
            _resolve_paths(holder, Path.cwd())
            _resolve_reference_paths(holder, Path.cwd())
            value = _lookup(holder, ".".join(keys))
        _apply(data, keys, value, item)
    for field in PATH_FIELDS:
        section, _, name = field.rpartition(".")
        holder = _lookup(data, section)
        if isinstance(holder, dict) and name in holder and holder[name] is None and field not in OPTIONAL_PATHS:
            raise SpecError(f"{source}: {field}: is null (YAML reads a bare ~ as null); write the path in quotes, "
                            f"e.g. '~/datasets/out' or '~'")
    load_calibration(data, source, "masks.calibration" in on_command_line)
    spec = validate_spec(data, source)
    spec._given, spec._on_command_line = given, on_command_line
    if check_files:
        check_paths(spec, source)
    return spec
