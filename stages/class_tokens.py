"""Discriminative class tokens: each class name's token embeddings, tuned once with a judge's feedback.

``synthgen tune-tokens`` (pipeline/tune_tokens.py) writes a file; a job names it as ``model.class_tokens`` and
the synthesis stage writes its vectors into the text encoder's input embedding table before the first draw
(:func:`apply`), so every prompt that names the class is encoded with the tuned tokens.

The file is safetensors: one float32 tensor per class, (tokens of its name, the text encoder's width), the
input embeddings of the tokens the model's ``tokenizer`` makes of the class name (no BOS/EOS); its metadata
holds ``format`` (:data:`FORMAT`), ``model_id`` (the model by content, ``stages.identity.short_id``: the
vectors belong to that text encoder), ``token_ids`` (JSON {class: [ids]}), ``judge`` and ``tuning`` (JSON:
how it was made). :func:`problem` is the pre-flight check (one line each: file, classes, shapes, model).

Must not: import pipeline/ or torch at module level.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

FORMAT = "synthgen-class-tokens/1"
FIELD = "model.class_tokens"


def token_ids(tokenizer: Any, name: str) -> list[int]:
    """The ids the tokenizer makes of a class name, without BOS/EOS (what the tuned vectors replace)."""
    return list(tokenizer(name, add_special_tokens=False).input_ids)


def shared_tokens(ids: dict[str, list[int]]) -> tuple[str, str, int] | None:
    """Two classes whose names share a token (one vector cannot be tuned for both), or None."""
    owner: dict[int, str] = {}
    for name, found in ids.items():
        for i in found:
            if i in owner and owner[i] != name:
                return owner[i], name, i
            owner[i] = name
    return None


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors by class, metadata with ``token_ids``/``tuning`` parsed) of a class-token file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # header and tensors in one open
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("token_ids", "tuning"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return tensors, meta


def write(path: str | Path, tensors: dict[str, Any], model_id: str, ids: dict[str, list[int]], judge: str,
          tuning: dict) -> None:
    """Write a class-token file atomically (a temporary name beside it, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT, "model_id": model_id, "token_ids": json.dumps(ids), "judge": judge,
            "tuning": json.dumps(tuning)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().float().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def problem(spec: Any, family: Any, folder: Path | None,
            ids_of: Callable[[str], list[int]] | None = None) -> str | None:
    """Why the job's ``model.class_tokens`` cannot be used (one line: what, where, how to fix), or None.
    Reads the file's header and, for a local model ``folder``, its text-encoder config, its identity and the ids
    ``ids_of`` (its tokenizer, no BOS/EOS) gives each class name; no weights."""
    given = getattr(spec.model, "class_tokens", None)
    if given is None:
        return None
    retune = "write it with `synthgen tune-tokens JOB`"
    unfit = family.class_tokens_problem() if family is not None else None
    if unfit:
        return f"{FIELD}: {unfit}; set {FIELD}: null"
    path = Path(given)
    if not path.is_file():
        return f"{FIELD}: {given} does not exist; {retune}"
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 -- safetensors raises several kinds for a file that is not one
        return f"{FIELD}: {given} is not a safetensors file ({str(err).strip().splitlines()[0][:120]}); {retune}"
    if meta.get("format") != FORMAT:
        return f"{FIELD}: {given} is not a class-token file (format {meta.get('format')!r}, expected {FORMAT!r}); {retune}"
    try:
        ids = json.loads(meta.get("token_ids", ""))
    except ValueError:
        return f"{FIELD}: {given} has no readable token_ids; {retune}"
    classes = [c.name for c in spec.classes]
    other = [c for c in shapes if c not in classes]
    if other or set(ids) != set(shapes):
        return (f"{FIELD}: {given} holds tokens for {other or sorted(set(ids) ^ set(shapes))}, not classes of this job "
                f"({classes}); tune them for this job's classes")
    if folder is None or ids_of is None:  # a hub model: its tokenizer and width are only known to the workers
        return None
    width = json.loads((folder / "text_encoder" / "config.json").read_text()).get("hidden_size")
    for name, shape in shapes.items():
        want = list(ids_of(name))
        if ids[name] != want or shape != (len(want), width):
            return (f"{FIELD}: {given}: class {name!r} holds {shape[0]} vector(s) of width {shape[1]} for tokens "
                    f"{ids[name]}, the model's tokenizer and text encoder need {len(want)} of width {width} for "
                    f"{want}; tuned for another model? {retune}")
    from .identity import model_identity, short_id

    model_id = short_id(model_identity(str(folder)))
    if meta.get("model_id") != model_id:
        return (f"{FIELD}: {given} was tuned for model {meta.get('model_id')}, this job's model is {model_id}; "
                f"{retune}")
    return None


def digest(path: str | Path) -> str:
    """16 hex digits of the file's sha256: what each sample's ``gen`` records."""
    from .identity import cached_sha256

    return cached_sha256(path)[:16]


def apply(text_encoder: Any, tensors: dict[str, Any], ids: dict[str, list[int]]) -> None:
    """Write each class's tuned vectors into the text encoder's input embedding table, in place."""
    import torch

    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for name, vectors in tensors.items():
            table[list(ids[name])] = vectors.to(table.dtype, copy=True).to(table.device)


class Override:
    """A forward hook on the text encoder's input embeddings that puts ``vectors[name]`` where the input holds
    the class's token ids: the same numbers :func:`apply` writes, but differentiable (the tuner's path)."""

    def __init__(self, text_encoder: Any, vectors: dict[str, Any], ids: dict[str, list[int]]):
        self.vectors, self.ids = vectors, ids
        self.handle = text_encoder.get_input_embeddings().register_forward_hook(self)

    def __call__(self, module: Any, inputs: Sequence[Any], output: Any) -> Any:
        input_ids = inputs[0]
        out = output.clone()
        for name, found in self.ids.items():
            for j, token in enumerate(found):
                hit = input_ids == token
                if bool(hit.any()):
                    out[hit] = self.vectors[name][j].to(out.dtype)
        return out

    def remove(self) -> None:
        self.handle.remove()
