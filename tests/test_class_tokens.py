"""Discriminative class tokens (issue 34): ``synthgen tune-tokens`` and ``model.class_tokens``.

The tuner's differentiable path is the pipeline's own call (same images, same prompt embeddings as the tokens
written into the table); on a constructed case (one class's token replaced by another's, so the model draws the
wrong shape) tuning raises the judge's score of the prompted class; a job naming the file draws with it and records
it; a file that is missing, has the wrong shape, other classes or another model, or a family that cannot take it,
is one line and exit 2 with nothing written.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, write_job
from family_models import build_sdxl
from pipeline.cli import main
from pipeline.spec import load_spec
from pipeline.tune_tokens import TuneSettings, tune
from stages import class_tokens
from stages.identity import model_identity, short_id
from stages.sampling import SamplingStage
from stages.synthesis import SynthesisStage

pytestmark = pytest.mark.usefixtures("own_cache")  # digests cached in this module's folder (conftest)

JUDGE = REPO / "pipeline" / "models" / "shapes-judge"


def job(folder: Path, model: str, tokens: Path | None = None, **sections) -> Path:
    extra = {} if tokens is None else {"model": {"class_tokens": str(tokens)}}
    return write_job(folder, model, judge={"path": str(JUDGE), "region": "attention"},
                     output={"dir": str(folder / "out")}, **extra, **sections)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("tokens")
    path = job(root, tiny_model)
    assert main(["tune-tokens", str(path), "--tokens", str(root / "tokens.safetensors"), "--iterations", "2",
                 "--batch", "2", "--lr", "0.05"]) == 0
    return root / "tokens.safetensors"


def test_the_file_holds_each_class_tuned_for_this_model(tuned, tiny_model):
    from transformers import CLIPTextModel, CLIPTokenizer

    vectors, meta = class_tokens.read(tuned)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    table = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder").get_input_embeddings().weight
    assert set(vectors) == {"circle", "square", "triangle", "star"}
    assert meta["format"] == class_tokens.FORMAT and meta["model_id"] == short_id(model_identity(tiny_model))
    for name, v in vectors.items():
        ids = meta["token_ids"][name]
        assert ids == class_tokens.token_ids(tokenizer, name) and v.shape == (len(ids), table.shape[1])
    moved = [n for n, v in vectors.items() if not torch.equal(v, table[meta["token_ids"][n]])]
    assert moved  # the prompted classes' vectors took the gradient
    history = meta["tuning"]["history"]
    assert len(history) == 2 and all(0 <= h["judge_score"] <= 1 and h["objects"] >= 2 for h in history)


def test_the_tuners_path_is_the_pipelines_call_and_the_hook_equals_the_written_table(tmp_path, tiny_model):
    spec = load_spec(job(tmp_path, tiny_model))
    stage = SynthesisStage(spec, capture=False)
    pipe = stage.pipe
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    ids = {"star": class_tokens.token_ids(tokenizer, "star")}
    new = {"star": torch.randn(len(ids["star"]), encoder.config.hidden_size)}
    prompt = tokenizer(["a red star on noise"], padding="max_length", return_tensors="pt").input_ids
    hook = class_tokens.Override(encoder, new, ids)
    with torch.no_grad():
        hooked = encoder(prompt)[0]
    hook.remove()
    class_tokens.apply(encoder, new, ids)
    with torch.no_grad():
        written = encoder(prompt)[0]
    assert torch.equal(hooked, written)
    # the pipeline's call without its no_grad: the very images the synthesis stage's call makes
    kwargs = dict(prompt=["a red star on noise"], num_inference_steps=4, guidance_scale=4.0, height=64, width=64)
    plain = pipe(generator=[torch.Generator().manual_seed(5)], output_type="np", **kwargs).images
    unwrapped = inspect.unwrap(type(pipe).__call__)(pipe, generator=[torch.Generator().manual_seed(5)],
                                                    output_type="pt", **kwargs).images
    assert np.array_equal(plain, unwrapped.detach().permute(0, 2, 3, 1).numpy())


def test_tuning_repairs_a_confused_token(tmp_path, tiny_model):
    """Constructed case: "square"'s token carries the star's embedding, so a "square" prompt draws what a "star"
    prompt draws and the judge scores the square low; a few iterations on square prompts raise that score."""
    from stages.judges import ClassifierJudge

    path = job(tmp_path, tiny_model, classes=[{"name": "square", "attributes": ["red", "blue"]},
                                              {"name": "star", "attributes": ["red", "blue"]}],
               prompts={"templates": ["{objects} on noise"], "max_classes_per_image": 1},
               generation={"steps": 8, "guidance_scale": 5.0, "height": 64, "width": 64, "batch_size": 4,
                           "scheduler": "default"})
    spec = load_spec(path)
    stage = SynthesisStage(spec)
    ids = {n: class_tokens.token_ids(stage.pipe.tokenizer, n) for n in ("square", "star")}
    table = stage.pipe.text_encoder.get_input_embeddings().weight
    confused = {"square": table[ids["star"]].detach().clone(), "star": table[ids["star"]].detach().clone()}
    start = tmp_path / "confused.safetensors"
    class_tokens.write(start, confused, short_id(model_identity(tiny_model)), ids, "", {})
    judge = ClassifierJudge(JUDGE, region="attention")

    def class_scores(tokens: Path) -> dict[str, float]:
        """The judge's mean score of each class on 8 held-out 1-object prompts drawn with ``tokens``."""
        s = load_spec(path, [f"model.class_tokens={tokens}", "seed=99"])
        rows = SamplingStage(s)({"index": np.arange(8, dtype=np.int64)})
        out = SynthesisStage(s).draw(rows)
        classes = [json.loads(c) for c in rows["class_names"]]
        scores = judge.scores(out["image"], list(rows["prompt"]), classes, out["attn"])
        return {n: float(np.mean([sc[0] for sc, c in zip(scores, classes) if c == [n]])) for n in ("square", "star")}

    record = tune(load_spec(path), tmp_path / "repaired.safetensors", TuneSettings(iterations=8, lr=0.1, batch=4),
                  start=start, log=lambda line: None)
    before, after = class_scores(start), class_scores(tmp_path / "repaired.safetensors")
    assert before["square"] < 0.5 < after["square"], (before, after, record["history"])
    assert after["star"] > 0.5, (before, after)  # the star, tuned beside it, still drawn as one


def test_a_job_naming_the_file_draws_with_it_and_records_it(tuned, tmp_path, tiny_model, capsys):
    plain, with_tokens = job(tmp_path / "a", tiny_model), job(tmp_path / "b", tiny_model, tuned)
    outs = {}
    for name, path in (("plain", plain), ("tokens", with_tokens)):
        spec = load_spec(path)
        rows = SamplingStage(spec)({"index": np.arange(4, dtype=np.int64)})
        outs[name] = SynthesisStage(spec).draw(rows)
    gen = json.loads(str(outs["tokens"]["gen"][0]))
    assert gen["class_tokens"] == class_tokens.digest(tuned) and "class_tokens" not in json.loads(str(outs["plain"]["gen"][0]))
    assert not np.array_equal(outs["plain"]["image"], outs["tokens"]["image"])
    identity = {"source": "local", "id": "0" * 64}
    assert load_spec(plain).fingerprint(identity) != load_spec(with_tokens).fingerprint(identity)
    assert "class_tokens" not in load_spec(plain).model_dump(mode="json")["model"]  # unset: fingerprints as before
    capsys.readouterr()
    assert main(["validate", str(with_tokens)]) == 0
    assert f"class tokens {tuned}" in capsys.readouterr().out


def bad_file(case: str, folder: Path, tiny_model: str, tuned: Path) -> Path:
    vectors, meta = class_tokens.read(tuned)
    path = folder / f"{case}.safetensors"
    if case == "missing":
        return path
    if case == "not-safetensors":
        path.write_text("not a tensor file\n")
        return path
    ids, model_id = meta["token_ids"], meta["model_id"]
    if case == "wrong-width":
        vectors = {n: v[:, :8] for n, v in vectors.items()}
    elif case == "other-class":
        vectors, ids = {**vectors, "hexagon": vectors["star"]}, {**ids, "hexagon": ids["star"]}
    elif case == "other-model":
        model_id = "0123456789abcdef"
    class_tokens.write(path, vectors, model_id, ids, "", {})
    return path


@pytest.mark.parametrize("case", ["missing", "not-safetensors", "wrong-width", "other-class", "other-model", "sdxl"])
def test_a_file_that_does_not_fit_is_one_line_at_validate(case, tuned, tmp_path, tiny_model, capsys):
    model = str(build_sdxl(tmp_path / "tiny-sdxl")) if case == "sdxl" else tiny_model
    masks = {"capture_resolutions": ["1/2"], "self_attention_resolution": None, "refine_power": 0}
    path = job(tmp_path, model, tuned if case == "sdxl" else bad_file(case, tmp_path, tiny_model, tuned),
               **({"masks": masks} if case == "sdxl" else {}))
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.class_tokens" in err, err
    assert ("sdxl" in err) if case == "sdxl" else True
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["no-judge", "exists", "bad-init", "references"])
def test_tune_tokens_refuses_bad_input_in_one_line(case, tuned, tmp_path, tiny_model, capsys):
    dest = tmp_path / "tokens.safetensors"
    path = job(tmp_path, tiny_model)
    extra = []
    if case == "no-judge":
        path = write_job(tmp_path, tiny_model, name="nojudge.yaml")
    elif case == "exists":
        dest.write_bytes(tuned.read_bytes())
    elif case == "bad-init":
        extra = ["--init", str(bad_file("other-model", tmp_path, tiny_model, tuned))]
    else:  # an img2img job: its prompts are not the text-to-image draws the tuner makes
        from pipeline.shapes.coco import render_coco

        render_coco(tmp_path / "refs", 2, classes=("circle", "square", "triangle", "star"))
        extra = ["--set", f"references={{path: {tmp_path / 'refs'}, strengths: [0.5], seeds_per_level: 1}}",
                 "--set", "samples=2"]
    before = dest.read_bytes() if dest.exists() else None
    capsys.readouterr()
    assert main(["tune-tokens", str(path), "--tokens", str(dest), "--iterations", "1", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tune-tokens" in err, err
    assert (dest.read_bytes() if dest.exists() else None) == before
