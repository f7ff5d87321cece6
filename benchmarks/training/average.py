"""Average the weights of two exported runs of one model (a two-ingredient "model soup").

    python -m benchmarks.training.average A B --weight 0.5 --out OUT

OUT is an SD folder whose UNet and text encoder are ``(1 - weight) * A + weight * B``, tensor by tensor;
its VAE and tokenizer are A's. Averaging only makes sense for runs that share a latent space and a
vocabulary and started from the same weights (a fine-tune B of A: Wortsman et al. 2022, "Model soups"),
so the two folders must have the same VAE (weights and config), the same vocabulary and the same UNet
and text-encoder architectures; anything else is refused before a byte is written. OUT may be A itself (everything is read
before the folder is replaced, atomically). How the bundled model was made: README, model card.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline.shapes.tiny_sd import drop_source_paths, replace_folder

PARTS = ("unet", "text_encoder", "vae", "tokenizer")


def _config(model) -> dict:
    """The architecture part of a diffusers or transformers config (no names, paths or versions)."""
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "transformers_version"}


def _same_weights(x: torch.nn.Module, y: torch.nn.Module) -> bool:
    sx, sy = x.state_dict(), y.state_dict()
    return sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)


def load(folder: Path) -> dict:
    missing = [s for s in PARTS if not (folder / s).is_dir()]
    if missing:
        raise ValueError(f"{folder} is not an SD folder: no {', '.join(s + '/' for s in missing)}")
    return {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
            "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae"),
            "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")}


def check_compatible(a: dict, b: dict, names: tuple[Path, Path]) -> None:
    """Raise ValueError naming the first part in which the two runs cannot be averaged."""
    pair = f"{names[0]} and {names[1]}"
    if _config(a["vae"]) != _config(b["vae"]) or not _same_weights(a["vae"], b["vae"]):
        raise ValueError(f"the VAEs of {pair} differ: only runs on one latent space can be averaged "
                         "(fine-tune one from the other with --init-from)")
    ta, tb = a["tokenizer"], b["tokenizer"]
    if ta.get_vocab() != tb.get_vocab() or ta.model_max_length != tb.model_max_length:
        raise ValueError(f"the tokenizers of {pair} differ: only runs with one vocabulary can be averaged")
    for part in ("unet", "text_encoder"):
        ca, cb = _config(a[part]), _config(b[part])
        diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        if diff:
            raise ValueError(f"{part}/config.json differs between {pair} ({', '.join(diff)}): "
                             "different architectures cannot be averaged")


def mix(model_a: torch.nn.Module, model_b: torch.nn.Module, weight: float) -> torch.nn.Module:
    """model_a, its floating-point tensors replaced by (1 - weight) * a + weight * b (others must match)."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    out = {}
    for k, va in sa.items():
        vb = sb[k]
        if va.is_floating_point():
            out[k] = torch.lerp(va, vb.to(va.dtype), weight)
        elif torch.equal(va, vb):
            out[k] = va
        else:
            raise ValueError(f"{type(model_a).__name__}.{k}: integer tensors differ, cannot be averaged")
    model_a.load_state_dict(out)
    return model_a


def average(a: str | Path, b: str | Path, weight: float, out: str | Path) -> Path:
    """Write the averaged folder to ``out``: A's files, with the UNet and text encoder replaced."""
    a, b, out = Path(a), Path(b), Path(out)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"--weight {weight}: must be in [0, 1] (0 gives A, 1 gives B)")
    ma, mb = load(a), load(b)
    check_compatible(ma, mb, (a, b))
    history = [json.loads((f / "training.json").read_text()) if (f / "training.json").exists() else None
               for f in (a, b)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        shutil.copytree(a, tmp, dirs_exist_ok=True)  # VAE, tokenizer, scheduler, model_index.json: A's, byte for byte
        for part in ("unet", "text_encoder"):
            mixed = mix(ma[part], mb[part], weight).eval()
            shutil.rmtree(tmp / part)
            mixed.save_pretrained(tmp / part, safe_serialization=True)
        drop_source_paths(tmp)
        (tmp / "training.json").write_text(json.dumps(
            {"average": {"weight_of_b": weight, "a": str(a), "b": str(b)}, "a": history[0], "b": history[1]},
            indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # OUT, if it existed, is untouched
        raise
    return replace_folder(tmp, out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.training.average", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="an exported SD folder")
    ap.add_argument("b", type=Path, help="another run of the same model (e.g. a fine-tune of A)")
    ap.add_argument("--weight", type=float, default=0.5, help="weight of B (default 0.5: the midpoint)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        path = average(args.a, args.b, args.weight, args.out)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path}: {1 - args.weight:g} x {args.a} + {args.weight:g} x {args.b}")


if __name__ == "__main__":
    main()
