"""Prompt sampling: global index → key, seed, prompt, classes, the prompt tokens naming each class, and
the conditioning (reference image / text embedding) and curriculum record of image-guided variations."""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import CLIPTokenizer

from .base import Batch, Stage, passthrough
from .prompt_words import count_phrase, grouped_positions

if TYPE_CHECKING:  # stages.references imports webdataset, which imports torch (~3 s per worker)
    from .references import Instance, Reference

OBJECTS = "{objects}"
EMBEDDING_STREAM = 1  # numpy seed-sequence word that separates embedding draws from prompt draws
COUNT_STREAM = 2  # ... and instance counts (prompts.max_instances_per_class > 1)


def stable_seed(job_seed: int, index: int) -> int:
    """A 63-bit seed from (job seed, index) via blake2b: the same on every machine and Python run."""
    digest = hashlib.blake2b(f"{job_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def class_token_positions(tokenizer, prompt: str, spans: list[tuple[int, int]]) -> list[list[int]]:
    """For each character span of ``prompt``, the positions (BOS = 0) of the tokens overlapping it."""
    enc = tokenizer(prompt, return_offsets_mapping=True, truncation=False)
    if len(enc.input_ids) > tokenizer.model_max_length:
        raise ValueError(f"prompt {prompt!r} is {len(enc.input_ids)} tokens, over the tokenizer's limit of "
                         f"{tokenizer.model_max_length}: use shorter templates or fewer classes per image")
    positions = []
    for start, end in spans:
        hit = [i for i, (a, b) in enumerate(enc.offset_mapping) if b > a and a < end and b > start]
        if not hit:
            raise ValueError(f"no token of {prompt!r} covers characters {start}:{end}")
        positions.append(hit)
    return positions


def variation_curriculum(level: int, strength: float, group_id: str) -> dict[str, Any]:
    """The ``curriculum`` record of an image-guided variation: image guidance (and difficulty) = 1 - strength."""
    guidance = round(1.0 - strength, 6)
    return {"level": level, "strength": strength, "image_guidance": guidance, "group_id": group_id,
            "source": "synthetic", "difficulty": guidance}


class SamplingStage(Stage):
    """Deterministic per-sample prompts: 1..max classes, one template, exact class token positions.

    With ``spec.references`` every index is one image-guided variation (see :meth:`variation`):
    the prompt names the reference's class (with its attribute when the class lists it), ``cond``
    holds the reference key and strength, ``curriculum`` the level, strength, image guidance
    (1 - strength), group id (the reference key), source "synthetic" and difficulty (= image
    guidance: 0 is a text-driven image, 1 the hard reference itself). With
    ``spec.prompts.embedding`` ``cond`` also holds everything the synthesis stage needs to
    reproduce the embedding (mode, prompts, weight / sigma and noise seed).
    """

    name = "sampling"
    kind = "task"  # no state between batches (the tokenizer is loaded once per worker process)
    reads = ("model", "classes", "prompts", "references")
    inputs = ("index",)
    outputs = ("key", "seed", "prompt", "class_names", "token_index", "cond", "curriculum")

    def __init__(self, spec: Any):
        super().__init__(spec)
        spec = self.spec
        self.classes = list(spec.classes)
        prompts = spec.prompts
        self.templates = list(prompts.templates)
        self.min_classes = prompts.min_classes_per_image
        self.max_classes = prompts.max_classes_per_image
        self.tokenizer = CLIPTokenizer.from_pretrained(spec.model.path, subfolder="tokenizer")
        self.embedding = getattr(prompts, "embedding", None)
        self.max_instances = int(getattr(prompts, "max_instances_per_class", 1) or 1)
        self.count_style = getattr(prompts, "count_style", "number")
        self.reference_counts: dict[str, int] = {}
        self.references: list[Reference] = []  # one per unit: the reference image (inpaint: of each instance)
        self.instances: list[Instance] = []
        refs = getattr(spec, "references", None)
        if refs is not None:
            from .references import list_references

            self.strengths = sorted(refs.strengths, reverse=True)  # level 0: least image guidance
            self.seeds_per_level = refs.seeds_per_level
            if refs.mode == "inpaint":  # the units are instances: every annotation repainted in its outline
                from .references import inpaint_references

                found = inpaint_references(spec)
                self.instances, self.outlines = found.instances, found.outlines
                self.references = [i.ref for i in self.instances]
            else:
                self.references = list_references(spec)
            total = len(self.references) * len(self.strengths) * self.seeds_per_level
            if self.max_instances > 1 and refs.mode != "inpaint":
                self.reference_counts = _reference_counts(refs, self.references)
            if spec.samples != total:
                raise ValueError(f"samples is {spec.samples} but the references give {total} variations")

    def counts(self, seed: int, n: int) -> list[int]:
        """Instances asked for per class of a text prompt (its own random stream; all 1 unless
        ``prompts.max_instances_per_class > 1``)."""
        if self.max_instances <= 1:
            return [1] * n
        rng = np.random.default_rng([seed, COUNT_STREAM])
        return [int(c) for c in rng.integers(1, self.max_instances + 1, size=n)]

    def _compose(self, seed: int) -> tuple[str, list[Any], list[list[tuple[int, int]]]]:
        """(prompt, classes in prompt order, character spans of each class's word(s)) for one sample seed."""
        rng = np.random.default_rng(seed)
        count = int(rng.integers(self.min_classes, self.max_classes + 1))
        chosen = [self.classes[i] for i in rng.choice(len(self.classes), size=count, replace=False)]
        counts = self.counts(seed, len(chosen))
        template = self.templates[int(rng.integers(len(self.templates)))]
        prefix, suffix = template.split(OBJECTS)
        text, spans, used = prefix, [], set()
        for i, cls in enumerate(chosen):
            if i:
                text += " and "
            attributes = list(getattr(cls, "attributes", None) or [])
            if attributes:  # distinct attributes within an image while they last
                fresh = [a for a in attributes if a not in used] or attributes
                attribute = str(rng.choice(fresh))
                used.add(attribute)
            else:
                attribute = None
            phrase, at = count_phrase(counts[i], attribute, str(rng.choice([cls.name, *cls.synonyms])),
                                      self.count_style)
            spans.append([(len(text) + a, len(text) + b) for a, b in at])
            text += phrase
        return text + suffix, chosen, spans

    def compose(self, seed: int) -> tuple[str, list[str], list[list[int]]]:
        """(prompt, class names in prompt order, token positions per class) for one sample seed."""
        prompt, chosen, spans = self._compose(seed)
        return prompt, [c.name for c in chosen], self.positions(prompt, spans)

    def positions(self, prompt: str, spans: list[list[tuple[int, int]]]) -> list[list[int]]:
        """Token positions of each class: all tokens of all its words ('a ring and a ring': both)."""
        return grouped_positions(lambda flat: class_token_positions(self.tokenizer, prompt, flat), spans)

    def variation(self, index: int) -> tuple[int, int, float]:
        """(unit, level, strength) of a sample: index = (level x units + unit) x seeds_per_level + seed
        number, so consecutive indices share a level (and a pipeline call). A unit is a reference
        (``self.references[unit]``) or, inpainting, an instance (``self.instances[unit]``)."""
        per_level = len(self.references) * self.seeds_per_level
        level, rest = divmod(index, per_level)
        if level >= len(self.strengths):
            raise ValueError(f"index {index} is beyond the {per_level * len(self.strengths)} variations")
        return rest // self.seeds_per_level, level, self.strengths[level]

    def inpaint_prompt(self, seed: int, instance: Instance) -> tuple[str, list[Any], list[list[tuple[int, int]]],
                                                                     str | None]:
        """(prompt, classes, spans, attribute) of an inpainting sample: the instance's class first (a template
        with a new attribute: one of its class's attributes the instance does not have, within the palette
        when the outline is filled from it), then the image's other classes (not in the prompt: no spans).
        With ``inpaint.prompt: empty`` the prompt is empty and no class has a span."""
        opts = self.spec.references.inpaint
        rng = np.random.default_rng(seed)
        cls = next(c for c in self.classes if c.name == instance.outline.class_name)
        others = [next(c for c in self.classes if c.name == name) for name in dict.fromkeys(
            o.class_name for o in self.outlines[instance.key]) if name != cls.name]
        usable = [a for a in (getattr(cls, "attributes", None) or []) if opts.fill != "palette" or a in opts.palette]
        fresh = [a for a in usable if a not in instance.outline.attributes] or usable
        attribute = str(fresh[int(rng.integers(len(fresh)))]) if fresh else None
        if opts.prompt == "empty":
            return "", [cls, *others], [[] for _ in range(1 + len(others))], attribute
        prefix, suffix = self.templates[int(rng.integers(len(self.templates)))].split(OBJECTS)
        phrase, at = count_phrase(1, attribute, str(rng.choice([cls.name, *cls.synonyms])), self.count_style)
        spans = [[(len(prefix) + a, len(prefix) + b) for a, b in at]] + [[] for _ in others]
        return prefix + phrase + suffix, [cls, *others], spans, attribute

    def reference_prompt(self, seed: int, ref: Reference) -> tuple[str, list[Any], list[list[tuple[int, int]]]]:
        """A template filled with the reference's class (and its attribute if the class lists it)."""
        rng = np.random.default_rng(seed)
        cls = next(c for c in self.classes if c.name == ref.class_name)
        prefix, suffix = self.templates[int(rng.integers(len(self.templates)))].split(OBJECTS)
        attribute = next((a for a in ref.attributes if a in (getattr(cls, "attributes", None) or [])), None)
        phrase, at = count_phrase(self.reference_count(ref), attribute, str(rng.choice([cls.name, *cls.synonyms])),
                                  self.count_style)
        return prefix + phrase + suffix, [cls], [[(len(prefix) + a, len(prefix) + b) for a, b in at]]

    def reference_count(self, ref: Reference) -> int:
        """Instances a variation of ``ref`` asks for: its annotations of its class, up to
        ``prompts.max_instances_per_class`` (1 when that is 1)."""
        return min(self.reference_counts.get(ref.key, 1), self.max_instances)

    def embedding_cond(self, seed: int, prompt: str, classes: list[Any], spans: list[list[tuple[int, int]]]) -> dict:
        """The ``cond["embedding"]`` of a sample (its own random stream, so prompts stay as without it)."""
        rng = np.random.default_rng([seed, EMBEDDING_STREAM])
        spec = self.embedding
        if spec.mode == "jitter":
            return {"mode": "jitter", "prompt": prompt, "sigma": spec.sigma, "seed": int(rng.integers(2**63 - 1))}
        present = {c.name for c in classes}
        others = [c for c in self.classes if c.name not in present]
        partner = others[int(rng.integers(len(others)))]
        word = str(rng.choice([partner.name, *partner.synonyms]))
        other = prompt
        for start, end in reversed(spans[0]):  # every word of the first class (from the end: spans stay valid)
            other = other[:start] + word + other[end:]
        return {"mode": "interpolate", "method": spec.method, "prompts": [prompt, other],
                "classes": [classes[0].name, partner.name], "weight": round(float(rng.uniform(*spec.weight)), 4)}

    def row(self, index: int, seed: int) -> tuple[str, list[str], list[list[int]], str, str]:
        """(prompt, class names, token positions, cond JSON, curriculum JSON) of one sample."""
        cond: dict[str, Any] = {}
        curriculum: dict[str, Any] = {}
        if self.references:
            unit, level, strength = self.variation(index)
            ref = self.references[unit]
            cond["reference"] = {"key": ref.key, "strength": strength}
            if self.instances:
                opts = self.spec.references.inpaint
                prompt, classes, spans, attribute = self.inpaint_prompt(seed, self.instances[unit])
                cond["reference"].update(mode="inpaint", instance=self.instances[unit].outline.id,
                                         dilation=opts.dilation, prompt=opts.prompt, fill=opts.fill)
                if opts.crop_padding is not None:
                    cond["reference"]["crop_padding"] = opts.crop_padding
                if opts.fill == "palette":
                    cond["reference"]["fill_rgb"] = list(opts.palette[attribute]) if attribute else None
                counts = [1] * len(classes)
            else:
                prompt, classes, spans = self.reference_prompt(seed, ref)
                counts = [self.reference_count(ref)]
            curriculum = variation_curriculum(level, strength, ref.key)
        else:
            prompt, classes, spans = self._compose(seed)
            counts = self.counts(seed, len(classes))
        if any(c > 1 for c in counts):  # the label stage reads how many instances each class should have
            cond["counts"] = counts
        if self.embedding is not None:
            cond["embedding"] = self.embedding_cond(seed, prompt, classes, spans)
        positions = self.positions(prompt, spans)
        return (prompt, [c.name for c in classes], positions, json.dumps(cond, sort_keys=True) if cond else "",
                json.dumps(curriculum, sort_keys=True))

    def __call__(self, batch: Batch) -> Batch:
        indices = np.asarray(batch["index"], dtype=np.int64)
        if (indices < 0).any():
            raise ValueError("sample indices must be non-negative")
        seeds = [stable_seed(self.spec.seed, int(i)) for i in indices]
        rows = [self.row(int(i), s) for i, s in zip(indices, seeds)]
        return passthrough(
            batch,
            key=np.array([f"{self.spec.name}-{int(i):09d}" for i in indices], dtype=str),
            seed=np.array(seeds, dtype=np.int64),
            prompt=np.array([r[0] for r in rows], dtype=str),
            class_names=np.array([json.dumps(r[1]) for r in rows], dtype=str),
            token_index=np.array([json.dumps(r[2]) for r in rows], dtype=str),
            cond=np.array([r[3] for r in rows], dtype=str),
            curriculum=np.array([r[4] for r in rows], dtype=str),
        )


def _reference_counts(cfg: Any, refs: list[Reference]) -> dict[str, int]:
    """{reference key: its annotations of its own class} for a COCO-folder ``references.path`` (an output
    folder's references count 1)."""
    from pathlib import Path

    from .references import ANNOTATIONS, load_coco

    if not (Path(cfg.path) / ANNOTATIONS).is_file():
        return {}
    coco, images = load_coco(Path(cfg.path), field="references.path")
    names = {c["id"]: c["name"] for c in coco.cats.values()}
    by_key = {im.key: im for im in images}
    return {r.key: sum(names[a["category_id"]] == r.class_name for a in by_key[r.key].annotations)
            for r in refs if r.key in by_key}
