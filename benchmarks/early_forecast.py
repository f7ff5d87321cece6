"""How well the early check's verdict part-way forecasts the final verdict (generation.early_check, issue 34).

The demo job at ``--objects`` objects per prompt, held-out job seed, one draw of each of ``--n`` prompts, no redraws.
At each of ``--steps`` the judge reads every row's predicted clean image (the scheduler's x0, decoded) on the
attention maps captured so far, as the early check does; at the end the job's checks give the final verdict
(``stages.redraw.SampleChecks``: the judge at its min_score, masks, labels, filters but dedup) and the shapes-world
oracle says which draws are right. Per step and early ``min_score``: the share the check lets go on, and of the draws it
would stop, the share that pass at the end and the share that are right.

    python -m benchmarks.early_forecast [--n 100] [--objects 3] [--steps 10 12 14 16]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np

from benchmarks.common import REPO, run_header, write_result
from benchmarks.steer_fidelity import HELD_OUT_JOB_SEED, JUDGE
from pipeline.spec import load_spec

MIN_SCORES = (0.02, 0.05, 0.1, 0.2)


def share(mask: np.ndarray, values: np.ndarray) -> float | None:
    return round(float(values[mask].mean()), 3) if mask.any() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default=str(REPO / "jobs" / "shapes-demo.yaml"))
    ap.add_argument("--n", type=int, default=100, help="prompts (a multiple of the batch size)")
    ap.add_argument("--objects", type=int, default=3)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 12, 14, 16], help="loop steps to check after")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "early_forecast.json"))
    args = ap.parse_args(argv)
    import torch

    from stages.attention import fp16_safe
    from stages.early_check import CleanLatents
    from stages.judges import ShapesOracleJudge
    from stages.redraw import SampleChecks
    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    base = [f"seed={HELD_OUT_JOB_SEED}", f"samples={args.n}", f"output.shard_size={args.n}",
            f"prompts.min_classes_per_image={args.objects}", f"prompts.max_classes_per_image={args.objects}",
            f"judge={{path: {JUDGE}, region: attention}}", "generation.redraws=0", *args.overrides]
    spec = load_spec(args.job, base, out=tempfile.mkdtemp())
    torch.set_num_threads(1)
    sampling, stage = SamplingStage(spec), SynthesisStage(spec)
    checks, oracle = SampleChecks(spec), ShapesOracleJudge()
    clean, capture = CleanLatents(stage.pipe.scheduler), stage.capture
    previews: dict[int, tuple] = {}
    on_step_end = capture.on_step_end

    def record(pipe, step, timestep, kwargs):  # the capture's own callback first: its step count moves on
        kwargs = on_step_end(pipe, step, timestep, kwargs)
        if step + 1 in args.steps:
            previews[step + 1] = (clean.latest.clone(), capture.so_far()["attn"])
        return kwargs

    capture.on_step_end = record
    final, right, early = [], [], {k: [] for k in args.steps}
    for start in range(0, args.n, spec.generation.batch_size):
        previews.clear()
        batch = sampling({"index": np.arange(start, min(start + spec.generation.batch_size, args.n), dtype=np.int64)})
        drawn = stage.draw(batch)
        prompts, classes = list(batch["prompt"]), [json.loads(c) for c in batch["class_names"]]
        final += [not r for r in checks(batch, drawn)]
        right += [all(s >= 1 for s in sc) for sc in oracle.scores(drawn["image"], prompts, classes)]
        for k in args.steps:
            x0, maps = previews[k]
            pixels = (np.clip(stage.family.decode_latents(x0), 0, 1) * 255).round().astype(np.uint8)
            attn = fp16_safe(maps.float()).to(torch.float16).cpu().numpy()
            early[k] += [min(s) for s in stage.judge.scores(pixels, prompts, classes, attn)]
    final, right = np.array(final), np.array(right)
    result = {**run_header("benchmarks.early_forecast", argv), "overrides": base, "draws": args.n,
              "final_pass_share": round(float(final.mean()), 3), "right_share": round(float(right.mean()), 3),
              "loop_steps": stage.loop_steps, "steps": {}}
    for k in args.steps:
        low = np.array(early[k])
        result["steps"][str(k)] = {f"min_score_{round(m * 100)}": {
            "goes_on_share": round(float((low >= m).mean()), 3),
            "final_pass_of_stopped": share(low < m, final), "right_of_stopped": share(low < m, right),
            "right_of_going_on": share(low >= m, right)} for m in MIN_SCORES}
        print(k, json.dumps(result["steps"][str(k)]), flush=True)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
