"""``synthgen``: run / submit / validate a job, inspect / preview / export-coco its output.

Bad input (command line, job file, model folder, output dir, cluster resources) is one line on stderr
and exit code 2, before Ray starts and with nothing written (pipeline/preflight.py). A failure while
running is one line and exit code 1 (``--verbose`` shows the traceback); committed shards stay valid
and rerunning the same command resumes. Every failure's line is ``synthgen: error: <Type>: <message>``
and names a log file with the full traceback (:func:`main`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import NoReturn

from . import quiet
from . import errors
from .errors import auth_error, report
from .plan import ShardPlan
from .preflight import check_hub_reachable, check_model, check_output_dir, job_warnings, model_folder
from .spec import SpecError, UsageError, load_spec


#: help of the positional OUT of the commands that read a run's output
OUT_HELP = "a run's output directory (its output.dir), or its URI (s3://bucket/prefix, gs://...)"


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job file (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job field, e.g. --set generation.steps=10 (value parsed as YAML)")
    p.add_argument("--out", help="output directory (overrides output.dir)")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad value, missing argument) are one line and exit 2, like
    every other bad input, instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="synthgen", description="Turn a text-to-image diffusion model into a "
                                     "labeled, sharded WebDataset.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate the dataset of a job (resumes an interrupted run)")
    _job_args(run)
    run.add_argument("--overwrite", action="store_true", help="replace an output dir made by a different spec "
                     "(deletes only the files its manifest names)")
    run.add_argument("--verify", action="store_true", help="also compare every committed shard's sha256 before "
                     "resuming (sizes are always compared); a shard that fails is generated again")
    run.add_argument("--address", help="Ray cluster to connect to (default: $RAY_ADDRESS, else a local Ray)")
    run.add_argument("--no-ray", action="store_true", help="run the stages in this process, without Ray")
    run.add_argument("--retries", type=int, metavar="N", help="recoveries from a lost node, actor, worker or object "
                     "within this run (overrides the job's retries, default 3; 0: stop at the first)")
    run.add_argument("--resource-timeout", type=float, default=0.0, metavar="S",
                     help="ask the autoscaler for missing CPUs/GPUs and wait up to S seconds (default: fail now)")
    run.add_argument("-v", "--verbose", action="store_true", help="show everything: library warnings, Ray's log "
                     "and per-operator progress, worker output, tracebacks")
    run.set_defaults(func=cmd_run)

    submit = sub.add_parser("submit", help="send `synthgen run` to a Ray cluster through the Ray Jobs API")
    _job_args(submit)
    submit.add_argument("--address", help="Ray dashboard address, e.g. http://head:8265 (required unless --dry-run)")
    submit.add_argument("--working-dir", default=".", help="project folder the package is taken from (default: "
                        "current directory; must contain the job file): the job file, the files the stages read "
                        "from the local inputs it names and the project code git tracks; never dotfiles, keys or "
                        "untracked code")
    submit.add_argument("--dry-run", action="store_true", help="print every file the package holds, its size "
                        "and the entrypoint; send nothing")
    submit.add_argument("--overwrite", action="store_true", help="pass --overwrite to `synthgen run` on the "
                        "cluster: replace an output dir made by a different spec (deletes only the files its "
                        "manifest names)")
    submit.add_argument("--resource-timeout", type=float, default=900.0, metavar="S",
                        help="how long the job waits for the autoscaler to add GPU workers (default 900)")
    submit.set_defaults(func=cmd_submit)

    validate = sub.add_parser("validate", help="check a job file and print what it would do")
    _job_args(validate)
    validate.set_defaults(func=cmd_validate)

    verify = sub.add_parser("verify", help="check an output dir against its manifest (sizes, sha256, index); "
                            "exit 1 on any mismatch")
    verify.add_argument("out", help=OUT_HELP)
    verify.set_defaults(func=cmd_verify)

    repair = sub.add_parser("repair", help="rebuild a lost manifest.json from the shards and index parts that agree "
                            "with the job; `synthgen run` then resumes")
    _job_args(repair)
    repair.set_defaults(func=cmd_repair)

    status = sub.add_parser("status", help="a job's progress from its manifest and journal (from any machine that "
                            "can read OUT): shards committed and pending, kept / rejected, rate, ETA, recoveries")
    status.add_argument("out", help=OUT_HELP)
    status.set_defaults(func=cmd_status)

    inspect = sub.add_parser("inspect", help="print an output dir's manifest summary and sample records")
    inspect.add_argument("out", help=OUT_HELP)
    inspect.add_argument("-n", type=int, default=3, help="sample records to show")
    inspect.set_defaults(func=cmd_inspect)

    preview = sub.add_parser("preview", help="contact sheet of samples with mask and box overlays")
    preview.add_argument("out", help=OUT_HELP)
    preview.add_argument("-o", "--output", default="preview.png", help="PNG file to write (default: preview.png)")
    preview.add_argument("-n", type=int, default=16, help="samples to draw")
    preview.set_defaults(func=cmd_preview)

    export = sub.add_parser("export-coco", help="write one COCO annotations.json for the whole dataset (with "
                            "--images: and the images, in a folder COCO tools load directly)")
    export.add_argument("out", help=OUT_HELP)
    export.add_argument("-o", "--output", help="target file (default OUT/annotations.json, with --images "
                        "DIR/annotations.json)")
    export.add_argument("--images", metavar="DIR", help="also write every kept sample's image into DIR as its COCO "
                        "file_name (DIR: new, empty or an earlier export's)")
    export.set_defaults(func=cmd_export_coco)

    evaluate = sub.add_parser("eval", help="label quality against a source of ground truth (the shapes-world oracle, "
                              "or a COCO folder of annotated images through img2img)")
    _job_args(evaluate)
    evaluate.add_argument("-n", type=int, default=200, help="held-out prompts or images (default 200)")
    evaluate.add_argument("--truth", metavar="SOURCE",
                          help="oracle (shapes-world jobs: the default) or coco:DIR (a COCO folder: each annotated "
                          "image is varied by img2img at --strength and keeps its annotations as the truth)")
    evaluate.add_argument("--strength", type=float, default=0.3,
                          help="img2img strength of --truth coco:DIR variations (default 0.3)")
    evaluate.add_argument("--json", metavar="FILE", help="also write the numbers to FILE (default: print the "
                          "table only)")
    evaluate.add_argument("--calibrate", metavar="FILE",
                          help="instead: fit per-class mask thresholds on calibration prompts and write them "
                          "to FILE, for masks.calibration")
    evaluate.set_defaults(func=cmd_eval)

    imp = sub.add_parser("import-coco", help="write a COCO folder of real images as a synthgen output dir "
                         "(records with curriculum.source = real)")
    imp.add_argument("coco", help="folder with annotations.json and the images it names")
    imp.add_argument("out", help="output directory")
    imp.add_argument("--name", default="real", help="dataset name recorded in the manifest (default: real)")
    imp.add_argument("--shard-size", type=int, default=1000)
    imp.add_argument("--split", default="train")
    imp.add_argument("--jpeg-quality", type=int, default=95)
    imp.add_argument("--overwrite", action="store_true", help="replace an output dir made from other data")
    imp.set_defaults(func=cmd_import_coco)

    tune = sub.add_parser("tune-tokens", help="tune each class name's token embeddings with the job's judge "
                          "(discriminative class tokens) and write the file model.class_tokens names")
    tune.add_argument("job", help="job file (YAML) with a classifier judge")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a job field (value parsed as YAML)")
    tune.add_argument("--tokens", metavar="FILE", help="file to write (default: the job's model.class_tokens)")
    tune.add_argument("--iterations", type=int, default=60, help="gradient steps, each on a new batch (default 60)")
    tune.add_argument("--batch", type=int, default=6, help="prompts per iteration (default 6)")
    tune.add_argument("--lr", type=float, default=0.01, help="the largest move of a token vector in one iteration "
                      "(SGD on its gradient clipped to norm 1, decaying to 0 on a cosine; default 0.01)")
    tune.add_argument("--seed", type=int, default=12345, help="the sampler's seed for the tuning prompts and noise "
                      "(default 12345; not the job's, so tuning never sees its samples)")
    tune.add_argument("--init", metavar="FILE", help="start from this class-token file's vectors (default: the "
                      "model's own)")
    tune.add_argument("--overwrite", action="store_true", help="replace an existing file")
    tune.set_defaults(func=cmd_tune_tokens)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, *([f"retries={args.retries}"] if args.retries is not None else [])]
    spec = load_spec(args.job, overrides, args.out)  # before the heavy imports: bad input fails fast
    for warning in job_warnings(spec):
        print(warning, file=sys.stderr)
    from .report import format_summary
    from .runner import run_job

    summary = run_job(spec, overwrite=args.overwrite, verify=args.verify, use_ray=not args.no_ray,
                      address=args.address or os.environ.get("RAY_ADDRESS"),
                      resource_wait_s=args.resource_timeout, verbose=args.verbose)
    print(format_summary(summary))
    print(f"output: {spec.output.dir}")
    return 0


def submission(args: argparse.Namespace) -> dict:
    """What ``synthgen submit`` sends: ``entrypoint`` (``synthgen run`` of the job inside the package),
    ``package`` (pipeline/package.py: the job, the files the stages read from its local inputs and the
    tracked code of --working-dir, staged at submit time) and ``inside`` (the output dir lies in the working
    dir: refused, except by a dry run, which warns).

    Before anything is packed the job passes the checks ``validate`` runs on every input that is on this
    machine: the model folder (pipeline/preflight.py) and the references (``check_references``); the
    calibration file is read by ``load_spec``. The output dir, a hub id and an absolute path that is not
    here are the cluster's and are left to ``run`` there. The output dir must be absolute and outside
    the working dir: the package is unpacked into a temporary folder on the cluster.
    """
    from .package import build_package
    from .spec import check_judge, check_references

    source = str(Path(args.job))
    spec = load_spec(args.job, args.overrides, args.out, check_files=False)
    if model_folder(spec) is not None and Path(spec.model.path).is_dir():
        check_model(spec, source)
    refs = spec.references
    if refs is not None and Path(refs.path).exists() and (refs.select is None or Path(refs.select.path).exists()):
        check_references(spec, source)
    if spec.judge is not None and spec.judge.path and Path(spec.judge.path).is_dir():
        check_judge(spec, source)
    workdir = Path(args.working_dir).resolve()
    job = Path(args.job).resolve()
    if not job.is_relative_to(workdir):
        raise SpecError(f"{args.job}: the job file must be inside --working-dir {workdir}")
    inside = Path(spec.output.dir).is_relative_to(workdir)
    if inside and not args.dry_run:  # a dry run lists the package and says so
        raise SpecError(f"{args.job}: output.dir {spec.output.dir} is inside the shipped working_dir, which the "
                        "cluster unpacks into a temporary folder; pass --out with an absolute path on the cluster "
                        "or a URI (s3://bucket/prefix)")
    package = build_package(workdir, job, args.overrides)
    argv = ["python", "-m", "pipeline.cli", "run", job.relative_to(workdir).as_posix()]
    for item in args.overrides:
        argv += ["--set", item]
    argv += ["--out", spec.output.dir, "--resource-timeout", f"{args.resource_timeout:g}"]
    if args.overwrite:
        argv.append("--overwrite")
    return {"entrypoint": shlex.join(argv), "package": package, "inside": inside}


def cmd_submit(args: argparse.Namespace) -> int:
    import tempfile

    if not args.address and not args.dry_run:
        raise UsageError("submit: --address is required (the Ray dashboard, e.g. http://head:8265), unless --dry-run")
    sub = submission(args)
    package = sub["package"]
    notes = [f"not sent, read on the cluster: {name} {path}" for name, path in package.cluster_paths.items()]
    if package.untracked:
        shown = ", ".join(package.untracked[:5]) + (f", ... ({len(package.untracked)} in all)"
                                                    if len(package.untracked) > 5 else "")
        notes.append(f"warning: not sent, not tracked by git: {shown}; git add them to send them")
    if args.dry_run:
        if sub["inside"]:
            notes.append("warning: the output dir is inside the working dir, which the cluster unpacks into a "
                         "temporary folder: submitting needs --out with an absolute path on the cluster or a URI")
        print(package.listing())
        print("\n".join(notes + [f"entrypoint: {sub['entrypoint']}", "dry run: nothing sent"]))
        return 0
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    print("\n".join([f"sending {package.summary()}", *notes]), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="synthgen-package-") as tmp:
        staged = package.stage(Path(tmp) / "package")  # Ray uploads this folder: exactly the package
        try:
            job_id = JobSubmissionClient(args.address).submit_job(entrypoint=sub["entrypoint"],
                                                                  runtime_env={"working_dir": str(staged)})
        except AuthenticationError as e:
            raise auth_error(args.address, str(e).splitlines()[0]) from None
    print(job_id)
    print(f"follow it with: ray job logs --follow --address {args.address} {job_id}", file=sys.stderr)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .runner import prepare

    spec = load_spec(args.job, args.overrides, args.out)  # every pre-flight check of `run` (pipeline/preflight.py)
    check_output_dir(spec, str(Path(args.job)))
    # the writer's own check of the output dir (ownership, fingerprint; writes nothing); a dir that lost its
    # manifest passes: `synthgen repair` adopts it
    batch = ""
    if spec.generation.batch_size == "auto":  # an earlier run's measurement, when this dir has one
        from .batch_size import recorded, with_batch_size

        size = recorded(spec)
        batch = f"; batch_size auto: {size}, as the first run measured" if size else \
            "; batch_size auto: measured where the synthesis runs, at the run's start"
        spec = with_batch_size(spec, size) if size else spec
    writer = prepare(spec, adopt=True)
    synth = spec.resources.synthesis
    shards = ShardPlan.from_spec(spec).num_shards
    model = (f"{spec.model.path}" if model_folder(spec) is not None else
             f"{spec.model.path} (hub id: its files, tokenizers and capture levels are checked when the workers "
             "download it)")
    for warning in job_warnings(spec):
        print(warning, file=sys.stderr)
    if model_folder(spec) is None:  # run makes the same check and stops (exit 2); validate warns
        try:
            check_hub_reachable(spec.model.path)
        except UsageError as e:
            print(f"warning: {e}", file=sys.stderr)
    resume = f"; resumes: {len(writer.committed)} of {shards} shards committed" if writer.committed else ""
    resume += f"; {writer.resize_note()}" if writer.resized else ""
    print(f"ok: job {spec.name!r}: {spec.samples} samples of {len(spec.classes)} classes in {shards} "
          f"shards of {spec.output.shard_size} -> {spec.output.dir}{resume}; model {model} "
          f"({spec.model.device}, {spec.model.dtype}); synthesis {synth.actors} actor(s) x {synth.num_gpus:g} GPU"
          + (f"; judge {spec.judge.kind}" + (f" {spec.judge.path}" if spec.judge.path else "")
             + f", min_score {spec.judge.min_score:g}" if spec.judge is not None else "")
          + (f"; up to {spec.generation.redraws} redraws per sample" if spec.generation.redraws else "") + batch
          + "".join(f"; {name}" for name in options_on(spec)))
    return 0


def options_on(spec) -> list[str]:
    """The speed and steering options a job turns on, as validate's ok line names them."""
    gen = spec.generation
    return [*([f"guidance_cutoff {gen.guidance_cutoff:g}"] if gen.guidance_cutoff is not None else []),
            *([f"cache_interval {gen.cache_interval}"] if gen.cache_interval is not None else []),
            *([f"excite (steps {gen.excite.steps:g}, scale {gen.excite.scale:g})"] if gen.excite is not None else []),
            *([f"early_check (step {gen.early_check.step:g}, min_score {gen.early_check.min_score:g})"]
              if gen.early_check is not None else []),
            *(["model.compile"] if spec.model.compile else []),
            *([f"class tokens {spec.given('model.class_tokens')}"] if spec.model.class_tokens is not None else [])]


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify_dataset

    result = verify_dataset(args.out)  # a path or a URI (s3://...): never Path() it
    for problem in result["problems"]:
        print(f"{args.out}: {problem}")
    if result["problems"]:
        print(f"verify: {len(result['problems'])} problem(s) in {args.out}", file=sys.stderr)
        return 1
    print(f"ok: {args.out}: {result['shards']} shards, {result['samples']} samples match the manifest (sizes, sha256, "
          "index)")
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    spec = load_spec(args.job, args.overrides, args.out)
    if spec.generation.batch_size == "auto":  # the number was the lost manifest's: the fingerprint needs it
        raise UsageError("generation.batch_size: auto, and the number the first run measured was in the lost "
                         "manifest; give it: --set generation.batch_size=N (the run printed 'generation.batch_size "
                         "auto: N')")
    from .verify import repair

    result = repair(spec)
    sets = "".join(f" --set {shlex.quote(item)}" for item in args.overrides)
    print(f"repaired {spec.output.dir}: adopted {len(result['adopted'])} shard(s) ({result['samples']} samples); "
          f"{result['pending']} shard(s) to generate: `synthgen run {args.job}{sets}"
          f"{' --out ' + args.out if args.out else ''}` resumes")
    if result["left_alone"]:
        print(f"left alone: {', '.join(result['left_alone'])}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .report import status_text

    print(status_text(args.out))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .report import inspect_text

    print(inspect_text(args.out, args.n))
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    from .report import preview

    print(preview(args.out, Path(args.output), args.n))
    return 0


def cmd_export_coco(args: argparse.Namespace) -> int:
    from .export_coco import export_coco

    print(export_coco(args.out, Path(args.output) if args.output else None,  # OUT may be a URI
                      Path(args.images) if args.images else None))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    # --calibrate writes the thresholds a calibrated job reads: the job's own calibration is not needed for it
    fit = ["masks.calibration=null", "masks.threshold=fixed"] if args.calibrate else []
    spec = load_spec(args.job, [*args.overrides, *fit], args.out)
    if args.n < 1:
        raise UsageError(f"-n {args.n}: need at least 1 prompt")
    from . import evaluate

    truth = evaluate.truth_source(args.truth, spec, args.strength)
    if args.calibrate:
        result = evaluate.calibrate(spec, args.n, truth=truth)
        evaluate.write_json(Path(args.calibrate), result)
        print(json.dumps(result["class_thresholds"]))
        weak = {c: iou for c, iou in result["calibration_iou"].items() if iou < evaluate.WEAK_CLASS_IOU}
        if weak:
            print(f"warning: the attention of {sorted(weak)} does not localise (best IoU {weak}); their masks will be "
                  "poor at any threshold: filter those samples or check the model", file=sys.stderr)
        print(f"wrote {args.calibrate}; use it with masks: {{threshold: calibrated, calibration: {args.calibrate}}}")
        return 0
    result = evaluate.evaluate(spec, args.n, truth=truth)
    print(evaluate.format_report(result))
    if args.json:
        evaluate.write_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return 0


def cmd_tune_tokens(args: argparse.Namespace) -> int:
    from .tune_tokens import TuneSettings, check, tune

    named = load_spec(args.job, args.overrides, check_files=False).model.class_tokens
    if args.tokens is None and named is None:
        raise UsageError(f"tune-tokens: {args.job} sets no model.class_tokens; give --tokens FILE (and name that "
                         "file as model.class_tokens in the job)")
    dest = Path(args.tokens or named).expanduser().absolute()
    spec = load_spec(args.job, [*args.overrides, "model.class_tokens=null"])  # every check but the file it writes
    settings = TuneSettings(args.iterations, args.lr, args.batch, args.seed)
    check(spec, settings, dest, args.overwrite)
    start = None if args.init is None else Path(args.init).expanduser().absolute()
    if start is not None:  # the checks a job naming it gets (stages/class_tokens.py)
        from .spec import check_class_tokens

        try:
            check_class_tokens(spec.model_copy(update={"model": spec.model.model_copy(
                update={"class_tokens": str(start)})}), "--init")
        except SpecError as e:
            raise UsageError(f"tune-tokens: {e}") from None
    record = tune(spec, dest, settings, start, log=lambda line: print(line, file=sys.stderr))
    first, last = record["history"][0], record["history"][-1]
    print(f"wrote {dest}: {len(spec.classes)} classes, {settings.iterations} iterations in {record['wall_s']:g} s; "
          f"judge score {first['judge_score']:.3f} -> {last['judge_score']:.3f}")
    return 0


def cmd_import_coco(args: argparse.Namespace) -> int:
    from .import_coco import import_coco

    summary = import_coco(args.coco, args.out, name=args.name, shard_size=args.shard_size, split=args.split,
                          jpeg_quality=args.jpeg_quality, overwrite=args.overwrite)
    data = summary["dataset"]
    print(f"{data['samples']} real images in {data['shards']} shards ({summary['shards_written']} written now, "
          f"{summary['skipped_unannotated']} images without annotations skipped) -> {Path(args.out).resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Every failure ends in one line, ``synthgen: error: <Type>: <message>``, and an exit code:
    2 bad input (a rerun repeats it), 1 a failure while running (a rerun resumes), 130 interrupted;
    the full traceback goes to a log file the line names (pipeline/errors.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command, verbose = "", False
    errors.on_sigterm()  # SIGTERM ends a command like Ctrl-C: one line, exit 143
    try:
        args, extra = build_parser().parse_known_args(argv)
        command, verbose = args.command, getattr(args, "verbose", False)
        if extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see `synthgen {args.command} --help`)")
        quiet.setup(verbose)  # before anything imports transformers, diffusers or Ray
        return args.func(args)
    except BrokenPipeError:  # `synthgen inspect OUT | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (Exception, KeyboardInterrupt) as e:
        return report(e, command, argv, verbose)
    except SystemExit as e:  # SIGTERM inside ray.init, whose own handler is sys.exit(SIGTERM) until ours is back
        if e.code != signal.SIGTERM:
            raise
        return report(errors.Terminated(f"signal {e.code}"), command, argv, verbose)


if __name__ == "__main__":
    sys.exit(main())
