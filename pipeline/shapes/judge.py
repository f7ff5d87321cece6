"""Train the bundled shapes-world judge: a small single-object classifier in transformers' format.

It answers "which of the world's classes is this object" for the crop around one object, which is how a
job with ``judge.region: attention`` asks it about each prompted class: the crop around that class's
attention (stages/judges.py). It is what a user's own classifier is to a real job (``judge.path``): a
transformers image-classification folder (``config.json`` with ``id2label``, ``model.safetensors``,
``preprocessor_config.json``). It is trained on crops of rendered scenes only, with the world's ground
truth (never on generated images, never on the oracle's readings): each object's square box
(``stages.judges.square_box``) with a jittered margin and centre, half of the scenes passed through the
bundled model's VAE first so that it sees the decoder's texture. Its error on generated images is
measured against the oracle by ``benchmarks/steer_fidelity.py``.

    python -m pipeline.shapes.judge --out pipeline/models/shapes-judge
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stages.judges import CROP_MARGIN, crop, square_box
from .tiny_sd import vae_round_trip
from .world import CLASSES, render_scene

FIRST_SEED = 3_000_000  # disjoint from the model's training scenes, the held-out (1e6) and calibration (1.2e6) seeds
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
CROP = 32  # the classifier's input side


def scene_crops(first: int, n: int, vae=None, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Crops (uint8, CROP²) of every object of ``n`` rendered scenes and their class indices; the margin is
    drawn around :data:`CROP_MARGIN` and the centre moved by up to 10 % of the side, so the crop the judge
    gets from an attention region (which is rarely the object's exact box) is in the training set."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    scenes = [render_scene(first + i, 64) for i in range(n)]
    images = np.stack([s.image for s in scenes])
    if vae is not None:
        images = vae_round_trip(vae, images)
    crops, labels = [], []
    for scene, image in zip(scenes, images):
        for o in scene.objects:
            box = square_box(o.mask, float(rng.uniform(0.0, 2 * CROP_MARGIN)), tuple(rng.uniform(-0.1, 0.1, 2)))
            crops.append(np.asarray(Image.fromarray(crop(image, box)).resize((CROP, CROP), Image.BILINEAR)))
            labels.append(CLASSES.index(o.cls))
    return crops, np.array(labels)


def generated_crops(n: int, job_seed: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Crops of the objects the bundled model draws for ``n`` prompts of jobs/shapes-demo.yaml (3 objects each,
    job seed ``job_seed``), each labelled with the class the oracle reads for its colour, as an annotator would
    label a sample of generations by hand (an object the oracle finds no class for is left out)."""
    import json as _json

    from PIL import Image

    from pipeline.spec import load_spec
    from stages.judges import prompted_colour
    from stages.sampling import SamplingStage
    from stages.synthesis import SynthesisStage

    from .oracle import find_objects

    rng = np.random.default_rng([seed, job_seed])
    spec = load_spec(Path(__file__).parents[2] / "jobs" / "shapes-demo.yaml",
                     [f"seed={job_seed}", "prompts.min_classes_per_image=3", f"samples={n}"])
    sampling, synthesis = SamplingStage(spec), SynthesisStage(spec, capture=False)
    crops, labels = [], []
    for start in range(0, n, spec.generation.batch_size):
        batch = sampling({"index": np.arange(start, min(start + spec.generation.batch_size, n), dtype=np.int64)})
        images = synthesis.draw(batch)["image"]
        for image, prompt, names in zip(images, batch["prompt"], batch["class_names"]):
            colours = [prompted_colour(str(prompt), c) for c in _json.loads(str(names))]
            for o in find_objects(image, [c for c in colours if c]):
                if not o.area or o.cls is None:
                    continue
                box = square_box(o.mask, float(rng.uniform(0.0, 2 * CROP_MARGIN)), tuple(rng.uniform(-0.1, 0.1, 2)))
                crops.append(np.asarray(Image.fromarray(crop(image, box)).resize((CROP, CROP), Image.BILINEAR)))
                labels.append(CLASSES.index(o.cls))
        print(f"generated {min(start + spec.generation.batch_size, n)}/{n}", flush=True)
    return crops, np.array(labels)


def model():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128, 128], depths=[1, 1, 1, 1],
                          layer_type="basic", num_labels=len(CLASSES), problem_type="single_label_classification",
                          id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    return ResNetForImageClassification(config)


def save_judge(out: Path, net=None) -> Path:
    """Write ``net`` (default: a random-weight one) and its image processor as a judge folder."""
    from transformers import ViTImageProcessorPil
    from transformers.utils import logging

    out = Path(out)
    logging.disable_progress_bar()
    try:
        (net if net is not None else model()).save_pretrained(out, safe_serialization=True)
    finally:
        logging.enable_progress_bar()
    ViTImageProcessorPil(do_resize=True, size={"height": CROP, "width": CROP}, do_rescale=True,
                         rescale_factor=1 / 255, do_normalize=True, image_mean=MEAN, image_std=STD).save_pretrained(out)
    return out


def tensor(crops: list[np.ndarray]) -> torch.Tensor:
    return (torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vae", default=str(Path(__file__).parents[1] / "models" / "shapes-tiny-sd"))
    ap.add_argument("--scenes", type=int, default=16000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--generated", type=int, default=0, help="also crops of this many generated 3-object images per "
                    "--generated-seeds job seed, labelled by the oracle (an annotator's labels; 0: rendered only)")
    ap.add_argument("--generated-seeds", type=int, nargs="*", default=[101, 102])
    ap.add_argument("--generated-repeat", type=int, default=4, help="each generated crop this many times per epoch")
    ap.add_argument("--cache", type=Path, help="keep / reuse the generated crops here (generated-N-SEED.npz)")
    args = ap.parse_args(argv)
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    start = time.time()
    vae = AutoencoderKL.from_pretrained(args.vae, subfolder="vae").eval()
    half = args.scenes // 2
    a, la = scene_crops(FIRST_SEED, half, vae, seed=args.seed)
    b, lb = scene_crops(FIRST_SEED + half, args.scenes - half, None, seed=args.seed + 1)
    crops, labels = a + b, [la, lb]
    for job_seed in args.generated_seeds if args.generated else []:
        cached = args.cache / f"generated-{args.generated}-{job_seed}.npz" if args.cache else None
        if cached is not None and cached.is_file():
            data = np.load(cached)
            g, lg = list(data["crops"]), data["labels"]
        else:
            g, lg = generated_crops(args.generated, job_seed)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez(cached, crops=np.stack(g), labels=lg)
        crops, labels = crops + g * args.generated_repeat, labels + [np.tile(lg, args.generated_repeat)]
    x_all, y_all = tensor(crops), torch.from_numpy(np.concatenate(labels))
    test, test_y = scene_crops(FIRST_SEED + args.scenes, 1000, vae, seed=args.seed + 2)
    x_test = tensor(test)
    net = model()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    total = args.epochs * ((len(x_all) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total)
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x_all))
        for s in range(0, len(order), args.batch):
            idx = order[s:s + args.batch]
            x = x_all[idx]
            flip = torch.rand(len(x)) < 0.5
            x[flip] = x[flip].flip(-1)
            loss = net(pixel_values=x, labels=y_all[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            acc = float((net(pixel_values=x_test).logits.argmax(-1).numpy() == test_y).mean())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.4f}, accuracy on {len(test_y)} crops of 1000 "
              f"held-out rendered scenes (through the VAE) {acc:.3f}", flush=True)
    out = save_judge(Path(args.out), net)
    (out / "training.json").write_text(json.dumps({
        "command": "python -m pipeline.shapes.judge " + " ".join(sys.argv[1:] if argv is None else argv),
        "scenes": args.scenes, "crops": len(x_all), "first_seed": FIRST_SEED, "vae_scenes": half,
        "generated_per_seed": args.generated, "generated_repeat": args.generated_repeat, "generated_job_seeds": args.generated_seeds if args.generated else [],
        "epochs": args.epochs, "lr": args.lr, "seed": args.seed, "held_out_crop_accuracy": acc,
        "seconds": round(time.time() - start, 1)}, indent=2) + "\n")
    print(f"wrote {out} ({acc:.3f} accuracy on held-out rendered crops)")


if __name__ == "__main__":
    main()
