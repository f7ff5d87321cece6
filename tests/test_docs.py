"""The documentation stays true to the code and to the committed results.

* README.md is a manual: at most 250 lines, and its job-file reference is exactly what
  ``pipeline.jobref.job_reference()`` renders from the config models in pipeline/spec.py.
* Every table in benchmarks/README.md and in the bundled model's card cites a results JSON, and every
  number in it equals that JSON at the precision shown. The citation is an HTML comment right after
  the table (invisible on GitHub), one line of JSON key paths per table row, in the order the numbers
  appear in the row (the first column, the row's label, is not read)::

      | labels | mIoU | missing |
      |---|---|---|
      | raw | 0.723 | 15.9 % |
      <!-- figures: benchmarks/results/eval.json
      raw.semantic.miou raw.missing_object_rate%
      -->

  ``key%`` means the JSON value × 100; list items are numbered (``runs.0.seed``); a line may start
  with ``other.json:`` to read that file (same folder) instead. Rerun a benchmark, then edit the
  table's numbers: the key lines stay.
* Each benchmarks section with a table names its command, machine, date, results JSON and status; a
  section whose status is not current (measured with an older model) shows no ✔.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline import jobref

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "benchmarks" / "README.md"
CARD = ROOT / "pipeline" / "models" / "shapes-tiny-sd" / "README.md"
MAX_README_LINES = 250
REGENERATE = "python -m pipeline.jobref --write README.md"
#: a number as a table shows it: optional sign (ASCII or U+2212 minus), digits, optional decimals
NUMBER = re.compile(r"(?<![\w.])([−+-]?)(\d+(?:\.\d+)?)(?![\w.])")
PROVENANCE = ("command", "machine", "date", "results", "status")


@dataclass
class Table:
    line: int  # 1-based line of the header
    rows: list[list[str]]  # body rows, cells stripped
    source: Path | None = None  # the JSON the figures comment names
    keys: list[list[tuple[Path, str]]] = field(default_factory=list)  # per row: (json file, key path)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_tables(text: str, doc: Path) -> list[Table]:
    """Markdown tables and the figures comment that follows each (if any)."""
    lines = text.splitlines()
    tables, i = [], 0
    while i < len(lines):
        if not (lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-:| ]+\|$", lines[i + 1])):
            i += 1
            continue
        table = Table(line=i + 1, rows=[])
        i += 2
        while i < len(lines) and lines[i].startswith("|"):
            table.rows.append(_cells(lines[i]))
            i += 1
        while i < len(lines) and not lines[i].strip():
            i += 1
        if i < len(lines) and lines[i].startswith("<!-- figures:"):
            table.source = ROOT / lines[i].removeprefix("<!-- figures:").strip()
            i += 1
            while i < len(lines) and lines[i].strip() != "-->":
                path, _, rest = lines[i].strip().rpartition(":") if ".json:" in lines[i] else ("", "", lines[i])
                src = table.source.parent / path.strip() if path else table.source
                table.keys.append([(src, key) for key in rest.split()])
                i += 1
        tables.append(table)
    return tables


def lookup(data, key: str):
    for part in key.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def figure_problems(doc: Path, text: str | None = None) -> list[str]:
    """Every way the tables of ``doc`` fail to match their JSON (empty: all good)."""
    text = doc.read_text() if text is None else text
    problems, cache = [], {}
    for table in parse_tables(text, doc):
        where = f"{doc.relative_to(ROOT)}:{table.line}"
        if table.source is None:
            problems.append(f"{where}: table without a '<!-- figures: benchmarks/results/X.json' comment after it")
            continue
        if len(table.keys) != len(table.rows):
            problems.append(f"{where}: {len(table.rows)} rows but {len(table.keys)} key lines")
            continue
        for r, (row, keys) in enumerate(zip(table.rows, table.keys), start=1):
            shown = [(m.group(1), m.group(2)) for cell in row[1:] for m in NUMBER.finditer(cell)]
            if len(shown) != len(keys):
                problems.append(f"{where} row {r} ({row[0]}): {len(shown)} numbers but {len(keys)} keys")
                continue
            for (sign, digits), (src, key) in zip(shown, keys):
                if src not in cache:
                    if not src.is_file():
                        problems.append(f"{where}: {src.relative_to(ROOT)} does not exist")
                        cache[src] = None
                        continue
                    cache[src] = json.loads(src.read_text())
                if cache[src] is None:
                    continue
                try:
                    value = lookup(cache[src], key.removesuffix("%"))
                except (KeyError, IndexError, ValueError, TypeError):
                    problems.append(f"{where} row {r}: {src.name} has no key {key}")
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    problems.append(f"{where} row {r}: {src.name} {key} is {value!r}, not a number")
                    continue
                value = value * 100 if key.endswith("%") else value
                number = float(digits) * (-1 if sign in "−-" and sign else 1)
                decimals = len(digits.partition(".")[2])
                if not math.isclose(number, value, abs_tol=0.5 * 10 ** -decimals + 1e-9):
                    problems.append(f"{where} row {r} ({row[0]}): shows {sign}{digits}, but {src.name} {key} "
                                    f"= {value:.6g}")
    return problems


def sections(text: str) -> dict[str, str]:
    """``## `` sections of a document by heading."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[k].strip(): parts[k + 1] for k in range(1, len(parts), 2)}


# --- README ---------------------------------------------------------------------------------------
def test_readme_is_at_most_250_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (f"README.md has {lines} lines (budget {MAX_README_LINES}): measured "
                                       "tables go to benchmarks/README.md, history to docs/history.md")


def test_readme_job_reference_is_generated_from_the_spec():
    block = jobref.readme_block(README.read_text())
    assert block is not None, f"README.md lacks the {jobref.START} / {jobref.END} markers"
    assert block == jobref.job_reference(), (
        f"README.md's job-file reference differs from pipeline/spec.py's fields; regenerate it: {REGENERATE}")


def test_readme_keeps_the_two_commands():
    text = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -c .ci/constraints-cpu.txt -e ".[test]" && python -m pytest -q' in text
    assert "pip install -c .ci/constraints-cpu.txt -e . && synthgen run jobs/shapes-demo.yaml" in text
    assert 'pip install -q -c .ci/constraints-cpu.txt -e ".[test]"' in ci and "python -m pytest -q" in ci


def test_readme_documents_every_command():
    from pipeline.cli import build_parser

    text = README.read_text()
    commands = build_parser()._subparsers._group_actions[0].choices
    missing = [c for c in commands if f"`synthgen {c}" not in text]
    assert not missing, f"README.md's command table lacks: {missing}"


def test_jobref_write_rewrites_only_the_block(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text(f"# t\nbefore\n{jobref.START}\n| stale |\n{jobref.END}\nafter\n")
    assert jobref.main(["--write", str(doc)]) == 0
    text = doc.read_text()
    assert text == f"# t\nbefore\n{jobref.START}\n{jobref.job_reference()}{jobref.END}\nafter\n"
    assert jobref.main(["--write", str(doc)]) == 0 and doc.read_text() == text  # idempotent
    (tmp_path / "bare.md").write_text("no markers\n")
    assert jobref.main(["--write", str(tmp_path / "bare.md")]) == 2


def test_job_reference_has_a_row_per_leaf_field_with_a_description():
    rows = [line for line in jobref.job_reference().splitlines()[2:]]
    paths = [_cells(r)[0].strip("`") for r in rows]
    for expected in ("name", "samples", "generation.steps", "masks.image_refine", "resources.*.num_cpus",
                     "classes[].synonyms", "references.select.top_k", "prompts.embedding.sigma"):
        assert expected in paths
    undocumented = [p for p, r in zip(paths, rows) if not _cells(r)[3]]
    assert not undocumented, f"fields without Field(description=...) in pipeline/spec.py: {undocumented}"
    steps = next(_cells(r) for r in rows if _cells(r)[0] == "`generation.steps`")
    assert steps[1:3] == ["int ≥ 1", "`25`"]


# --- figures --------------------------------------------------------------------------------------
@pytest.mark.parametrize("doc", [BENCHMARKS, CARD], ids=["benchmarks", "model-card"])
def test_every_table_number_equals_its_results_json(doc):
    assert parse_tables(doc.read_text(), doc), f"{doc} has no tables"
    problems = figure_problems(doc)
    assert not problems, "\n".join(problems)


def test_figure_check_catches_a_wrong_number_and_a_missing_citation():
    good = ("| x | mIoU | missing |\n|---|---|---|\n| raw | 0.723 | 15.9 % |\n"
            "<!-- figures: benchmarks/results/eval.json\nraw.semantic.miou raw.missing_object_rate%\n-->\n")
    assert figure_problems(BENCHMARKS, good) == []
    wrong = good.replace("0.723", "0.733")
    assert any("shows 0.733" in p for p in figure_problems(BENCHMARKS, wrong))
    assert any("2 numbers but 1 keys" in p
               for p in figure_problems(BENCHMARKS, good.replace(" raw.missing_object_rate%", "")))
    assert any("without" in p for p in figure_problems(BENCHMARKS, good.split("<!--")[0]))
    assert any("no key" in p for p in figure_problems(BENCHMARKS, good.replace("miou ", "mIoU ")))


def test_benchmark_sections_state_their_provenance_and_mark_old_figures():
    text = BENCHMARKS.read_text()
    checked = 0
    for heading, body in sections(text).items():
        tables = parse_tables(body, BENCHMARKS)
        if not tables:
            continue
        checked += 1
        fields = dict(re.findall(r"^- \*\*(\w+)\*\*: (.+)$", body, flags=re.M))
        missing = [f for f in PROVENANCE if f not in fields]
        assert not missing, f"benchmarks/README.md '## {heading}' lacks {missing}"
        for table in tables:
            cited = {str(src.relative_to(ROOT)) for row in table.keys for src, _ in row}
            for name in cited:
                assert name in fields["results"], f"'## {heading}': a table cites {name}, not in its results line"
        if not fields["status"].startswith("current"):
            assert "✔" not in body, f"'## {heading}' is not current ({fields['status'][:60]}) but shows ✔"
    assert checked >= 6
    assert "## Planning scale and no-op rerun" in text


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", [README, BENCHMARKS, CARD, ROOT / "docs" / "history.md"],
                         ids=["readme", "benchmarks", "model-card", "history"])
def test_relative_links_resolve(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"
