"""Prompt fidelity of a model under perturbed-attention guidance (PAG, Ahn et al. 2024), beside plain
classifier-free guidance on the same prompts and noise seeds.

    python -m benchmarks.pag_fidelity [--model pipeline/models/shapes-tiny-sd] [--n 400] [--first-seed 1200000]
                                     [--pag up@1.0 up@1.5 ...] [--json pag_fidelity.json]

Each ``--pag LAYERS@SCALE`` is one run of diffusers' ``StableDiffusionPAGPipeline`` with
``pag_applied_layers=LAYERS`` ('+' joins several, e.g. ``up_blocks.1+mid``) and ``pag_scale=SCALE``.
Images are scored like the model card's (``object_hits``): per object, 1-, 2- and 3-object prompts.
The plain run reproduces the card's rates at the same settings. Prints a line per run and writes a JSON.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchmarks.common import write_result
from benchmarks.shapes_model_card import object_hits
from pipeline.evaluate import shapes_prompts
from pipeline.shapes.tiny_sd import BUNDLED_MODEL


def generate(pipe, prompts, batch: int, steps: int, guidance: float, **extra) -> list[np.ndarray]:
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        out = pipe([p.text for p in chunk], num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                   output_type="np", generator=[torch.Generator("cpu").manual_seed(int(p.seed)) for p in chunk],
                   **extra)
        images += list((np.clip(out.images, 0.0, 1.0) * 255).round().astype(np.uint8))
    return images


def rates(prompts, images) -> dict:
    per_object, by_count = [], {1: [], 2: [], 3: []}
    for p, image in zip(prompts, images):
        hits = object_hits(image, p)[1]
        per_object += hits
        by_count[len(hits)].append(all(hits))
    return {"per_object": round(float(np.mean(per_object)), 3),
            **{f"{k}_object": round(float(np.mean(v)), 3) if v else None for k, v in by_count.items()}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(BUNDLED_MODEL))
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--first-seed", type=int, default=1_200_000, help="the development prompts by default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--pag", nargs="+", default=["up@1.0", "up@1.5", "up@2.0"], metavar="LAYERS@SCALE")
    ap.add_argument("--json", default="pag_fidelity.json")
    args = ap.parse_args(argv)
    runs = []
    for spec in args.pag:
        layers, _, scale = spec.partition("@")
        try:
            runs.append((layers.split("+"), float(scale)))
        except ValueError:
            ap.error(f"--pag {spec!r}: expected LAYERS@SCALE, e.g. up@1.5 or up_blocks.1+mid@2")
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline

    prompts = shapes_prompts(args.n, args.first_seed)
    settings = {"model": args.model, "prompts": args.n, "first_seed": args.first_seed, "steps": args.steps,
                "guidance_scale": args.guidance}
    results = []
    for layers, scale in [(None, 0.0)] + runs:
        if layers is None:
            pipe = StableDiffusionPipeline.from_pretrained(args.model)
        else:
            pipe = StableDiffusionPAGPipeline.from_pretrained(args.model, pag_applied_layers=layers)
        pipe.set_progress_bar_config(disable=True)
        t0 = time.time()
        images = generate(pipe, prompts, args.batch, args.steps, args.guidance,
                          **({} if layers is None else {"pag_scale": scale}))
        row = {"pag_layers": layers, "pag_scale": scale, **rates(prompts, images),
               "seconds_per_image": round((time.time() - t0) / len(prompts), 3)}
        print(json.dumps(row), flush=True)
        results.append(row)
    write_result(args.json, {**settings, "runs": results})


if __name__ == "__main__":
    main()
