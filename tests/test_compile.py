"""``model.compile``: the denoiser through ``torch.compile``, the capture's bookkeeping outside its graphs (issue 35).

On this CPU the tests compile with the "aot_eager" backend (``COMPILE_BACKEND``): dynamo traces the same graphs and
the same breaks at the capture's bookkeeping as with inductor, without generating C++ (inductor takes ~80 s for
the bundled UNet here, and runs it slower than eager on a CPU; its use is the GPU). Compiled images and maps equal
eager's within float tolerance; the option is recorded in ``gen``; left off, the fingerprint is as before.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_job
from mmdit_models import build_flux, build_sd3
from pipeline.spec import load_spec
from stages.families import base
from stages.sampling import SamplingStage
from stages.synthesis import SynthesisStage

pytestmark = pytest.mark.usefixtures("own_cache")  # digests cached in this module's folder (conftest)


def job(folder: Path, model: Path | str, compile_: bool | None, **generation) -> Path:
    gen = {"steps": 4, "guidance_scale": 5.0, "height": 64, "width": 64, "batch_size": 2, **generation}
    extra = {} if compile_ is None else {"model": {"compile": compile_}}
    return write_job(folder, str(model), samples=4, generation=gen, output={"dir": str(folder / "out")}, **extra)


def synthesize(job_path: Path) -> tuple[dict, int]:
    """The synthesis outputs of the job's 4 rows and how many graphs dynamo compiled for them."""
    spec = load_spec(job_path)
    rows = SamplingStage(spec)({"index": np.arange(4, dtype=np.int64)})
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = SynthesisStage(spec)(rows)
    return out, torch._dynamo.utils.counters["stats"]["unique_graphs"] - before


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(base, "COMPILE_BACKEND", "aot_eager")
    yield
    torch._dynamo.reset()


def assert_close(eager: dict, compiled: dict) -> None:
    diff = np.abs(eager["image"].astype(int) - compiled["image"].astype(int))
    assert diff.max() <= 1, diff.max()  # uint8: float reassociation moves a pixel by one step at most
    for col in ("attn", "attn_raw"):
        a, b = eager[col].astype(np.float32), compiled[col].astype(np.float32)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-3, col


def test_the_compiled_unet_matches_eager_with_the_capture_on(tmp_path, tiny_model, aot_eager):
    (eager, eager_graphs), (compiled, graphs) = (synthesize(job(tmp_path / name, tiny_model, flag, scheduler="ddim"))
                                                 for name, flag in (("eager", None), ("compiled", True)))
    assert eager_graphs == 0 and graphs > 0  # it did compile, in pieces around the capture's bookkeeping
    assert_close(eager, compiled)
    assert json.loads(str(compiled["gen"][0]))["compiled"] is True
    assert "compiled" not in json.loads(str(eager["gen"][0]))
    identity = {"source": "local", "id": "0" * 64}
    plain = load_spec(job(tmp_path / "a", tiny_model, None)).fingerprint(identity)
    assert load_spec(job(tmp_path / "f", tiny_model, False)).fingerprint(identity) == plain
    assert load_spec(job(tmp_path / "t", tiny_model, True)).fingerprint(identity) != plain


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_compiled_transformer_matches_eager_with_the_joint_capture_on(family, tmp_path, aot_eager):
    model = build_sd3(tmp_path / "m") if family == "sd3" else build_flux(tmp_path / "m")
    extra = {"guidance_scale": 3.5} if family == "flux" else {}
    (eager, _), (compiled, graphs) = (synthesize(job(tmp_path / name, model, flag, scheduler="default", **extra))
                                      for name, flag in (("eager", None), ("compiled", True)))
    assert graphs > 0
    assert_close(eager, compiled)


def test_validate_warns_that_a_cpu_compiles_first_and_gains_nothing(tmp_path, tiny_model, capsys):
    from pipeline.cli import main

    capsys.readouterr()
    assert main(["validate", str(job(tmp_path, tiny_model, True))]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: model.compile: on a CPU") and len(err.strip().splitlines()) == 1, err
    assert main(["validate", str(job(tmp_path / "eager", tiny_model, None))]) == 0
    assert "model.compile" not in capsys.readouterr().err
