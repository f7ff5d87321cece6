"""benchmarks.shapes_model_card: the decoder-ceiling measure reads what the VAE gives back."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks import shapes_model_card as card


class _FakeVAE:
    """encode/decode with diffusers' return shapes; ``decode`` applies ``fn`` to the 'latent' (the image)."""

    def __init__(self, fn):
        self.fn = fn

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=self.fn(z))


def test_a_perfect_decoder_keeps_every_class_and_a_blank_one_none():
    readings = card.rendered_readings(12)
    perfect = card.oracle_on_reconstructions(_FakeVAE(lambda z: z), readings)
    assert perfect["objects"] >= 12 and perfect["class_accuracy"] == 1.0
    assert set(perfect["per_class"]) <= {"circle", "square", "triangle", "star", "ring", "cross"}
    blank = card.oracle_on_reconstructions(_FakeVAE(torch.zeros_like), readings)
    assert blank["objects"] == perfect["objects"] and blank["class_accuracy"] == 0.0


def test_rates_come_with_their_count_and_a_95_percent_interval():
    held_out = card.counted([True] * 52 + [False] * 9)  # the card's 1-object row, 2026-11-30
    assert (held_out["n"], held_out["found"]) == (61, 52)
    low, high = held_out["ci95"]
    assert 0.73 < low < 52 / 61 < high < 0.93
    wider = card.counted([True] * 26 + [False] * 5)["ci95"]
    assert wider[0] < low and wider[1] > high  # half the prompts: a wider interval
    assert card.counted([]) == {"n": 0, "found": 0, "ci95": None}
    assert card.counted([True] * 10)["ci95"][1] == 1.0


def test_more_images_per_prompt_keep_the_first_and_add_fresh_noise_seeds():
    from pipeline.evaluate import shapes_prompts

    prompts = shapes_prompts(4)
    three = card.repeated(prompts, 3)
    assert three[:4] == prompts and card.repeated(prompts, 1) == prompts
    assert [p.text for p in three] == [p.text for p in prompts] * 3
    assert len({p.seed for p in three}) == 12
