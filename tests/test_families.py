"""The model seam (stages/families/) on random-weight models of each UNet family (tests/family_models.py):
SD 1.x, SD 2.x (v-prediction, linear projections, heads [5, 10, 20, 20]) and SDXL (two text encoders,
pooled embeddings, time ids) end to end through one local Ray, a resumed run's bytes, multi-token
class words in every tokenizer, and the capture of an SDXL layer against an explicit softmax(QKᵀ/√d)."""
from __future__ import annotations

import json
import math
import shutil
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, assert_same_dataset, member_hashes, write_job
from family_models import BUILDERS
from pipeline.dataset import read_manifest
from pipeline.runner import run_job
from pipeline.spec import load_spec
from stages.families import family_class, resolve_family
from stages.unet_layout import level_grid

FAMILY_OF = {"sd15": "sd", "sd2": "sd", "sdxl": "sdxl"}
CLASSES = ["traffic light", "fire hydrant", "hot dog", "cat"]
MULTI = "a photo of a traffic light and a fire hydrant and a hot dog"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def family_job(folder: Path, model: Path, name: str, **extra) -> Path:
    """4 samples of COCO's multi-token classes in 2 shards, 64², 2 steps, levels named relative to the latent."""
    sections = dict(
        classes=CLASSES, samples=4, output={"dir": str(folder / "out"), "shard_size": 2},
        prompts={"templates": ["a photo of {objects}"], "max_classes_per_image": 2},
        generation={"steps": 2, "guidance_scale": 5.0, "height": 64, "width": 64, "batch_size": 2,
                    "scheduler": "default"},
        masks={"capture_resolutions": ["1/2", "1/4"], "refine_power": 1, "self_attention_resolution": "1/2",
               "threshold": "otsu"},
        filters={"min_area_fraction": 0.0, "max_area_fraction": 1.0, "min_contrast": -1.0, "dedup_threshold": None},
        resources={"synthesis": {"num_cpus": 1}, **{s: {"num_cpus": 0.5} for s in
                                                    ("sampling", "masks", "labels", "filters", "encode")}},
    )
    sections.update(extra)
    job = write_job(folder, str(model), **sections)
    text = job.read_text().replace("name: tiny", f"name: {name}")
    job.write_text(text)
    return job


def samples_of(out: Path) -> list[dict]:
    """Every sample in the committed shards: its json record and decoded seg mask."""
    found: dict[str, dict] = {}
    for shard in read_manifest(out)["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                entry = found.setdefault(key, {})
                if ext == "json":
                    entry["json"] = json.loads(data)
                elif ext == "seg.png":
                    entry["seg"] = np.asarray(Image.open(BytesIO(data)))
                elif ext == "jpg":
                    entry["image"] = np.asarray(Image.open(BytesIO(data)))
    return [found[k] for k in sorted(found)]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    temp = tempfile.mkdtemp(prefix="sg-fam-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING", log_to_driver=False, _temp_dir=temp,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})  # workers import pipeline/ and stages/ from here
    # (from any working directory: Ray's workers start in the driver's, and pytest may run from tests/)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_family_end_to_end_and_resume(name, models, ray_session, tmp_path):
    """SD 2.x and SDXL through Ray, SD 1.5 in-process (its layout, the bundled model's, runs through Ray in
    tests/test_pipeline_e2e.py and tests/test_determinism.py; CI time)."""
    model = models[name]
    family = resolve_family(model)
    assert family.name == FAMILY_OF[name]
    extra = {"prompts": {"templates": ["a photo of {objects}"], "max_classes_per_image": 2,
                         "embedding": {"mode": "jitter", "sigma": 0.05}}} if name != "sd15" else {}
    job = family_job(tmp_path, model, f"fam-{name}", **extra)
    spec = load_spec(job)
    use_ray = name != "sd15"
    summary = run_job(spec, use_ray=use_ray, progress=False)
    assert summary["runner"] == ("ray" if use_ray else "in-process") and summary["processed"] == 4
    out = Path(spec.output.dir)
    records = samples_of(out)
    assert len(records) == summary["kept"] >= 1  # random weights: a class may find no pixel (missing:<class>)
    latent = (64 // 8, 64 // 8)
    plan = family.capture_plan(model, spec.masks, 64, 64)
    for record in records:
        gen = record["json"]["gen"]
        gen = json.loads(gen) if isinstance(gen, str) else gen
        capture = gen["capture"]
        assert gen.get("family", "sd") == family.name
        # the grid each level's maps had: "1/2" and "1/4" of the 8×8 latent, whatever the model's native size
        assert capture["grids"] == {"cross": {"1/2": [4, 4], "1/4": [2, 2]}, "self": {"1/2": [4, 4]}}
        assert capture["map_grid"] == list(latent)
        for level in plan:
            assert list(level_grid(*latent, level.index)) == list(level.grid)
            assert capture["grids"][level.kind][level.name] == list(level.grid)
        assert record["seg"].shape == (64, 64) and record["image"].shape == (64, 64, 3)
        assert len(record["json"]["class_names"]) == len(record["json"]["token_index"])
    # a partial output (one committed shard lost) resumes to the same bytes (in-process: Ray = in-process is
    # tests/test_determinism.py's; one Ray pass per family keeps this test short)
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    (out / read_manifest(out)["shards"][1]["tar"]).unlink()
    resumed = run_job(load_spec(job), use_ray=False, progress=False, verify=True)
    assert resumed["processed"] == 2
    assert_same_dataset(out, reference)
    assert member_hashes(out) == member_hashes(reference)


def test_the_same_job_resolves_the_same_grids_on_sd15_sd21_and_sdxl_configs(tmp_path):
    """jobs/coco80-sd15.yaml's levels (16, 32; self-attention 32) at 512² on the real UNet configurations."""
    from pipeline.spec import MasksSpec

    configs = {
        "sd15": dict(sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                     down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
        "sd21-768": dict(sample_size=96, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                         down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                         up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, use_linear_projection=True),
        "sdxl": dict(sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     transformer_layers_per_block=[1, 2, 10], addition_embed_type="text_time"),
    }
    masks = MasksSpec(capture_resolutions=[16, 32], self_attention_resolution=32, refine_power=1)
    layers = {}
    for name, config in configs.items():
        folder = tmp_path / name
        for sub, data in (("unet", {"_class_name": "UNet2DConditionModel", **config}),
                          ("vae", {"block_out_channels": [128, 256, 512, 512]})):
            (folder / sub).mkdir(parents=True)
            (folder / sub / "config.json").write_text(json.dumps(data))
        family = family_class("sdxl" if name == "sdxl" else "sd")
        plan = family.capture_plan(folder, masks, 512, 512)
        assert [(lv.kind, lv.name, lv.grid) for lv in plan] == [("cross", "16", (16, 16)), ("cross", "32", (32, 32)),
                                                               ("self", "32", (32, 32))]
        layers[name] = [lv.layers for lv in plan]
        if name == "sdxl":  # at its native 1024² the same names are coarser levels; "1/2" and "1/4" are its two
            native = family.capture_plan(folder, MasksSpec(capture_resolutions=["1/2", "1/4"]), 1024, 1024)
            assert [(lv.grid, lv.layers) for lv in native] == [((64, 64), 2 * 2 + 3 * 2), ((32, 32), 10 * 2 + 10 * 3 + 10)]
    assert layers == {"sd15": [5, 5, 5], "sd21-768": [5, 5, 5], "sdxl": [10 * 2 + 10 * 3 + 10, 2 * 2 + 3 * 2,
                                                                         2 * 2 + 3 * 2]}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_judge_and_redraws_run_on_every_unet_family(name, models, tmp_path):
    from test_redraw import assert_every_attempt_is_drawn_on

    assert_every_attempt_is_drawn_on(family_job(tmp_path, models[name], f"judged-{name}"), CLASSES, tmp_path)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_multi_token_class_words_map_to_all_their_tokens_in_every_tokenizer(name, models):
    from transformers import CLIPTokenizer

    family = resolve_family(models[name])
    spans = [(MULTI.index(w), MULTI.index(w) + len(w)) for w in ("traffic light", "fire hydrant", "hot dog")]
    positions = {}
    for sub in family.tokenizers:
        tok = CLIPTokenizer.from_pretrained(str(models[name]), subfolder=sub)
        stub = family.__new__(family)  # token_positions reads only the tokenizers
        stub.pipe = type("P", (), {s: tok for s in family.tokenizers})()
        groups = stub.token_positions(MULTI, spans)[sub]
        ids = tok(MULTI).input_ids
        for (start, end), group in zip(spans, groups):
            word = MULTI[start:end]
            assert len(group) >= 2, (sub, word, group)  # two words: at least two tokens
            assert group == list(range(group[0], group[-1] + 1))  # contiguous
            assert tok.decode([ids[i] for i in group]).strip() == word  # exactly the word's tokens
            assert tok.decode([ids[group[0] - 1]]).strip() in ("a", "<|startoftext|>")  # nothing before it is left out
        positions[sub] = groups
    # SDXL's two encoders read the same token positions (their features are concatenated per token), so
    # the sampler's positions (from `tokenizer`) are valid for the cross-attention keys
    assert len({json.dumps(p) for p in positions.values()}) == 1


def test_sdxl_capture_is_explicit_softmax_and_leaves_the_layer_output_unchanged(models):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from stages.attention import AttentionCapture, CaptureConfig

    unet = UNet2DConditionModel.from_pretrained(str(models["sdxl"]), subfolder="unet").eval()
    unet.set_attn_processor(AttnProcessor2_0())
    latent = (8, 8)
    gen = torch.Generator().manual_seed(0)
    batch, tokens = 2, [[[2, 3]], [[4]]]
    sample = torch.randn(2 * batch, 4, *latent, generator=gen)
    context = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, generator=gen)
    added = {"text_embeds": torch.randn(2 * batch, 32, generator=gen), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 4)}
    layer_name = "down_blocks.2.attentions.0.transformer_blocks.1.attn2"  # level 2 (2×2), second transformer
    layer = unet.get_submodule(layer_name)
    seen: dict[str, list] = {"q": [], "k": [], "out": []}

    def pre(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs["encoder_hidden_states"]
        seen["q"].append(module.to_q(hidden).detach())
        seen["k"].append(module.to_k(ctx).detach())

    def post(module, args, kwargs, output):
        seen["out"].append(output.detach().clone())

    layer.register_forward_pre_hook(pre, with_kwargs=True)
    layer.register_forward_hook(post, with_kwargs=True)
    with torch.no_grad():
        plain = unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample
    capture = AttentionCapture(unet, CaptureConfig(resolutions=("1/4",)), latent_hw=latent)
    assert capture.cross_levels == [2] and capture.grids(latent) == {"cross": {"1/4": [2, 2]}}
    capture.begin(tokens, 2, latent, 1, 77)
    with torch.no_grad():
        captured = unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample
    assert torch.equal(seen["out"][0], seen["out"][1])  # the layer's output, bitwise, capture on vs off
    assert torch.equal(plain, captured)
    # explicit softmax(QKᵀ/√d) of this layer from its q/k: conditional half, mean over heads, class token slots
    q, k = seen["q"][1][batch:], seen["k"][1][batch:]
    heads = layer.heads
    d = q.shape[-1] // heads
    q = q.view(batch, -1, heads, d).transpose(1, 2)
    k = k.view(batch, -1, heads, d).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(dim=1)  # (B, N, 77)
    layers_at_level = capture.expected[("attn2", 2)]
    assert layers_at_level == 1 * 2 + 2 * 2 + 2  # down: 1 block x 2 transformers; mid: 2; up: 2 blocks x 2
    # the capture's running sum at level 2 holds every layer of the level; take this layer alone by
    # running the same inputs with only it hooked
    capture.remove()
    solo = AttentionCapture(unet, CaptureConfig(resolutions=("1/4",)), latent_hw=latent)
    procs = unet.attn_processors  # the chosen layer keeps its capture processor, every other one plain SDPA
    unet.set_attn_processor({n: p if n == layer_name + ".processor" else AttnProcessor2_0() for n, p in procs.items()})
    solo.begin(tokens, 2, latent, 1, 77)
    with torch.no_grad():
        unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=added)
    summed = solo._run["cross"][2]  # (B, slots, N): one layer, one step
    expected = torch.stack([probs[0][:, [2, 3]].T, probs[1][:, [4, 0]].T])  # image 1's unused slot reads position 0
    torch.testing.assert_close(summed, expected, rtol=0, atol=1e-5)
    solo.remove()


def test_a_low_contrast_map_survives_the_float16_hand_over():
    """Maps travel as float16 (the ``attn`` columns); one whose range is a sliver of its max used to collapse to
    one fp16 value (the mask stage then saw a flat map: no object). fp16_safe stretches it in float32 first."""
    from stages.attention import fp16_safe
    from stages.masks import class_maps

    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.exp(-((yy - 4) ** 2 + (xx - 11) ** 2) / 8)
    low = 1 - 1e-4 + 1e-4 * blob  # range 1e-4 of its max: below fp16's resolution near 1
    wide = 0.2 + 0.8 * blob
    maps = torch.stack([low, wide, torch.zeros(16, 16)])[None]  # (1, K=3, 16, 16), the last one padding
    assert low.half().unique().numel() == 1  # the old hand-over: one value left
    safe = fp16_safe(maps)
    assert torch.equal(safe[0, 1:], maps[0, 1:])  # wide and padding maps pass bit for bit
    _, norm = class_maps(safe.half().numpy()[0], 3, (64, 64))
    peak = np.unravel_index(norm[0].argmax(), norm[0].shape)
    assert norm[0].max() == 1.0 and (abs(peak[0] - 4 * 4 - 1.5) <= 4 and abs(peak[1] - 11 * 4 - 1.5) <= 4)
    _, before = class_maps(maps.half().numpy()[0], 3, (64, 64))
    assert before[0].max() == 0.0  # what the collapse did: an all-zero map
    assert np.corrcoef(norm[0].ravel(), before[1].ravel())[0, 1] > 0.99  # same shape as the wide copy of the blob


def test_the_sdxl_job_is_valid_and_its_levels_resolve_on_sdxl_at_1024(tmp_path):
    job = load_spec(REPO / "jobs" / "coco80-sdxl.yaml", check_files=False)
    assert job.model.family == "sdxl" and (job.generation.height, job.generation.width) == (1024, 1024)
    folder = tmp_path / "sdxl-configs"  # SDXL base 1.0's UNet and VAE configs (the layout keys)
    for sub, data in (("unet", {"_class_name": "UNet2DConditionModel", "sample_size": 128,
                                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                                "mid_block_type": "UNetMidBlock2DCrossAttn", "layers_per_block": 2,
                                "transformer_layers_per_block": [1, 2, 10], "addition_embed_type": "text_time"}),
                      ("vae", {"block_out_channels": [128, 256, 512, 512]})):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "config.json").write_text(json.dumps(data))
    plan = family_class("sdxl").capture_plan(folder, job.masks, 1024, 1024)
    assert [(lv.kind, lv.grid, lv.layers) for lv in plan] == [("cross", (64, 64), 10), ("cross", (32, 32), 60),
                                                              ("self", (32, 32), 60)]
