"""CPU core-seconds per image of the post-synthesis stages (masks, labels, filters, encode) at real sizes.

    python -m benchmarks.stage_cost [--sizes 512,1024] [--images 8] [--sources sdxl,scenes] [--repeats 5]

These stages run on CPU workers while a GPU synthesises; their cost per image says how many CPUs keep one
GPU fed. It does not depend on the model's weights, only on the outputs' shapes and (somewhat) on their
content, so the inputs are made without a GPU, for ``jobs/coco80-sdxl.yaml``'s settings (otsu thresholds,
ambiguity margin, 1-3 of COCO's 80 classes per image, its area bounds, dedup, JPEG quality 95) at each size:

  * ``sdxl``    real synthesis outputs: ``SamplingStage`` + ``SynthesisStage`` on a random-weight SDXL of the
                real layout (DownBlock2D, two cross-attention levels, two text encoders, text_time
                micro-conditioning) at tiny widths, on CPU, with the job's capture ("1/2", "1/4"),
                self-attention refinement at "1/4", 25 DPM-Solver++ steps and guidance 7: the images have the
                real size, the maps the real grid (the latent's: 64×64 at 512², 128×128 at 1024²). Random
                weights make both noise: a noise image is the costliest JPEG, and noise maps cut into many
                components (~15 instances per class), the label stage's worst case. Cached as ``.npz`` in
                ``--cache`` (one file per size and image count; the model folder beside them).
  * ``scenes``  synthetic scenes, as a trained model's outputs look: a shaded, grainy background with one
                object per class (an ellipse or a polygon) and per-class maps on the latent grid with a blob
                on the object (sometimes a second, weaker one elsewhere) over low-frequency noise.

Each stage is constructed once (the filter stage, which keeps the dedup memory, once per repeat); the rows go
through them in batches of ``generation.batch_size`` (4), each batch through the four stages in turn, as the
pipeline's one CPU operator runs them (``pipeline/graph.py``'s ``Chain``), after one untimed pass over the
first batch (imports, first calls). Time is this process's CPU time (``time.process_time``: core-seconds,
not wall time, so other work on the machine inflates it only through shared caches; numpy, scipy and
torch held to one thread), the best of ``--repeats`` per stage. Prints a table and writes
``benchmarks/results/stage_cost.json`` (``--json``), with ``cpus_per_gpu``: core-s per image × the images/s
of a GPU (25 at 512², 8 at 1024²).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import REPO, run_header, write_result  # noqa: E402

JOB = REPO / "jobs" / "coco80-sdxl.yaml"
STAGE_NAMES = ("masks", "labels", "filters", "encode")
SOURCES = ("sdxl", "scenes")
#: core-s per image that 2 CPU cores can spend to keep up with a GPU making 25 img/s at 512² and 8 at 1024²
TARGETS = {512: 2 / 25, 1024: 2 / 8}
GPU_RATES = {512: 25.0, 1024: 8.0}  # images/s of one GPU the targets assume
COLUMNS = ("key", "index", "seed", "prompt", "class_names", "token_index", "cond", "curriculum",
           "image", "attn", "attn_raw", "gen")


def job_spec(size: int, model: str | None = None, extra: tuple[str, ...] = ()):
    """``jobs/coco80-sdxl.yaml`` at ``size``² on CPU (``model``: a local model folder; None: the job's hub id,
    files not checked)."""
    from pipeline.spec import load_spec

    overrides = [f"generation.height={size}", f"generation.width={size}", "resources.synthesis.actors=1",
                 *extra]
    if model is not None:
        overrides += [f"model.path={model}", "model.dtype=float32", "model.device=cpu",
                      "resources.synthesis.num_gpus=0"]
    return load_spec(JOB, overrides, out=str(Path(tempfile.gettempdir()) / "synthgen-stage-cost-out"),
                     check_files=model is not None)


# ---- sdxl: real synthesis outputs of a random-weight, tiny-width SDXL --------------------------------------

def build_sdxl(folder: Path) -> Path:
    """A random-weight SDXL folder of the real layout at tiny widths (as tests/family_models.py's)."""
    import contextlib
    import io
    import shutil

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if (folder / "model_index.json").is_file():
        return folder
    width = 32

    def text_encoder(vocab: int, projection: bool, seed: int):
        torch.manual_seed(seed)
        cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=37, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, projection_dim=width,
                             bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_act="gelu")
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()

    from benchmarks.family_capture import clip_tokenizer

    tok, tok2 = clip_tokenizer(folder / "_tok"), clip_tokenizer(folder / "_tok2", pad_token="!")
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=4, norm_num_groups=8, sample_size=128, block_out_channels=(16, 32, 32),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 2), use_linear_projection=True, cross_attention_dim=2 * width,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + width)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=8, layers_per_block=1, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae.eval(), text_encoder=text_encoder(len(tok), False, 4),
                                     text_encoder_2=text_encoder(len(tok2), True, 5), tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet.eval(), scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    with contextlib.redirect_stderr(io.StringIO()):
        pipe.save_pretrained(str(folder), safe_serialization=True)
    for staging in folder.glob("_tok*"):
        shutil.rmtree(staging)
    return folder


def sdxl_rows(size: int, n: int, cache: Path) -> dict[str, np.ndarray]:
    """``n`` rows of sampling + synthesis output at ``size``² (cached in ``cache`` as .npz)."""
    path = cache / f"sdxl-tiny-{size}-{n}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    import torch

    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    torch.set_num_threads(1)
    spec = job_spec(size, str(build_sdxl(cache / "sdxl-tiny")))
    t0 = time.process_time()
    batch = SamplingStage(spec)({"index": np.arange(n, dtype=np.int64)})
    synthesis = SynthesisStage(spec)
    b = spec.generation.batch_size
    parts = [synthesis({k: v[i:i + b] for k, v in batch.items()}) for i in range(0, n, b)]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in COLUMNS}
    print(f"synthesised {n} images at {size}² with the random-weight SDXL in {time.process_time() - t0:.0f} "
          f"core-s; cached in {path}", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **rows)
    os.replace(tmp, path)
    return rows


# ---- scenes: synthetic photo-like images and blobby maps ----------------------------------------------------

def _smooth(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1] of ``shape``: a ``cells``² random grid, bicubic-upsampled."""
    from PIL import Image

    grid = rng.random((cells, cells)).astype(np.float32)
    out = np.asarray(Image.fromarray(grid).resize((shape[1], shape[0]), Image.BICUBIC), np.float32)
    return np.clip(out, 0.0, 1.0)


def scene_rows(size: int, n: int, spec, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` synthetic rows at ``size``²: 1-3 of the job's classes, one object each (an ellipse or a polygon,
    shaded and grainy, on a shaded background) and maps on the latent grid (``size / 8``) peaking on it."""
    from PIL import Image, ImageDraw

    names = [c.name for c in spec.classes]
    k_max = spec.prompts.max_classes_per_image
    grid = size // 8
    gen = json.dumps({"model": "stage-cost-scenes", "height": size, "width": size, "steps": 25,
                      "capture": {"map_grid": [grid, grid]}})
    yy, xx = np.mgrid[0:grid, 0:grid].astype(np.float32) + 0.5
    cols = {c: [] for c in COLUMNS}
    for index in range(n):
        rng = np.random.default_rng([seed, size, index])
        k = int(rng.integers(1, k_max + 1))
        classes = [names[i] for i in rng.choice(len(names), k, replace=False)]
        prompt = "a photo of " + " and ".join(f"a {c}" for c in classes)
        tint = rng.uniform(40, 220, (2, 3)).astype(np.float32)
        ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        img = tint[0] * (1 - ramp) + tint[1] * ramp
        img = img + 60 * (_smooth(rng, (size, size), 6)[..., None] - 0.5)
        canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        attn = np.zeros((k_max, grid, grid), np.float32)
        raw = np.zeros_like(attn)
        for i in range(k):
            r = rng.uniform(0.08, 0.22) * size
            cy, cx = rng.uniform(r, size - r, 2)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse([cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r], fill=colour)
            else:
                angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
                radii = r * rng.uniform(0.6, 1.0, len(angles))
                draw.polygon([(float(cx + a * np.cos(t)), float(cy + a * np.sin(t))) for a, t in zip(radii, angles)],
                             fill=colour)
            gy, gx, gr = cy / 8, cx / 8, r / 8
            blob = np.exp(-((yy - gy) ** 2 + (xx - gx) ** 2) / (2 * (0.6 * gr) ** 2))
            if rng.random() < 0.3:  # attention spilled onto a second spot
                oy, ox = rng.uniform(0, grid, 2)
                blob = blob + 0.6 * np.exp(-((yy - oy) ** 2 + (xx - ox) ** 2) / (2 * (0.4 * gr) ** 2))
            noise = _smooth(rng, (grid, grid), 8)
            raw[i] = blob + 0.25 * noise
            attn[i] = blob ** 1.5 + 0.15 * noise
        img = np.asarray(canvas, np.float32) * (0.85 + 0.3 * _smooth(rng, (size, size), 4))[..., None]
        img = img + rng.normal(0, 4, img.shape).astype(np.float32)
        cols["image"].append(np.clip(img, 0, 255).round().astype(np.uint8))
        cols["attn"].append((attn / max(attn.max(), 1e-6)).astype(np.float16))
        cols["attn_raw"].append((raw / max(raw.max(), 1e-6)).astype(np.float16))
        cols["key"].append(f"{spec.name}-{index:09d}")
        cols["index"].append(index)
        cols["seed"].append(int(rng.integers(0, 2 ** 62)))
        cols["prompt"].append(prompt)
        cols["class_names"].append(json.dumps(classes))
        words = prompt.split()
        cols["token_index"].append(json.dumps([[1 + words.index(c.split()[0])] for c in classes]))
        cols["cond"].append("")
        cols["curriculum"].append("{}")
        cols["gen"].append(gen)
    out = {}
    for c, values in cols.items():
        out[c] = np.stack(values) if c in ("image", "attn", "attn_raw") else np.array(values)
    return out


# ---- timing ---------------------------------------------------------------------------------------------------

def load_stage_classes() -> dict[str, type]:
    from stages.encode import EncodeStage
    from stages.filters import FilterStage
    from stages.labels import LabelStage
    from stages.masks import MaskStage

    return {"masks": MaskStage, "labels": LabelStage, "filters": FilterStage, "encode": EncodeStage}


def time_stages(rows: dict[str, np.ndarray], spec, repeats: int) -> dict:
    """Core-seconds per image of each stage on ``rows`` (best of ``repeats``), in batches of the job's size."""
    classes = load_stage_classes()
    n, b = len(rows["index"]), spec.generation.batch_size
    batches = [{k: v[i:i + b] for k, v in rows.items()} for i in range(0, n, b)]
    stages = {name: cls(spec) for name, cls in classes.items()}
    warm = batches[0]  # one untimed pass first: imports and first-call costs are paid once per worker, not per image
    for name in STAGE_NAMES:
        warm = stages[name](warm)
    best = {name: math.inf for name in STAGE_NAMES}
    for _ in range(repeats):
        stages["filters"] = classes["filters"](spec)  # a fresh dedup memory: every repeat sees the same verdicts
        spent = dict.fromkeys(STAGE_NAMES, 0.0)
        current = []
        for batch in batches:  # as the pipeline runs them: one operator, the four stages one batch after another
            for name in STAGE_NAMES:
                t0 = time.process_time()
                batch = stages[name](batch)
                spent[name] += time.process_time() - t0
            current.append(batch)
        best = {name: min(best[name], spent[name]) for name in STAGE_NAMES}
    kept = int(sum(batch["keep"].sum() for batch in current))
    per_image = {name: best[name] / n for name in STAGE_NAMES}
    instances = sum(len(json.loads(str(a))) for batch in current for a in batch["annotations"])
    return {"images": n, "core_s_per_image": {**per_image, "total": sum(per_image.values())},
            "kept": kept, "instances_per_image": instances / n,
            "classes_per_image": sum(len(json.loads(str(c))) for c in rows["class_names"]) / n,
            "map_grid": list(rows["attn"].shape[2:])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "synthgen-stage-cost"))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "stage_cost.json"))
    args = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    sizes = [int(s) for s in args.sizes.split(",")]
    sources = args.sources.split(",")
    unknown = set(sources) - set(SOURCES)
    if unknown:
        ap.error(f"--sources: unknown {sorted(unknown)}; choose from {list(SOURCES)}")
    result = {**run_header("benchmarks.stage_cost", argv), "job": "jobs/coco80-sdxl.yaml", "images": args.images,
              "repeats": args.repeats, "threads": 1,
              "targets_core_s_per_image": {str(s): t for s, t in TARGETS.items()},
              "gpu_images_per_s": {str(s): r for s, r in GPU_RATES.items()}, "results": {}}
    for source in sources:
        for size in sizes:
            spec = job_spec(size)
            rows = sdxl_rows(size, args.images, Path(args.cache)) if source == "sdxl" else \
                scene_rows(size, args.images, spec)
            r = time_stages(rows, spec, args.repeats)
            total = r["core_s_per_image"]["total"]
            if size in GPU_RATES:  # CPUs that keep up with one GPU at the assumed rate
                r["cpus_per_gpu"] = total * GPU_RATES[size]
                r["meets_target"] = total <= TARGETS[size]
            result["results"].setdefault(source, {})[str(size)] = r
    print(f"core-s per image ({args.images} images, best of {args.repeats}; jobs/coco80-sdxl.yaml settings)")
    header = "".join(f"{f'{src} {size}²':>14}" for src in result["results"] for size in result["results"][src])
    print(f"{'stage':<8}{header}")
    for name in (*STAGE_NAMES, "total"):
        print(f"{name:<8}" + "".join(f"{result['results'][src][sz]['core_s_per_image'][name]:>14.4f}"
                                     for src in result["results"] for sz in result["results"][src]))
    result["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    write_result(args.json, result)


if __name__ == "__main__":
    main()
