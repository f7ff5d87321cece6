"""The job-file reference: a markdown table generated from the config models in pipeline/spec.py.

``job_reference()`` walks ``JobSpec``'s pydantic fields recursively and renders one row per leaf
field: its dotted path, a short type (constraints included), its default and the ``Field``
description. Sections are not rows of their own, except a list of sections (``classes[]``), an
optional section (``references``) and a section whose fields all share one model
(``resources.*``, one per stage), whose rows say what the section is. The README holds the table
between ``<!-- job-reference:start -->`` and ``<!-- job-reference:end -->``; tests/test_docs.py
checks it is current, and ``python -m pipeline.jobref --write README.md`` rewrites it.

Must not: import Ray, torch or stage code; describe a field anywhere but in its ``Field``.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .spec import JobSpec

START = "<!-- job-reference:start -->"
END = "<!-- job-reference:end -->"
HEADER = ("| field | type | default | meaning |", "|---|---|---|---|")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _constraints(metadata: list) -> tuple[str, dict]:
    """Short text for numeric bounds and lengths; other facts (pattern) returned apart."""
    lo = hi = ""
    extra: dict[str, Any] = {}
    for m in metadata:
        if isinstance(m, FieldInfo):  # Annotated[int, Field(ge=1)] nests its constraints
            text, more = _constraints(m.metadata)
            extra.update(more, text=(extra.get("text", "") + " " + text).strip())
        elif isinstance(m, at.Ge):
            lo = f"≥ {_number(m.ge)}"
        elif isinstance(m, at.Gt):
            lo = f"> {_number(m.gt)}"
        elif isinstance(m, at.Le):
            hi = f"≤ {_number(m.le)}"
        elif isinstance(m, at.Lt):
            hi = f"< {_number(m.lt)}"
        elif isinstance(m, at.MinLen):
            extra["min_items"] = m.min_length
        elif getattr(m, "pattern", None):
            extra["pattern"] = m.pattern
    if lo.startswith("≥ ") and hi.startswith("≤ "):
        text = f"{lo[2:]}–{hi[2:]}"
    elif lo and hi:  # an open end: interval notation, e.g. (0, 1]
        text = f"in {'[' if lo[0] == '≥' else '('}{lo[2:]}, {hi[2:]}{']' if hi[0] == '≤' else ')'}"
    else:
        text = lo or hi
    if extra.get("text"):
        text = (extra.pop("text") + " " + text).strip()
    return text, extra


def _unwrap(ann: Any) -> tuple[Any, list]:
    """``Annotated[T, meta...]`` (nested too) -> (T, meta)."""
    meta: list = []
    while get_origin(ann) is typing.Annotated:
        ann, *more = get_args(ann)
        meta = [*more, *meta]
    return ann, meta


def _is_union(ann: Any) -> bool:
    return get_origin(ann) in (Union, types.UnionType)


def type_name(ann: Any, metadata: list = ()) -> str:
    """A short, readable type: ``int ≥ 1``, ``float 0–1``, ``list[int ≥ 1]``, ``cpu / cuda / auto``."""
    ann, inner = _unwrap(ann)
    bounds, extra = _constraints([*inner, *metadata])
    origin = get_origin(ann)
    if _is_union(ann):
        args = [a for a in get_args(ann) if a is not type(None)]
        text = " or ".join(type_name(a) for a in args)
        return text + (" or null" if len(args) < len(get_args(ann)) else "")
    if origin is Literal:
        return " / ".join(str(a) for a in get_args(ann))
    if origin is list:
        text = f"list[{type_name(get_args(ann)[0])}]"
        if extra.get("min_items"):
            text += f", ≥ {extra['min_items']} item" + ("s" if extra["min_items"] > 1 else "")
        return text
    if origin is tuple:
        args = [type_name(a) for a in get_args(ann)]
        return f"[{args[0]}, {args[1]}]" if len(args) == 2 else f"[{', '.join(args)}]"
    if origin is dict:
        key, value = get_args(ann)
        return f"{{{type_name(key)}: {type_name(value)}}}"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "{" + ", ".join(f"{n}: {type_name(f.annotation, f.metadata)}"
                               for n, f in ann.model_fields.items()) + "}"
    name = getattr(ann, "__name__", str(ann))
    if name == "float" and "–" in bounds:
        name = ""  # "0–1" says float on its own
    if extra.get("min_items") and name == "str":
        bounds = (bounds + " non-empty").strip()
    if extra.get("pattern"):
        bounds = (bounds + f" matching {extra['pattern']}").strip()
    return f"{name} {bounds}".strip()


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _section(ann: Any) -> tuple[type[BaseModel] | None, str]:
    """The model a field holds and how: 'plain' (a section), 'optional' (section or null), 'list'."""
    ann, _ = _unwrap(ann)
    is_model = lambda t: isinstance(t, type) and issubclass(t, BaseModel)  # noqa: E731
    if is_model(ann):
        return ann, "plain"
    if _is_union(ann):
        args = [_unwrap(a)[0] for a in get_args(ann)]
        models = [a for a in args if is_model(a)]
        if len(args) == 2 and type(None) in args and models:
            return models[0], "optional"
    if get_origin(ann) is list and is_model(_unwrap(get_args(ann)[0])[0]):
        return _unwrap(get_args(ann)[0])[0], "list"
    return None, ""


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        path = prefix + name
        sub, kind = _section(field.annotation)
        description = field.description or ""
        if sub is None:
            rows.append((f"`{path}`", type_name(field.annotation, field.metadata), _default(field), description))
            continue
        children = list(sub.model_fields.values())
        uniform = kind == "plain" and len({_section(f.annotation)[0] for f in children}) == 1 \
            and _section(children[0].annotation)[0] is not None
        if uniform:  # e.g. resources: one identical section per stage
            names = ", ".join(sub.model_fields)
            rows.append((f"`{path}.*`", "section", "", f"{description} (`*`: {names})".strip()))
            rows += _rows(_section(children[0].annotation)[0], f"{path}.*.")
        elif kind == "list":
            _, extra = _constraints(field.metadata)
            count = f", ≥ {extra['min_items']}" if extra.get("min_items") else ""
            rows.append((f"`{path}`", f"list of sections{count}", _default(field), description))
            rows += _rows(sub, f"{path}[].")
        elif kind == "optional":
            rows.append((f"`{path}`", "section or null", _default(field), description))
            rows += _rows(sub, f"{path}.")
        else:
            rows += _rows(sub, f"{path}.")
    return rows


def job_reference() -> str:
    """The job-file reference table (markdown, ends with a newline)."""
    lines = list(HEADER)
    for row in _rows(JobSpec):
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def readme_block(text: str) -> str | None:
    """What a document holds between the markers (None when they are missing)."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def replace_block(text: str, table: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.jobref", description="print the job-file "
                                     "reference table, or rewrite it between the markers of a document")
    parser.add_argument("--write", metavar="FILE", help="rewrite FILE's block between the job-reference markers")
    args = parser.parse_args(argv)
    table = job_reference()
    if not args.write:
        sys.stdout.write(table)
        return 0
    path = Path(args.write)
    text = path.read_text()
    if readme_block(text) is None:
        print(f"{path}: no {START} ... {END} markers", file=sys.stderr)
        return 2
    new = replace_block(text, table)
    if new != text:
        path.write_text(new)
    print(f"{path}: job reference {'rewritten' if new != text else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
