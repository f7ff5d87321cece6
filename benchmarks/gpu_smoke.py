"""GPU smoke test: the synthesis path with attention capture on a GPU, in every dtype, against a CPU float32
reference computed in the same run. Nothing is downloaded.

    python -m benchmarks.gpu_smoke [--device cuda] [--families DIR] [--demo-job] [--json PATH]
    python -m benchmarks.gpu_smoke --build DIR          # only build the tiny family folders into DIR
    python -m benchmarks.gpu_smoke --quick --device cpu --json /tmp/smoke.json   # what tests/ run

Models: the bundled shapes model (pipeline/models/shapes-tiny-sd, SD 1.x layout) and tiny random-weight
folders of SD 1.5, SDXL, SD3 (3.5: dual attention, RMS q/k norms, T5) and Flux dev, built offline from the
real layouts the capture benchmarks use (``family_capture.MODELS``, ``mmdit_capture.build``) at tiny widths
(seconds; ~40 MB), into ``--families DIR`` (reused when already there; ``--build DIR`` builds and exits)
or a temporary folder.
On a GPU the float32 reference runs on the CPU in the same process; ``--device cpu`` checks float32 and
bfloat16 and skips float16 (noted in the JSON). Per family and dtype, ``SynthesisStage`` (the model seam,
stages/families/) with capture on, on one batch of two sampled prompts:

  weights   the denoiser and the VAE were loaded in the dtype asked for
  images    the pipeline's float output (before the uint8 cast) is finite and no image is constant
  maps      ``attn`` / ``attn_raw`` are (B, K, h, w) float16 with (h, w) the recorded ``map_grid``, finite,
            and every named class's map is non-zero
  cosine    each named class's ``attn`` map against the CPU float32 reference: the smallest cosine
            similarity (at least --min-cosine for the dtype)
  repeat    a second identical call gives bit-identical images and maps
  capture   the same call with capture off (``SynthesisStage(spec, capture=False)``) gives the same image bytes
  syncs     cuda only: ``torch.cuda.set_sync_debug_mode("warn")`` inside the capture's per-step methods
            (``record`` in every captured layer, ``on_step_end``): synchronizing calls counted, 0 expected;
            those of ``begin`` / ``finish`` (once per call) and of the rest of the call reported, not checked

Then capture cost at real block shapes (``--block-size``, default 1024²; ``--quick``: 128², 2 heads): SDXL's
UNet (family_capture's real configuration at reduced depth: one transformer layer per level, one resnet
per block; capture at "1/2" and "1/4", its two cross-attention levels), SD3.5 Medium (2 blocks, capture block 0)
and Flux dev (1 double- + 1 single-stream block, both captured) at their real widths and text lengths
(``mmdit_capture.build`` / ``inputs``), random weights, bfloat16 on cuda (float32 on cpu): time per denoiser
call and peak device memory with capture off and on, the same weights (``--block-depth full``: every block).
``--demo-job`` also runs jobs/shapes-demo.yaml (``--demo-samples``, ``model.device`` = ``--device``) through
``synthgen run`` on a local Ray and ``synthgen verify`` in a temporary output dir.

Prints a table, writes JSON (``--json``; on cuda by default benchmarks/results/gpu_smoke.json) and exits 1 when
a check fails. On one H100 the whole run (demo job included) is meant to take under 5 minutes.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.common import REPO, run_header, write_result
from pipeline import quiet

BUNDLED = REPO / "pipeline" / "models" / "shapes-tiny-sd"
FAMILIES = ("sd", "sd15", "sdxl", "sd3", "flux")  # "sd": the bundled model; the rest built here
DTYPES = ("float32", "float16", "bfloat16")
MIN_COSINE = {"float32": 0.99, "float16": 0.9, "bfloat16": 0.9}
CLASSES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue")
TEMPLATES = ("a photo of {objects}", "{objects} on a table")
GUIDANCE = {"sd": 5.0, "sd15": 5.0, "sdxl": 5.0, "sd3": 4.0, "flux": 3.5}
SIZE = 64  # tiny folders: 64² images (an 8×8 latent, 4×4 MM-DiT tokens)

# --- tiny random-weight folders ---------------------------------------------------------------------------
# The real layouts come from the capture benchmarks (family_capture.MODELS, mmdit_capture.build); only widths and
# depths are overridden, and the text encoders are 2-layer models of width 32 (their vocabularies: family_capture's
# CLIP tokenizer, and a T5 word-piece vocabulary of the prompts' words).
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
TINY_UNET = {
    "sd15": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, attention_head_dim=4, cross_attention_dim=32,
                 sample_size=8),
    "sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=(1, 2, 2),
                 transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32, sample_size=8),
}
TINY_MMDIT = {
    "sd3": dict(num_layers=4, dual_attention_layers=(1,), joint_attention_dim=64, pooled_projection_dim=64,
                pos_embed_max_size=16, sample_size=8),
    "flux": dict(heads=1, num_layers=2, num_single_layers=2, joint_attention_dim=64, pooled_projection_dim=32),
}


def _scheduler(name: str):
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if name == "sd3":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    if name == "flux":
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=16,
                         latent_channels=latent_channels, **extra)


def _clip(tokenizer, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, hidden_act="gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **TEXT)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_tokenizer(folder: Path):
    """A T5-format tokenizer (Unigram over whole words of the prompts, single characters for the rest; ``<pad>`` 0,
    ``</s>`` 1, ``<unk>`` 2), saved to ``folder``."""
    import string

    from transformers import T5TokenizerFast

    words = sorted({w for t in TEMPLATES for w in t.replace("{objects}", "").split()} | set(CLASSES) | set(COLOURS)
                   | {"a", "an", "and", "two", "three"})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in string.ascii_lowercase + string.digits + ",."]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    tok.save_pretrained(str(folder))
    return T5TokenizerFast.from_pretrained(str(folder))


def _mmdit_config(family: str, **overrides) -> dict:
    """The real MM-DiT layout of ``mmdit_capture.build`` (built on the meta device: no weights), overridden."""
    import torch

    from benchmarks.mmdit_capture import build

    heads = overrides.pop("heads", 2)
    with torch.device("meta"):
        config = {k: v for k, v in build(family, heads).config.items() if not k.startswith("_")}
    config.update(overrides)
    return config


def build_tiny(name: str, folder: Path) -> Path:
    """A tiny random-weight diffusers folder of ``name`` (sd15, sdxl, sd3, flux), reused when complete."""
    import torch
    from diffusers import (FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import T5Config, T5EncoderModel

    from benchmarks.family_capture import MODELS, clip_tokenizer

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))  # renamed into place when saved
    torch.manual_seed(0)
    tok = clip_tokenizer(staging / "_tok")
    if name in TINY_UNET:
        unet = UNet2DConditionModel(**{**MODELS[name]["unet"], **TINY_UNET[name]})
        if name == "sd15":
            pipe = StableDiffusionPipeline(vae=_vae(4), text_encoder=_clip(tok, False), tokenizer=tok, unet=unet,
                                           scheduler=_scheduler(name), safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        else:
            pipe = StableDiffusionXLPipeline(vae=_vae(4), text_encoder=_clip(tok, False), tokenizer=tok,
                                             text_encoder_2=_clip(tok, True), tokenizer_2=tok, unet=unet,
                                             scheduler=_scheduler(name), add_watermarker=False)
    else:
        t5_tok = t5_tokenizer(staging / "_t5")
        width = TINY_MMDIT[name]["joint_attention_dim"]
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=width, d_kv=16, d_ff=2 * width, num_layers=2,
                                     num_heads=width // 16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        if name == "sd3":
            transformer = SD3Transformer2DModel(**_mmdit_config("sd3", **TINY_MMDIT["sd3"]))
            pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=_scheduler(name),
                                            vae=_vae(16, shift_factor=0.0609, scaling_factor=1.5305,
                                                     use_quant_conv=False, use_post_quant_conv=False),
                                            text_encoder=_clip(tok, True), tokenizer=tok,
                                            text_encoder_2=_clip(tok, True), tokenizer_2=tok,
                                            text_encoder_3=t5, tokenizer_3=t5_tok)
        else:
            transformer = FluxTransformer2DModel(**_mmdit_config("flux", **TINY_MMDIT["flux"]))
            pipe = FluxPipeline(transformer=transformer, scheduler=_scheduler(name),
                                vae=_vae(16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                                         use_post_quant_conv=False),
                                text_encoder=_clip(tok, False), tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok)
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # no progress bars
        pipe.save_pretrained(str(staging / "model"), safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging / "model", folder)
    shutil.rmtree(staging, ignore_errors=True)
    return folder


def build_families(root: Path, names=FAMILIES, checks: "Checks | None" = None) -> dict[str, dict]:
    """{family: {"folder", "build_s"}}: the bundled model for "sd", tiny folders under ``root`` for the rest. With
    ``checks`` a family whose build fails is a failed ``<family>/build`` check and left out; without, it raises."""
    out = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            folder = BUNDLED if name == "sd" else build_tiny(name, Path(root) / name)
        except Exception as e:  # noqa: BLE001
            if checks is None:
                raise
            checks.add(f"{name}/build", False, _last_line(e))
            traceback.print_exc()
            continue
        out[name] = {"folder": str(folder), "build_s": round(time.perf_counter() - t0, 2)}
    return out


# --- the checks -----------------------------------------------------------------------------------------
class Checks:
    """Named pass/fail results, in order."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append({"name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    @property
    def failed(self) -> list[str]:
        return [r["name"] for r in self.rows if not r["ok"]]


def _last_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


class SyncCounter:
    """Wraps some instance methods so that CUDA's sync debug mode is "warn" while they run, and counts the
    synchronizing-call warnings each one raised (``counts``)."""

    def __init__(self):
        self.counts: Counter = Counter()

    def wrap(self, obj: Any, name: str, label: str | None = None) -> None:
        method = getattr(obj, name)
        label = label or name

        def wrapped(*args, **kwargs):
            return self.run(label, method, *args, **kwargs)

        setattr(obj, name, wrapped)

    def run(self, label: str, fn: Callable, *args, **kwargs):
        import torch

        previous = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(previous)
                self.counts[label] += sum("synchroniz" in str(w.message) for w in caught)


def smoke_spec(name: str, folder: str, device: str, dtype: str, steps: int, out_dir: str):
    """The job the family checks run: two samples, two classes at most per prompt, capture with refinement."""
    from pipeline.spec import validate_spec

    unet = name in ("sd", "sd15", "sdxl")
    masks = ({"capture_resolutions": ["1/2", "1/4"] if name == "sdxl" else ["1", "1/2"],
              "self_attention_resolution": "1/2", "refine_power": 1} if unet else {"refine_power": 1})
    data = {"name": f"smoke-{name}", "seed": 7, "model": {"path": folder, "device": device, "dtype": "float32"},
            "classes": [{"name": c, "attributes": list(COLOURS)} for c in CLASSES],
            "prompts": {"templates": list(TEMPLATES), "max_classes_per_image": 2}, "samples": 2,
            "generation": {"steps": steps, "guidance_scale": GUIDANCE[name], "height": SIZE, "width": SIZE,
                           "batch_size": 2, "scheduler": "default"},
            "masks": masks, "output": {"dir": out_dir, "shard_size": 2},
            "resources": {"synthesis": {"num_gpus": 1 if device.startswith("cuda") else 0}}}
    spec = validate_spec(data, f"smoke job ({name})")
    # the spec refuses half precision on a CPU (slow, not what a job should do); the smoke test checks it anyway
    return spec.model_copy(update={"model": spec.model.model_copy(update={"dtype": dtype})})


def sample_batch(spec) -> dict:
    from stages.sampling import SamplingStage

    return SamplingStage(spec)({"index": np.arange(spec.samples, dtype=np.int64)})


class Synth:
    """A ``SynthesisStage`` whose pipeline float output is kept (``last_images``) before the stage's uint8 cast,
    optionally with the capture's methods counted by a ``SyncCounter``."""

    def __init__(self, spec, capture: bool = True, syncs: SyncCounter | None = None):
        from stages.synthesis import SynthesisStage

        self.stage = SynthesisStage(spec, capture=capture)
        self.last_images: np.ndarray | None = None
        run = self.stage.family.run

        def keep(*args, **kwargs):
            out = run(*args, **kwargs)
            self.last_images = np.array(out, dtype=np.float32, copy=True)
            return out

        self.stage.family.run = keep
        if syncs is not None and self.stage.capture is not None:
            outer = self.stage.capture
            syncs.wrap(outer.capture, "record")  # the processors call the inner capture's record
            for name in ("on_step_end", "begin", "finish"):
                syncs.wrap(outer, name)

    def __call__(self, batch: dict) -> dict:
        return self.stage(batch)


def component_dtypes(pipe) -> dict[str, str]:
    """{component: the dtype most of its weights have} for the pipeline's torch modules."""
    import torch

    out = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            counts = Counter()
            for p in module.parameters():
                counts[str(p.dtype).replace("torch.", "")] += p.numel()
            out[name] = counts.most_common(1)[0][0] if counts else None
    return out


def _cosines(maps: np.ndarray, ref: np.ndarray, counts: list[int]) -> list[float]:
    out = []
    for b, n in enumerate(counts):
        for k in range(n):
            x, y = maps[b, k].astype(np.float64).ravel(), ref[b, k].astype(np.float64).ravel()
            denom = np.linalg.norm(x) * np.linalg.norm(y)
            out.append(float(x @ y / denom) if denom > 0 else 0.0)
    return out


def check_family(name: str, folder: str, device: str, dtypes: list[str], steps: int, min_cosine: dict,
                 checks: Checks, out_dir: str) -> dict:
    """Every per-dtype check of one family; the CPU float32 reference first."""
    import torch

    result: dict[str, Any] = {"folder": folder if name != "sd" else str(BUNDLED.relative_to(REPO)), "dtypes": {}}
    on_cuda = device.startswith("cuda")
    try:
        ref_spec = smoke_spec(name, folder, "cpu", "float32", steps, out_dir)
        batch = sample_batch(ref_spec)
        counts = [len(json.loads(c)) for c in batch["class_names"]]
        result["prompts"] = [str(p) for p in batch["prompt"]]
        t0 = time.perf_counter()
        reference = Synth(ref_spec)(batch)["attn"]
        result["reference_s"] = round(time.perf_counter() - t0, 3)
    except Exception as e:  # noqa: BLE001 - one family's failure must not hide the others'
        checks.add(f"{name}/reference", False, _last_line(e))
        traceback.print_exc()
        return result
    for dtype in dtypes:
        key = f"{name}/{dtype}"
        row: dict[str, Any] = {}
        result["dtypes"][dtype] = row
        try:
            spec = smoke_spec(name, folder, device, dtype, steps, out_dir)
            syncs = SyncCounter() if on_cuda else None
            synth = Synth(spec, syncs=syncs)
            loaded = component_dtypes(synth.stage.pipe)
            row["component_dtypes"] = loaded
            denoiser = "unet" if "unet" in loaded else "transformer"
            checks.add(f"{key}/weights", loaded[denoiser] == dtype and loaded["vae"] == dtype,
                       f"{denoiser} {loaded[denoiser]}, vae {loaded['vae']} (asked for {dtype})")
            t0 = time.perf_counter()
            if on_cuda:
                # the call's other synchronizing calls (those inside the capture's methods are counted there)
                first = syncs.run("rest_of_call", synth, batch)
            else:
                first = synth(batch)
            row["seconds_per_call"] = round(time.perf_counter() - t0, 3)
            floats = synth.last_images
            finite = bool(np.isfinite(floats).all())
            spread = [float(np.ptp(img)) for img in floats] if finite else []
            row["images_finite"], row["image_ranges"] = finite, [round(s, 4) for s in spread]
            checks.add(f"{key}/images", finite and min(spread) > 0,
                       "non-finite pixels" if not finite else f"smallest image range {min(spread):.4f}")

            gens = [json.loads(str(g)) for g in first["gen"]]
            grid = list(gens[0]["capture"]["map_grid"])
            want = (len(batch["prompt"]), spec.prompts.max_classes_per_image, *grid)
            # the stage zeroes a non-finite row's image and maps and marks its gen (stages/finite.py, where present)
            row["gen_non_finite"] = [bool(g.get("non_finite", False)) for g in gens]
            problems = [f"gen marks rows {[i for i, b in enumerate(row['gen_non_finite']) if b]} non-finite"] \
                if any(row["gen_non_finite"]) else []
            for col in ("attn", "attn_raw"):
                maps = first[col]
                if tuple(maps.shape) != want or maps.dtype != np.float16:
                    problems.append(f"{col} {tuple(maps.shape)} {maps.dtype}, expected {want} float16")
                elif not np.isfinite(maps).all():
                    problems.append(f"{col} has non-finite values")
                elif any(not np.any(maps[b, k]) for b, n in enumerate(counts) for k in range(n)):
                    problems.append(f"{col}: a named class's map is all zero")
            row["map_shape"], row["map_dtype"] = list(first["attn"].shape), str(first["attn"].dtype)
            checks.add(f"{key}/maps", not problems, "; ".join(problems) or f"{want} float16")

            cos = _cosines(first["attn"], reference, counts) if not problems else []
            row["cosine_min"] = round(min(cos), 6) if cos else None
            row["cosine_mean"] = round(float(np.mean(cos)), 6) if cos else None
            checks.add(f"{key}/cosine", bool(cos) and min(cos) >= min_cosine[dtype],
                       f"min {min(cos):.4f} (>= {min_cosine[dtype]})" if cos else "no maps to compare")

            second = synth(batch)
            same = all(np.array_equal(first[c], second[c]) for c in ("image", "attn", "attn_raw"))
            row["repeat_identical"] = same
            checks.add(f"{key}/repeat", same, "bit-identical" if same else
                       f"images differ by up to {int(np.abs(first['image'].astype(int) - second['image']).max())}")

            bare = Synth(spec, capture=False)
            off = bare(batch)
            equal = bool(np.array_equal(first["image"], off["image"]))
            diff = float(np.abs(floats - bare.last_images).max())
            row["capture_off_identical"], row["capture_off_max_abs_diff"] = equal, diff
            checks.add(f"{key}/capture", equal, f"image bytes equal (float max diff {diff:.2g})" if equal
                       else f"images differ (float max diff {diff:.3g})")
            del bare
            if on_cuda:
                counts_ = dict(syncs.counts)
                row["syncs"] = counts_
                per_step = counts_.get("record", 0) + counts_.get("on_step_end", 0)
                checks.add(f"{key}/syncs", per_step == 0,
                           f"record/on_step_end {per_step}, begin {counts_.get('begin', 0)}, finish "
                           f"{counts_.get('finish', 0)}, rest of the call {counts_.get('rest_of_call', 0)}")
            del synth
        except Exception as e:  # noqa: BLE001
            checks.add(f"{key}/run", False, _last_line(e))
            traceback.print_exc()
        finally:
            if on_cuda:
                torch.cuda.empty_cache()
    return result


# --- capture cost at real block shapes --------------------------------------------------------------------
BLOCK_FAMILIES = ("sdxl", "sd3", "flux")
#: inputs that stay float32 whatever the weights' dtype (positions, timesteps, micro-conditioning), as pipelines pass
FLOAT32_INPUTS = ("timestep", "guidance", "img_ids", "txt_ids", "time_ids")


def block_model(family: str, device: str, dtype, quick: bool, full: bool):
    """(denoiser, description): the family's real configuration (``family_capture.MODELS["sdxl"]``,
    ``mmdit_capture.build``) at its real width (quick: SDXL's channels / 5, 2 heads of the MM-DiTs' real head
    size) and reduced depth unless ``full``, random weights built on ``device`` in ``dtype``."""
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from benchmarks.family_capture import MODELS
    from benchmarks.mmdit_capture import build

    if family == "sdxl":
        cls, config = UNet2DConditionModel, dict(MODELS["sdxl"]["unet"])
        if quick:
            config["block_out_channels"] = tuple(c // 5 for c in config["block_out_channels"])
            config["attention_head_dim"] = tuple(max(1, h // 5) for h in config["attention_head_dim"])
        if not full:
            config.update(layers_per_block=1, transformer_layers_per_block=(1, 1, 1))
        channels, layers = config["block_out_channels"], config["transformer_layers_per_block"]
        desc = (f"SDXL UNet, channels {channels[0]}-{channels[-1]}, transformer layers "
                f"{'/'.join(map(str, layers))}")
    else:
        cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
        heads = 2 if quick else 24
        with torch.device("meta"):  # the real configuration, no weights
            config = {k: v for k, v in build(family, heads).config.items() if not k.startswith("_")}
        if not full:
            config.update(dict(num_layers=2, dual_attention_layers=(0,)) if family == "sd3"
                          else dict(num_layers=1, num_single_layers=1))
        depth = (f"{config['num_layers']} blocks" if family == "sd3"
                 else f"{config['num_layers']}+{config['num_single_layers']} double+single blocks")
        title = "SD3.5 Medium" if family == "sd3" else "Flux dev"
        desc = f"{title}, {heads} heads × {config['attention_head_dim']}, {depth}"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype, on the device, as from_pretrained(dtype=...) builds
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = cls(**config).to(dtype).eval()
    finally:
        torch.set_default_dtype(previous)
    return model, desc


def block_inputs(family: str, size: int, device: str, dtype) -> dict:
    """One denoiser call's inputs at ``size``² (SDXL and SD3: a CFG batch of 2; Flux: 1), at the real text
    lengths and widths (``mmdit_capture.inputs``; SDXL: 77 tokens × 2048, pooled 1280, 6 time ids)."""
    import torch

    from benchmarks.mmdit_capture import inputs

    if family == "sdxl":
        g = torch.Generator().manual_seed(0)
        side = size // 8
        args = dict(sample=torch.randn(2, 4, side, side, generator=g), timestep=torch.full((2,), 500.0),
                    encoder_hidden_states=torch.randn(2, 77, 2048, generator=g),
                    added_cond_kwargs={"text_embeds": torch.randn(2, 1280, generator=g),
                                       "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2,
                                                                dtype=torch.float32)})
    else:
        args = inputs(family, size)

    def move(key: str, value):
        if isinstance(value, dict):
            return {k: move(k, v) for k, v in value.items()}
        cast = value.is_floating_point() and key not in FLOAT32_INPUTS
        return value.to(device=device, dtype=dtype if cast else value.dtype)

    return {k: move(k, v) for k, v in args.items()}


def attach_block_capture(family: str, model, size: int, full: bool):
    """(capture, begin(steps)): SDXL's two cross-attention levels; the MM-DiTs' blocks (reduced depth: SD3 block 0,
    Flux both blocks; full depth: the family defaults); two classes named by tokens [3] and [5, 6]."""
    from stages.attention import AttentionCapture, CaptureConfig
    from stages.families.joint_attention import JointAttentionCapture, JointCaptureConfig

    token_index = [[[3], [5, 6]]]
    if family == "sdxl":
        latent = (size // 8, size // 8)
        capture = AttentionCapture(model, CaptureConfig(resolutions=("1/2", "1/4")), latent_hw=latent)
        return capture, lambda steps: capture.begin(token_index, 2, latent, steps, 77)
    blocks = None if full else ((0,) if family == "sd3" else (0, 1))
    capture = JointAttentionCapture(model, JointCaptureConfig(blocks=blocks))
    text = 77 + 256 if family == "sd3" else 512
    grid = (size // 16, size // 16)
    return capture, lambda steps: capture.begin(token_index, 2, grid, steps, text)


def _time_calls(model, args: dict, steps: int, cuda: bool, capture=None, begin=None) -> tuple[float, float | None, Any]:
    """(seconds per denoiser call, peak device MB, the capture's maps): one warm-up call, then ``steps`` calls."""
    import torch

    def run(n: int):
        if begin is not None:
            begin(n)
        for step in range(n):
            model(**args, return_dict=False)
            if capture is not None:
                capture.on_step_end(None, step, 0, {})
        return capture.finish() if capture is not None else None

    with torch.no_grad():
        run(1)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        maps = run(steps)
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return seconds, peak, maps


def block_costs(family: str, device: str, size: int, steps: int, quick: bool, full: bool, checks: Checks) -> dict:
    import torch

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    row: dict[str, Any] = {"size": size, "dtype": str(dtype).replace("torch.", ""), "steps": steps,
                           "depth": "full" if full else "reduced"}
    model = capture = None
    try:
        model, row["description"] = block_model(family, device, dtype, quick, full)
        row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        args = block_inputs(family, size, device, dtype)
        off_s, off_mb, _ = _time_calls(model, args, steps, cuda)
        capture, begin = attach_block_capture(family, model, size, full)
        syncs = SyncCounter() if cuda else None
        if syncs is not None:
            syncs.wrap(capture, "record")
            syncs.wrap(capture, "on_step_end")
        on_s, on_mb, maps = _time_calls(model, args, steps, cuda, capture, begin)
        row["captured"] = (list(capture.blocks) if hasattr(capture, "blocks")
                           else {str(k): v for k, v in capture.layer_counts["cross"].items()})
        row["seconds_per_call"] = {"off": round(off_s, 5), "capture": round(on_s, 5)}
        row["time_overhead"] = round(on_s / off_s - 1, 4)
        row["peak_mb"] = {"off": None if off_mb is None else round(off_mb, 1),
                          "capture": None if on_mb is None else round(on_mb, 1)}
        row["memory_overhead"] = None if off_mb is None else round(on_mb / off_mb - 1, 4)
        finite = all(bool(torch.isfinite(v).all()) for v in maps.values())
        checks.add(f"blocks/{family}/maps", finite, "finite" if finite else "non-finite maps")
        if syncs is not None:
            row["syncs"] = dict(syncs.counts)
            n = sum(syncs.counts.values())
            checks.add(f"blocks/{family}/syncs", n == 0, f"record/on_step_end: {n} synchronizing calls")
    except Exception as e:  # noqa: BLE001
        checks.add(f"blocks/{family}/run", False, _last_line(e))
        traceback.print_exc()
    finally:
        del model, capture
        if cuda:
            torch.cuda.empty_cache()
    return row


# --- the demo job through Ray ---------------------------------------------------------------------------
def demo_job(device: str, samples: int, checks: Checks) -> dict:
    """jobs/shapes-demo.yaml (``samples``, on ``device``) through ``synthgen run`` (local Ray) and ``verify``."""
    out = Path(tempfile.mkdtemp(prefix="synthgen-smoke-demo-"))
    sets = [f"samples={samples}", f"model.device={device}"]
    if device.startswith("cuda"):
        # batch_size auto: measured on the GPU by a Ray task (pipeline/batch_size.py), its figures in the result
        sets += ["resources.synthesis.num_gpus=1", "resources.synthesis.actors=1", "generation.batch_size=auto"]
    cli = [sys.executable, "-m", "pipeline.cli"]
    result: dict[str, Any] = {"samples": samples, "overrides": sets}
    try:
        for step, cmd in (("run", [*cli, "run", "jobs/shapes-demo.yaml", "--out", str(out / "out"),
                                   *[a for s in sets for a in ("--set", s)]]),
                          ("verify", [*cli, "verify", str(out / "out")])):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            result[step] = {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 2)}
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            checks.add(f"demo/{step}", proc.returncode == 0, f"exit {proc.returncode}: {' | '.join(tail)[:300]}")
            if proc.returncode:
                break
        else:
            summary = json.loads((out / "out" / "manifest.json").read_text())["summary"]
            result.update({k: summary.get(k) for k in ("kept", "rejected", "images_per_s", "first_batch_s",
                                                       "batch_size_auto")})
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return result


# --- report -----------------------------------------------------------------------------------------------
def _cell(checks: dict[str, dict], name: str, text: str = "ok") -> str:
    row = checks.get(name)
    if row is None:
        return "-"
    return text if row["ok"] else "FAIL"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_report(result: dict, checks: Checks) -> None:
    by_name = {r["name"]: r for r in checks.rows}
    print(f"\ndevice {result['device']} ({result['device_name']}), torch {result['versions']['torch']}, diffusers "
          f"{result['versions']['diffusers']}; {result['steps']} steps at {SIZE}²")
    head = f"{'family':<7}{'dtype':<10}{'images':<8}{'maps':<20}{'cosine':<9}{'repeat':<8}{'cap=off':<9}" \
           f"{'syncs':<7}{'s/call':>7}"
    print(head + "\n" + "-" * len(head))
    for name, fam in result["families"].items():
        if f"{name}/reference" in by_name:
            print(f"{name:<7}{'':<10}reference FAILED: {by_name[f'{name}/reference']['detail']}")
        for dtype, row in fam.get("dtypes", {}).items():
            key = f"{name}/{dtype}"
            if f"{key}/run" in by_name:
                print(f"{name:<7}{dtype:<10}FAILED: {by_name[f'{key}/run']['detail'][:100]}")
                continue
            shape = "×".join(str(v) for v in row.get("map_shape", []))
            cos = row.get("cosine_min")
            syncs = str(sum(row.get("syncs", {}).get(k, 0) for k in ("record", "on_step_end")))
            print(f"{name:<7}{dtype:<10}{_cell(by_name, key + '/images'):<8}"
                  f"{_cell(by_name, key + '/maps', 'ok ' + shape):<20}"
                  f"{_cell(by_name, key + '/cosine', f'{cos:.4f}' if cos is not None else '-'):<9}"
                  f"{_cell(by_name, key + '/repeat'):<8}{_cell(by_name, key + '/capture'):<9}"
                  f"{_cell(by_name, key + '/syncs', syncs):<7}"
                  f"{row.get('seconds_per_call', float('nan')):>7.2f}")
    if result.get("blocks"):
        print(f"\ncapture at real block shapes ({result['block_size']}², {result['block_depth']} depth, ms per "
              "denoiser call, peak device MB)")
        head = f"{'model (random weights)':<58}{'off ms':>9}{'cap ms':>9}{'time':>8}{'off MB':>9}{'cap MB':>9}" \
               f"{'memory':>8}{'syncs':>7}"
        print(head + "\n" + "-" * len(head))
        for family, row in result["blocks"].items():
            if "seconds_per_call" not in row:
                print(f"{family:<58}FAILED: {by_name.get(f'blocks/{family}/run', {}).get('detail', '')[:100]}")
                continue
            ms, mb = row["seconds_per_call"], row["peak_mb"]
            mem = "-" if row["memory_overhead"] is None else f"{100 * row['memory_overhead']:+.1f}%"
            syncs = str(sum(row["syncs"].values())) if "syncs" in row else "-"
            print(f"{row['description'][:57]:<58}{1e3 * ms['off']:>9.1f}{1e3 * ms['capture']:>9.1f}"
                  f"{100 * row['time_overhead']:>+7.1f}%{_mb(mb['off']):>9}{_mb(mb['capture']):>9}{mem:>8}{syncs:>7}")
    if result.get("demo_job"):
        d = result["demo_job"]
        print(f"\ndemo job ({d['samples']} samples): run {_cell(by_name, 'demo/run')} "
              f"({d.get('run', {}).get('wall_s', '-')} s), verify {_cell(by_name, 'demo/verify')}")
    for note in result["notes"]:
        print(f"note: {note}")
    failed = checks.failed
    print(f"\n{len(checks.rows)} checks, {len(failed)} failed" + (": " + ", ".join(failed) if failed else ""))
    for r in checks.rows:
        if not r["ok"]:
            print(f"  FAIL {r['name']}: {r['detail']}")


def main(argv=None) -> int:
    quiet.setup(verbose=False)  # no progress bars or library notices, as the CLI (before they are imported)
    import torch

    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=default_device, help=f"default: {default_device}")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated (float16 is skipped on a cpu)")
    ap.add_argument("--families", metavar="DIR", help="tiny family folders: reused when there, else built there "
                                                      "(default: a temporary folder)")
    ap.add_argument("--build", metavar="DIR", help="build the tiny family folders into DIR and exit")
    ap.add_argument("--only", default=",".join(FAMILIES), help=f"families to check, of {','.join(FAMILIES)}")
    ap.add_argument("--steps", type=int, help="denoising steps per call (default 4; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="CPU-test settings: 2 steps, block shapes at 128² with "
                                                         "2 heads (SDXL: channels / 5), 2 timed block calls")
    ap.add_argument("--block-size", type=int, help="image side for the block-shape costs (default 1024; --quick 128)")
    ap.add_argument("--block-depth", choices=("reduced", "full"), default="reduced")
    ap.add_argument("--block-steps", type=int, help="timed denoiser calls per configuration (default 5; --quick 2)")
    ap.add_argument("--blocks", default=",".join(BLOCK_FAMILIES), help="block shapes to time ('' for none)")
    ap.add_argument("--demo-job", action="store_true", help="also run the demo job through synthgen run + verify")
    ap.add_argument("--demo-samples", type=int, default=20)
    ap.add_argument("--min-cosine", nargs="*", default=[], metavar="DTYPE=X",
                    help=f"smallest cosine to the CPU float32 maps (default {MIN_COSINE})")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default on cpu: 1, the tiny models' fastest "
                                                "on a shared machine; on cuda: torch's default)")
    ap.add_argument("--json", help="result JSON (default on cuda: benchmarks/results/gpu_smoke.json)")
    args = ap.parse_args(argv)

    if args.build:
        t0 = time.perf_counter()
        built = build_families(Path(args.build), [f for f in FAMILIES if f != "sd"])
        for name, b in built.items():
            print(f"{name}: {b['folder']} ({b['build_s']} s)")
        print(f"built in {time.perf_counter() - t0:.1f} s")
        return 0
    t_start = time.perf_counter()
    device = args.device
    cuda = device.startswith("cuda")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    min_cosine = dict(MIN_COSINE)
    for item in args.min_cosine:
        k, _, v = item.partition("=")
        if k not in DTYPES:
            ap.error(f"--min-cosine {item}: expected DTYPE=X with DTYPE one of {DTYPES}")
        min_cosine[k] = float(v)
    dtypes = [d for d in args.dtypes.split(",") if d]
    notes = []
    if not cuda and "float16" in dtypes:
        dtypes.remove("float16")
        notes.append("float16 skipped on cpu (no half-precision kernels worth checking there)")
    if not cuda:
        notes.append("no sync check on cpu (torch.cuda.set_sync_debug_mode needs a GPU)")
    steps = args.steps or (2 if args.quick else 4)
    block_size = args.block_size or (128 if args.quick else 1024)
    block_steps = args.block_steps or (2 if args.quick else 5)
    only = [f for f in args.only.split(",") if f]
    blocks = [b for b in args.blocks.split(",") if b]
    unknown = sorted(set(only) - set(FAMILIES)) + sorted(set(blocks) - set(BLOCK_FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}")

    import diffusers

    checks = Checks()
    result: dict[str, Any] = {
        **run_header("benchmarks.gpu_smoke", argv), "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "cuda": torch.version.cuda if cuda else None},
        "quick": args.quick, "threads": torch.get_num_threads(), "dtypes": dtypes, "steps": steps, "size": SIZE,
        "min_cosine": min_cosine,
        "reference": "cpu float32, same process", "notes": notes, "families": {}, "blocks": {},
        "block_size": block_size, "block_steps": block_steps, "block_depth": args.block_depth}
    with tempfile.TemporaryDirectory(prefix="synthgen-smoke-") as tmp:
        t0 = time.perf_counter()
        built = build_families(Path(args.families or Path(tmp) / "families"), only, checks)
        result["build_s"] = round(time.perf_counter() - t0, 2)
        for name in built:
            t0 = time.perf_counter()
            print(f"checking {name} ({', '.join(dtypes)}) ...", flush=True)
            fam = check_family(name, built[name]["folder"], device, dtypes, steps, min_cosine, checks, tmp)
            fam.update(build_s=built[name]["build_s"], check_s=round(time.perf_counter() - t0, 2))
            result["families"][name] = fam
        for family in blocks:
            print(f"timing capture on {family} block shapes at {block_size}² ...", flush=True)
            result["blocks"][family] = block_costs(family, device, block_size, block_steps, args.quick,
                                                   args.block_depth == "full", checks)
    if args.demo_job:
        print(f"running the demo job ({args.demo_samples} samples on {device}) ...", flush=True)
        result["demo_job"] = demo_job(device, args.demo_samples, checks)
    result["checks"] = checks.rows
    result["failed"] = checks.failed
    result["passed"] = not checks.failed
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    print_report(result, checks)
    path = args.json or (str(REPO / "benchmarks" / "results" / "gpu_smoke.json") if cuda else None)
    if path:
        write_result(path, result)
    print(f"wall {result['wall_s']} s")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
