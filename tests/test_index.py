"""The typed index.parquet (pipeline.dataset.INDEX_SCHEMA): pyarrow filters on its struct fields select
exactly the rows the shards' per-sample JSON records say they should; version-1 indexes (JSON text
columns) still read; keys the schema does not list are kept in ``other``."""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.dataset import (CURRICULUM, INDEX_SCHEMA, INDEX_VERSION, SCORES, index_row, index_version, read_index,
                              read_manifest)
from pipeline.loader import CurriculumDataset
from test_loader import SYN, syn_level, write_dir


def shard_records(out: Path) -> dict[str, dict]:
    """{key: the sample's JSON record} of every committed shard."""
    records = {}
    for shard in read_manifest(out)["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    rec = json.loads(tar.extractfile(m).read())
                    records[rec["key"]] = rec
    return records


def untyped(value):
    """A typed struct value back to the record's JSON: unset fields dropped, ``other`` merged in."""
    if isinstance(value, dict):
        out = {k: untyped(v) for k, v in value.items() if k != "other" and v is not None}
        return {**out, **json.loads(value["other"])} if value.get("other") else out
    if isinstance(value, list):
        return [untyped(v) for v in value]
    return value


def instances_of(rec: dict, categories: dict[int, str]) -> list[dict]:
    """Annotated instances per class of a record, prompted classes included with 0."""
    ids = {n: i for i, n in categories.items()}
    cids = sorted({a["category_id"] for a in rec["annotations"]} | {ids[n] for n in rec["class_names"]})
    return [{"name": categories[c], "category_id": c,
             "count": sum(a["category_id"] == c for a in rec["annotations"])} for c in cids]


def test_index_is_typed_and_filters_match_the_shards(dataset):
    path = dataset.out / "index.parquet"
    schema = pq.read_schema(path)
    assert schema.field("scores").type == SCORES and schema.field("curriculum").type == CURRICULUM
    assert schema.metadata[b"synthgen.index"] == b"2" and schema.remove_metadata().equals(
        INDEX_SCHEMA.remove_metadata())
    records = shard_records(dataset.out)
    rows = {r["key"]: r for r in pq.read_table(path).to_pylist()}
    kept = {k for k, r in rows.items() if r["keep"]}
    assert kept == set(records) and len(records) >= 4, "too few kept samples to test filters"
    categories = {i + 1: c.name for i, c in enumerate(dataset.spec.classes)}
    for key, rec in records.items():
        row = rows[key]
        assert untyped(row["scores"]) == rec["scores"]  # every field typed, nothing lost
        assert row["scores"]["other"] is None and all(c["other"] is None for c in row["scores"]["per_class"]), \
            "the label / filter stages write a score the schema does not type: add it to pipeline.dataset.SCORES"
        assert row["curriculum"] is None and rec["curriculum"] == {}  # text-to-image: no curriculum
        assert row["classes"] == rec["class_names"] and row["prompt"] == rec["prompt"]
        assert row["instances"] == instances_of(rec, categories)

    # pushdown filters on struct fields: exactly the records whose JSON says so
    contrasts = sorted(rec["scores"]["min_contrast"] for rec in records.values())
    cut = contrasts[len(contrasts) // 2]
    expr = (pc.field("scores", "min_contrast") > cut) & pc.field("keep")
    got = pq.read_table(path, filters=expr, columns=["key"]).column("key").to_pylist()
    want = sorted(k for k, rec in records.items() if rec["scores"]["min_contrast"] > cut)
    assert got == want and 0 < len(want) < len(records)
    table = ds.dataset(path).to_table(filter=pc.field("scores", "n_instances") >= 2)
    assert sorted(table.column("key").to_pylist()) == sorted(
        k for k, r in rows.items() if r["scores"]["n_instances"] >= 2)
    assert set(table.column("key").to_pylist()) & kept == {
        k for k, rec in records.items() if len(rec["annotations"]) >= 2}

    # list columns: samples with a circle, and circles per sample, with pyarrow compute
    index = pq.read_table(path)
    flat = pc.list_flatten(index.column("instances"))
    parents = pc.list_parent_indices(index.column("instances"))
    circles = {index.column("key")[p.as_py()].as_py(): n.as_py() for p, name, n in
               zip(parents, pc.struct_field(flat, "name"), pc.struct_field(flat, "count")) if name.as_py() == "circle"}
    assert {k: n for k, n in circles.items() if k in kept} == {
        k: sum(a["category_id"] == 1 for a in rec["annotations"]) for k, rec in records.items()
        if "circle" in rec["class_names"] or any(a["category_id"] == 1 for a in rec["annotations"])}


def test_curriculum_level_filter_and_version_1_index(tmp_path):
    out = write_dir(tmp_path / "syn", "syn", ["star", "circle", "square"], SYN)
    path = out / "index.parquet"
    records = shard_records(out)
    got = pq.read_table(path, filters=pc.field("curriculum", "level") == 2).column("index").to_pylist()
    assert got == [i for i in range(len(SYN)) if syn_level(i) == 2]  # kept and rejected rows
    kept = pq.read_table(path, filters=(pc.field("curriculum", "level") == 2) & pc.field("keep"))
    assert kept.column("key").to_pylist() == sorted(
        k for k, rec in records.items() if rec["curriculum"].get("level") == 2)
    guided = ds.dataset(path).to_table(filter=pc.field("curriculum", "image_guidance") >= 0.5)
    assert sorted(guided.column("key").to_pylist()) == sorted(
        f"syn-{i:09d}" for i, s in enumerate(SYN) if s["curriculum"].get("image_guidance", 0) >= 0.5)
    for row in pq.read_table(path).to_pylist():
        if row["keep"]:
            rec = records[row["key"]]
            assert untyped(row["curriculum"] or {}) == rec["curriculum"]
            assert untyped(row["scores"]) == rec["scores"]
    text_to_image = pq.read_table(path, filters=pc.field("curriculum").is_null()).column("index").to_pylist()
    assert text_to_image == [i for i in range(len(SYN)) if not SYN[i]["curriculum"]]

    # a version-1 index (scores / curriculum as JSON text, no instances) reads as the typed schema
    typed = read_index(path)
    before = CurriculumDataset(out, seed=1)
    version_1(path)
    assert index_version(path) == "1" and pq.read_schema(path).field("scores").type == pa.string()
    converted = read_index(path)
    assert converted.schema.equals(INDEX_SCHEMA) and converted.column("instances").null_count == len(SYN)
    assert converted.drop_columns(["instances"]).equals(typed.drop_columns(["instances"]))
    after = CurriculumDataset(out, seed=1)
    assert after.levels == before.levels == (2, 1, 0) and after.epoch_size == before.epoch_size
    assert sorted(s["key"] for s in after) == sorted(s["key"] for s in before)


def test_keys_the_schema_does_not_list_are_kept_in_other():
    rec = {"key": "k-000000001", "index": 1, "seed": 7, "prompt": "p", "class_names": '["circle"]',
           "keep": True, "reject_reason": "",
           "scores": json.dumps({"min_contrast": 0.4, "count_mismatch": True,
                                 "per_class": [{"name": "circle", "contrast": 0.4, "new": [1, 2]}]}),
           "curriculum": json.dumps({"level": 3, "source": "synthetic", "teacher": "x"}),
           "annotations": json.dumps([{"category_id": 2}, {"category_id": 2}])}
    row = index_row(rec, "train-000000.tar", {1: "circle", 2: "square"})
    table = pa.Table.from_pylist([row], schema=INDEX_SCHEMA)
    back = table.to_pylist()[0]
    assert back["scores"]["min_contrast"] == 0.4 and json.loads(back["scores"]["other"]) == {"count_mismatch": True}
    assert json.loads(back["scores"]["per_class"][0]["other"]) == {"new": [1, 2]}
    assert back["curriculum"]["level"] == 3 and json.loads(back["curriculum"]["other"]) == {"teacher": "x"}
    assert back["instances"] == [{"name": "circle", "category_id": 1, "count": 0},
                                 {"name": "square", "category_id": 2, "count": 2}]
    bad = index_row({**rec, "curriculum": json.dumps({"level": "two"})}, "s", {})
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):  # a value of another type fails, never drops
        pa.Table.from_pylist([bad], schema=INDEX_SCHEMA)


def version_1(path: Path) -> None:
    """Rewrite an index file as version 1 wrote it: scores / curriculum as JSON text, no instances."""
    table = read_index(path)
    text = [pa.array([json.dumps(untyped(v)) if v else "{}" for v in table.column(c).to_pylist()])
            for c in ("scores", "curriculum")]
    old = table.drop_columns(["instances"]).set_column(8, "scores", text[0]).set_column(9, "curriculum", text[1])
    pq.write_table(old.replace_schema_metadata(None), path)


def test_a_rerun_of_a_version_1_dataset_rewrites_its_index_typed(dataset, tmp_path):
    """A dataset written before the typed columns (parts and index as JSON text, committed as such): a
    rerun generates nothing, keeps every shard and part, and rewrites index.parquet with typed columns."""
    from conftest import member_hashes
    from pipeline.cli import main
    from stages.identity import sha256_file

    out = tmp_path / "old"
    shutil.copytree(dataset.out, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        version_1(out / shard["part"])
        shard.update(part_bytes=(out / shard["part"]).stat().st_size, part_sha256=sha256_file(out / shard["part"]))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    version_1(out / "index.parquet")
    assert index_version(out / "index.parquet") == "1"
    parts = {s["part"]: (out / s["part"]).read_bytes() for s in manifest["shards"]}

    assert main(["run", str(dataset.job), "--no-ray", "--out", str(out)]) == 0
    after = json.loads((out / "manifest.json").read_text())
    assert after["runs"][-1]["shards_written"] == 0 and after["shards"] == manifest["shards"]
    assert member_hashes(out) == member_hashes(dataset.out)  # shard bytes untouched
    assert {p: (out / p).read_bytes() for p in parts} == parts
    assert index_version(out / "index.parquet") == INDEX_VERSION
    typed_now, original = pq.read_table(out / "index.parquet"), pq.read_table(dataset.out / "index.parquet")
    assert typed_now.schema.equals(INDEX_SCHEMA) and typed_now.column("instances").null_count == typed_now.num_rows
    assert typed_now.drop_columns(["instances"]).equals(original.drop_columns(["instances"]))


def test_without_index_parquet_the_parts_are_the_index(dataset, tmp_path, capsys):
    """output.index: false writes no index.parquet (a 10^8-row job): verify passes, the loader and pyarrow read
    parts/ as one dataset; output.index: true on a rerun writes it again, equal to the one a run wrote."""
    import pyarrow.dataset as pds

    from pipeline.cli import main
    from pipeline.loader import CurriculumDataset

    out = tmp_path / "out"
    shutil.copytree(dataset.out, out)
    original = pq.read_table(out / "index.parquet")
    (out / "index.parquet").unlink()
    run = ["run", str(dataset.job), "--no-ray", "--out", str(out)]
    assert main([*run, "--set", "output.index=false"]) == 0  # the same job: index is no part of the fingerprint
    assert not (out / "index.parquet").exists()
    assert main(["verify", str(out)]) == 0
    parts = pds.dataset(str(out / "parts"), format="parquet").to_table()
    assert parts.sort_by("index").equals(original)
    keys = {s["key"] for s in CurriculumDataset(out, shuffle=False)}
    assert keys == {k for k, keep in zip(original.column("key").to_pylist(), original.column("keep").to_pylist())
                    if keep}
    capsys.readouterr()
    assert main(run) == 0
    assert pq.read_table(out / "index.parquet").equals(original)
