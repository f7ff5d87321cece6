"""What joint-attention capture costs on MM-DiT transformers (SD3.5 Medium and Flux dev layouts): counted at the
real shapes, timed on one block on this CPU, and (``--transformer``) timed on the whole transformer.

    python -m benchmarks.mmdit_capture [--family sd3 flux] [--size 1024] [--slots 8]
                                       [--block-size 512] [--block-heads sd3=6 flux=6] [--block-repeats 9]
                                       [--block-threads 1]
                                       [--transformer [--heads sd3=24 flux=12] [--transformer-size 512]
                                                      [--steps 2] [--repeats 1]]

**Counted** (``counted``): FLOPs and bytes moved of one captured block at the real shapes, bf16 inputs, one image
(``--size``² → (size/16)² image tokens: 4096 at 1024²; text 512 T5 tokens for Flux, 77 CLIP + 256 T5 = 333
for SD3):
Flux dev's single-stream block (its default captured blocks 23–32 are single-stream) at width 3072 (24 heads of
128), SD3.5 Medium's joint block without dual attention (blocks 13–14 of its captured 9–14) at width 1536 (24 of
64), both with an MLP ratio of 4. The block is every projection, norm, modulation, RoPE, the fused attention
(FLOPs of QKᵀ and PV; bytes: read q, k, v, write out) and the MLP, each reading its inputs and writing its output
once in bf16 (the compulsory traffic: real kernels move more, so the block's bytes are a floor and the capture's
share an upper bound). The capture's extra work, per captured block call, three ways:

  * ``before``  the previous capture: per head, fp32 copies of q and k, the fp32 (N × S) scores (no TF32), scaled,
                logsumexp over all S joint keys (ATen: amax, subtract, exp, sum: four passes), class columns gathered
  * ``after``   this capture: the row normaliser is the fused attention kernel's logsumexp (``attention_with_lse``);
                the capture gathers the ``--slots`` class-token keys, computes their (slots × N) fp32 logits minus
                the normaliser in one fp32-output matmul from the bf16 image queries (CUDA), exponentiates and
                sums over heads
  * ``after_chunked``  this capture where the kernel returns no logsumexp (``joint_logsumexp``): the QKᵀ of the
                image rows in TF32 chunks (fp32 scores: matmul write, amax, subtract, exp, sum), plus ``after``'s
                class columns

Each with ``flops``, ``bytes``, their ratios to the block's (target: ≤ 5 % both), and a roofline estimate of the
time on an H100 SXM (per operation max(FLOPs / peak of its unit, bytes / 3.35 TB/s); bf16 989, TF32 495, fp32 67
TFLOP/s dense), an estimate, not a measurement.

**Block timing** (``block``): one block of the same kind (Flux single-stream, SD3 joint) at ``--block-heads`` heads of
the real head size and the real text length, at ``--block-size``² (1024 image tokens at 512²), random weights,
fp32 on this CPU (no native bf16 here: AVX2 only), one image, called directly with capture off, ``after`` (the
capture) and ``before`` (the previous capture, kept here as ``FullSoftmaxCapture``), the configurations taking
turns ``--block-repeats`` times in one process after a warm-up turn, on ``--block-threads`` threads; the best
CPU time of each (this process's, which a busy shared machine does not inflate as it does the wall clock; both
are in the JSON) is kept, and the capture's ``record`` is also timed in place (``record_share``).

**Whole transformer** (``--transformer``, ``families``; 10–15 min per family on a quiet 2-core machine): the real
layouts (SD3.5 Medium: 24 blocks, 13 with dual attention, 24 heads of 64, RMS q/k norms, joint text 77 CLIP + 256
T5 tokens; Flux dev: 19 double- + 38 single-stream blocks, 24 heads of 128, RoPE, 512 T5 tokens) at ``--heads``
heads per family (the real width at 24; Flux dev's 12 B parameters are 48 GB in fp32, so by default it runs at 12
heads, width 1536, 3 B parameters: the widest that fits this machine's 24 GiB beside the rest; the JSON states the
width), the real depth, random weights, fp32 on the CPU. Only the transformer runs: ``--steps`` forward calls at
``--transformer-size``² (SD3: a CFG batch of 2; Flux: 1) after one warm-up call, with capture off (diffusers' own
processors) or on (the family's default middle blocks, per-class maps of 2 classes reduced on the fly). Each
configuration runs in its own subprocess (its peak resident memory is its own), they take turns ``--repeats``
times, and the best time is kept. The capture's own work (``begin``, ``record`` in every captured block, the step-end hook,
``finish``) is also timed in place inside the timed calls (``capture_work_share``): two processes' wall clocks
on a shared machine differ by more than the capture costs.

Writes JSON (default benchmarks/results/mmdit_capture.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

from benchmarks.common import run_header, REPO, MethodTimer, write_result

CONFIGS = ("off", "joint")
BLOCK_CONFIGS = ("off", "after", "before")
BF16, FP32 = 2, 4  # bytes per element

#: the real block shapes: width, heads × head size, text tokens, MLP ratio, captured blocks / all blocks
REAL = {
    "flux": {"title": "Flux dev", "block": "single-stream", "width": 3072, "heads": 24, "head_dim": 128,
             "text": 512, "mlp_ratio": 4, "captured_blocks": 10, "blocks": "19 double + 38 single"},
    "sd3": {"title": "SD3.5 Medium", "block": "joint (no dual attention)", "width": 1536, "heads": 24,
            "head_dim": 64, "text": 77 + 256, "mlp_ratio": 4, "captured_blocks": 6, "blocks": "24 (13 dual)"},
}
#: H100 SXM dense peaks (FLOP/s by unit) and HBM bandwidth (B/s), for the roofline estimate only
H100 = {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12, "vector": 67e12, "bandwidth": 3.35e12}


# --- counted cost at the real shapes ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    name: str
    flops: float
    bytes: float
    unit: str = "vector"  # "bf16" / "tf32" / "fp32" matmul units, "vector": elementwise and reductions

    def h100_seconds(self) -> float:
        return max(self.flops / H100[self.unit], self.bytes / H100["bandwidth"])


def linear(name: str, tokens: int, d_in: int, d_out: int) -> Op:
    """A bf16 ``nn.Linear`` with bias: the weights read once, the input read, the output written."""
    return Op(name, 2 * tokens * d_in * d_out + tokens * d_out,
              BF16 * (d_in * d_out + d_out + tokens * (d_in + d_out)), "bf16")


def pointwise(name: str, elements: int, flops_per: float, reads: int = 1, writes: int = 1,
              size: int = BF16) -> Op:
    """An elementwise / row-wise op over ``elements``: ``reads`` inputs of that size read, ``writes`` written."""
    return Op(name, flops_per * elements, size * elements * (reads + writes))


def attention_ops(seq: int, heads: int, dim: int) -> list[Op]:
    """The fused SDPA (flash): QKᵀ and PV, the softmax's exp/max/sum/scale; read q, k, v, write out (and the
    row logsumexp the flash kernel stores anyway)."""
    width = heads * dim
    return [Op("sdpa", 4 * seq * seq * width + 4 * seq * seq * heads,
               BF16 * 4 * seq * width + FP32 * seq * heads, "bf16")]


def block_ops(family: str, image: int) -> list[Op]:
    """One block of ``family`` at its real width for ``image`` image tokens and one image (batch 1)."""
    r = REAL[family]
    d, heads, dim, text, hidden = r["width"], r["heads"], r["head_dim"], r["text"], r["mlp_ratio"] * r["width"]
    seq = image + text
    if family == "flux":  # FluxSingleTransformerBlock on the concatenated [text, image] sequence
        return [pointwise("concat text + image", seq * d, 0),
                linear("norm.linear (temb → shift, scale, gate)", 1, d, 3 * d),
                pointwise("layer norm + modulation", seq * d, 9),
                linear("proj_mlp", seq, d, hidden), pointwise("gelu (tanh)", seq * hidden, 10),
                *(linear(f"to_{x}", seq, d, d) for x in "qkv"),
                pointwise("rms norm q, k", 2 * seq * d, 4),
                pointwise("rope q, k", 2 * seq * d, 3),
                Op("rope cos, sin (fp32, read for q and for k)", 0, 2 * 2 * FP32 * seq * dim),
                *attention_ops(seq, heads, dim),
                pointwise("concat attention + mlp", seq * (d + hidden), 0),
                linear("proj_out", seq, d + hidden, d),
                pointwise("gate + residual", seq * d, 2, reads=2)]
    # SD3 JointTransformerBlock (context_pre_only=False, no attn2): image stream on `image`, text stream on `text`
    ops = [linear("norm1.linear (temb → 6 modulations)", 1, d, 6 * d),
           linear("norm1_context.linear", 1, d, 6 * d)]  # the 6: shift, scale, gate of attention and of the MLP
    for stream, tokens, prefix in (("image", image, "to_"), ("text", text, "add_")):
        ops += [pointwise(f"{stream}: layer norm + modulation", tokens * d, 9),
                *(linear(f"{stream}: {prefix}{x}", tokens, d, d) for x in "qkv"),
                pointwise(f"{stream}: rms norm q, k", 2 * tokens * d, 4)]
    ops += [pointwise("concat q, k, v", 3 * seq * d, 0), *attention_ops(seq, heads, dim)]
    for stream, tokens, out in (("image", image, "to_out"), ("text", text, "to_add_out")):
        ops += [linear(f"{stream}: {out}", tokens, d, d), pointwise(f"{stream}: gate + residual", tokens * d, 2, 2),
                pointwise(f"{stream}: layer norm 2 + modulation", tokens * d, 9),
                linear(f"{stream}: ff in", tokens, d, hidden), pointwise(f"{stream}: gelu (tanh)", tokens * hidden, 10),
                linear(f"{stream}: ff out", tokens, hidden, d),
                pointwise(f"{stream}: gate + residual", tokens * d, 2, 2)]
    return ops


def class_column_ops(image: int, heads: int, dim: int, slots: int) -> list[Op]:
    """This capture's work besides the normaliser, as ``JointAttentionCapture.record`` does it on CUDA: the
    class-token keys gathered; per image one fp32-output matmul from the bf16 image queries with the normaliser as
    its bias (−lse copied into the output, then read and written by the GEMM: three passes over the (slots × N)
    fp32 log-probabilities per head); exp in place; the sum over heads added into the running sum."""
    logits = slots * image * heads
    return [pointwise("gather class keys", slots * heads * dim, 0),
            Op("class log-probs k·qᵀ·scale − lse (bf16 in, fp32 out)", 2 * logits * dim + 2 * logits,
               BF16 * (image + slots) * heads * dim + FP32 * (image * heads + 3 * logits), "bf16"),
            pointwise("exp (in place)", logits, 1, size=FP32),
            Op("sum over heads", logits, FP32 * (logits + slots * image)),
            pointwise("add into the running sum", slots * image, 1, reads=2, size=FP32)]


def capture_ops(family: str, image: int, slots: int, how: str) -> list[Op]:
    """The capture's extra work in one captured block call, one image: ``how`` = before / after / after_chunked."""
    r = REAL[family]
    heads, dim, seq = r["heads"], r["head_dim"], image + r["text"]
    scores = image * seq * heads
    if how == "before":  # the previous record(): per head chunk, everything fp32, the whole score matrix
        return [pointwise("q → fp32", image * heads * dim, 0, reads=1, writes=2),
                pointwise("k → fp32", seq * heads * dim, 0, reads=1, writes=2),
                Op("scores q·kᵀ (fp32, no TF32)", 2 * scores * dim,
                   FP32 * ((image + seq) * heads * dim + scores), "fp32"),
                pointwise("× scale", scores, 1, size=FP32),
                pointwise("logsumexp: amax", scores, 1, writes=0, size=FP32),
                pointwise("logsumexp: subtract", scores, 1, size=FP32),
                pointwise("logsumexp: exp", scores, 1, size=FP32),
                pointwise("logsumexp: sum", scores, 1, writes=0, size=FP32),
                pointwise("gather class columns, − lse, exp, sum over heads", slots * image * heads, 3, 2, 2,
                          size=FP32)]
    ops = class_column_ops(image, heads, dim, slots)
    if how == "after":  # the normaliser is the fused kernel's logsumexp; F.sdpa may not have asked it to store it
        return [pointwise("logsumexp stored by the fused kernel", seq * heads, 0, reads=0, size=FP32), *ops]
    # after_chunked: joint_logsumexp, TF32 on the half-precision inputs, fp32 scores chunk by chunk
    return [pointwise("q → fp32, × scale", image * heads * dim, 1, reads=3, writes=4),  # bf16 units: 2+4, 4+4 B
            pointwise("k → fp32", seq * heads * dim, 0, reads=1, writes=2),
            Op("scores q·kᵀ (TF32)", 2 * scores * dim, FP32 * ((image + seq) * heads * dim + scores), "tf32"),
            pointwise("amax", scores, 1, writes=0, size=FP32),
            pointwise("subtract (in place)", scores, 1, size=FP32),
            pointwise("exp (in place)", scores, 1, size=FP32),
            pointwise("sum", scores, 1, writes=0, size=FP32), *ops]


def totals(ops: list[Op]) -> dict:
    flops, moved = sum(o.flops for o in ops), sum(o.bytes for o in ops)
    return {"flops": flops, "bytes": moved, "gflop": flops / 1e9, "mb": moved / 1e6,
            "h100_ms": 1e3 * sum(o.h100_seconds() for o in ops)}


def counted(family: str, size: int, slots: int) -> dict:
    """The block's and the capture's counted FLOPs and bytes at the real shapes, and their ratios."""
    r = REAL[family]
    image = (size // 16) ** 2  # VAE 8 × patch 2
    block = totals(block_ops(family, image))
    out = {**{k: r[k] for k in ("title", "block", "width", "heads", "head_dim", "text", "mlp_ratio",
                                "captured_blocks", "blocks")},
           "size": size, "image_tokens": image, "slots": slots, "dtype": "bfloat16", "batch": 1, "block_cost": block}
    for how in ("before", "after", "after_chunked"):
        extra = totals(capture_ops(family, image, slots, how))
        out[how] = {**extra, "flop_ratio": extra["flops"] / block["flops"],
                    "byte_ratio": extra["bytes"] / block["bytes"],
                    "h100_ratio": extra["h100_ms"] / block["h100_ms"],
                    "step_tflops": extra["flops"] * r["captured_blocks"] / 1e12,
                    "step_gb": extra["bytes"] * r["captured_blocks"] / 1e9}
    return out


# --- one block timed on this CPU -------------------------------------------------------------------------------
def _previous_capture():
    """``FullSoftmaxCapture``: the capture as it was before the text-columns change (the whole image × joint fp32
    softmax per head chunk, then the class columns), for the ``before`` timing."""
    import torch

    from stages.families.joint_attention import JointAttentionCapture

    class FullSoftmaxCapture(JointAttentionCapture):
        @torch.no_grad()
        def record(self, block, query, key, image_start, text_start, text_length, lse=None):
            run = self._require_run()
            if not self.recording():
                return
            batch, n = run["batch"], run["n_image"]
            query, key = query[-batch:], key[-batch:]
            heads, seq, dim = query.shape[1], key.shape[2], query.shape[3]
            scale = 1.0 / math.sqrt(dim)
            index = (run["positions"] + text_start)[:, None, None, :]
            chunk = max(1, min(heads, self.chunk_bytes // max(1, 4 * batch * n * seq)))
            total = run["sums"][block]
            for h in range(0, heads, chunk):
                q, k = query[:, h:h + chunk].float(), key[:, h:h + chunk].float()
                scores = torch.matmul(q, k.transpose(-1, -2)) * scale
                lse_ = scores.logsumexp(dim=-1, keepdim=True)
                cols = scores.gather(-1, index.expand(-1, scores.shape[1], n, -1))
                total += (cols - lse_).exp().sum(dim=1).transpose(1, 2)
            run["calls"][block] += 1
            run["heads"] = heads

    return FullSoftmaxCapture


def block_timing(family: str, heads: int, size: int, repeats: int, slots: int) -> dict:
    """One block (Flux single-stream / SD3 joint) at ``heads`` heads of the real head size, the real text length,
    ``size``² (one image), fp32 on this CPU: seconds per call with capture off / after / before, best of
    ``repeats`` turns (CPU seconds of this process, and wall clock), and the capture's ``record`` timed in place."""
    import torch

    from stages.families.joint_attention import JointAttentionCapture, JointCaptureConfig

    full_softmax = _previous_capture()
    timers = {"after": MethodTimer(JointAttentionCapture, ("record",)),
              "before": MethodTimer(full_softmax, ("record",))}
    r = REAL[family]
    side = size // 16
    image, text = side * side, r["text"]
    overrides = (dict(num_layers=0, num_single_layers=1) if family == "flux"
                 else dict(num_layers=2, dual_attention_layers=()))  # SD3: block 0 (the last is context_pre_only)
    model = build(family, heads, **overrides)
    width = heads * r["head_dim"]
    g = torch.Generator().manual_seed(0)
    hidden, context = torch.randn(1, image, width, generator=g), torch.randn(1, text, width, generator=g)
    temb = torch.randn(1, width, generator=g)
    if family == "flux":
        from diffusers import FluxPipeline

        ids = torch.cat([torch.zeros(text, 3), FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu",
                                                                                       torch.float32)])
        rope = model.pos_embed(ids)
        module, kwargs = model.single_transformer_blocks[0], dict(image_rotary_emb=rope)
    else:
        module, kwargs = model.transformer_blocks[0], {}
    # slots / 2 classes of 2 tokens each (the counted default: 8 slots = 4 classes × 2 tokens)
    token_index = [[[2 * c + 1, 2 * c + 2] for c in range(max(1, slots // 2))]]
    classes = len(token_index[0])
    kinds = {"after": JointAttentionCapture, "before": full_softmax}
    best = {c: math.inf for c in BLOCK_CONFIGS}
    wall = {c: math.inf for c in BLOCK_CONFIGS}
    work = {c: [] for c in ("after", "before")}
    with torch.no_grad():
        for turn in range(repeats + 1):  # the first turn warms up
            for config in BLOCK_CONFIGS:
                capture = None if config == "off" else kinds[config](model, JointCaptureConfig(blocks=(0,)))
                if capture is not None:
                    capture.begin(token_index, classes, (side, side), 1, text)
                    timers[config].seconds = 0.0
                t0, c0 = time.perf_counter(), time.process_time()
                module(hidden_states=hidden, encoder_hidden_states=context, temb=temb, **kwargs)
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                if capture is not None:
                    assert capture._run["calls"][0] == 1
                    capture.remove()
                if turn:
                    best[config], wall[config] = min(best[config], cpu), min(wall[config], seconds)
                    if capture is not None:
                        work[config].append(timers[config].seconds / seconds)
    return {"heads": heads, "width": width, "real_width": r["width"], "size": size, "image_tokens": image,
            "text_tokens": text, "slots": classes * 2, "dtype": "float32", "batch": 1, "repeats": repeats,
            "threads": torch.get_num_threads(), "cpu_seconds": best, "wall_seconds": wall,
            "cpu_ms": {c: 1e3 * best[c] for c in BLOCK_CONFIGS},
            "overhead": {c: best[c] / best["off"] - 1 for c in ("after", "before")},
            "wall_overhead": {c: wall[c] / wall["off"] - 1 for c in ("after", "before")},
            "record_share": {c: min(work[c]) for c in work},
            "params_m": sum(p.numel() for p in module.parameters()) / 1e6}


# --- the whole transformer, one process per configuration ------------------------------------------------------
def build(family: str, heads: int, **overrides):
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if family == "sd3":
        config = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                      num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=64 * heads,
                      pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                      dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
        return SD3Transformer2DModel(**{**config, **overrides}).eval()
    config = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=heads, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
    return FluxTransformer2DModel(**{**config, **overrides}).eval()


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


def transformer_runs(args, heads: dict, family: str) -> dict:
    """``--transformer``: the whole transformer, capture off / on, one subprocess per configuration."""
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):
        for config in CONFIGS:
            cmd = [sys.executable, "-m", "benchmarks.mmdit_capture", "--child", family, config,
                   "--heads", f"{family}={heads[family]}", "--transformer-size", str(args.transformer_size),
                   "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
            runs[config].append(json.loads(out.strip().splitlines()[-1]))
    best = {c: min(r["seconds_per_step"] for r in runs[c]) for c in CONFIGS}
    peak = {c: max(r["peak_rss_mb"] for r in runs[c]) for c in CONFIGS}
    head_dim = 64 if family == "sd3" else 128
    f = {"heads": heads[family], "width": heads[family] * head_dim, "real_width": 24 * head_dim,
         "params_m": runs["off"][0]["params_m"], "blocks": runs["joint"][0]["blocks"], "seconds_per_step": best,
         "peak_rss_mb": peak, "time_overhead": best["joint"] / best["off"] - 1,
         "memory_overhead": peak["joint"] / peak["off"] - 1,
         "capture_work_share": (sum(r["capture_work_s_per_step"] for r in runs["joint"])
                                / sum(r["seconds_per_step"] for r in runs["joint"])),
         "runs": runs, "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
    print(f"{family}: width {f['width']} ({f['params_m']:.0f} M params), blocks {f['blocks']}: "
          f"{best['off']:.2f} -> {best['joint']:.2f} s/step ({100 * f['time_overhead']:+.1f}%), "
          f"peak RSS {peak['off']:.0f} -> {peak['joint']:.0f} MB ({100 * f['memory_overhead']:+.1f}%), "
          f"capture's own work {100 * f['capture_work_share']:.2f}% of its time", flush=True)
    return f


def _per_family(ap, items: list[str], flag: str) -> dict[str, int]:
    out = {}
    for item in items:
        family, _, n = item.partition("=")
        if family not in REAL or not n.isdigit():
            ap.error(f"{flag} {item}: expected FAMILY=N with FAMILY one of {sorted(REAL)}")
        out[family] = int(n)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    ap.add_argument("--size", type=int, default=1024,
                    help="image side in pixels (a multiple of 16) of the counted shapes")
    ap.add_argument("--slots", type=int, default=8, help="class-token keys per image the capture reads (counted)")
    ap.add_argument("--block-size", type=int, default=512, help="image side of the CPU block timing")
    ap.add_argument("--block-heads", nargs="+", default=["sd3=6", "flux=6"], metavar="FAMILY=N",
                    help="heads of the block timed on the CPU (24: the real width)")
    ap.add_argument("--block-repeats", type=int, default=9)
    ap.add_argument("--block-threads", type=int, default=1,
                    help="threads of the CPU block timing (1: its CPU seconds are not inflated by spin-waiting)")
    ap.add_argument("--transformer", action="store_true",
                    help="also time the whole transformer, one process per configuration (slow)")
    ap.add_argument("--heads", nargs="+", default=["sd3=24", "flux=12"], metavar="FAMILY=N",
                    help="--transformer: attention heads per family (24: the real width)")
    ap.add_argument("--transformer-size", type=int, default=512, help="--transformer: image side in pixels")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "mmdit_capture.json"))
    ap.add_argument("--child", nargs=2, metavar=("FAMILY", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    heads = {"sd3": 24, "flux": 24, **_per_family(ap, args.heads, "--heads")}
    if args.child:
        family, config = args.child
        print(json.dumps(child(family, config, heads[family], args.transformer_size, args.steps, args.threads)))
        return
    block_heads = {"sd3": 6, "flux": 6, **_per_family(ap, args.block_heads, "--block-heads")}
    result = {**run_header("benchmarks.mmdit_capture", argv), "size": args.size, "slots": args.slots,
              "counted": {}, "block": {}}
    for family in args.family:
        c = result["counted"][family] = counted(family, args.size, args.slots)
        print(f"{c['title']} {c['block']} block, {c['image_tokens']} image + {c['text']} text tokens, bf16: "
              f"{c['block_cost']['flops'] / 1e9:.0f} GFLOP, {c['block_cost']['bytes'] / 1e6:.0f} MB", flush=True)
        for how in ("before", "after", "after_chunked"):
            x = c[how]
            print(f"  capture {how:>13}: {x['flops'] / 1e9:10.3f} GFLOP ({100 * x['flop_ratio']:7.3f} %), "
                  f"{x['bytes'] / 1e6:9.1f} MB ({100 * x['byte_ratio']:8.2f} %), H100 roofline "
                  f"{100 * x['h100_ratio']:7.2f} % of the block", flush=True)
    import torch

    torch.set_num_threads(args.block_threads)
    for family in args.family:
        b = result["block"][family] = block_timing(family, block_heads[family], args.block_size,
                                                   args.block_repeats, args.slots)
        s = b["cpu_seconds"]
        print(f"{REAL[family]['title']} block on this CPU (width {b['width']}, {b['image_tokens']} + "
              f"{b['text_tokens']} tokens, fp32, CPU time): off {1e3 * s['off']:.0f} ms, "
              f"capture {1e3 * s['after']:.0f} ms "
              f"({100 * b['overhead']['after']:+.1f} %, record {100 * b['record_share']['after']:.1f} % of the "
              f"call), previous capture {1e3 * s['before']:.0f} ms ({100 * b['overhead']['before']:+.1f} %, record "
              f"{100 * b['record_share']['before']:.1f} %)", flush=True)
    result["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    if args.transformer:
        result.update(transformer_size=args.transformer_size, steps=args.steps, repeats=args.repeats,
                      threads=args.threads, families={})
        for family in args.family:
            result["families"][family] = transformer_runs(args, heads, family)
            write_result(args.json, result)
    write_result(args.json, result)


if __name__ == "__main__":
    main()
