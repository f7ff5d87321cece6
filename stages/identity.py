"""Identity of a job's inputs by content and by the name the user gave them, never by location.

``public_path(given)`` is how a dataset names a path (model folder, reference folder, output dir):
as the user wrote it when relative (or a hub id), only its last component when absolute or
``~``-based, so no local location leaks into samples or manifests and two checkouts of the same
job write the same bytes.

``model_identity(model, name)`` is a model by content: the sha256 of its weights, configs and
tokenizer files (relative names) and one combined ``id``; the synthesis stage records
``short_id`` of it in every sample, the job fingerprint takes the whole ``id``.

``sha256_file(path)`` hashes a file's bytes. ``cached_sha256(path)`` returns the same digest but
remembers it in ``$XDG_CACHE_HOME/synthgen/sha256.json`` (default ``~/.cache/synthgen``) keyed by
the file's resolved path, size and ``mtime_ns``, so a rerun of a job on a multi-GB checkpoint
costs a ``stat`` per file instead of reading the weights again. A file modified within
``RACY_S`` seconds before it is hashed is not cached (its mtime could repeat after an edit in
the same clock tick, as with git's "racily clean" index entries). An unwritable cache only costs
the hashing again; the cache holds local paths but never travels into a dataset.

Must not: import pipeline/ (stages stay importable on their own) or torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path, PurePosixPath
from typing import Any

CACHE_NAME = "sha256.json"
RACY_S = 2.0  # files younger than this are hashed every time
_memory: dict[str, tuple[int, int, str]] = {}  # resolved path -> (size, mtime_ns, digest), this process


def public_path(given: str) -> str:
    """A path as a dataset records it: relative ones (and hub ids) as written, normalised
    ('./models/x/' -> 'models/x'); absolute or '~' ones as their last component ('/data/sd15' -> 'sd15')."""
    if "://" in given:  # a URI (s3://bucket/prefix): as written; one with credentials is refused before this
        return given
    text = given.replace(os.sep, "/")
    if text.startswith("~") or os.path.isabs(given):
        return PurePosixPath(os.path.normpath(os.path.expanduser(given)).replace(os.sep, "/")).name or text
    return PurePosixPath(os.path.normpath(text)).as_posix()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_file() -> Path:
    """Where digests are cached: ``$XDG_CACHE_HOME/synthgen/sha256.json`` (``~/.cache`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "synthgen" / CACHE_NAME


def _load(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(path: Path, entries: dict[str, tuple[int, int, str]]) -> None:
    """Merge ``entries`` into the cache file (tmp + replace; concurrent writers lose entries, never data)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load(path)
        data.update({k: list(v) for k, v in entries.items()})
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # read-only home: every run hashes again


#: content-keyed checks that passed on this machine (``passed_before`` / ``remember_pass``), beside the digests
CHECKS_NAME = "checks.json"


def passed_before(key: str) -> bool:
    """Whether a check keyed by content (a judge folder's weights against its config, keyed by its digest) passed
    here before: pre-flight then skips the check's imports. Only passes are remembered; a failure is always
    checked again."""
    return key in _load(cache_file().with_name(CHECKS_NAME))


def remember_pass(key: str) -> None:
    _save(cache_file().with_name(CHECKS_NAME), {key: ("ok",)})


def cached_sha256_many(paths: list[Path]) -> dict[Path, str]:
    """{path: sha256} of ``paths``, from the cache where size and mtime_ns still match."""
    started = time.time_ns()
    store = cache_file()
    disk: dict[str, list] | None = None
    out, fresh = {}, {}
    for path in paths:
        real = os.path.realpath(path)
        st = os.stat(real)
        key = (st.st_size, st.st_mtime_ns)
        entry = _memory.get(real)
        if entry is None or entry[:2] != key:
            if disk is None:
                disk = _load(store)
            entry = tuple(disk.get(real, ()))
        if len(entry) == 3 and tuple(entry[:2]) == key:
            digest = str(entry[2])
        else:
            digest = sha256_file(real)
            if st.st_mtime_ns >= started - int(RACY_S * 1e9):
                out[path] = digest  # racy: neither cached nor remembered
                continue
            fresh[real] = (*key, digest)
        _memory[real] = (*key, digest)
        out[path] = digest
    if fresh:
        _save(store, fresh)
    return out


def cached_sha256(path: str | os.PathLike) -> str:
    """``sha256_file(path)``, cached by (resolved path, size, mtime_ns); see the module docstring."""
    return cached_sha256_many([Path(path)])[Path(path)]


def digest_of(mapping: dict[str, str]) -> str:
    """One sha256 over a {name: digest} mapping (sorted names), e.g. a model's combined id."""
    return hashlib.sha256(json.dumps(mapping, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- models ---------------------------------------------------------------------------------------
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
EXPECTED = "expected a local Stable Diffusion folder (containing model_index.json) or a Hugging Face hub id"


def local_folder(model: str) -> Path | None:
    """The model's local folder, None for a hub id; raises for a missing or malformed local path."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{str(path)!r} has no model_index.json: {EXPECTED}")
        return path
    if not HUB_ID.match(model) or model.startswith((".", "~")):
        raise FileNotFoundError(f"model path {model!r} does not exist: {EXPECTED}")
    return None


#: tokenizer files (CLIP BPE, SentencePiece, fast tokenizers) hashed into a model's identity
TOKENIZER_FILES = frozenset({"vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                             "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                             "special_tokens_map.json", "added_tokens.json"})


def model_files(folder: Path) -> dict[str, dict[str, Path]]:
    """The files that make a diffusers folder the model it is, by kind (relative posix name -> path):
    ``weights`` (*.safetensors), ``tokenizer`` (``TOKENIZER_FILES``, or .json/.txt/.model in a
    ``tokenizer*`` folder) and ``configs`` (model_index.json, other *.json) of the components that
    model_index.json names. Other files (model card, training notes, .bin weights) are not identity."""
    index = json.loads((folder / "model_index.json").read_text())
    components = sorted(k for k, v in index.items()
                        if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None)
    kinds: dict[str, dict[str, Path]] = {"weights": {}, "configs": {"model_index.json": folder / "model_index.json"},
                                         "tokenizer": {}}
    for component in components:
        for path in sorted((folder / component).rglob("*")):
            if not path.is_file():
                continue
            name = path.relative_to(folder).as_posix()
            if path.suffix == ".safetensors":
                kinds["weights"][name] = path
            elif path.name in TOKENIZER_FILES or (component.startswith("tokenizer")
                                                   and path.suffix in (".json", ".txt", ".model")):
                kinds["tokenizer"][name] = path
            elif path.suffix == ".json":
                kinds["configs"][name] = path
    return kinds


def _content(folder: Path) -> dict[str, Any]:
    """sha256 of each identity file (cached by path, size, mtime_ns) and the combined ``id``."""
    kinds = model_files(folder)
    digests = cached_sha256_many([p for files in kinds.values() for p in files.values()])
    out: dict[str, Any] = {kind: {name: digests[p] for name, p in files.items()} for kind, files in kinds.items()}
    out["id"] = digest_of({name: d for kind in kinds for name, d in out[kind].items()})
    return out


def model_identity(model: str, name: str | None = None) -> dict[str, Any]:
    """What the manifest records about a model, by content and by name, never by location:

    ``model``: ``name`` (the path as the user gave it, see ``public_path``;
    default: ``public_path(model)``); ``weights`` / ``configs`` / ``tokenizer``: {relative file:
    sha256}; ``id``: one sha256 over all of them. A hub id also records the cached snapshot's
    ``revision``; when it is not cached yet, only the id is known (``id`` None).
    """
    name = public_path(model) if name is None else name
    folder = local_folder(model)
    if folder is not None:
        return {"source": "local", "model": name, **_content(folder)}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "model_index.json")
    if not isinstance(cached, str):  # not in the local cache: only the id is known
        return {"source": "hub", "model": name, "revision": None, "id": None, "weights": {}, "configs": {},
                "tokenizer": {}}
    snapshot = Path(cached).parent  # .../snapshots/<commit>/model_index.json
    return {"source": "hub", "model": name, "revision": snapshot.name, **_content(snapshot)}


#: the files that make a judge folder (stages/judges.py) the classifier it is
JUDGE_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
               "vocab.json", "merges.txt", "special_tokens_map.json")


def judge_identity(folder: str | Path) -> str:
    """One sha256 over a judge folder's ``JUDGE_FILES`` (the ones it has): the judge by content."""
    paths = {name: Path(folder) / name for name in JUDGE_FILES if (Path(folder) / name).is_file()}
    digests = cached_sha256_many(list(paths.values()))
    return digest_of({name: digests[p] for name, p in paths.items()})


def short_id(identity: dict[str, Any]) -> str | None:
    """The first 16 hex digits of a model identity's ``id`` (what each sample's ``gen`` records)."""
    return identity["id"][:16] if identity.get("id") else None
