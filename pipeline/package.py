"""What ``synthgen submit`` sends to a Ray cluster: an allowlist of files, staged into a fresh folder.

The package holds exactly:

- the job file;
- of each input the job names inside the working dir, the files the stages read from it, never the
  folder around them:

  - ``model.path`` (a local folder): the model's own files as its identity counts them
    (``stages.identity.model_files``: ``model_index.json``, and in the components it lists their
    configs, ``*.safetensors`` and tokenizer files), so the cluster loads, and fingerprints, the same
    model; a model card, ``.bin`` weights or anything else in the folder stays home;
  - ``references.path``: what the reference reader opens (``stages.references``): a COCO folder's
    ``annotations.json`` and the images it lists, or a synthgen output dir's ``index.parquet``, the
    ``manifest.json`` that confirms its shard names, and the shards of its records;
  - ``judge.path``: the classifier's ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``
    (``stages.identity.JUDGE_FILES``, what the judge loads and fingerprints);
  - ``masks.calibration``, ``references.select.path``, ``model.class_tokens``: that one file;

- the project code the cluster runs: ``pyproject.toml``, ``pipeline/`` and ``stages/`` without the
  bundled models (``pipeline/models/``: a job that uses one names it, which sends that one). In a git
  checkout only the files git tracks travel (modified ones with their edits), so an untracked file
  never leaves the machine. Outside a git checkout (an unpacked release) nothing tells tracked from
  untracked, so these three code folders alone are walked, under the same exclusions and size cap;
  the working dir and input folders are never walked.

A path the job file writes relative is resolved against the job file's folder, a ``--set`` one against
the working dir (the cluster's current directory), as ``synthgen run`` does there. One that leaves the
working dir names nothing the cluster can see and is refused; an absolute one is the cluster's own
path and is not sent. A package over :data:`MAX_BYTES` is refused (Ray uploads it as one zip).

Must not: walk the working dir or an input folder and subtract a denylist (Ray's ``excludes``); send a
dotfile or anything under a dot-folder at any depth (``.env``, ``.git/``, ``.venv/``, ``.aws/``), a key or
credentials file (:data:`SECRETS`), a virtualenv, ``__pycache__``, ``*.egg-info`` or ``*.tmp``, even
where an input lists it (:func:`skipped`, the second guard); follow a link out of the working dir. It
validates no job (pipeline/spec.py and pipeline/preflight.py do; ``submit`` runs them first) and talks
to no cluster (pipeline/cli.py does).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Sequence

import yaml

from .spec import PATH_FIELDS, UsageError, given_paths, looks_local, parse_override

#: project code, relative to the working dir
CODE = ("pyproject.toml", "pipeline", "stages")
#: bundled model folders: sent only when the job names one
BUNDLED_MODELS = PurePosixPath("pipeline/models")
#: folder names never sent (besides every name starting with a dot)
SKIP_DIRS = frozenset({"__pycache__", "venv", "site-packages", "node_modules"})
#: file names (lower-cased, fnmatch) of keys and credentials, never sent wherever they are
SECRETS = ("id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks",
           "*.keystore", "credentials*", "secrets.*", "*.env")
#: the most a package may hold: Ray uploads working_dir as one zip through its GCS and refuses one of
#: 512 MiB or more (ray._private.runtime_env.packaging.GCS_STORAGE_MAX_SIZE); bigger inputs belong on
#: the cluster (an absolute path) or the hub
MAX_BYTES = 500 * 2**20


def skipped(rel: PurePosixPath) -> bool:
    """Whether a path (relative to the working dir) is one the package never holds."""
    name = rel.name.lower()
    return any(part.startswith(".") or part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts) \
        or name.endswith(".tmp") or any(fnmatch(name, pattern) for pattern in SECRETS)


@dataclass
class Package:
    """The files of a package: ``files`` maps a POSIX path relative to ``root`` to its size in bytes."""

    root: Path
    files: dict[str, int]
    #: job fields left to the cluster (absolute paths): field -> path
    cluster_paths: dict[str, str] = field(default_factory=dict)
    #: files under the code folders that git does not track, so they are not sent
    untracked: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(self.files.values())

    def top_level(self) -> list[tuple[str, int, int]]:
        """(entry, files, bytes) per top-level entry; folders end with '/'."""
        entries: dict[str, list[int]] = {}
        for rel, size in self.files.items():
            head, sep, _ = rel.partition("/")
            entry = entries.setdefault(head + "/" if sep else head, [0, 0])
            entry[0] += 1
            entry[1] += size
        return [(name, n, size) for name, (n, size) in sorted(entries.items())]

    def summary(self) -> str:
        """One line: '54 files, 16.4 MiB: jobs/ (2 files, 1.3 KiB), pipeline/ (...), pyproject.toml (929 B)'."""
        parts = [f"{name} ({files(n)}, {human(size)})" if name.endswith("/") else f"{name} ({human(size)})"
                 for name, n, size in self.top_level()]
        return f"{files(len(self.files))}, {human(self.size)}: " + ", ".join(parts)

    def listing(self) -> str:
        """Every file with its size, then the total."""
        lines = [f"{human(size):>10}  {rel}" for rel, size in sorted(self.files.items())]
        return "\n".join(lines + [f"{files(len(self.files))}, {human(self.size)} from {self.root}"])

    def stage(self, dest: Path) -> Path:
        """Hard-link (or copy, across filesystems) every file into the empty or new folder ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        for rel in sorted(self.files):
            src, dst = self.root / rel, dest / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        return dest


def human(size: int) -> str:
    """'1001 B', '3.8 KiB', '16.0 MiB'."""
    if size < 1024:
        return f"{size} B"
    value, unit = size / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def named_paths(job: Path, overrides: Sequence[str], workdir: Path) -> dict[str, tuple[str, Path]]:
    """The input files the job names: dotted field -> (value as written, folder a relative value is
    resolved against: the job file's, or the working dir for a ``--set``). The output dir is not sent."""
    found = given_paths(yaml.safe_load(job.read_text()), [parse_override(item) for item in overrides],
                        job.parent, workdir)
    return {field: found[field] for field in PATH_FIELDS if field in found and field != "output.dir"}


def _rel(path: Path, workdir: Path) -> PurePosixPath | None:
    """``path`` relative to the working dir as named (``..`` collapsed, links kept: the package holds
    the file under this name); None when it lies outside, or when it is a link that leads outside or
    into a dot-folder."""
    named = Path(os.path.normpath(os.path.abspath(path)))
    resolved = path.resolve()
    if not named.is_relative_to(workdir) or not resolved.is_relative_to(workdir) \
            or (resolved != named and skipped(PurePosixPath(resolved.relative_to(workdir).as_posix()))):
        return None
    return PurePosixPath(named.relative_to(workdir).as_posix())


def _add_tree(files: dict[str, int], top: Path, workdir: Path, what: str) -> None:
    """Every file under ``top`` (a file or folder inside the working dir) that the rules allow."""
    def add(path: Path) -> None:
        rel = _rel(path, workdir)
        if rel is None:
            raise UsageError(f"{what}: {path} links to {path.resolve()}, outside the working dir {workdir} "
                             "(or into a dot-folder), which the cluster cannot see; copy the file in its place")
        files[rel.as_posix()] = path.stat().st_size

    if top.is_file():
        add(top)
        return
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            sub = here / name
            if skipped(PurePosixPath(name)) or (sub / "pyvenv.cfg").exists():
                continue
            if sub.is_symlink():
                raise UsageError(f"{what}: {sub} is a link to a folder, which the package does not follow; "
                                 "copy the folder in its place")
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            if not skipped(PurePosixPath(name)):
                add(here / name)


def _git(workdir: Path, *args: str) -> list[str] | None:
    """``git ls-files`` output under the working dir (paths relative to it); None outside a git checkout."""
    try:
        done = subprocess.run(["git", "-C", str(workdir), "ls-files", "-z", *args, "--", *CODE],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [p for p in done.stdout.decode("utf-8", "surrogateescape").split("\0") if p]


def _is_code(rel: PurePosixPath, workdir: Path) -> bool:
    """Project code: not skipped, not a bundled model, not inside a virtualenv (a folder with pyvenv.cfg)."""
    return not skipped(rel) and not rel.is_relative_to(BUNDLED_MODELS) \
        and not any((workdir / folder / "pyvenv.cfg").exists() for folder in rel.parents[:-1])


def _add_code(package: Package, workdir: Path) -> None:
    tracked = _git(workdir, "--cached")
    if tracked is None:  # not a git checkout: the allowlisted folders under the same rules
        for name in CODE:
            if (workdir / name).exists():
                _add_tree(package.files, workdir / name, workdir, name)
        package.files = {rel: size for rel, size in package.files.items() if _is_code(PurePosixPath(rel), workdir)}
        return
    for rel in tracked:
        path = workdir / rel
        if _is_code(PurePosixPath(rel), workdir) and path.is_file() and _rel(path, workdir) is not None:
            package.files[rel] = path.stat().st_size
    package.untracked = sorted(rel for rel in _git(workdir, "--others", "--exclude-standard") or []
                               if _is_code(PurePosixPath(rel), workdir))


def model_files(folder: Path) -> list[Path]:
    """The files of a local model folder the cluster needs: those that make it the model it is
    (``stages.identity.model_files``, the one rule, which the cluster's fingerprint reads too)."""
    from stages.identity import model_files as identity_files

    kinds = identity_files(folder)
    inside = os.path.normpath(folder)
    return [path for files in kinds.values() for path in files.values()
            if Path(os.path.normpath(path)).is_relative_to(inside)]  # a component named '..' lists nothing


def reference_files(folder: Path) -> list[Path]:
    """What the reference reader opens (stages/references.py), for every reference the folder lists
    (``references.select`` is applied on the cluster): its listing (``annotations.json`` or
    ``index.parquet``) and each reference's image file or shard tar. ReferenceDataError when the folder
    is not a reference dataset."""
    from stages.references import ANNOTATIONS, INDEX, _selected

    from .dataset import JOURNAL, MANIFEST

    refs = _selected(SimpleNamespace(path=str(folder), select=None))  # the reader's own listing
    if (folder / ANNOTATIONS).is_file():
        listing = [folder / ANNOTATIONS]
    else:  # a synthgen output: its index, and the manifest (+ journal) that confirms the index's shard names
        listing = [folder / INDEX, folder / MANIFEST] + ([folder / JOURNAL] if (folder / JOURNAL).is_file() else [])
    return [*listing, *sorted({Path(ref.image) for ref in refs})]


def input_files(name: str, path: Path, source: str) -> list[Path]:
    """The files the stages read from the input ``name`` (a dotted job field) at ``path``; UsageError
    when it is not what the field names."""
    from stages.references import ReferenceDataError

    if name == "model.path":
        try:
            return model_files(path)
        except (OSError, ValueError, AttributeError) as e:  # no / unreadable / non-object model_index.json
            raise UsageError(f"{source}: model.path: {path} is not a diffusers model folder ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); point it at a save_pretrained folder"
                             ) from None
    if name == "judge.path":
        from stages.identity import JUDGE_FILES

        if not path.is_dir():
            raise UsageError(f"{source}: judge.path: {path} is not a folder; it names a transformers "
                             "image-classification folder")
        return [path / f for f in JUDGE_FILES if (path / f).is_file()]
    if name == "references.path":
        try:
            return reference_files(path)
        except ReferenceDataError as e:
            raise UsageError(f"{source}: {e}") from None
    if not path.is_file():
        raise UsageError(f"{source}: {name}: {path} is a folder; it names one file")
    return [path]


def build_package(workdir: Path, job: Path, overrides: Sequence[str] = ()) -> Package:
    """The package that runs ``job`` (a file inside ``workdir``) on a cluster. Raises UsageError (one
    line, naming the field, the file and the fix) when the job names a local file the cluster could not
    see, or one the package never holds, or when the package is over :data:`MAX_BYTES`."""
    workdir, job = workdir.resolve(), job.resolve()
    if not job.is_relative_to(workdir):
        raise UsageError(f"{job}: the job file must be inside --working-dir {workdir}")
    job_rel = PurePosixPath(job.relative_to(workdir).as_posix())
    if skipped(job_rel):
        raise UsageError(f"{job}: the job file is in a dot-folder (or a dotfile), which is never sent; "
                         "move it, e.g. under jobs/")
    package = Package(workdir, {})
    _add_code(package, workdir)
    package.files[job_rel.as_posix()] = job.stat().st_size
    for name, (value, base) in named_paths(job, overrides, workdir).items():
        if name == "model.path" and not looks_local(value, base):
            continue  # a hub id
        if value.startswith("~") or Path(value).is_absolute():
            if Path(value).expanduser().resolve().is_relative_to(workdir):
                raise UsageError(f"{job}: {name}: {value} is an absolute path inside --working-dir {workdir}, "
                                 "which the cluster unpacks elsewhere; write it relative to "
                                 f"{'the job file' if base == job.parent else 'the working dir'}")
            package.cluster_paths[name] = value
            continue
        path = base / value
        named = Path(os.path.normpath(path))
        if not named.is_relative_to(workdir):
            raise UsageError(f"{job}: {name}: {value} is {named}, outside --working-dir {workdir}, "
                             "which the cluster cannot see; move it inside the working dir (or give an absolute "
                             "path that exists on the cluster)")
        if not path.exists():
            raise UsageError(f"{job}: {name}: {path} does not exist, so it cannot be sent")
        rel = PurePosixPath(named.relative_to(workdir).as_posix())
        if skipped(rel):
            raise UsageError(f"{job}: {name}: {rel} is a dotfile, in a dot-folder or otherwise never sent "
                             "(a key or credentials file, __pycache__, venv, *.egg-info, *.tmp); move it to a "
                             "plain folder")
        for file in input_files(name, path, str(job)):
            file_rel = _rel(file, workdir)
            if file_rel is None:
                raise UsageError(f"{job}: {name}: {file} is {file.resolve()}, outside --working-dir {workdir} (or in "
                                 "a dot-folder), which the cluster cannot see; copy the file in its place")
            if skipped(file_rel):
                if name == "model.path":
                    continue  # a stray .json beside a component's files: not what the loader reads
                raise UsageError(f"{job}: {name}: {file_rel} is a dotfile, a key or credentials file or otherwise "
                                 "never sent, and the job reads it; rename it")
            package.files[file_rel.as_posix()] = file.stat().st_size
    package.files = dict(sorted(package.files.items()))
    package.untracked = [rel for rel in package.untracked if rel not in package.files]  # sent as job input
    if package.size > MAX_BYTES:
        biggest = ", ".join(f"{name} ({human(size)})" for name, _, size in
                            sorted(package.top_level(), key=lambda entry: -entry[2])[:3])
        raise UsageError(f"{job}: the package is {human(package.size)}, over submit's limit of {human(MAX_BYTES)} "
                         f"(Ray uploads it as one zip; largest: {biggest}); give big inputs (model.path, "
                         "references.path) as absolute paths on the cluster, or the model as a hub id")
    return package
