"""The write path's commit, on real Parquet files in a local lake (no Ray needed: the stage and the
publisher are plain functions that Ray runs): pieces become one file per shard and table, a shard
whose pieces do not add up is never published, and older writes are replaced only by complete ones."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayclust.commit import IncompleteShard, Output, publish_shard, write_of, write_pieces
from rayclust.lake import ERRORS, LABELS, Lake, new_write_id
from rayclust.shards import END_OF_SHARD, WHOLE_SHARD_KEY

OUTPUT = (Output(LABELS, ("key", "cluster")),)


def block(shard: str, keys: list[str], errors: list[str | None], end: int | None = None) -> pa.Table:
    """Rows as a pipeline's last stage sees them; ``end`` adds the shard's end row."""
    rows = {"key": keys, "shard": [shard] * len(keys), "cluster": list(range(len(keys))), "error": errors,
            "shard_rows": [None] * len(keys)}
    if end is not None:
        for column, value in (("key", WHOLE_SHARD_KEY), ("shard", shard), ("cluster", 0), ("error", END_OF_SHARD),
                              ("shard_rows", end)):
            rows[column].append(value)
    return pa.table(rows, schema=pa.schema([("key", pa.string()), ("shard", pa.string()), ("cluster", pa.int32()),
                                             ("error", pa.string()), ("shard_rows", pa.int64())]))


def staged(lake: Lake, write_id: str, *blocks: pa.Table) -> tuple[dict[str, list[str]], dict[str, int], int]:
    """Run the writer stage over ``blocks``: (pieces per table, rows per table, the end row's count)."""
    pieces: dict[str, list[str]] = {}
    rows: dict[str, int] = {}
    expected = None
    for records in (write_pieces(b, lake, write_id, OUTPUT, "test").to_pylist() for b in blocks):
        for record in records:
            if record["table"] is None:
                expected = record["rows"]
                continue
            rows[record["table"]] = rows.get(record["table"], 0) + record["rows"]
            if record["path"]:
                pieces.setdefault(record["table"], []).append(record["path"])
    return pieces, rows, expected


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake.open(str(tmp_path / "lake"), create=True)


def published(lake: Lake, table: str, shard: str) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in lake.partition_files(table, shard)]


def test_pieces_of_a_shard_become_one_file_per_table(lake):
    write_id = new_write_id()
    pieces, rows, expected = staged(lake, write_id, block("a", ["a1", "a2"], [None, "undecodable image: x"]),
                                    block("a", ["a3", "a4"], [None, None], end=4))
    assert expected == 4 and rows == {LABELS: 3, ERRORS: 1} and len(pieces[LABELS]) == 2
    publish_shard(lake, write_id, "a", pieces, rows, [LABELS, ERRORS], {LABELS: "f1"})
    assert published(lake, LABELS, "a") == [f"{write_id}_f1.parquet"]
    labels = pq.read_table(lake.partition_files(LABELS, "a")[0])
    assert sorted(labels.column("key").to_pylist()) == ["a1", "a3", "a4"]
    assert set(labels.column("write_id").to_pylist()) == {write_id}
    errors = pq.read_table(lake.partition_files(ERRORS, "a")[0]).to_pylist()
    assert [(e["key"], e["reason"], e["stage"]) for e in errors] == [("a2", "undecodable image: x", "test")]
    assert not list(Path(lake.path("_staging", write_id, LABELS, "shard=a")).glob("*.parquet")), "pieces left"


def test_a_missing_piece_fails_the_commit_and_the_old_partition_survives(lake):
    old = new_write_id()
    publish_shard(lake, old, "a", *staged(lake, old, block("a", ["a1", "a2"], [None, None], end=2))[:2], [LABELS])
    new = new_write_id()
    pieces, rows, _ = staged(lake, new, block("a", ["a1"], [None]), block("a", ["a2", "a3"], [None, None], end=3))
    Path(pieces[LABELS][1]).unlink()  # a piece lost between its stage and the commit
    with pytest.raises(IncompleteShard, match="labels has 1 staged rows, expected 3"):
        publish_shard(lake, new, "a", pieces, rows, [LABELS])
    assert [write_of(p) for p in lake.partition_files(LABELS, "a")] == [old]
    assert pq.read_table(lake.partition_files(LABELS, "a")[0]).num_rows == 2


def test_a_newer_write_replaces_the_older_file_and_an_older_one_never_replaces_a_newer(lake):
    first, second = new_write_id(), new_write_id()
    publish_shard(lake, second, "a", *staged(lake, second, block("a", ["new"], [None], end=1))[:2], [LABELS])
    publish_shard(lake, first, "a", *staged(lake, first, block("a", ["old"], [None], end=1))[:2], [LABELS])
    assert sorted(write_of(p) for p in lake.partition_files(LABELS, "a")) == [first, second]
    assert lake.newest_files(LABELS)["a"].endswith(f"{second}.parquet")
    third = new_write_id()
    publish_shard(lake, third, "a", *staged(lake, third, block("a", ["newest"], [None], end=1))[:2], [LABELS])
    assert [write_of(p) for p in lake.partition_files(LABELS, "a")] == [third]


def test_a_complete_shard_with_no_rows_for_a_table_empties_its_partition(lake):
    old = new_write_id()
    publish_shard(lake, old, "a", *staged(lake, old, block("a", ["a1"], ["not an image: x"], end=1))[:2],
                  [LABELS, ERRORS])
    assert published(lake, ERRORS, "a") and not published(lake, LABELS, "a")
    new = new_write_id()
    publish_shard(lake, new, "a", *staged(lake, new, block("a", ["a1"], [None], end=1))[:2], [LABELS, ERRORS])
    assert not published(lake, ERRORS, "a"), "the sample decodes now: its old error row must go"
    assert [write_of(p) for p in lake.partition_files(LABELS, "a")] == [new]


def test_records_count_rows_per_shard_when_a_block_mixes_shards(lake):
    write_id = new_write_id()
    mixed = pa.concat_tables([block("a", ["a1"], [None], end=1), block("b", ["b1", "b2"], [None, None])])
    records = write_pieces(mixed, lake, write_id, OUTPUT, "test").to_pylist()
    rows = {(r["table"], r["shard"]): r["rows"] for r in records}
    assert rows == {(None, "a"): 1, (LABELS, "a"): 1, (ERRORS, "a"): 0, (LABELS, "b"): 2, (ERRORS, "b"): 0}
