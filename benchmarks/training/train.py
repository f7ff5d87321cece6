"""Train the bundled tiny Stable-Diffusion-layout model on the shapes world.

    python -m benchmarks.training.train --work /tmp/tiny-sd-train --out pipeline/models/shapes-tiny-sd

Phases (each resumable from ``--work``; rerunning the same command continues where it stopped):
  1. render the training scenes (seeds 0..N-1; evaluation uses seeds >= HELD_OUT_SEED)
  2. train the AutoencoderKL (L1 + a small KL term, on random crops)
  3. encode every scene to latents once and set the VAE's ``scaling_factor`` to 1/std
  4. train UNet + CLIP text encoder jointly (v-prediction, 10% empty captions for
     classifier-free guidance, EMA weights), exporting the SD folder every ``--export-every``
Seeded: the same command on the same CPU machine gives the same weights (CUDA kernels are not bitwise deterministic).

``--init-from FOLDER`` starts phase 4 from an exported SD folder (its VAE, latent scale, tokenizer,
UNet and text encoder) instead of phases 2-3 and random weights: how the bundled model was
fine-tuned. ``--grounding W`` adds TokenCompose's token loss (benchmarks/training/grounding.py) on the
colour and class tokens of every object, weight W; ``--min-snr G`` weights the denoising loss by
min(SNR, G) / (SNR + 1) (Min-SNR, Hang et al. 2023), which spends more of it on the noisy steps
where shapes are decided. ``--decoder-steps N`` first fine-tunes the VAE's decoder alone (encoder
frozen: the latents, and any UNet trained on them, stay valid); ``--decoder-edge-weight W`` weights its
loss W times more on a band around object outlines (star points, square corners: a few pixels that
decide the class, swamped by background texture in a plain mean). With ``--init-from`` and
``--unet-steps 0`` a run fine-tunes the decoder alone and exports the UNet unchanged. ``--device`` picks CPU or CUDA (default:
CUDA when there is one); the scenes are rendered by one process per core.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.shapes import tiny_sd
from pipeline.shapes.oracle import MIN_SATURATION
from pipeline.shapes.world import CLASSES, COLORS, caption_for, render_scene

from . import grounding as grounding_loss

MAX_OBJECTS = 3
LATENT_SCALE = 4  # the VAE's downsampling: object masks are pooled to the latent grid


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def _render_range(args: tuple[int, int, int]):
    """Scenes start..stop-1 (a worker's share of render_dataset)."""
    start, stop, size = args
    g = size // LATENT_SCALE
    images = np.zeros((stop - start, size, size, 3), np.uint8)
    masks = np.zeros((stop - start, MAX_OBJECTS, g, g), np.float16)
    captions, short = [], []
    for j, i in enumerate(range(start, stop)):
        sc = render_scene(i, size)
        images[j] = sc.image
        captions.append(sc.caption)
        short.append(caption_for([(o.color, o.cls) for o in sc.objects]))
        for k, o in enumerate(sc.objects):
            masks[j, k] = o.mask.reshape(g, LATENT_SCALE, g, LATENT_SCALE).mean((1, 3))
    return images, captions, short, masks


def render_dataset(work: Path, n: int, size: int, workers: int | None = None):
    """Scenes 0..n-1: images, full and short captions, and each object's visible coverage on the
    latent grid (n, MAX_OBJECTS, size/4, size/4; zeros where a scene has fewer objects).
    Rendered by ``workers`` processes (default: every core for 1,000 scenes or more, else this process),
    started with "spawn" (a fork of a process whose other threads hold locks can hang); each scene
    depends on its seed alone, so the result is the same for any number of workers."""
    path = work / f"scenes-{n}-{size}-masks.npz"
    if path.exists():
        d = np.load(path, allow_pickle=False)
        return d["images"], list(d["captions"]), list(d["short"]), d["masks"]
    if workers is None:
        workers = (os.cpu_count() or 1) if n >= 1000 else 1
    bounds = np.linspace(0, n, min(n, 4 * workers) + 1).astype(int)
    jobs = [(int(a), int(b), size) for a, b in zip(bounds[:-1], bounds[1:])]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_render_range, jobs))
    else:
        parts = [_render_range(j) for j in jobs]
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    short = [c for p in parts for c in p[2]]
    masks = np.concatenate([p[3] for p in parts])
    work.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, captions=np.array(captions), short=np.array(short), masks=masks)
    return images, captions, short, masks


def object_token_positions(tokenizer, captions: list[str]) -> np.ndarray:
    """(n, 2 * MAX_OBJECTS) prompt positions of object k's colour (2k) and class (2k + 1) tokens, -1 if none.

    Positions come from the sampling stage's own ``class_token_positions`` (tokenizer offsets); every
    world word must be exactly one token (tiny_sd.build_tokenizer checks it when it builds the vocabulary).
    """
    from stages.sampling import class_token_positions

    out = np.full((len(captions), 2 * MAX_OBJECTS), -1, np.int64)
    for i, text in enumerate(captions):
        slots, spans, k, at = [], [], 0, 0
        for word in text.split():
            at = text.index(word, at)
            if word in COLORS:
                slots.append(2 * k)
                spans.append((at, at + len(word)))
            elif word in CLASSES:
                slots.append(2 * k + 1)
                spans.append((at, at + len(word)))
                k += 1
            at += len(word)
        for slot, hit in zip(slots, class_token_positions(tokenizer, text, spans)):
            if len(hit) != 1:
                raise RuntimeError(f"caption {text!r}: a world word is {len(hit)} tokens, not one")
            out[i, slot] = hit[0]
    return out


def parse_class_weights(text: str | None) -> dict[str, float]:
    """``"square=3,cross=3"`` -> {"square": 3.0, "cross": 3.0}; unknown classes and weights <= 0 are errors."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in CLASSES:
            raise ValueError(f"--class-weights: unknown class {name!r} in {text!r}; the world's classes are "
                             f"{', '.join(CLASSES)} (write e.g. square=3,cross=2)")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"--class-weights: {item.strip()!r} is not CLASS=NUMBER (e.g. square=3)") from None
        if not weight > 0:
            raise ValueError(f"--class-weights: the weight of {name} must be > 0, got {value!r}")
        out[name] = weight
    return out


def scene_probabilities(captions: list[str], class_weights: dict[str, float]) -> np.ndarray | None:
    """How often each training scene is drawn: in proportion to the mean weight of its objects' classes
    (classes not listed weigh 1), so hard classes come up more often while the mix of 1-, 2- and
    3-object scenes stays about the same. None without weights: every scene equally often."""
    if not class_weights:
        return None
    w = np.array([np.mean([class_weights.get(cls, 1.0) for cls in caption_classes(text)]) for text in captions])
    return w / w.sum()


def caption_classes(text: str) -> list[str]:
    """The class words of a world caption, in order (one per object)."""
    return [word for word in text.split() if word in CLASSES]


def class_shares(captions: list[str], probs: np.ndarray) -> dict[str, float]:
    """The share of each class among the objects drawn when scenes are drawn with ``probs``."""
    share = dict.fromkeys(CLASSES, 0.0)
    for p, text in zip(probs, captions):
        for cls in caption_classes(text):
            share[cls] += p
    total = sum(share.values())
    return {cls: v / total for cls, v in share.items()}


def draw_scenes(rng: np.random.Generator, n: int, batch: int, probs: np.ndarray | None) -> np.ndarray:
    """A batch of scene indices: uniform, or by ``probs`` (:func:`scene_probabilities`)."""
    return rng.integers(0, n, batch) if probs is None else rng.choice(n, batch, p=probs)


def to_tensor(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) array or tensor -> float (N, 3, H, W) in [-1, 1], on the input's device."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device: torch.device) -> None:
    if isinstance(state, torch.Tensor):  # checkpoints from before device support
        state = {"cpu": state, "cuda": None}
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_ckpt(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def resume_vae(ckpt: Path, vae, opt, device: torch.device, seed: int) -> int:
    """Load a VAE-phase checkpoint into ``vae`` and ``opt`` and return its step; without one, seed and return 0."""
    if not ckpt.exists():
        torch.manual_seed(seed)
        return 0
    st = torch.load(ckpt, weights_only=False, map_location="cpu")
    vae.load_state_dict(st["model"]), opt.load_state_dict(st["opt"])
    set_rng_state(st["rng"], device)
    return st["step"]


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L1 + MSE / 2 per pixel, averaged (weighted by ``weight`` (B, 1, H, W) when given)."""
    d = rec - x
    per_pixel = d.abs() + 0.5 * d * d
    if weight is None:
        return per_pixel.mean()
    return (weight * per_pixel).mean() / weight.mean()


def outline_weights(x: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """(B, 1, H, W) loss weights for images ``x`` in [-1, 1]: 1 + ``edge_weight`` within about two pixels of
    an object's outline. Objects are the saturated pixels (the world paints them from a saturated palette
    on desaturated backgrounds; the oracle's own test, ``oracle.MIN_SATURATION``)."""
    px = (x + 1) * 127.5
    mx, mn = px.max(1, keepdim=True).values, px.min(1, keepdim=True).values
    obj = ((mx - mn) / mx.clamp(min=1.0) >= MIN_SATURATION).float()
    outline = F.max_pool2d(obj, 3, 1, 1) + F.max_pool2d(-obj, 3, 1, 1)  # dilation minus erosion
    return 1.0 + edge_weight * F.max_pool2d(outline, 3, 1, 1)


def train_vae(work: Path, images: np.ndarray, steps: int, batch: int, seed: int,
              device: torch.device = torch.device("cpu")):
    torch.manual_seed(seed)  # the initial weights, so a fresh run is reproducible
    vae = tiny_sd.build_vae().to(device)
    ckpt = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    start = resume_vae(ckpt, vae, opt, device, seed)
    if start >= steps:
        return vae
    rng = np.random.default_rng([seed, start])
    t0 = time.time()
    vae.train()
    for step in range(start, steps):
        idx = rng.integers(0, len(images), batch)
        crop = 32 if step < int(steps * 0.8) else images.shape[1]
        y0, x0 = rng.integers(0, images.shape[1] - crop + 1, 2)
        x = to_tensor(images[idx, y0:y0 + crop, x0:x0 + crop]).to(device)
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = reconstruction_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"vae step {step + 1}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / (step + 1 - start):.2f}s/step)")
            save_ckpt(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1, rng=rng_state(device))
    return vae


def train_decoder(work: Path, vae, images: np.ndarray, steps: int, batch: int, seed: int, lr: float = 5e-4,
                  edge_weight: float = 0.0):
    """Fine-tune the VAE's decoder alone (encoder frozen): the latent space, and so every UNet trained
    on it, stays valid while decoded shapes get sharper. Full-size images, L1 + MSE as in train_vae,
    weighted towards object outlines when ``edge_weight`` > 0 (:func:`outline_weights`)."""
    ckpt = work / "decoder.pt"
    device = vae.device
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in list(vae.encoder.parameters()) + list(vae.quant_conv.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = resume_vae(ckpt, vae, opt, device, seed + 2)
    if start >= steps:
        return vae
    pixels = torch.from_numpy(images).to(device)  # uint8, converted per batch
    rng = np.random.default_rng([seed, 3, start])
    t0 = time.time()
    vae.train()
    for step in range(start, steps):
        idx = torch.from_numpy(rng.integers(0, len(images), batch)).to(device)
        x = to_tensor(pixels[idx])
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = reconstruction_loss(rec, x, outline_weights(x, edge_weight) if edge_weight else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % 50 == 0 or done == steps:
            log(f"decoder step {done}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / (done - start):.3f}s/step)")
        if done % 500 == 0 or done == steps:
            save_ckpt(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=done, rng=rng_state(device))
    vae.eval()
    return vae


@torch.no_grad()
def encode_latents(work: Path, vae, images: np.ndarray, scale: float | None = None):
    """Latent means of every scene, scaled by ``scale`` (default: 1/std, set on the VAE's config)."""
    path = work / "latents.pt"
    if path.exists():
        return torch.load(path)
    vae.eval()
    device = vae.device
    lat = torch.cat([vae.encode(to_tensor(images[i:i + 256]).to(device)).latent_dist.mean.cpu()
                     for i in range(0, len(images), 256)])
    scale = float(1.0 / lat.std()) if scale is None else scale
    vae.register_to_config(scaling_factor=scale)
    out = {"latents": lat * scale, "scaling_factor": scale}
    torch.save(out, path)
    return out


def train_unet(work: Path, out: Path, vae, latents, captions, short, masks, tokenizer, steps: int, batch: int,
               seed: int, export_every: int, lr: float, init: Path | None = None, grounding: float = 0.0,
               min_snr: float | None = None, pixel: float = 0.0, device: torch.device = torch.device("cpu"),
               class_weights: dict[str, float] | None = None):
    if init is not None:  # the exported (EMA) weights of an earlier run
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(init, subfolder="unet")
        text_encoder = CLIPTextModel.from_pretrained(init, subfolder="text_encoder")
    else:
        torch.manual_seed(seed + 1)  # the initial weights, so a fresh run is reproducible
        text_encoder = tiny_sd.build_text_encoder(tokenizer)
        unet = tiny_sd.build_unet()
    unet.to(device), text_encoder.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = tiny_sd.build_scheduler()
    acp = sched.alphas_cumprod.to(device)
    ckpt = work / "unet.pt"
    start = 0
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False, map_location="cpu")
        unet.load_state_dict(st["unet"]), text_encoder.load_state_dict(st["text_encoder"])
        opt.load_state_dict(st["opt"])
        for e, v in zip(ema, st["ema"]):
            e.copy_(v)
        start = st["step"]
        set_rng_state(st["rng"], device)
    else:
        torch.manual_seed(seed + 1)
    store = grounding_loss.install(unet) if grounding > 0 or pixel > 0 else None

    # token ids for every caption, once
    def tok(texts):
        return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)
    ids_full, ids_short, ids_empty = tok(captions), tok(short), tok([""])[0]
    # objects come first in both caption forms, so their token positions are the same
    positions = torch.from_numpy(object_token_positions(tokenizer, captions)).to(device)
    token_masks = torch.from_numpy(np.repeat(masks.astype(np.float32), 2, axis=1)).to(device)  # colour, class token
    lat = latents["latents"].to(device)
    if start >= steps:  # finished earlier: export again (a decoder fine-tune of this run may have changed the VAE)
        export(out, tokenizer, text_encoder, vae, unet, params, ema, start)
        return
    rng = np.random.default_rng([seed, 7, start])
    probs = scene_probabilities(captions, class_weights or {})
    if probs is not None:
        log("class weights " + ", ".join(f"{c}={w:g}" for c, w in class_weights.items()) + ": objects drawn per class "
            + ", ".join(f"{c} {v:.2f}" for c, v in class_shares(captions, probs).items()))
    warmup = 200
    t0 = time.time()
    unet.train(), text_encoder.train()
    for step in range(start, steps):
        idx = torch.from_numpy(draw_scenes(rng, len(lat), batch, probs)).to(device)
        which = rng.random(batch)
        empty = torch.from_numpy(which > 0.9).to(device)
        ids = torch.where(torch.from_numpy(which < 0.35).to(device)[:, None], ids_short[idx], ids_full[idx])
        ids = torch.where(empty[:, None], ids_empty[None], ids)
        x0 = lat[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * noise
        target = a * noise - s * x0  # v-prediction
        if store is not None:
            store.clear()
        cond = text_encoder(ids)[0]
        pred = unet(xt, t, cond).sample
        per_sample = ((pred - target) ** 2).mean((1, 2, 3))
        if min_snr:
            snr = acp[t] / (1 - acp[t])
            per_sample = per_sample * snr.clamp(max=min_snr) / (snr + 1)
        loss = denoise = per_sample.mean()
        ground = torch.zeros((), device=device)
        if store is not None:
            pos = torch.where(empty[:, None], -1, positions[idx])
            tmasks = token_masks[idx]
            ground = grounding_loss.token_loss(store, pos, tmasks, *x0.shape[2:])
            loss = denoise + grounding * ground
            if pixel > 0:  # class tokens only: a colour and a class token cannot both take a pixel's whole attention
                loss = loss + pixel * grounding_loss.pixel_loss(store, pos[:, 1::2], tmasks[:, 1::2], *x0.shape[2:])
        cur_lr = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        done = step + 1
        if done % 25 == 0:
            log(f"unet step {done}/{steps} loss {denoise.item():.4f} grounding {ground.item():.4f} lr {cur_lr:.2e} "
                f"({(time.time() - t0) / (done - start):.2f}s/step)")
        if done % 100 == 0 or done == steps:
            save_ckpt(ckpt, unet=unet.state_dict(), text_encoder=text_encoder.state_dict(), opt=opt.state_dict(),
                      ema=ema, step=done, rng=rng_state(device))
        if done % export_every == 0 or done == steps:
            export(out, tokenizer, text_encoder, vae, unet, params, ema, done)


def export(out: Path, tokenizer, text_encoder, vae, unet, params, ema, step: int) -> None:
    """Save the EMA weights as the SD folder, leaving the training weights untouched."""
    backup = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval(), text_encoder.eval(), vae.eval()
    device = unet.device
    tiny_sd.save_pipeline(out, tokenizer, text_encoder.cpu(), vae.cpu(), unet.cpu())
    unet.to(device), text_encoder.to(device), vae.to(device)
    (out / "training.json").write_text(json.dumps({"step": step}, indent=1))
    with torch.no_grad():
        for p, b in zip(params, backup):
            p.copy_(b)
    unet.train(), text_encoder.train()
    log(f"exported step {step} to {out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tiny-sd-train"), help="checkpoints and caches")
    ap.add_argument("--out", type=Path, default=tiny_sd.BUNDLED_MODEL, help="where the SD folder is written")
    ap.add_argument("--scenes", type=int, default=24000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--unet-steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--export-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start the UNet phase from this exported SD folder (its VAE, tokenizer and weights)")
    ap.add_argument("--grounding", type=float, default=0.0, help="weight of the token grounding loss (0: off)")
    ap.add_argument("--pixel", type=float, default=0.0,
                    help="weight of TokenCompose's pixel loss on the class tokens (0: off)")
    ap.add_argument("--min-snr", type=float, default=None, help="Min-SNR gamma for the denoising loss (off)")
    ap.add_argument("--decoder-steps", type=int, default=0,
                    help="fine-tune the VAE decoder alone (encoder, latents and UNet unchanged) for this many steps")
    ap.add_argument("--decoder-edge-weight", type=float, default=0.0,
                    help="extra loss weight on object outlines in the decoder fine-tune (0: plain mean)")
    ap.add_argument("--class-weights", default=None, metavar="CLASS=W,...",
                    help="draw training scenes in proportion to the mean weight of their objects' classes "
                         "(unlisted classes 1), e.g. square=3,cross=3: more steps on the classes the model draws worst")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when there is one)")
    args = ap.parse_args(argv)
    try:
        class_weights = parse_class_weights(args.class_weights)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    device = pick_device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    images, captions, short, masks = render_dataset(args.work, args.scenes, args.size)
    log(f"{len(images)} scenes ready")
    if args.init_from is not None:
        from diffusers import AutoencoderKL
        from transformers import CLIPTokenizer

        if args.init_from.resolve() == args.out.resolve():
            raise SystemExit(f"--init-from and --out are both {args.out}: export somewhere else, then move it")
        tokenizer = CLIPTokenizer.from_pretrained(args.init_from, subfolder="tokenizer")
        vae = AutoencoderKL.from_pretrained(args.init_from, subfolder="vae").to(device)
        latents = encode_latents(args.work, vae, images, scale=vae.config.scaling_factor)
    else:
        tokenizer = tiny_sd.build_tokenizer(args.work / "tokenizer")
        vae = train_vae(args.work, images, args.vae_steps, 32, args.seed, device)
        latents = encode_latents(args.work, vae, images)
    vae.register_to_config(scaling_factor=latents["scaling_factor"])
    if args.decoder_steps:
        train_decoder(args.work, vae, images, args.decoder_steps, args.batch, args.seed,
                      edge_weight=args.decoder_edge_weight)
    log(f"latents {tuple(latents['latents'].shape)}, scaling_factor {latents['scaling_factor']:.4f}")
    train_unet(args.work, args.out, vae, latents, captions, short, masks, tokenizer, args.unet_steps, args.batch,
               args.seed, args.export_every, args.lr, args.init_from, args.grounding, args.min_snr, args.pixel, device,
               class_weights)
    log(f"done in {time.time() - t0:.0f}s (this run)")


if __name__ == "__main__":
    main()
