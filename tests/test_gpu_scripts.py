"""benchmarks/gpu_smoke.py and benchmarks/gpu_throughput.py keep working where no GPU is: each runs in its own
process on the CPU at its quickest settings (``--quick`` / ``--tiny``, random-weight models built offline), its
JSON has the expected keys and finite numbers, and every smoke check passes. No timing is asserted."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
SMOKE_FAMILIES = ("sd", "sd15", "sdxl", "sd3", "flux")
CPU_DTYPES = ("float32", "bfloat16")
STAGES = ("sampling", "synthesis", "masks", "labels", "filters", "encode")
def run(module: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    return proc


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_gpu_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    proc = run("benchmarks.gpu_smoke", "--quick", "--device", "cpu", "--families", str(tmp_path / "families"),
               "--json", str(out))
    assert out.is_file(), proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"command", "device", "dtypes", "families", "blocks", "checks", "failed", "passed", "notes",
            "wall_s"} <= result.keys()
    assert result["device"] == "cpu" and result["dtypes"] == list(CPU_DTYPES)
    assert any("float16 skipped" in n for n in result["notes"])
    assert finite(result["wall_s"]) and finite(result["build_s"])
    assert sorted(result["families"]) == sorted(SMOKE_FAMILIES)
    for name, fam in result["families"].items():
        assert finite(fam["reference_s"]) and len(fam["prompts"]) == 2
        for dtype in CPU_DTYPES:
            row = fam["dtypes"][dtype]
            assert row["map_dtype"] == "float16" and len(row["map_shape"]) == 4 and row["map_shape"][:2] == [2, 2]
            assert finite(row["cosine_min"]) and -1.0 <= row["cosine_min"] <= 1.0 + 1e-9
            assert finite(row["seconds_per_call"]) and finite(row["capture_off_max_abs_diff"])
            assert row["images_finite"] and row["repeat_identical"] and row["capture_off_identical"]
            assert row["component_dtypes"]["vae"] == dtype
            assert "syncs" not in row  # cpu: no sync check
    assert sorted(result["blocks"]) == ["flux", "sd3", "sdxl"]
    for family, row in result["blocks"].items():
        assert all(finite(row["seconds_per_call"][c]) and row["seconds_per_call"][c] > 0 for c in ("off", "capture"))
        assert finite(row["time_overhead"]) and finite(row["params_m"]) and row["captured"]
        assert row["peak_mb"] == {"off": None, "capture": None} and row["memory_overhead"] is None  # cpu
    names = {c["name"] for c in result["checks"]}
    for name in SMOKE_FAMILIES:
        for dtype in CPU_DTYPES:
            assert {f"{name}/{dtype}/{c}" for c in ("weights",)} <= names
            assert {f"{name}/{dtype}/{c}" for c in ("images", "maps", "cosine", "repeat", "capture")} <= names
    assert {f"blocks/{f}/maps" for f in ("sdxl", "sd3", "flux")} <= names
    assert result["failed"] == [], [c for c in result["checks"] if c["name"] in result["failed"]]
    assert result["passed"] and proc.returncode == 0


def test_gpu_throughput_runs_on_cpu(tmp_path):
    out = tmp_path / "throughput.json"
    proc = run("benchmarks.gpu_throughput", "--tiny", "--device", "cpu", "--cache", str(tmp_path / "models"),
               "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"command", "device", "dtype", "stock_dtype", "models", "targets", "wall_s"} <= result.keys()
    assert result["device"] == "cpu" and result["tiny"] and finite(result["wall_s"])
    assert sorted(result["models"]) == ["sd15", "sdxl"]
    for name, row in result["models"].items():
        s = row["settings"]
        assert (s["height"], s["width"], s["steps"], s["batch_size"]) == (64, 64, 2, 2)
        for config in ("stock", "optimized", "synthgen"):
            r = row[config]
            assert r["images"] == 2 * result["batches"] and finite(r["images_per_s"]) and r["images_per_s"] > 0
            assert finite(r["wall_s"]) and finite(r["warmup_s"]) and r["peak_gpu_mb"] is None  # cpu
        assert "optimized_compiled" not in row  # no --compile
        synth = row["synthgen"]
        assert synth["stages"] == list(STAGES)
        assert all(finite(synth["seconds_per_image"][st]) for st in STAGES)
        assert finite(synth["synthesis_images_per_busy_s"]) and 0 <= synth["kept"] <= synth["images"]
        ratios = row["ratios"]
        for key in ("synthgen_over_optimized", "synthgen_synthesis_over_optimized", "optimized_over_stock",
                    "optimized_eager_over_stock"):
            assert finite(ratios[key]) and ratios[key] > 0, key
        assert ratios["synthgen_over_optimized_compiled"] is None
