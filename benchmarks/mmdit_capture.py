"""What joint-attention capture costs on MM-DiT transformers (SD3.5 Medium and Flux layouts), random weights, CPU.

    python -m benchmarks.mmdit_capture [--family sd3 flux] [--heads sd3=24 flux=12] [--size 512] [--steps 2]
                                       [--repeats 1]

The real layouts (SD3.5 Medium: 24 blocks, 13 with dual attention, 24 heads of 64, RMS q/k norms, joint
text 77 CLIP + 256 T5 tokens; Flux dev: 19 double- + 38 single-stream blocks, 24 heads of 128, RoPE,
512 T5 tokens) at ``--heads`` heads per family (the real width at 24; Flux dev's 12 B parameters are 48 GB
in fp32, so by default it runs at 12 heads, width 1536, 3 B parameters: the widest that fits this
machine's 24 GiB beside the rest; the JSON states the width), the real depth, random weights, fp32 on the CPU. Only the
transformer runs: ``--steps`` forward calls at ``--size``² (SD3: a CFG batch of 2; Flux: 1) after one
warm-up call, with capture off (diffusers' own processors) or on (the family's default middle blocks,
per-class maps of 2 classes reduced on the fly). Each configuration runs in its own subprocess (its
peak resident memory is its own), they take turns ``--repeats`` times, and the best time is kept. The
capture's own work (``begin``, ``record`` in every captured block, the step-end hook, ``finish``) is also
timed in place inside the timed calls (``capture_work_share``): two processes' wall clocks on a shared
machine differ by more than the capture costs.

Writes JSON (default benchmarks/results/mmdit_capture.json).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from benchmarks.common import run_header, REPO, MethodTimer, write_result

CONFIGS = ("off", "joint")


def build(family: str, heads: int):
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if family == "sd3":
        return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                     attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=4096,
                                     caption_projection_dim=64 * heads, pooled_projection_dim=2048, out_channels=16,
                                     pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                     qk_norm="rms_norm").eval()
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                  attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=4096,
                                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).eval()


def inputs(family: str, size: int) -> dict:
    import torch
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(0)
    side = size // 16  # image tokens per side: VAE 8 × patch 2
    if family == "sd3":
        return dict(hidden_states=torch.randn(2, 16, 2 * side, 2 * side, generator=g),
                    encoder_hidden_states=torch.randn(2, 77 + 256, 4096, generator=g),
                    pooled_projections=torch.randn(2, 2048, generator=g), timestep=torch.full((2,), 500.0))
    return dict(hidden_states=torch.randn(1, side * side, 64, generator=g),
                encoder_hidden_states=torch.randn(1, 512, 4096, generator=g),
                pooled_projections=torch.randn(1, 768, generator=g), timestep=torch.full((1,), 0.5),
                img_ids=FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32),
                txt_ids=torch.zeros(512, 3), guidance=torch.full((1,), 3.5))


def child(family: str, config: str, heads: int, size: int, steps: int, threads: int) -> dict:
    import torch

    from stages.families.joint_attention import JointAttentionCapture, JointCaptureConfig

    torch.set_num_threads(threads)
    model = build(family, heads)
    args = inputs(family, size)
    capture = JointAttentionCapture(model, JointCaptureConfig()) if config == "joint" else None
    timer = MethodTimer(JointAttentionCapture, ("begin", "record", "on_step_end", "finish"))
    text = 77 + 256 if family == "sd3" else 512
    side = size // 16

    def call(n: int) -> None:
        if capture is not None:
            capture.begin([[[3], [5, 6]]], 2, (side, side), n, text)
        for step in range(n):
            model(**args, return_dict=False)
            if capture is not None:
                capture.on_step_end(None, step, 0, {})
        if capture is not None:
            assert torch.isfinite(capture.finish()["attn"]).all()

    with torch.no_grad():
        call(1)  # warm-up
        timer.seconds = 0.0
        t0 = time.perf_counter()
        call(steps)
        seconds = time.perf_counter() - t0
    return {"seconds_per_step": seconds / steps, "capture_work_s_per_step": timer.seconds / steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "blocks": list(capture.blocks) if capture is not None else None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    ap.add_argument("--heads", nargs="+", default=["sd3=24", "flux=12"], metavar="FAMILY=N",
                    help="attention heads per family (24: the real width)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 16)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "mmdit_capture.json"))
    ap.add_argument("--child", nargs=2, metavar=("FAMILY", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    heads = {f: 24 for f in ("sd3", "flux")}
    for item in args.heads:
        family, _, n = item.partition("=")
        if family not in heads or not n.isdigit():
            ap.error(f"--heads {item}: expected FAMILY=N with FAMILY one of {sorted(heads)}")
        heads[family] = int(n)
    if args.child:
        family, config = args.child
        print(json.dumps(child(family, config, heads[family], args.size, args.steps, args.threads)))
        return
    result = {**run_header("benchmarks.mmdit_capture", argv),
              "size": args.size, "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
              "families": {}}
    for family in args.family:
        runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        for _ in range(args.repeats):
            for config in CONFIGS:
                cmd = [sys.executable, "-m", "benchmarks.mmdit_capture", "--child", family, config,
                       "--heads", f"{family}={heads[family]}", "--size", str(args.size), "--steps", str(args.steps),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
                runs[config].append(json.loads(out.strip().splitlines()[-1]))
        best = {c: min(r["seconds_per_step"] for r in runs[c]) for c in CONFIGS}
        peak = {c: max(r["peak_rss_mb"] for r in runs[c]) for c in CONFIGS}
        head_dim = 64 if family == "sd3" else 128
        result["families"][family] = {
            "heads": heads[family], "width": heads[family] * head_dim, "real_width": 24 * head_dim, "params_m": runs["off"][0]["params_m"],
            "blocks": runs["joint"][0]["blocks"], "seconds_per_step": best, "peak_rss_mb": peak,
            "time_overhead": best["joint"] / best["off"] - 1, "memory_overhead": peak["joint"] / peak["off"] - 1,
            "capture_work_share": (sum(r["capture_work_s_per_step"] for r in runs["joint"])
                                   / sum(r["seconds_per_step"] for r in runs["joint"])),
            "runs": runs, "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
        f = result["families"][family]
        print(f"{family}: width {f['width']} ({f['params_m']:.0f} M params), blocks {f['blocks']}: "
              f"{best['off']:.2f} -> {best['joint']:.2f} s/step ({100 * f['time_overhead']:+.1f}%), "
              f"peak RSS {peak['off']:.0f} -> {peak['joint']:.0f} MB ({100 * f['memory_overhead']:+.1f}%), "
              f"capture's own work {100 * f['capture_work_share']:.2f}% of its time", flush=True)
        write_result(args.json, result)


if __name__ == "__main__":
    main()
