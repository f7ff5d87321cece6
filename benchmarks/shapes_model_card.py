"""Numbers for the bundled tiny model's card (issue "Shapes world and the bundled tiny model").

    python -m benchmarks.shapes_model_card [--model pipeline/models/shapes-tiny-sd] [--n 200] [--json out.json]
                                           [--images-per-prompt K]

Measures, on this machine:
  * oracle accuracy on rendered held-out scenes (IoU of recovered masks vs the renderer's, class accuracy);
  * the decoder's ceiling: the oracle's class accuracy on the model's VAE reconstructions of those scenes
    (objects it reads right on the original), per class — a shape the decoder cannot draw back from a
    true latent it will not draw from a generated one;
  * generation speed of plain ``StableDiffusionPipeline.from_pretrained(model)`` on CPU, 64×64, 20 steps
    (the folder's own scheduler);
  * prompt fidelity on N held-out prompts: the oracle finds an object of the prompted class *and*
    colour (per object, 1-object prompts, 2-object prompts: both), with counts and 95 % intervals;
    ``--images-per-prompt K`` makes K images of each prompt (K noise seeds) for a tighter estimate;
  * cross-attention sanity: the plain class-token cross-attention map (mean over layers, heads and
    steps, min-max normalised, threshold 0.5) vs the oracle mask, mean IoU.
Prints a table and writes a JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import REPO, write_result
from pipeline.evaluate import prompt_batch, shapes_prompts
from pipeline.shapes.oracle import find_objects
from pipeline.shapes.tiny_sd import BUNDLED_MODEL, vae_round_trip
from pipeline.shapes.world import HELD_OUT_SEED, render_scene


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def rendered_readings(n: int) -> list:
    """(scene, the oracle's reading of it) for n rendered held-out scenes: read once, used by the two
    measures below."""
    scenes = [render_scene(HELD_OUT_SEED + 500_000 + i) for i in range(n)]
    return [(scene, find_objects(scene.image, [o.color for o in scene.objects])) for scene in scenes]


def oracle_accuracy(readings: list) -> dict:
    """The oracle on rendered scenes (truth known); per object count, the rate at which it reads every
    object right: the ceiling of the prompt-fidelity rates measured with it."""
    ious, cls_ok, whole = [], [], {}
    for scene, found in readings:
        ok = [f.cls == obj.cls for obj, f in zip(scene.objects, found)]
        ious += [iou(obj.mask, f.mask) for obj, f in zip(scene.objects, found)]
        cls_ok += ok
        whole.setdefault(len(ok), []).append(all(ok))
    return {"scenes": len(readings), "objects": len(ious), "mask_iou_mean": float(np.mean(ious)),
            "mask_iou_min": float(np.min(ious)), "class_accuracy": float(np.mean(cls_ok)),
            "all_read_by_object_count": {k: round(float(np.mean(v)), 3) for k, v in sorted(whole.items())}}


@torch.no_grad()
def oracle_on_reconstructions(vae, readings: list) -> dict:
    """Encode and decode the rendered scenes of :func:`rendered_readings` with the model's VAE; the rate at which
    the oracle still reads an object's class right (of those it reads right on the original), per class."""
    hits = {}
    for start in range(0, len(readings), 50):
        chunk = readings[start:start + 50]
        rec = vae_round_trip(vae, np.stack([s.image for s, _ in chunk]), batch=len(chunk))
        for (scene, found), image in zip(chunk, rec):
            again = find_objects(image, [o.color for o in scene.objects])
            for obj, a, b in zip(scene.objects, found, again):
                if a.cls == obj.cls:
                    hits.setdefault(obj.cls, []).append(b.cls == obj.cls)
    every = [h for v in hits.values() for h in v]
    return {"scenes": len(readings), "objects": len(every), "class_accuracy": round(float(np.mean(every)), 3),
            "per_class": {k: round(float(np.mean(v)), 3) for k, v in sorted(hits.items())}}


def generation_speed(pipe, steps: int, batch: int, guidance: float, repeats: int = 3) -> dict:
    prompts = [p.text for p in shapes_prompts(batch)]
    pipe(prompts, num_inference_steps=2, height=64, width=64, output_type="np")  # warm-up
    times = []
    for r in range(repeats):
        gen = torch.Generator().manual_seed(r)
        t0 = time.perf_counter()
        pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
             output_type="np", generator=gen)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"steps": steps, "batch": batch, "guidance_scale": guidance,
            "seconds_per_image": best / batch, "images_per_second": batch / best,
            "scheduler": type(pipe.scheduler).__name__}


def synthesis_stage(model: str, steps: int, guidance: float, batch: int, scheduler: str):
    """The project's own synthesis stage (same capture path as a job) on the demo job's settings."""
    from pipeline.spec import load_spec
    from stages.synthesis import SynthesisStage

    spec = load_spec(REPO / "jobs" / "shapes-demo.yaml", [
        f"model.path={model}", f"generation.steps={steps}", f"generation.guidance_scale={guidance}",
        f"generation.batch_size={batch}", f"generation.scheduler={scheduler}", "masks.refine_power=0",
        "masks.capture_resolutions=[16, 8]", "masks.threshold=fixed"])  # every cross-attention layer, unrefined
    return SynthesisStage(spec)


def counted(hits: list) -> dict:
    """n, how many hits, and the 95 % Wilson interval of the rate: at 61 prompts a rate of 0.85 can be
    anything from 0.74 to 0.92, which is what comparing two models or two prompt sets has to allow for."""
    from scipy.stats import binomtest

    if not hits:
        return {"n": 0, "found": 0, "ci95": None}
    ci = binomtest(int(sum(hits)), len(hits)).proportion_ci(confidence_level=0.95, method="wilson")
    return {"n": len(hits), "found": int(sum(hits)), "ci95": [round(float(ci.low), 3), round(float(ci.high), 3)]}


NOISE_SEED_STRIDE = 1_000_003  # image k of a prompt starts from noise seed (scene seed + k * this)


def repeated(prompts: list, images_per_prompt: int) -> list:
    """Each prompt ``images_per_prompt`` times, image k from its own noise seed; image 0 is the one a
    single-image run makes, so more images per prompt only add to it."""
    from dataclasses import replace

    return [replace(p, seed=p.seed + k * NOISE_SEED_STRIDE) for k in range(images_per_prompt) for p in prompts]


def object_hits(image: np.ndarray, prompt) -> tuple[list, list[bool]]:
    """The oracle's reading of a generated image (one per prompted object, looked up by its colour) and,
    per object, whether it found that colour drawn as the prompted class."""
    found = find_objects(image, [colour for colour, _ in prompt.objects])
    return found, [f.cls == cls and f.area > 0 for (_, cls), f in zip(prompt.objects, found)]


def fidelity_and_attention(stage, prompts, batch: int) -> dict:
    per_obj, single, double, triple, attn_ious, per_class = [], [], [], [], [], {}
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        out = stage(prompt_batch(stage.pipe.tokenizer, chunk, start))
        for p, image, amap in zip(chunk, out["image"], out["attn_raw"]):
            objs = p.objects
            found, hits = object_hits(image, p)
            per_obj += hits
            for (_, cls), hit in zip(objs, hits):
                per_class.setdefault(cls, []).append(hit)
            {1: single, 2: double, 3: triple}[len(objs)].append(all(hits))
            for k, f in enumerate(found):
                if not f.area:
                    continue
                m = np.asarray(Image.fromarray(amap[k].astype(np.float32)).resize(image.shape[1::-1], Image.BILINEAR))
                m = (m - m.min()) / max(m.max() - m.min(), 1e-8)
                attn_ious.append(iou(m >= 0.5, f.mask))
    return {
        "images": len(prompts),
        "object_found_rate": float(np.mean(per_obj)),
        "found_rate_per_class": {c: round(float(np.mean(v)), 3) for c, v in sorted(per_class.items())},
        "one_object_prompts": {**counted(single), "found_rate": float(np.mean(single))},
        "two_object_prompts": {**counted(double), "both_found_rate": float(np.mean(double))},
        "three_object_prompts": {**counted(triple), "all_found_rate": float(np.mean(triple)) if triple else None},
        "raw_cross_attention_miou": float(np.mean(attn_ious)), "attention_objects": len(attn_ious),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(BUNDLED_MODEL))
    ap.add_argument("--n", type=int, default=200, help="prompts (held-out by default)")
    ap.add_argument("--first-seed", type=int, default=HELD_OUT_SEED,
                    help="scene seed of the first prompt (a development set to choose settings on: 1200000)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--scheduler", default="default",
                    help="for the fidelity and attention numbers: a job file's generation.scheduler "
                         "(default: the folder's own)")
    ap.add_argument("--json", default="shapes_model_card.json")
    ap.add_argument("--oracle-scenes", type=int, default=300)
    ap.add_argument("--images-per-prompt", type=int, default=1,
                    help="fidelity over K images of each prompt (K noise seeds): the same prompts, a tighter estimate")
    args = ap.parse_args(argv)
    if args.images_per_prompt < 1:
        ap.error(f"--images-per-prompt must be at least 1, got {args.images_per_prompt}")
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    readings = rendered_readings(args.oracle_scenes)
    pipe.set_progress_bar_config(disable=True)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "model": args.model,
        "parameters_m": {name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
                         for name in ("unet", "vae", "text_encoder")},
        "oracle_on_rendered": oracle_accuracy(readings),
        "oracle_on_vae_reconstructions": oracle_on_reconstructions(pipe.vae, readings),
        "speed": generation_speed(pipe, args.steps, args.batch, args.guidance),
    }
    del pipe
    stage = synthesis_stage(args.model, args.steps, args.guidance, args.batch, args.scheduler)
    result["held_out"] = {"steps": args.steps, "guidance_scale": args.guidance,
                          "scheduler": type(stage.pipe.scheduler).__name__,
                          "first_seed": args.first_seed, "prompts": args.n, "images_per_prompt": args.images_per_prompt,
                          **fidelity_and_attention(stage, repeated(shapes_prompts(args.n, args.first_seed),
                                                                   args.images_per_prompt), args.batch)}
    print(json.dumps(result, indent=2))
    write_result(args.json, result)


if __name__ == "__main__":
    main()
