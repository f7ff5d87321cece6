"""``synthgen tune-tokens``: discriminative class tokens, tuned once with the job's judge.

Each class name's input token embeddings in the text encoder are the only trainable numbers. One iteration
draws a batch of the job's own prompts (its sampler, at ``--seed`` instead of the job's seed, so tuning never
sees the job's samples) through the job's text-to-image call (steps, guidance, size, scheduler: the same
diffusers call the synthesis stage makes, with autograd on and the tokens put in by a forward hook,
``stages.class_tokens.Override``), crops every prompted object where its attention lies (the crop a
``region: attention`` judge reads, ``stages.judges.attention_box``) and takes the judge's cross-entropy for the
prompted class; its gradient flows back through the VAE decoder and every denoising step into the tokens. Each
vector's gradient is clipped to norm 1 and plain SGD steps it (``--lr``: the largest move of a vector in one
iteration, decaying to 0 on a cosine): a class the judge already reads right has a gradient near 0 and stays
where it is, while the gradient of a wrong one varies 10^5-fold between batches.
The generation options (excite, cache_interval, guidance_cutoff, compile) are not used while tuning.

The file (``--tokens``, default the job's ``model.class_tokens``) is written at the end, atomically, with the
loss and judge score of every iteration in its ``tuning`` metadata; an existing file is replaced only with
``--overwrite``. On a GPU the UNet runs with gradient checkpointing (memory of one step, not of all of them).
"""
from __future__ import annotations

import inspect
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .spec import JobSpec, UsageError


@dataclass(frozen=True)
class TuneSettings:
    iterations: int = 60
    lr: float = 0.01
    batch: int = 6
    seed: int = 12345


def check(spec: JobSpec, settings: TuneSettings, dest: Path, overwrite: bool) -> None:
    """Bad input for tune-tokens, one line each (UsageError: exit 2) before any weight loads."""
    from .preflight import job_family

    family = job_family(spec)
    problem = family.class_tokens_problem() if family is not None else None
    if problem:
        raise UsageError(f"tune-tokens: {problem}")
    if spec.references is not None:
        raise UsageError("tune-tokens: the job draws from references (img2img, inpainting); tune the tokens on a "
                         "text-to-image job with the same model and classes and name the file in both")
    if spec.judge is None:
        raise UsageError("tune-tokens: the job has no judge; add judge: {path: <classifier folder>, region: attention}")
    if spec.judge.kind != "classifier":
        raise UsageError(f"tune-tokens: the job's judge is of kind {spec.judge.kind}; tuning needs a classifier "
                         "judge (its gradient)")
    if settings.iterations < 1 or settings.batch < 1 or not settings.lr > 0:
        raise UsageError("tune-tokens: --iterations and --batch must be at least 1 and --lr above 0")
    if not dest.parent.is_dir():
        raise UsageError(f"tune-tokens: {dest.parent} does not exist; create it or give another --tokens")
    if dest.exists() and not overwrite:
        raise UsageError(f"tune-tokens: {dest} exists; give --overwrite to replace it, or another --tokens")


def tune(spec: JobSpec, dest: Path, settings: TuneSettings, start: Path | None = None,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tune the class tokens of ``spec``'s classes and write them to ``dest``; the ``tuning`` record. ``start``: a
    class-token file to start from (its classes' vectors; the others start from the model's own)."""
    import torch

    from stages import class_tokens
    from stages.identity import judge_identity, model_identity, short_id
    from stages.judges import attention_box, box_pixels, load_judge
    from stages.sampling import SamplingStage
    from stages.synthesis import model_family

    gen = spec.generation
    started = time.perf_counter()
    family = model_family(spec.model)(spec.model.path, spec.model.dtype, spec.model.device, gen.scheduler)
    pipe = family.pipe
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    if pipe.device.type != "cpu" and getattr(pipe.unet, "_supports_gradient_checkpointing", False):
        pipe.unet.enable_gradient_checkpointing()
    judge = load_judge(spec)
    names = [c.name for c in spec.classes]
    ids = {name: class_tokens.token_ids(pipe.tokenizer, name) for name in names}
    shared = class_tokens.shared_tokens(ids)
    if shared:
        raise UsageError(f"tune-tokens: classes {shared[0]!r} and {shared[1]!r} share token {shared[2]}; one vector "
                         "cannot be tuned for both: rename one class")
    table = pipe.text_encoder.get_input_embeddings().weight
    initial = {n: table[i].detach().clone().float() for n, i in ids.items()}
    if start is not None:  # checked as a job's model.class_tokens is (synthgen tune-tokens --init)
        initial.update({n: v.float() for n, v in class_tokens.read(start)[0].items()})
    vectors = {n: torch.nn.Parameter(v.clone()) for n, v in initial.items()}
    override = class_tokens.Override(pipe.text_encoder, vectors, ids)
    capture = family.attach_capture(spec.masks, gen.height, gen.width)
    sampler = SamplingStage(spec.model_copy(update={"seed": settings.seed}))
    steps = family.loop_steps(gen.steps)
    call = inspect.unwrap(type(pipe).__call__)  # the pipeline's call without its torch.no_grad
    # SGD, not Adam: a class the judge already reads right has a gradient near 0 and must stay where it is (Adam
    # scales a tiny gradient up to a full step: measured, it moved every vector by 50-80 % of its norm and the
    # tuned tokens lowered the oracle's fidelity from 0.57 to 0.42 on held-out 3-object prompts)
    optimizer = torch.optim.SGD(list(vectors.values()), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.iterations)  # lr down to 0 at the end
    history = []
    try:
        for it in range(settings.iterations):
            batch = sampler({"index": np.arange(it * settings.batch, (it + 1) * settings.batch)})
            prompts = [str(p) for p in batch["prompt"]]
            classes = [json.loads(c) for c in batch["class_names"]]
            capture.begin([family.capture_token_index(p, json.loads(t)) for p, t in zip(prompts, batch["token_index"])],
                          spec.prompts.max_classes_per_image, steps)
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in batch["seed"]]
            images = call(pipe, prompt=prompts, num_inference_steps=gen.steps, guidance_scale=gen.guidance_scale,
                          height=gen.height, width=gen.width, generator=generators, output_type="pt",
                          callback_on_step_end=capture.on_step_end).images  # (B, 3, H, W) in [0, 1]
            maps = capture.finish()["attn"].float().cpu().numpy()
            crops, labels = [], []
            for i, row in enumerate(classes):
                for k, name in enumerate(row):
                    rows, cols = box_pixels(attention_box(maps[i, k], (gen.height, gen.width)), gen.height, gen.width)
                    crops.append(images[i][:, torch.as_tensor(rows)][:, :, torch.as_tensor(cols)])
                    labels.append(judge.label_index(name))
            target = torch.as_tensor(labels, device=images.device)
            logits = judge.logits_of(crops)
            loss = torch.nn.functional.cross_entropy(logits, target.to(logits.device))
            optimizer.zero_grad()
            loss.backward()
            grads = {n: round(float(v.grad.norm()), 5) for n, v in vectors.items() if v.grad is not None}
            for v in vectors.values():  # a step moves a vector by at most lr (the gradient's size varies 10^5-fold)
                if v.grad is not None:
                    torch.nn.utils.clip_grad_norm_([v], 1.0)
            optimizer.step()
            schedule.step()
            pipe.scheduler.set_timesteps(gen.steps)  # drop the scheduler's references to this iteration's graph
            score = float(torch.softmax(logits.detach(), -1)[torch.arange(len(labels)), target.cpu()].mean())
            history.append({"loss": round(float(loss.detach()), 4), "judge_score": round(score, 4),
                            "objects": len(labels), "grad_norm": grads})
            log(f"tune-tokens: iteration {it + 1}/{settings.iterations}: loss {history[-1]['loss']:.3f}, judge score "
                f"of the prompted classes {score:.3f} ({len(labels)} objects)")
    finally:
        override.remove()
        capture.remove()
    moved = {n: round(float((vectors[n].detach() - initial[n]).norm() / initial[n].norm()), 4) for n in ids}
    record = {**asdict(settings), "init": None if start is None else class_tokens.digest(start), "steps": gen.steps,
              "guidance_scale": gen.guidance_scale, "size": [gen.height, gen.width], "history": history, "relative_change": moved,
              "wall_s": round(time.perf_counter() - started, 1)}
    model_id = short_id(model_identity(spec.model.path, spec.model_name))
    class_tokens.write(dest, {n: v.detach() for n, v in vectors.items()}, model_id, ids,
                       judge_identity(spec.judge.path)[:16], record)
    return record
