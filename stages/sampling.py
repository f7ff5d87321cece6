"""Prompt sampling: global index → key, seed, prompt, classes and the prompt tokens naming each class."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from transformers import CLIPTokenizer

from .base import Batch, Stage, passthrough

OBJECTS = "{objects}"


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


class SamplingStage(Stage):
    """Deterministic per-sample prompts: 1..max classes, one template, exact class token positions."""

    name = "sampling"
    kind = "actor"  # loads the tokenizer once per worker
    inputs = ("index",)
    outputs = ("key", "seed", "prompt", "class_names", "token_index", "cond", "curriculum")

    def __init__(self, spec: Any):
        super().__init__(spec)
        if "." in spec.name:
            raise ValueError(f"job name {spec.name!r} must not contain '.' (it prefixes WebDataset keys)")
        self.classes = list(spec.classes)
        prompts = spec.prompts
        self.templates = list(prompts.templates)
        bad = [t for t in self.templates if t.count(OBJECTS) != 1]
        if not self.templates or bad:
            raise ValueError(f"prompt templates must each contain {OBJECTS} exactly once, got {bad or 'none'}")
        self.min_classes = prompts.min_classes_per_image
        self.max_classes = min(prompts.max_classes_per_image, len(self.classes))
        if not 1 <= self.min_classes <= self.max_classes:
            raise ValueError(f"classes per image must satisfy 1 <= min ({self.min_classes}) <= max "
                             f"({prompts.max_classes_per_image}, capped at {len(self.classes)} classes)")
        self.tokenizer = CLIPTokenizer.from_pretrained(spec.model.path, subfolder="tokenizer")

    def compose(self, seed: int) -> tuple[str, list[str], list[list[int]]]:
        """(prompt, class names in prompt order, token positions per class) for one sample seed."""
        rng = np.random.default_rng(seed)
        count = int(rng.integers(self.min_classes, self.max_classes + 1))
        chosen = [self.classes[i] for i in rng.choice(len(self.classes), size=count, replace=False)]
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
                text += f"a {attribute} "
            else:
                text += "a "
            word = str(rng.choice([cls.name, *cls.synonyms]))
            spans.append((len(text), len(text) + len(word)))
            text += word
        prompt = text + suffix
        return prompt, [c.name for c in chosen], class_token_positions(self.tokenizer, prompt, spans)

    def __call__(self, batch: Batch) -> Batch:
        indices = np.asarray(batch["index"], dtype=np.int64)
        if (indices < 0).any():
            raise ValueError("sample indices must be non-negative")
        seeds = [stable_seed(self.spec.seed, int(i)) for i in indices]
        rows = [self.compose(s) for s in seeds]
        return passthrough(
            batch,
            key=np.array([f"{self.spec.name}-{int(i):09d}" for i in indices], dtype=str),
            seed=np.array(seeds, dtype=np.int64),
            prompt=np.array([r[0] for r in rows], dtype=str),
            class_names=np.array([json.dumps(r[1]) for r in rows], dtype=str),
            token_index=np.array([json.dumps(r[2]) for r in rows], dtype=str),
            cond=np.array([""] * len(rows), dtype=str),
            curriculum=np.array(["{}"] * len(rows), dtype=str),
        )
