"""Judges: one interface for "which of the job's classes does this image show".

A judge scores each prompted object of an image in [0, 1]; the job's ``judge.min_score`` turns a score into a
verdict (``judge:<class>`` below it, stages/filters.py), and ``generation.redraws`` redraws a sample a judge
rejects (stages/redraw.py). Two kinds:

``classifier``  a transformers image-classification folder (``config.json`` with ``id2label``,
                ``model.safetensors``, ``preprocessor_config.json``): a user's own classifier, loaded with
                ``AutoModelForImageClassification`` and preprocessed by its ``AutoImageProcessor``. A
                multi-label model (``problem_type: multi_label_classification``) scores each label by its
                sigmoid, any other by its softmax. ``judge.labels`` maps job classes to the model's label
                names (default: the same names). The bundled ``pipeline/models/shapes-judge`` is one,
                trained on rendered shapes-world scenes only (pipeline/shapes/judge.py).
``clip``        a transformers CLIP folder (``CLIPModel``: ``config.json``, ``model.safetensors``, its tokenizer
                and ``preprocessor_config.json``), zero-shot: each job class is the text
                :data:`CLIP_TEMPLATE` of its name (or of its ``judge.labels`` entry), and an object's score is
                the softmax, over the job's classes, of the image's similarity to each text.
``shapes-oracle``  the shapes world's oracle (pipeline/shapes/oracle.py): an object scores 1 when the colour
                the prompt gives it is drawn as its class. It is the truth the benchmarks measure with, so
                a job judged by it measures nothing; it is here to bound what a perfect judge would give.

:func:`judge_problem` is the pre-flight check (one line, before any weight of the diffusion model loads):
a folder that is missing or not a classifier, weights whose shapes do not match its config, a job class
that the model does not name.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: the filters' reject reason prefix of a judged object below ``judge.min_score``
REASON = "judge:"


#: the text a ``clip`` judge compares an image with, per job class
CLIP_TEMPLATE = "a photo of a {}"
#: ``judge.region: attention``: the crop around a class's attention is this much wider than the region's box
CROP_MARGIN = 0.2
#: ... and the region is where the class's normalised attention map is at least this
CROP_THRESHOLD = 0.5


def square_box(mask: np.ndarray, margin: float, shift: tuple[float, float] = (0.0, 0.0)) -> tuple[int, int, int]:
    """(top, left, side) of the square around ``mask``'s bounding box, ``margin`` × its longer side wider on
    each side, its centre moved by ``shift`` × the side (training jitter); None-free: an empty mask gives the
    whole image."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return 0, 0, max(mask.shape)
    side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    side = int(round(side * (1 + 2 * margin)))
    cy = (ys.min() + ys.max() + 1) / 2 + shift[0] * side
    cx = (xs.min() + xs.max() + 1) / 2 + shift[1] * side
    return int(round(cy - side / 2)), int(round(cx - side / 2)), max(side, 1)


def box_pixels(box: tuple[int, int, int], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows and columns of a square ``box`` in an h × w image, edge pixels repeated where it leaves it."""
    top, left, side = box
    return np.clip(np.arange(top, top + side), 0, h - 1), np.clip(np.arange(left, left + side), 0, w - 1)


def crop(image: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    """The square ``box`` of ``image`` (uint8 H, W, 3), edge pixels repeated where it leaves the image."""
    rows, cols = box_pixels(box, *image.shape[:2])
    return image[rows][:, cols]


def attention_box(amap: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int]:
    """The square a ``region: attention`` judge reads for one class: around its :func:`attention_region`,
    :data:`CROP_MARGIN` wider."""
    return square_box(attention_region(amap, size), CROP_MARGIN)


def attention_region(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool (H, W): the largest connected part of a class's map (upsampled bilinearly to ``size``, min-max
    normalised) at or above :data:`CROP_THRESHOLD`."""
    from PIL import Image
    from scipy import ndimage

    m = np.asarray(Image.fromarray(np.asarray(amap, np.float32)).resize(size[::-1], Image.BILINEAR))
    m = (m - m.min()) / max(float(m.max() - m.min()), 1e-8)
    lab, n = ndimage.label(m >= CROP_THRESHOLD)
    if n <= 1:
        return lab > 0
    sizes = ndimage.sum(np.ones_like(m), lab, index=np.arange(1, n + 1))
    return lab == int(np.argmax(sizes)) + 1


class Judge:
    """Scores of prompted objects: ``scores(images, prompts, classes, maps)`` → per image, one score per class
    name. ``maps`` (B, K, h, w): each prompted class's attention, for a judge that looks at its region;
    ``region`` overrides the judge's own; ``mask``: ``maps`` are the objects' masks (an inpainting sample's
    outline), each read on the crop around its whole mask."""

    kind = ""

    def scores(self, images: np.ndarray, prompts: Sequence[str], classes: Sequence[list[str]],
               maps: np.ndarray | None = None, region: str | None = None) -> list[list[float]]:
        raise NotImplementedError


class _Regions(Judge):
    """A judge of images or of each prompted class's attention crop: ``probabilities(images)`` over ``self.index``."""

    region = "image"
    index: dict[str, int]
    labels: dict[str, str]

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def label_index(self, name: str) -> int:
        """The model's output index of job class ``name`` (through ``judge.labels`` where it maps it)."""
        return self.index[self.labels.get(name, name)]

    def scores(self, images: np.ndarray, prompts: Sequence[str], classes: Sequence[list[str]],
               maps: np.ndarray | None = None, region: str | None = None) -> list[list[float]]:
        if (region or self.region) == "image":
            probs = self.probabilities(images)
            return [[float(p[self.label_index(c)]) for c in names] for p, names in zip(probs, classes)]
        if maps is None:
            raise ValueError("judge.region attention needs the attention maps (the synthesis stage's capture)")
        crops, where = [], []
        for i, (image, names) in enumerate(zip(images, classes)):
            for k, name in enumerate(names):
                box = (square_box(maps[i, k] > 0.5, CROP_MARGIN) if region == "mask"
                       else attention_box(maps[i, k], image.shape[:2]))
                crops.append(crop(image, box))
                where.append((i, self.label_index(name)))
        probs = self.probabilities(crops) if crops else np.zeros((0, 1))
        out: list[list[float]] = [[] for _ in classes]
        for (i, label), p in zip(where, probs):
            out[i].append(float(p[label]))
        return out


class ClipJudge(_Regions):
    kind = "clip"

    def __init__(self, path: str | Path, classes: Sequence[str], labels: dict[str, str] | None = None,
                 device: str = "cpu", region: str = "image"):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(str(path)).eval().to(device)
        self.processor = AutoImageProcessor.from_pretrained(str(path), backend="pil")
        self.labels, self.region, self.torch = dict(labels or {}), region, torch
        names = [self.labels.get(c, c) for c in classes]
        self.index = {name: i for i, name in enumerate(names)}
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        text = tokenizer([CLIP_TEMPLATE.format(n) for n in names], padding=True, return_tensors="pt")
        with torch.no_grad():
            features = self.model.get_text_features(**{k: v.to(device) for k, v in text.items()})
            features = getattr(features, "pooler_output", features)
        self.text = torch.nn.functional.normalize(features.float(), dim=-1)

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            features = self.model.get_image_features(pixel_values=pixels.to(self.model.device, self.model.dtype))
            features = torch.nn.functional.normalize(getattr(features, "pooler_output", features).float(), dim=-1)
            logits = self.model.logit_scale.exp().float() * features @ self.text.T
            return torch.softmax(logits, -1).cpu().numpy()


class ClassifierJudge(_Regions):
    kind = "classifier"

    def __init__(self, path: str | Path, labels: dict[str, str] | None = None, device: str = "cpu",
                 region: str = "image"):
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.model = AutoModelForImageClassification.from_pretrained(str(path)).eval().to(device)
        self.processor = AutoImageProcessor.from_pretrained(str(path), backend="pil")
        self.multi_label = self.model.config.problem_type == "multi_label_classification"
        self.index = {name: int(i) for i, name in self.model.config.id2label.items()}
        self.labels = dict(labels or {})
        self.region = region
        self.torch = torch

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, labels) scores of uint8 images (any sizes: the processor resizes them)."""
        torch = self.torch
        with torch.no_grad():
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            logits = self.model(pixel_values=pixels.to(self.model.device, self.model.dtype)).logits.float()
            return (torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, -1)).cpu().numpy()

    def logits_of(self, crops: Sequence[Any]) -> Any:
        """(N, labels) logits of float crops (3, h, w) in [0, 1], differentiable: each resized to the processor's
        size (bilinear with antialiasing, as PIL's resize) and normalised by its mean and std. The class-token
        tuner's path (pipeline/tune_tokens.py); :meth:`probabilities` is the pipeline's."""
        torch = self.torch
        p = self.processor
        size = (int(p.size["height"]), int(p.size["width"]))
        pixels = torch.cat([torch.nn.functional.interpolate(c[None].float(), size=size, mode="bilinear",
                                                            antialias=True, align_corners=False) for c in crops])
        if getattr(p, "do_normalize", True):
            mean = torch.tensor(p.image_mean, dtype=pixels.dtype).view(1, -1, 1, 1)
            std = torch.tensor(p.image_std, dtype=pixels.dtype).view(1, -1, 1, 1)
            pixels = (pixels - mean) / std
        return self.model(pixel_values=pixels.to(self.model.device, self.model.dtype)).logits.float()


class ShapesOracleJudge(Judge):
    kind = "shapes-oracle"

    def scores(self, images: np.ndarray, prompts: Sequence[str], classes: Sequence[list[str]],
               maps: np.ndarray | None = None, region: str | None = None) -> list[list[float]]:
        from pipeline.shapes.oracle import find_objects

        out = []
        for image, prompt, names in zip(images, prompts, classes):
            colours = [prompted_colour(prompt, c) for c in names]
            found = find_objects(image, [c for c in colours if c])
            read = iter(found)
            out.append([float(c is not None and (o := next(read)).cls == name and o.area > 0)
                        for c, name in zip(colours, names)])
        return out


def prompted_colour(prompt: str, name: str) -> str | None:
    """The shapes-world colour word the prompt puts before ``name`` ("a red circle" → red), or None."""
    from pipeline.shapes.world import COLORS

    m = re.search(rf"\b({'|'.join(COLORS)})\s+{re.escape(name)}\b", prompt)
    return m.group(1) if m else None


def load_judge(spec: Any) -> Judge | None:
    """The job's judge (None without a ``judge`` section), on the job's device."""
    j = getattr(spec, "judge", None)
    if j is None:
        return None
    if j.kind == "shapes-oracle":
        return ShapesOracleJudge()
    device = spec.model.device if spec.model.device != "auto" else _auto_device()
    if j.kind == "clip":
        return ClipJudge(j.path, [c.name for c in spec.classes], j.labels, device, j.region)
    return ClassifierJudge(j.path, j.labels, device, j.region)


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def verdict(scores: Sequence[float], classes: Sequence[str], min_score: float) -> str:
    """``judge:<class>`` for the first prompted class scored below ``min_score``; "" when all pass."""
    for score, name in zip(scores, classes):
        if score < min_score:
            return f"{REASON}{name}"
    return ""


def judge_problem(spec: Any) -> str | None:
    """Why the job's judge cannot be used (one line: what, where, how to fix), or None. Reads the folder's
    config and its weights' header and shapes (no diffusion model, no generation)."""
    j = getattr(spec, "judge", None)
    if j is None:
        return None
    if j.kind == "shapes-oracle":
        from pipeline.shapes.world import CLASSES

        other = [c.name for c in spec.classes if c.name not in CLASSES]
        return (f"judge: kind shapes-oracle reads only the shapes world's classes {list(CLASSES)}, not {other}; "
                "use a classifier or clip judge" if other else None)
    folder = Path(j.path)
    where = f"judge.path: {j.path}"
    what = "a transformers image-classification folder" if j.kind == "classifier" else "a transformers CLIP folder"
    if not (folder / "config.json").is_file():
        missing = "does not exist" if not folder.exists() else "no config.json there"
        return f"{where}: {missing} ({spec.origin('judge.path')}); give {what} (save_pretrained)"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        return f"{where}: config.json is not JSON ({err})"
    if j.kind == "clip" and config.get("model_type") != "clip":
        return f"{where}: config.json is a {config.get('model_type')!r} model, not 'clip'; judge.kind clip takes a CLIPModel folder"
    names = list((config.get("id2label") or {}).values())
    if j.kind == "classifier" and not names:
        return f"{where}: config.json has no id2label; the judge must name its classes"
    if not (folder / "model.safetensors").is_file():
        return f"{where}: no model.safetensors there; save the model with safe_serialization=True"
    if not (folder / "preprocessor_config.json").is_file():
        return f"{where}: no preprocessor_config.json there; save the model's image processor beside it"
    if j.kind == "clip" and not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return f"{where}: no tokenizer there (tokenizer.json or vocab.json); save the CLIP tokenizer beside the model"
    wrong_keys = [k for k in (j.labels or {}) if k not in {c.name for c in spec.classes}]
    if wrong_keys:
        return f"judge.labels: {wrong_keys} are not classes of this job; map only the job's classes"
    mapped = {c.name: (j.labels or {}).get(c.name, c.name) for c in spec.classes}
    missing = [c for c, label in mapped.items() if label not in names]
    if j.kind == "classifier" and missing:
        given = [c for c in missing if c in (j.labels or {})]
        if given:
            return (f"judge.labels: maps {given[0]!r} to {mapped[given[0]]!r}, a label the classifier at {j.path} "
                    f"does not have (it names {names})")
        return (f"{where}: the classifier does not name the job's class(es) {missing} (it names {names}); "
                "map them with judge.labels: {job class: classifier label}")
    from .identity import judge_identity, passed_before, remember_pass

    key = f"judge-weights:{j.kind}:{judge_identity(folder)}"
    if passed_before(key):  # these very files passed here before: skip torch and transformers (~3 s)
        return None
    try:
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

        build = AutoModelForImageClassification if j.kind == "classifier" else AutoModel
        expected = {k: tuple(v.shape) for k, v in build.from_config(
            AutoConfig.from_pretrained(str(folder))).state_dict().items()}
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 -- transformers / safetensors raise many kinds; show the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"{where}: the model does not load ({first}); its config.json must be {what}'s"
    absent = sorted(set(expected) - set(stored), key=list(expected).index)
    unused = [k for k in absent if k.endswith("position_ids")]  # buffers some versions do not save
    absent = [k for k in absent if k not in unused]
    if absent:
        return (f"{where}: model.safetensors lacks {len(absent)} of the model's tensors (first: {absent[0]}); its "
                "weights must match its config.json")
    wrong = [k for k in expected if k in stored and stored[k] != expected[k]]
    if wrong:
        k = wrong[0]
        return (f"{where}: model.safetensors holds {k} as {list(stored[k])}, its config.json says {list(expected[k])}; "
                "its weights must match its config.json")
    remember_pass(key)
    return None
