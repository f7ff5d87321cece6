"""``generation.early_check``: early rejection part-way through a draw (issue 34, stages/early_check.py).

On the bundled model with its judge, 3-object prompts: a row the judge fails on its predicted clean image after the
check's step stops there (the UNet runs the remaining steps on the other rows only), is delivered with its preview
and the reason ``early:judge:<class>``, and the filters reject it so; the other rows are drawn as without the check.
With redraws the stopped attempts are recorded in the index. SDXL drops rows with its added
conditioning; a call whose rows all stop ends there. What cannot take it is one line at validate.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO, write_job
from family_models import build_sdxl
from mmdit_models import build_sd3
from pipeline.cli import main
from pipeline.runner import run_job
from pipeline.spec import load_spec
from stages.filters import row_verdict
from stages.sampling import SamplingStage
from stages.synthesis import SynthesisStage

pytestmark = pytest.mark.usefixtures("own_cache")  # digests cached in this module's folder (conftest)

STEPS = 10
JUDGE = {"path": str(REPO / "pipeline" / "models" / "shapes-judge"), "region": "attention"}


def job(folder: Path, model: Path | str, early: dict | None, judge: dict | None = JUDGE, masks: dict | None = None,
        **generation) -> Path:
    gen = {"steps": STEPS, "guidance_scale": 5.0, "height": 64, "width": 64, "batch_size": 4, "scheduler": "default",
           **({} if early is None else {"early_check": early}), **generation}
    prompts = {"templates": ["{objects} on noise"], "min_classes_per_image": 3, "max_classes_per_image": 3}
    return write_job(folder, str(model), samples=4, generation=gen, prompts=prompts, judge=judge,
                     output={"dir": str(folder / "out"), "shard_size": 4}, **({} if masks is None else {"masks": masks}))


def draw(job_path: Path, judge=None) -> tuple[dict, list[int]]:
    """The synthesis outputs of the job's 4 rows and the UNet's batch at each call."""
    spec = load_spec(job_path)
    stage = SynthesisStage(spec)
    if judge is not None:
        stage.early.judge = judge
    calls: list[int] = []
    stage.pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return stage(SamplingStage(spec)({"index": np.arange(4, dtype=np.int64)})), calls


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model) -> dict:
    root = tmp_path_factory.mktemp("early")
    out = {name: draw(job(root / name, tiny_model, early)) for name, early in
           (("off", None), ("checked", {"step": 0.5, "min_score": 0.5}))}
    return {**out, "spec": load_spec(job(root / "checked", tiny_model, {"step": 0.5, "min_score": 0.5}))}


def test_a_sample_failing_the_check_stops_there_and_is_rejected_with_its_reason(runs):
    (off, off_calls), (out, calls) = runs["off"], runs["checked"]
    gens = [json.loads(str(g)) for g in out["gen"]]
    stopped = [i for i, g in enumerate(gens) if "stopped" in g]
    ran = [i for i in range(4) if i not in stopped]
    assert stopped and ran, gens  # this case stops some rows and not others
    at = STEPS // 2
    # CFG pairs: every row for the first half of the steps, the rows that ran on for the rest
    assert off_calls == [8] * STEPS and calls == [8] * at + [2 * len(ran)] * (STEPS - at), calls
    classes = [json.loads(str(c)) for c in out["class_names"]]
    for i in stopped:
        stop = gens[i]["stopped"]
        assert stop["step"] == at and stop["reason"].startswith("early:judge:"), stop
        failed = stop["reason"].split(":")[-1]
        assert gens[i]["judge"][classes[i].index(failed)] < 0.5  # the judge's scores on the preview delivered
        assert row_verdict(runs["spec"], out["gen"][i], "{}", out["class_names"][i]) == stop["reason"]
        assert not np.array_equal(out["image"][i], off["image"][i])  # a preview, not the finished image
    for i in ran:  # drawn as without the check (the batch shrank: float rounding, at most 1 of 255)
        assert np.abs(out["image"][i].astype(int) - off["image"][i].astype(int)).max() <= 2
        assert np.allclose(out["attn_raw"][i].astype(np.float32), off["attn_raw"][i].astype(np.float32), atol=0.02)
    assert gens[0]["early_check"] == {"step": 0.5, "min_score": 0.5}


def test_redrawn_stops_are_recorded_in_the_index(tmp_path, tiny_model):
    """(Ray, in-process and killed-and-resumed runs with early stops write the same bytes: tests/test_determinism.py.)"""
    path = job(tmp_path, tiny_model, {"step": 0.5, "min_score": 0.5}, redraws=2)
    run_job(load_spec(path, out=str(tmp_path / "out")), use_ray=False, progress=False)
    rows = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    others = [json.loads(r["scores"]["other"]) for r in rows]
    reasons = [r["reason"] for o in others for r in o.get("rejected", [])]
    reasons += [r["reject_reason"] for r in rows if not r["keep"]]
    for r, other in zip(rows, others):  # a delivered stopped draw says so in the index: its scores are part-way
        assert ("stopped" in other) == r["reject_reason"].startswith("early:"), (r, other)
        if "stopped" in other:
            assert other["stopped"] == {"step": STEPS // 2, "reason": r["reject_reason"]}
    assert any(r.startswith("early:judge:") for r in reasons), reasons


def test_sdxl_drops_rows_with_its_added_conditioning_and_a_call_can_stop_whole(tmp_path):
    model = build_sdxl(tmp_path / "tiny-sdxl")
    masks = {"capture_resolutions": ["1/2"], "self_attention_resolution": None, "refine_power": 0}

    class FirstFails:  # a constructed judge: the first row still running fails, the others pass
        def scores(self, images, prompts, classes, maps, region=None):
            return [[0.0 if j == 0 else 1.0] * len(c) for j, c in enumerate(classes)]

    out, calls = draw(job(tmp_path / "x", model, {"step": 0.5}, masks=masks), judge=FirstFails())
    gens = [json.loads(str(g)) for g in out["gen"]]
    assert ["stopped" in g for g in gens] == [True, False, False, False]
    assert calls == [8] * (STEPS // 2) + [6] * (STEPS - STEPS // 2)
    assert np.isfinite(out["attn"].astype(np.float32)).all() and out["image"].shape[0] == 4

    class AllFail:
        def scores(self, images, prompts, classes, maps, region=None):
            return [[0.0] * len(c) for c in classes]

    out, calls = draw(job(tmp_path / "y", model, {"step": 0.5}, masks=masks), judge=AllFail())
    assert calls == [8] * (STEPS // 2)  # the call ended at the check
    assert all(json.loads(str(g))["stopped"]["step"] == STEPS // 2 for g in out["gen"])


@pytest.mark.parametrize("case", ["sd3", "references", "no-judge", "pndm"])
def test_what_cannot_take_it_is_one_line_at_validate(case, tmp_path, tiny_model, capsys):
    model = build_sd3(tmp_path / "tiny-sd3") if case == "sd3" else tiny_model
    path = job(tmp_path, model, {}, judge=None if case == "no-judge" else JUDGE)
    extra = {"references": ["--set", f"references={{path: {tmp_path / 'refs'}}}"],
             "pndm": ["--set", "generation.scheduler=pndm"]}.get(case, [])
    capsys.readouterr()
    assert main(["validate", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "generation.early_check" in err, err


def test_true_turns_it_on_with_the_defaults_validate_names_it_and_null_fingerprints_as_before(tmp_path, tiny_model,
                                                                                            capsys):
    path = job(tmp_path, tiny_model, None)
    spec = load_spec(path, ["generation.early_check=true"])
    assert spec.generation.early_check.step == 0.7 and spec.generation.early_check.min_score == 0.05
    identity = {"source": "local", "id": "0" * 64}
    assert load_spec(path).fingerprint(identity) != spec.fingerprint(identity)
    assert load_spec(path, ["generation.early_check=false"]).fingerprint(identity) == load_spec(path).fingerprint(identity)
    capsys.readouterr()
    assert main(["validate", str(path), "--set", "generation.early_check=true"]) == 0
    assert "early_check (step 0.7, min_score 0.05)" in capsys.readouterr().out
