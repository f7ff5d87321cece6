"""Bad input, one table: command line, job fields, model folders, class words, output dirs.

Every case fails the way the CLI promises (pipeline/cli.py): exit code 2, exactly one line on stderr
that names the field, Ray not started, nothing written (the job's folder, its output dir and the
model folder are unchanged). The table runs in-process through ``validate``; a handful of cases also
through ``run``, ``eval``, ``submit`` and the console entry point. The pre-flight checks behind the
model and class-word cases are pipeline/preflight.py's.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import ray
import yaml

from conftest import REPO, TINY_JOB, write_job
import pipeline.spec
from pipeline import preflight
from pipeline.cli import main
from pipeline.spec import load_spec, validate_spec

Setup = Callable[[Path], None]


@dataclass
class Case:
    id: str
    expect: str | tuple[str, ...]  # substrings of the one stderr line (the field first)
    job: dict = field(default_factory=dict)  # top-level sections merged into TINY_JOB one level deep
    text: str | None = None  # the job file's text instead ("{model}": the model folder)
    args: tuple[str, ...] = ()  # after the job path ("{tmp}": the test's folder)
    argv: tuple[str, ...] | None = None  # the whole command line instead (no job path added)
    model: Setup | None = None  # changes a copy of the tiny model (the job then uses the copy)
    out: Setup | None = None  # prepares the job's output dir (job/out)
    command: str = "validate"


# --- setups --------------------------------------------------------------------------------------
def remove(rel: str) -> Setup:
    def setup(root: Path) -> None:
        target = root / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return setup


def rename(rel: str, new: str) -> Setup:
    return lambda root: (root / rel).rename(root / new)


def write(rel: str, text: str) -> Setup:
    def setup(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return setup


def edit_json(rel: str, **changes) -> Setup:
    def setup(root: Path) -> None:
        data = json.loads((root / rel).read_text())
        data.update(changes)
        (root / rel).write_text(json.dumps(data))
    return setup


def job_text(drop: str, rename: str | None = None) -> str:
    """The tiny job without section ``drop`` (with ``rename``: the same value under that misspelled key)."""
    job = copy.deepcopy(TINY_JOB)
    job["model"]["path"] = "{model}"
    value = job.pop(drop)
    if rename:
        job[rename] = value
    return yaml.safe_dump(job, sort_keys=False)


@functools.lru_cache(maxsize=None)
def built(name: str) -> Path:
    """A random-weight model of tests/family_models.py, built once per session into a temp folder."""
    from family_models import BUILDERS

    return BUILDERS[name](Path(tempfile.mkdtemp(prefix=f"sg-bad-{name}-")) / name)


def family_model(name: str, *edits: Setup) -> Setup:
    """The copy of the tiny model replaced by a family model (``built``), then ``edits`` applied."""
    def setup(root: Path) -> None:
        shutil.rmtree(root)
        shutil.copytree(built(name), root)
        for edit in edits:
            edit(root)
    return setup


def truncate(rel: str) -> Setup:
    """Cut a file to half its size (a copy that stopped half way)."""
    def setup(root: Path) -> None:
        with open(root / rel, "r+b") as f:
            f.truncate((root / rel).stat().st_size // 2)
    return setup


def copy_dir(src: Path, rel: str) -> Setup:
    def setup(root: Path) -> None:
        shutil.rmtree(root / rel)
        shutil.copytree(src, root / rel)
    return setup


@functools.lru_cache(maxsize=None)
def built_judge() -> Path:
    """A random-weight judge of the bundled judge's architecture (pipeline/shapes/judge.py), built once."""
    from pipeline.shapes.judge import save_judge

    return save_judge(Path(tempfile.mkdtemp(prefix="sg-bad-judge-")) / "judge")


def judge_folder(*edits: Setup) -> Setup:
    """A judge folder at ``judge/`` of the model copy (the job names it ``../model/judge``), then ``edits``."""
    def setup(root: Path) -> None:
        shutil.copytree(built_judge(), root / "judge")
        for edit in edits:
            edit(root)
    return setup


JUDGE = {"judge": {"path": "../model/judge"}}
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
FAMILY_JOB = {"masks": {"capture_resolutions": ["1/2", "1/4"]}}  # levels every family model has at 64²
LONG = "x" * 300
Q9 = "q" * 9  # 9 tokens in the bundled vocabulary (one per letter)
LONG_TEMPLATE = "{objects} on " + " and ".join(["noise", "stripes", "gradient"] * 4)
MANIFEST_OTHER = json.dumps({"format": "someone-else/1", "shards": []})

CASES = [
    # the job file itself
    Case("yaml: malformed", "malformed YAML", text="name: [unclosed\nseed: 1\n"),
    Case("yaml: not a mapping", "must be a YAML mapping", text="- a\n- list\n"),
    Case("yaml: job file missing", "cannot read job file", argv=("validate", "{tmp}/nope.yaml")),
    Case("job: unknown key", "generation.stepz: unknown key (did you mean steps?)", job={"generation": {"stepz": 3}}),
    Case("job: wrong type", "generation.steps: Input should be a valid integer", job={"generation": {"steps": "ten"}}),
    Case("job: section missing", "output: required field is missing", text=job_text("output")),
    Case("job: section misspelled", "outptu: unknown key (did you mean output?)", text=job_text("output", "outptu")),
    Case("job: name with a space", ": name:", job={"name": "has space"}),
    Case("job: no classes", "classes: List should have at least 1 item", job={"classes": []}),
    Case("job: repeated class", "classes: class names must be unique", job={"classes": ["circle", "circle"]}),
    Case("job: samples typo", "samples.per_clas: unknown key (did you mean per_class?)", job={"samples": {"per_clas": 3}}),
    Case("job: shard size 0", "output.shard_size:", job={"output": {"shard_size": 0}}),
    Case("job: shard not whole batches", "output.shard_size: 5 is not a multiple", job={"output": {"shard_size": 5}}),
    Case("job: height not /8", "generation.height: must be a multiple of 8", job={"generation": {"height": 60}}),
    Case("job: negative guidance", "generation.guidance_scale", job={"generation": {"guidance_scale": -1}}),
    Case("job: unknown scheduler", "generation.scheduler", job={"generation": {"scheduler": "heun"}}),
    Case("job: float16 on cpu", "model.dtype: float16 on device cpu", job={"model": {"dtype": "float16"}}),
    Case("job: cuda without a GPU", "resources.synthesis.num_gpus", job={"model": {"device": "cuda"}}),
    Case("job: GPU for masks", "resources.masks.num_gpus", job={"resources": {"masks": {"num_gpus": 1}}}),
    Case("prompts: no {objects}", "prompts.templates: template 'a photo' must contain '{objects}'",
         job={"prompts": {"templates": ["a photo"]}}),
    Case("prompts: {objects} twice", "prompts.templates: template '{objects} and {objects}' must contain '{objects}' "
         "exactly once", job={"prompts": {"templates": ["{objects} and {objects}"]}}),
    Case("prompts: template padded", "prompts.templates[1]: has leading or trailing whitespace",
         job={"prompts": {"templates": ["{objects}", "{objects} on noise "]}}),
    Case("prompts: min > max", "prompts: min_classes_per_image (3) is larger",
         job={"prompts": {"min_classes_per_image": 3, "max_classes_per_image": 2}}),
    Case("prompts: max > classes", "prompts.max_classes_per_image: 5 is more than the 4 classes",
         job={"prompts": {"max_classes_per_image": 5}}),
    Case("prompts: embedding weight", "prompts.embedding: weight [0.2, 0.7] must be",
         job={"prompts": {"embedding": {"mode": "interpolate", "weight": [0.2, 0.7]}}}),
    Case("masks: step window reversed", "masks: step_window [0.8, 0.2]", job={"masks": {"step_window": [0.8, 0.2]}}),
    Case("masks: calibrated, no thresholds", "masks.class_thresholds: threshold is 'calibrated'",
         job={"masks": {"threshold": "calibrated"}}),
    Case("labels: removed section", "labels: this section was removed",
         job={"labels": {"semantic": True, "instances": True, "boxes": True}}),
    Case("masks: calibration file missing", "nope.json does not exist (a relative path in a job file resolves",
         job={"masks": {"calibration": "nope.json"}}),
    Case("references: folder missing", "references.path: ", job={"references": {"path": "no-refs", "strengths": [0.5]},
                                                                "samples": 5}),
    # class words
    Case("class: 300-character name", ("classes[0].name: class 'xxxx", "up to 305 tokens", "limit of 24"),
         job={"classes": [LONG, "square"]}),
    Case("class: blank name", "classes[1].name: must not be empty or only whitespace",
         job={"classes": ["circle", "   "]}),
    Case("class: name with a leading space", "classes[0].name: has leading or trailing whitespace; write 'circle'",
         job={"classes": [" circle", "square"]}),
    Case("class: blank synonym", "classes[0].synonyms[1]: must not be empty",
         job={"classes": [{"name": "circle", "synonyms": ["ring", " "]}, "square"]}),
    Case("class: attribute with a trailing space", "classes[0].attributes[0]: has leading or trailing whitespace",
         job={"classes": [{"name": "circle", "attributes": ["red "]}, "square"]}),
    Case("class: unknown word 猫", ("classes[0].name: '猫' has characters the model's tokenizer does not know",
                                   "'<|endoftext|>'"), job={"classes": ["猫", "square"]}),
    Case("class: unknown word é", "classes[1].name: 'é' has characters", job={"classes": ["circle", "é"]}),
    Case("class: synonym café", ("classes[0].synonyms[0]: 'café'", "does not know ('é')"),
         job={"classes": [{"name": "circle", "synonyms": ["café"]}, "square"]}),
    Case("class: attribute '.'", "classes[0].attributes[0]: '.' has characters",
         job={"classes": [{"name": "circle", "attributes": ["."]}, "square"]}),
    Case("class: too many per prompt", ("prompts.max_classes_per_image: 2 classes per image make prompts of up to 25 "
                                       "tokens", "limit of 24"),
         job={"classes": [{"name": "circle", "synonyms": [Q9]}, {"name": "square", "synonyms": [Q9]}]}),
    Case("prompts: template too long", ("prompts.templates[0]: this template makes 29-token prompts with a single class", "limit of 24"),
         job={"prompts": {"templates": [LONG_TEMPLATE]}}),
    # model folders
    Case("model: folder missing", "model.path: local model folder", job={"model": {"path": "./no/such/model"}}),
    Case("model: no model_index.json", "model.path: ", model=remove("model_index.json")),
    Case("model: model_index.json broken", ("model.path: ", "model_index.json is not readable JSON"),
         model=write("model_index.json", "{not json")),
    Case("model: unknown _class_name", ("model.path: ", "_class_name 'KandinskyV22Pipeline', which synthgen does not "
                                        "support; supported: StableDiffusionPipeline (sd)",
                                        "StableDiffusionXLPipeline (sdxl)"),
         model=edit_json("model_index.json", _class_name="KandinskyV22Pipeline")),
    # model families (stages/families/; random-weight models of tests/family_models.py)
    Case("family: override contradicts the folder", ("model.family: ", "model.family is 'sdxl' but the folder's "
                                                     "model_index.json names 'StableDiffusionPipeline'"),
         job={"model": {"family": "sdxl"}}),
    Case("family: sd override on an SDXL folder", ("model.family: ", "names 'StableDiffusionXLPipeline', a sdxl"),
         job={"model": {"family": "sd"}, **FAMILY_JOB}, model=family_model("sdxl")),
    Case("family: SDXL class on an SD UNet", ("model.path: ", "names 'StableDiffusionXLPipeline' (Stable Diffusion XL) "
                                              "but its unet has addition_embed_type None"),
         model=edit_json("model_index.json", _class_name="StableDiffusionXLPipeline")),
    Case("sdxl: no cross-attention at the latent grid", ("masks.capture_resolutions: no attn2 layers at resolution 8; "
                                                         "this UNet has {4: 3, 2: 8}", "at a 8×8 latent"),
         job={"masks": {"capture_resolutions": [8]}}, model=family_model("sdxl")),
    Case("sd2: level the model lacks", ("masks.capture_resolutions: no attn2 layers at resolution 1/16",
                                        "{'1': 3, '1/2': 3, '1/4': 3, '1/8': 1}"),
         job={"masks": {"capture_resolutions": ["1/16"]}}, model=family_model("sd2")),
    Case("sdxl: prompt over tokenizer_2's limit", ("prompts.max_classes_per_image: 2 classes per image make prompts",
                                                   "over the tokenizer (tokenizer_2)'s limit of 8",
                                                   "model_max_length in model/tokenizer_2"),
         job=FAMILY_JOB, model=family_model("sdxl", edit_json("tokenizer_2/tokenizer_config.json", model_max_length=8))),
    Case("sdxl: class word unknown to tokenizer_2", ("classes[0].name: '猫' has characters the model's tokenizer",
                                                     "does not know"),
         job={"classes": ["猫", "square"], **FAMILY_JOB},
         model=family_model("sdxl", copy_dir(REPO / "pipeline/models/shapes-tiny-sd/tokenizer", "tokenizer_2"))),
    Case("sdxl: text_encoder_2 as .bin only", ("model.path: component text_encoder_2 has only pytorch_model.bin; "
                                               "safetensors are required"),
         job=FAMILY_JOB, model=family_model("sdxl", rename("text_encoder_2/model.safetensors",
                                                           "text_encoder_2/pytorch_model.bin"))),
    Case("model: unet as .bin only", ("model.path: component unet has only diffusion_pytorch_model.bin; "
                                      "safetensors are required", "safe_serialization=True"),
         model=rename(UNET_WEIGHTS, "unet/diffusion_pytorch_model.bin")),
    Case("model: fp16 variant only", "model.path: component unet has only variant weights",
         model=rename(UNET_WEIGHTS, "unet/diffusion_pytorch_model.fp16.safetensors")),
    Case("model: text encoder without weights", "model.path: component text_encoder has no weights",
         model=remove("text_encoder/model.safetensors")),
    Case("model: vae folder missing", "model.path: component vae: folder", model=remove("vae")),
    Case("model: unet weights truncated", ("model.path: component unet: ", "is not a whole safetensors file",
                                           "copy it again"), model=truncate(UNET_WEIGHTS)),
    Case("model: text encoder weights truncated", ("model.path: component text_encoder: ",
                                                   "is not a whole safetensors file"),
         model=truncate("text_encoder/model.safetensors")),
    Case("model: no scheduler listed", "model.path: ", model=edit_json("model_index.json", scheduler=[None, None])),
    Case("model: tokenizer files missing", ("model.path: the tokenizer in", "has no vocabulary"),
         model=remove("tokenizer/tokenizer.json")),
    Case("model: unet config broken", ("model.path: ", "unet/config.json is not readable JSON"),
         model=write("unet/config.json", "")),
    Case("model: unsupported unet block", ("model.path: ", "unsupported UNet down block 'SimpleCrossAttnDownBlock2D'"),
         model=edit_json("unet/config.json", down_block_types=["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                                "DownBlock2D"])),
    Case("masks: no level at 32", "masks.capture_resolutions: no attn2 layers at resolution 32; this UNet has "
         "{16: 3, 8: 3, 4: 1}", job={"masks": {"capture_resolutions": [16, 32]}}),
    Case("masks: refine without level", "masks.self_attention_resolution: refine_power 2 on a UNet model needs",
         job={"masks": {"refine_power": 2}}),
    Case("masks: no self-attention at 64", "masks.self_attention_resolution: no attn1 layers at resolution 64",
         job={"masks": {"refine_power": 1, "self_attention_resolution": 64}}),
    Case("masks: self-attention too large", ("masks.self_attention_resolution: 64 is a 64×64 grid at generation "
                                            "256×256", "too large"),
         job={"masks": {"capture_resolutions": [64], "refine_power": 1, "self_attention_resolution": 64},
              "generation": {"height": 256, "width": 256}}),
    # command line and output dirs
    Case("cli: --set without =", "--set generation.steps: expected key.sub=value", args=("--set", "generation.steps")),
    Case("cli: --set bad YAML", "--set generation.steps=[1: value is not valid YAML",
         args=("--set", "generation.steps=[1")),
    Case("cli: --set into a number", "seed: Input should be a valid integer", args=("--set", "seed.x=1")),
    Case("cli: --set past the list", "--set classes.9.name=x: classes has no item '9'",
         args=("--set", "classes.9.name=x")),
    Case("cli: --set a bad value", "generation.steps: must be at least 1 (got 0); set generation.steps to a number at least 1",
         args=("--set", "generation.steps=0")),
    Case("cli: unknown flag", "unrecognized arguments: --stepz 3 (see `synthgen validate --help`)",
         args=("--stepz", "3")),
    Case("cli: unknown subcommand", "argument command: invalid choice: 'generate'", argv=("generate", "{tmp}/x.yaml")),
    Case("cli: job argument missing", "the following arguments are required: job", argv=("validate",)),
    Case("cli: eval -n not a number", "argument -n: invalid int value: 'many'",
         argv=("eval", "{tmp}/job/job.yaml", "-n", "many")),
    Case("cli: --out is a file", "output.dir: ", args=("--out", "{tmp}/taken.txt")),
    Case("output: dir is a file", "output.dir: ", out=lambda out: out.write_text("not a folder\n")),
    Case("output: foreign non-empty dir", "output.dir: ", out=write("notes.txt", "mine\n")),
    Case("output: foreign manifest", ("output.dir: ", "not a synthgen manifest"),
         out=write("manifest.json", MANIFEST_OTHER)),
    Case("output: inside a pseudo-filesystem", ("output.dir: no such file or directory in /proc/synthgen-out (to be made in /proc): it cannot be written; "
                                                "fix the directory",
                                                "choose another output dir"), args=("--out", "/proc/synthgen-out")),
    Case("output: bare ~ in the job file", "output.dir: is null (YAML reads a bare ~ as null); write the path in quotes",
         job={"output": {"dir": None}}),
    Case("cli: --set output.dir=~ is the home folder", ("output.dir: ", "is not empty and is not a synthgen output"),
         args=("--set", "output.dir=~")),
    Case("class: newline inside a name", "classes[0].name: holds the control character '\\n' at position 3",
         job={"classes": ["cir\ncle", "square"]}),
    Case("class: tab inside an attribute", "classes[1].attributes[0]: holds the control character '\\t'",
         job={"classes": ["circle", {"name": "square", "attributes": ["re\td"]}]}),
    Case("job: 10**12 samples", ("samples: 1000000000000 samples in shards of 4 make 250000000000 shards, over the "
                                 "limit of 1000000", "raise output.shard_size to at least 1000000"),
         args=("--set", "samples=1000000000000")),
    # the judge (stages/judges.py)
    Case("judge: folder missing", ("judge.path:", "does not exist (a relative path in a job file resolves"),
         job={"judge": {"path": "../nowhere"}}),
    Case("judge: folder missing, from --set", ("judge.path:", "does not exist (set on the command line: a "
                                               "relative path there resolves against the current directory)"),
         args=("--set", "judge.path=nowhere")),
    Case("model: folder missing, section from --set", ("model.path:", "/nowhere does not exist (set on the command "
                                                       "line"), args=("--set", "model={path: nowhere}")),
    Case("judge: weights of another shape", ("judge.path", "its weights must match its config.json"), job=JUDGE,
         model=judge_folder(edit_json("judge/config.json", hidden_sizes=[16, 32, 64, 96]))),
    Case("judge: no weights", ("judge.path", "no model.safetensors"), job=JUDGE,
         model=judge_folder(remove("judge/model.safetensors"))),
    Case("judge: other class names", ("judge.path", "does not name the job's class(es) ['star']"), job=JUDGE,
         model=judge_folder(edit_json("judge/config.json", id2label={"0": "circle", "1": "square", "2": "triangle",
                                                                      "3": "hexagon", "4": "ring", "5": "cross"}))),
    Case("judge: labels for a class the job lacks", "judge.labels: ['hexagon'] are not classes of this job",
         job={"judge": {"path": "../model/judge", "labels": {"hexagon": "star"}}}, model=judge_folder()),
    Case("judge: clip kind on a classifier's folder", ("judge.path", "is a 'resnet' model, not 'clip'"),
         job={"judge": {"kind": "clip", "path": "../model/judge"}}, model=judge_folder()),
    Case("judge: a label the classifier lacks", "judge.labels: maps 'circle' to 'hexagon', a label the classifier",
         job={"judge": {"path": "../model/judge", "labels": {"circle": "hexagon"}}}, model=judge_folder()),
    Case("judge: the oracle on classes outside the shapes world", "judge: kind shapes-oracle reads only the shapes",
         job={"judge": {"kind": "shapes-oracle"}, "classes": ["circle", "dog"]}),
    Case("judge: classifier without a path", "judge: kind classifier needs path", job={"judge": {"min_score": 0.5}}),
]
BY_ID = {case.id: case for case in CASES}
assert len(BY_ID) == len(CASES) >= 40


def snapshot(*roots: Path) -> list[tuple[str, int, int]]:
    """Every file and folder under ``roots``: (path, size, mtime_ns)."""
    out = []
    for root in roots:
        for p in sorted([root, *root.rglob("*")]) if root.exists() else []:
            st = p.stat()
            out.append((str(p), st.st_size if p.is_file() else 0, st.st_mtime_ns))
    return out


def prepare(case: Case, tmp: Path, tiny_model: str) -> tuple[list[str], Path, list[Path]]:
    """(command line, job output dir, folders that must stay as they are) of a case."""
    model = Path(tiny_model)
    if case.model is not None:
        model = tmp / "model"
        shutil.copytree(tiny_model, model)
        case.model(model)
    job_dir = tmp / "job"
    if case.text is not None:
        job_dir.mkdir()
        (job_dir / "job.yaml").write_text(case.text.replace("{model}", str(model)))
        job = job_dir / "job.yaml"
    else:
        sections = copy.deepcopy(case.job)
        job_name = sections.pop("name", None)  # write_job's own `name` is the file name
        job = write_job(job_dir, str(model), **sections)
        if job_name is not None:
            job.write_text(yaml.safe_dump({**yaml.safe_load(job.read_text()), "name": job_name}, sort_keys=False))
    (tmp / "taken.txt").write_text("a file where an output dir could go\n")
    out = job_dir / "out"
    if case.out is not None:
        if case.out.__name__ == "<lambda>":
            case.out(out)
        else:
            out.mkdir()
            case.out(out)
    if case.argv is not None:
        argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    else:
        argv = [case.command, str(job), *(a.replace("{tmp}", str(tmp)) for a in case.args)]
    return argv, out, [tmp, model]


def assert_rejected(argv: list[str], case: Case, watched: list[Path], capsys) -> str:
    before = snapshot(*watched)
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, (code, err)
    assert err.startswith("synthgen: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    for part in (case.expect,) if isinstance(case.expect, str) else case.expect:
        assert part in err, f"{part!r} not in {err!r}"
    assert captured.out == ""
    assert not ray.is_initialized()
    assert snapshot(*watched) == before, "something was written"
    return err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_before_ray_and_writes_nothing(case, tmp_path, tiny_model, capsys):
    argv, _, watched = prepare(case, tmp_path, tiny_model)
    err = assert_rejected(argv, case, watched, capsys)
    if not case.id.startswith("cli:"):
        assert str(Path(argv[1])) in err  # job errors name the job file


#: every case of the table that names a job: `run` refuses each one as `validate` does (no case is accepted by
#: one and refused by the other)
BOTH = [c.id for c in CASES if c.argv is None and c.command == "validate" and "--stepz" not in c.args]


@pytest.mark.parametrize("case_id", BOTH)
def test_run_rejects_what_validate_rejects(case_id, tmp_path, tiny_model, capsys):
    case = BY_ID[case_id]
    argv, out, watched = prepare(case, tmp_path, tiny_model)
    assert argv[0] == "validate"
    assert_rejected(["run", *argv[1:]], case, watched, capsys)  # run with Ray: it would start it after the checks
    assert case.out is not None or not out.exists()


@pytest.mark.parametrize("case_id", ["model: unet as .bin only", "class: 300-character name"])
def test_eval_and_submit_run_the_same_checks(case_id, tmp_path, tiny_model, capsys):
    case = BY_ID[case_id]
    argv, _, watched = prepare(case, tmp_path, tiny_model)
    assert_rejected(["eval", argv[1], "--json", str(tmp_path / "eval.json")], case, watched, capsys)
    submit = ["submit", argv[1], "--address", "http://127.0.0.1:1", "--working-dir", str(tmp_path),
              "--out", "/mnt/cluster/out"]
    assert_rejected(submit, case, watched, capsys)


@pytest.mark.parametrize("case_id", ["class: unknown word é", "model: unet as .bin only"])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_the_console_command_exits_2_with_one_line(case_id, command, tmp_path, tiny_model):
    argv, out, watched = prepare(BY_ID[case_id], tmp_path, tiny_model)
    before = snapshot(*watched)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", command, *argv[1:]], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("synthgen: error: "), proc.stderr
    assert snapshot(*watched) == before


# --- the checks themselves, on good input ----------------------------------------------------------
def test_the_shipped_demo_job_passes_every_check(capsys):
    assert main(["validate", str(REPO / "jobs" / "shapes-demo.yaml")]) == 0
    assert capsys.readouterr().out.startswith("ok: job 'shapes-demo'")


def test_the_fast_tokenizer_path_gives_the_samplers_ids(tiny_model, tmp_path):
    """Pre-flight reads tokenizer.json with `tokenizers` directly; the sampler uses transformers' CLIPTokenizer,
    on tokenizer.json or (real SD folders) vocab.json + merges.txt, which pre-flight then loads the same way."""
    where = Path(tiny_model) / "tokenizer"
    data = json.loads((where / "tokenizer.json").read_text())
    bpe = tmp_path / "tokenizer"  # the same vocabulary as vocab.json + merges.txt
    bpe.mkdir()
    (bpe / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (bpe / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    shutil.copy(where / "tokenizer_config.json", bpe)
    fast, clip, from_bpe = preflight._fast_tokenizer(where), preflight._clip_tokenizer(where), \
        preflight.load_tokenizer(bpe, "job")
    assert fast is not None and preflight._fast_tokenizer(bpe) is None
    assert {(t.unk_token, t.unk_token_id, t.model_max_length) for t in (fast, clip, from_bpe)} == \
           {("<|endoftext|>", 1, 24)}
    texts = ["circle", "a purple triangle and a yellow square on stripes", "猫", "é", "café", ".", "Circle!!",
             LONG, "traffic light", "a  red\tstar", "<|endoftext|>", "12 3", "\u200b", ""]
    for text in texts:
        for special in (False, True):
            assert fast.ids(text, special) == clip.ids(text, special) == from_bpe.ids(text, special), text


def test_the_longest_prompt_is_the_longest_the_sampler_builds(tiny_model, tmp_path):
    """The computed worst case bounds every sampled prompt and is reached (distinct single-token colours)."""
    from stages.sampling import SamplingStage, stable_seed

    spec = load_spec(write_job(tmp_path, tiny_model, classes=[
        {"name": "circle", "synonyms": ["disc"], "attributes": ["red", "blue"]},
        {"name": "square", "attributes": ["green"]}, {"name": "star", "synonyms": ["starry"]},
        "triangle"], prompts={"templates": ["{objects}", "{objects} on stripes"], "max_classes_per_image": 3}))
    tokenizer = preflight.load_tokenizer(Path(tiny_model) / "tokenizer", "job")
    slots, count = preflight.longest_prompts(spec, tokenizer)
    worst, _, prompt = preflight._fill(tokenizer, list(spec.prompts.templates),
                                       sorted(slots, key=lambda s: -s.tokens)[:count])
    stage = SamplingStage(spec)
    sampled = [len(tokenizer.ids(stage.compose(stable_seed(spec.seed, i))[0], True)) for i in range(3000)]
    assert max(sampled) == worst == 19, (max(sampled), worst, prompt)


def test_a_prompt_at_the_limit_passes_and_one_token_more_fails(tmp_path, tiny_model):
    # '{objects}' + 'a qqq..q' with BOS/EOS: 1 + 1 + n + 1 tokens; the limit is 24
    fits = write_job(tmp_path, tiny_model, classes=["q" * 21, "square"],
                     prompts={"templates": ["{objects}"], "max_classes_per_image": 1})
    load_spec(fits)
    over = write_job(tmp_path, tiny_model, name="over.yaml", classes=["q" * 22, "square"],
                     prompts={"templates": ["{objects}"], "max_classes_per_image": 1})
    with pytest.raises(preflight.SpecError, match=r"classes\[0\]\.name: .* up to 25 tokens .* limit of 24"):
        load_spec(over)


def test_a_word_that_becomes_no_token_is_refused():
    """A tokenizer that drops a word entirely (CLIP's text cleaning can) leaves nothing for a mask to follow."""
    spec = validate_spec(dict(TINY_JOB, model={"path": "org/m"}, classes=["circle", "ghost"]))
    drops = preflight.Tokenizer(lambda text, special: [] if "ghost" in text else [5], "<unk>", 1, 77)
    with pytest.raises(preflight.SpecError, match=r"job: classes\[1\]\.name: 'ghost' becomes no token"):
        preflight.check_words(spec, drops, "job")


def test_a_resumable_output_dir_passes(tmp_path, tiny_model, capsys):
    job = write_job(tmp_path, tiny_model)
    (tmp_path / "out").mkdir()
    for name in ("shards", "parts"):  # a synthgen output that lost its manifest: `synthgen repair` adopts it
        (tmp_path / "out" / name).mkdir()
    assert main(["validate", str(job)]) == 0, capsys.readouterr().err


def test_offline_a_hub_model_missing_from_the_cache_is_one_line_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # an empty cache
    job = write_job(tmp_path, "org/not-downloaded")
    out = tmp_path / "out"
    for command in ("validate", "run"):
        assert main([command, str(job), "--out", str(out)]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and "model.path: hub model org/not-downloaded is not in the local Hugging Face cache" \
            in lines[0] and "hf download org/not-downloaded" in lines[0], lines
        assert not out.exists()


def test_run_of_a_hub_model_the_hub_cannot_serve_is_one_line_before_anything(tmp_path, monkeypatch, capsys):
    """Not cached, not offline, and the hub unreachable (here: a closed port on 127.0.0.1): run says so at once,
    exit 2, nothing written, no Ray (the workers would retry the download for minutes)."""
    import socket

    import huggingface_hub.constants

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: connection refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    job = write_job(tmp_path, "org/not-downloaded")
    out = tmp_path / "out"
    assert main(["run", str(job), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.path: hub model org/not-downloaded is not in the local Hugging Face cache and " \
        "the hub cannot be reached" in lines[0] and "hf download org/not-downloaded" in lines[0], lines
    assert not out.exists() and not ray.is_initialized()
    assert main(["validate", str(job), "--out", str(out)]) == 0  # the same check, as a warning
    captured = capsys.readouterr()
    assert captured.out.startswith("ok: ") and captured.err.startswith("warning: model.path: hub model "
                                                                       "org/not-downloaded is not in the local")


def test_one_path_rule_relative_paths_resolve_against_the_job_files_folder(tmp_path, tiny_model, monkeypatch,
                                                                           capsys):
    """A relative model.path is looked for beside the job file, never in the current directory; only an org/name
    that exists nowhere is a hub id; every case is one line and exit 2, for validate and run alike."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model, tmp_path / "models" / "my-sd")
    (tmp_path / "jobs").mkdir()
    cases = {  # model.path as the job file (in jobs/) writes it -> words of the line
        "models/my-sd": ("local model folder", "jobs/models/my-sd does not exist",
                         "models/my-sd exists relative to the current directory, but a relative path in a job file "
                         "resolves against the job file's folder"),
        "pipeline/models/shapes-tiny-sd": ("local model folder", "jobs/pipeline/models/shapes-tiny-sd does not exist"),
        "./my-sd": ("local model folder", "jobs/my-sd does not exist"),
    }
    for path, words in cases.items():
        job = write_job(tmp_path / "jobs", path)
        for command in ("validate", "run"):
            assert main([command, str(job), "--out", str(tmp_path / "out")]) == 2, (path, command)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and all(w in err for w in words), err
    assert not (tmp_path / "out").exists() and not ray.is_initialized()
    job = write_job(tmp_path / "jobs", "../models/my-sd")  # relative to the job file: found from anywhere
    monkeypatch.chdir(tmp_path / "models")
    assert main(["validate", str(job), "--out", str(tmp_path / "out")]) == 0
    assert f"model {tmp_path / 'models' / 'my-sd'} (cpu" in capsys.readouterr().out


def test_validate_refuses_an_output_dir_of_another_spec_as_run_does(dataset, capsys):
    """validate runs the writer's own check (ownership and fingerprint), writing nothing."""
    before = sorted(p.name for p in dataset.out.iterdir())
    assert main(["validate", str(dataset.job)]) == 0
    assert "resumes: 4 of 4 shards committed" in capsys.readouterr().out
    assert main(["validate", str(dataset.job), "--set", "seed=8"]) == 2
    assert "holds a dataset of a different job or spec (seed: 3 → 8)" in capsys.readouterr().err
    assert sorted(p.name for p in dataset.out.iterdir()) == before


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the machine has a GPU")
def test_no_ray_on_a_gpu_less_machine_refuses_a_cuda_job(tmp_path, tiny_model, capsys):
    """``--no-ray`` runs the synthesis in this process: ``model.device: cuda`` without a GPU is one line, exit 2,
    before the model loads and with nothing written (validate passes it: a cluster may have the GPUs)."""
    case = Case("run --no-ray: cuda without a GPU", ("model.device: cuda", "no GPU", "model.device: auto"),
                job={"model": {"device": "cuda"}, "resources": {"synthesis": {"num_cpus": 1, "num_gpus": 1}}},
                args=("--no-ray",), command="run")
    argv, out, watched = prepare(case, tmp_path, tiny_model)
    assert main(["validate", argv[1]]) == 0
    capsys.readouterr()
    assert_rejected(argv, case, watched, capsys)
    assert not out.exists()


def test_a_size_far_from_the_models_native_one_is_one_warning_at_validate_and_run(tmp_path, tiny_model, monkeypatch,
                                                                                   capsys):
    import pipeline.runner

    job = write_job(tmp_path, tiny_model, generation={"height": 512, "width": 512},
                    masks={"capture_resolutions": ["1/2", "1/4"]})
    warning = "warning: generation: 512×512 is far from the model's native 64×64 (unet sample_size 16 × the VAE's " \
              "factor 4): expect poor drawings and long runs; set generation.height and width near 64"
    assert main(["validate", str(job)]) == 0
    assert capsys.readouterr().err == warning + "\n"

    def stop(*args, **kwargs):
        raise pipeline.spec.UsageError("stopped before any work")

    monkeypatch.setattr(pipeline.runner, "run_job", stop)
    assert main(["run", str(job)]) == 2
    assert capsys.readouterr().err.splitlines()[0] == warning
    assert main(["validate", str(write_job(tmp_path, tiny_model, name="native.yaml"))]) == 0  # 64²: no warning
    assert capsys.readouterr().err == ""
