"""What attention capture costs on real UNet configurations: bare diffusers vs the synthesis stage with capture.

    python -m benchmarks.family_capture [--models sd15,sd21,sdxl] [--size 256] [--steps 2] [--repeats 1]

Random-weight models at the real configurations (built once with diffusers / transformers into
``--cache``; nothing is downloaded): SD 1.5 and SD 2.1 (UNet, CLIP text encoder and VAE at full width
and depth) and SDXL at ``--sdxl-width`` of its channel widths (full depth: transformer depths
[1, 2, 10], both text encoders at full size). Per model, each configuration runs in its own
subprocess (its peak resident memory is its own), one image per call, CFG on (guidance 7.5):

  * ``bare``     the diffusers pipeline (StableDiffusionPipeline / StableDiffusionXLPipeline) called
                 directly: the same weights, scheduler (DDIM), size, steps and seed
  * ``capture``  ``SynthesisStage`` (the model seam of stages/families/) with cross-attention capture at
                 "1/2" and "1/4" of the latent side (16×16 and 8×8 at 256²; SDXL: its two
                 cross-attention levels)

Seconds are the best of ``--repeats`` timed calls after one warm-up call. On a shared machine two processes'
times differ by ±10 % with nothing changed, so the capture's cost is also measured in place: the time its
own methods take (``begin``, ``record`` in every captured layer, the step-end hook, ``finish``) as a share of
the same calls (``capture_work_share``). The CLIP tokenizer is the
real BPE vocabulary when the ``open_clip_torch`` wheel's files are installed (read, not imported),
else the bundled shapes model's vocabulary. Writes benchmarks/results/family_capture.json (``--json``);
``--update`` reruns some models into an existing JSON measured with the same settings, keeping the others.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import importlib.metadata
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import run_header, MethodTimer, REPO, write_result

CONFIGS = ("bare", "capture")
PROMPT = "a photo of a traffic light and a dog"

UNET_SD = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
               down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
MODELS = {
    "sd15": dict(unet=dict(UNET_SD, attention_head_dim=8, cross_attention_dim=768),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           hidden_act="quick_gelu"), prediction="epsilon"),
    "sd21": dict(unet=dict(UNET_SD, sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                           use_linear_projection=True, upcast_attention=True),
                 text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                           hidden_act="gelu"), prediction="v_prediction"),
    "sdxl": dict(unet=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                           use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
                           addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           hidden_act="quick_gelu"),
                 text2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            hidden_act="gelu", projection_dim=1280), prediction="epsilon"),
}


#: installed distributions that ship CLIP's BPE merges file (read, never imported)
CLIP_BPE_PACKAGES = ("openai-clip", "open_clip_torch")


def clip_bpe() -> Path | None:
    """CLIP's BPE merges file, ``bpe_simple_vocab_16e6.txt.gz``, from an installed package, if any."""
    for package in CLIP_BPE_PACKAGES:
        try:
            files = importlib.metadata.files(package) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name == "bpe_simple_vocab_16e6.txt.gz" and Path(f.locate()).is_file():
                return Path(f.locate())
    return None


@functools.lru_cache(maxsize=None)
def clip_bpe_files() -> tuple[str, str] | None:
    """(vocab.json text, merges.txt text) of the real CLIP BPE, as open_clip's SimpleTokenizer builds them;
    None when no installed package ships it."""
    gz = clip_bpe()
    if gz is None:
        return None
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):  # CLIP's (and GPT-2's) reversible byte -> printable character table
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    merges = [tuple(m.split()) for m in gzip.open(gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]]
    chars = [chr(c) for c in cs]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return (json.dumps({t: i for i, t in enumerate(vocab)}),
            "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer (77 tokens) saved to ``folder``: the real CLIP BPE when an installed package ships it,
    else the bundled shapes model's vocabulary."""
    from transformers import CLIPTokenizer

    src = Path(tempfile.mkdtemp())
    files = clip_bpe_files()
    if files is not None:
        (src / "vocab.json").write_text(files[0])
        (src / "merges.txt").write_text(files[1])
    else:
        data = json.loads((REPO / "pipeline/models/shapes-tiny-sd/tokenizer/tokenizer.json").read_text())
        (src / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
        (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(
            m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]) + "\n")
    tok = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(str(folder))
    return tok


def build(name: str, folder: Path, width: float) -> Path:
    """A random-weight diffusers folder of model ``name`` (safetensors); SDXL channel widths scaled by ``width``."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    cfg = MODELS[name]
    unet_cfg = dict(cfg["unet"])
    if name == "sdxl" and width != 1.0:
        unet_cfg["block_out_channels"] = tuple(int(c * width) for c in unet_cfg["block_out_channels"])
        unet_cfg["attention_head_dim"] = tuple(max(1, int(h * width)) for h in unet_cfg["attention_head_dim"])
    tok = clip_tokenizer(folder / "_tok")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77, **cfg["text"]))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
    unet = UNet2DConditionModel(**unet_cfg)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=cfg["prediction"])
    if name == "sdxl":
        tok2 = clip_tokenizer(folder / "_tok2")
        text2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tok2), max_position_embeddings=77,
                                                           **cfg["text2"]))
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok,
                                         tokenizer_2=tok2, unet=unet, scheduler=scheduler, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for staging in folder.glob("_tok*"):
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()
    return folder


def child(name: str, folder: str, config: str, size: int, steps: int, repeats: int) -> dict:
    """In the subprocess: one warm-up call, then ``repeats`` timed calls of one image."""
    import numpy as np
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work_timer = None
    if config == "bare":
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)

        def call() -> np.ndarray:
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                        generator=torch.Generator("cpu").manual_seed(1), output_type="np").images
    else:
        from pipeline.spec import validate_spec
        from stages.attention import AttentionCapture

        work_timer = MethodTimer(AttentionCapture, ("begin", "record", "on_step_end", "finish"))  # its own work
        from stages.sampling import class_token_positions
        from stages.synthesis import SynthesisStage

        spec = validate_spec({
            "name": f"bench-{name}", "model": {"path": folder, "device": "cpu"}, "classes": ["traffic light", "dog"],
            "prompts": {"max_classes_per_image": 2}, "samples": 1, "output": {"dir": tempfile.mkdtemp(), "shard_size": 1},
            "generation": {"steps": steps, "guidance_scale": 7.5, "height": size, "width": size, "batch_size": 1},
            "masks": {"capture_resolutions": ["1/2", "1/4"]}})
        stage = SynthesisStage(spec)
        spans = [(PROMPT.index(w), PROMPT.index(w) + len(w)) for w in ("traffic light", "dog")]
        batch = {"index": np.array([0]), "seed": np.array([1]), "prompt": np.array([PROMPT]),
                 "class_names": np.array([json.dumps(["traffic light", "dog"])]),
                 "token_index": np.array([json.dumps(class_token_positions(stage.pipe.tokenizer, PROMPT, spans))])}

        def call() -> np.ndarray:
            return stage(batch)["image"]
    call()  # warm-up
    times, work = [], []
    for _ in range(repeats):
        if work_timer is not None:
            work_timer.seconds = 0.0
        t0 = time.perf_counter()
        images = call()
        times.append(time.perf_counter() - t0)
        work.append(work_timer.seconds if work_timer is not None else 0.0)
        assert np.isfinite(np.asarray(images, dtype=np.float64)).all()
    out = {"seconds_per_image": min(times), "times": times,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if config == "capture":
        out["capture_work_s"] = work
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd15,sd21,sdxl")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sdxl-width", type=float, default=0.5, help="SDXL channel widths x this (1.0: real)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "synthgen-family-bench"))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "family_capture.json"))
    ap.add_argument("--update", action="store_true",
                    help="keep the other models of an existing --json measured with the same settings")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.folder, args.child[1], args.size, args.steps, args.repeats)))
        return
    result = {**run_header("benchmarks.family_capture", argv),
              "size": args.size, "steps": args.steps, "repeats": args.repeats, "sdxl_width": args.sdxl_width,
              "models": {}}
    if args.update and Path(args.json).is_file():
        earlier = json.loads(Path(args.json).read_text())
        settings = ("size", "steps", "repeats", "sdxl_width")
        if any(earlier.get(k) != result[k] for k in settings):
            ap.error(f"--update: {args.json} was measured with {({k: earlier.get(k) for k in settings})}, "
                     f"not {({k: result[k] for k in settings})}")
        result["models"] = earlier["models"]
        result["earlier_runs"] = [*earlier.get("earlier_runs", []),
                                  {k: earlier.get(k) for k in ("command", "date", "machine")}]
    for name in args.models.split(","):
        width = args.sdxl_width if name == "sdxl" else 1.0
        folder = build(name, Path(args.cache) / f"{name}-w{width:g}", width)
        runs = {}
        for config in CONFIGS:
            cmd = [sys.executable, "-m", "benchmarks.family_capture", "--child", name, config, "--folder", str(folder),
                   "--size", str(args.size), "--steps", str(args.steps), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
            runs[config] = json.loads(out.strip().splitlines()[-1])
        bare, cap = runs["bare"], runs["capture"]
        result["models"][name] = {
            "width": width, "unet_parameters_m": _unet_params(folder),
            "seconds_per_image": {c: runs[c]["seconds_per_image"] for c in CONFIGS},
            "peak_rss_mb": {c: runs[c]["peak_rss_mb"] for c in CONFIGS},
            "time_overhead": cap["seconds_per_image"] / bare["seconds_per_image"] - 1,
            "memory_overhead": cap["peak_rss_mb"] / bare["peak_rss_mb"] - 1,
            # the capture's own work (begin, record in every captured layer, step-end hook, finish) as a share of
            # the same calls' wall time: unlike the two processes' times it does not move with the machine's load
            "capture_work_share": sum(cap["capture_work_s"]) / sum(cap["times"]),
            "runs": runs, "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
        m = result["models"][name]
        print(f"{name:<6} w{width:<4g} bare {bare['seconds_per_image']:.2f} s {bare['peak_rss_mb']:.0f} MB | capture "
              f"{cap['seconds_per_image']:.2f} s {cap['peak_rss_mb']:.0f} MB | {100 * m['time_overhead']:+.1f}% time "
              f"{100 * m['memory_overhead']:+.1f}% memory | capture's own work {100 * m['capture_work_share']:.2f}% "
              "of its time", flush=True)
        write_result(args.json, result)


def _unet_params(folder: Path) -> float:
    """UNet parameters in millions, from its safetensors headers (one file or shards; no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for path in sorted((folder / "unet").glob("diffusion_pytorch_model*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return round(total / 1e6, 1)


if __name__ == "__main__":
    main()
