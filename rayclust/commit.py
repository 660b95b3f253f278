"""Rows become published Parquet files, one per shard and table, as each shard completes.

The last stage of every writing pipeline (embed, infer, refresh) is ``write_pieces``: Ray Data
tasks that write each block's rows, split by shard and table, as *pieces* under
``_staging/<write-id>/`` and return a small record per piece. Every shard's rows end with its end
row (``shards.END_OF_SHARD``), which says how many rows the shard had. The driver only reads
those records (``commit_as_shards_finish``): once a shard's pieces hold all its rows, a Ray task
(``publish_shard``, on a worker) makes them the shard's one file per table and publishes it by a
rename or a server-side copy. A shard is visible as soon as it is complete, whatever the others
do; a shard whose pieces do not add up is never published, and its old partition stays.
"""
from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from rayclust.lake import ERRORS, STAGING, WRITE_ID, Lake
from rayclust.progress import Progress
from rayclust.shards import END_OF_SHARD

ROW_GROUP_BYTES = 128 * 2**20  # what Spark and DuckDB scan well: one group per typical shard file
PUBLISHERS_IN_FLIGHT = 16
RECORD_SCHEMA = pa.schema([("table", pa.string()), ("shard", pa.string()), ("path", pa.string()),
                           ("rows", pa.int64()), ("reasons", pa.string())])
ERROR_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string()), ("stage", pa.string())])


@dataclass(frozen=True)
class Output:
    """A table a pipeline writes, and the columns of its rows."""

    table: str
    columns: tuple[str, ...]


def write_pieces(batch: pa.Table, lake: Lake, write_id: str, outputs: tuple[Output, ...], stage: str) -> pa.Table:
    """Ray Data stage: stage a block's rows as pieces, one per table and shard in the block.

    Good rows (``error`` null) go to every output; failed rows to the errors table; each shard's
    end row becomes a record with its row count. Returns records (``RECORD_SCHEMA``), never rows.
    """
    error = batch.column("error")
    is_end = pc.fill_null(pc.equal(error, END_OF_SHARD), False)
    ends = batch.filter(is_end)
    records = [(None, shard, None, count, None) for shard, count in
               zip(ends.column("shard").to_pylist(), ends.column("shard_rows").to_pylist())]
    rows = batch.filter(pc.invert(is_end))
    for shard in pc.unique(rows.column("shard")).to_pylist():
        of_shard = rows.filter(pc.equal(rows.column("shard"), shard))
        failed = of_shard.column("error").is_valid()
        good, bad = of_shard.filter(pc.invert(failed)), of_shard.filter(failed)
        for output in outputs:
            records.append(stage_piece(lake, write_id, output.table, shard, good.select(list(output.columns))))
        records.append(stage_piece(lake, write_id, ERRORS, shard, as_errors(bad, stage), reason_counts(bad)))
    columns = [list(column) for column in zip(*records)] if records else [[] for _ in RECORD_SCHEMA]
    return pa.table(columns, schema=RECORD_SCHEMA)


def as_errors(bad: pa.Table, stage: str) -> pa.Table:
    return pa.table([bad.column("key"), bad.column("error"), pa.array([stage] * bad.num_rows, pa.string())],
                    schema=ERROR_SCHEMA)


def stage_piece(lake: Lake, write_id: str, table: str, shard: str, rows: pa.Table,
                reasons: str | None = None) -> tuple:
    """One piece on the store (none for no rows); its record either way."""
    if rows.num_rows == 0:
        return table, shard, None, 0, reasons
    rows = rows.append_column(WRITE_ID, pa.array([write_id] * rows.num_rows, pa.string()))
    path = lake.path(STAGING, write_id, table, f"shard={shard}", f"{uuid.uuid4().hex}.parquet")
    write_parquet(lake, rows, path)
    return table, shard, path, rows.num_rows, reasons


def reason_counts(bad: pa.Table) -> str | None:
    """How many bad rows had each kind of reason (the text before its colon), as JSON, so the
    summary counts reasons without reading the rows again."""
    if bad.num_rows == 0:
        return None
    return json.dumps(Counter(reason.split(":")[0] for reason in bad.column("error").to_pylist()))


def write_parquet(lake: Lake, rows: pa.Table, path: str) -> None:
    if lake.is_local:
        lake.arrow_fs.create_dir(path.rsplit("/", 1)[0])
    per_row = max(1, rows.nbytes // max(1, rows.num_rows))
    pq.write_table(rows, path, filesystem=lake.arrow_fs, row_group_size=max(1, ROW_GROUP_BYTES // per_row))


@dataclass
class ShardPieces:
    """What the driver knows of one shard: its pieces per table and, once its end row came, its size."""

    expected: int | None = None
    pieces: dict[str, list[str]] = field(default_factory=dict)
    rows: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)

    def add(self, record: dict) -> None:
        if record["table"] is None:
            self.expected = record["rows"]
            return
        self.pieces.setdefault(record["table"], [])
        if record["path"]:
            self.pieces[record["table"]].append(record["path"])
        self.rows[record["table"]] += record["rows"]
        if record["reasons"]:
            self.reasons.update(json.loads(record["reasons"]))

    def counted(self, primary: str) -> int:
        return self.rows[primary] + self.rows[ERRORS]

    def complete(self, primary: str) -> bool:
        return self.expected is not None and self.counted(primary) == self.expected


@dataclass
class ShardResult:
    shard: str
    rows: int
    bad: int
    reasons: Counter


def publish_shard(lake: Lake, write_id: str, shard: str, pieces: dict[str, list[str]],
                  rows: dict[str, int], tables: Iterable[str], fingerprints: dict[str, str] | None = None) -> None:
    """Make this write the content of ``shard``'s partition of each of ``tables``.

    Per table: the pieces must hold exactly ``rows[table]`` rows, else nothing of the shard is
    published and its old files stay. One piece is published as it is (a rename, or a copy on S3,
    which appears whole or not at all); several become one file first. Then the partition's files
    of older writes are deleted; a table with no rows for the shard keeps none.
    """
    tables = list(tables)
    for table in tables:
        found = sum(staged_rows(lake, piece) for piece in pieces.get(table, []))
        if found != rows.get(table, 0):
            raise IncompleteShard(f"shard {shard}: {table} has {found} staged rows, expected {rows.get(table, 0)}; "
                                  f"its published files are kept")
    for table in tables:
        _publish_table(lake, write_id, shard, table, pieces.get(table, []), (fingerprints or {}).get(table, ""))


def staged_rows(lake: Lake, piece: str) -> int:
    """The rows of a staged piece, from its footer; 0 for a piece that is gone."""
    try:
        return pq.ParquetFile(piece, filesystem=lake.arrow_fs).metadata.num_rows
    except FileNotFoundError:
        return 0


def file_name(write_id: str, fingerprint: str) -> str:
    return f"{write_id}_{fingerprint}.parquet" if fingerprint else f"{write_id}.parquet"


def published_path(lake: Lake, table: str, shard: str, write_id: str, fingerprint: str) -> str:
    """Where a write publishes a shard's file of ``table``: a job knows its own files without listing."""
    return lake.path(table, f"shard={shard}", file_name(write_id, fingerprint))


def write_of(path: str) -> str:
    """The write id in a published file's name."""
    return path.rsplit("/", 1)[-1].removesuffix(".parquet").split("_", 1)[0]


def fingerprint_of(path: str) -> str:
    name = path.rsplit("/", 1)[-1].removesuffix(".parquet")
    return name.split("_", 1)[1] if "_" in name else ""


def _publish_table(lake: Lake, write_id: str, shard: str, table: str, pieces: list[str], fingerprint: str) -> None:
    """Moves and deletes go through fsspec: pyarrow's S3 client leaves an empty ``shard=…/``
    marker object behind a deleted file, which some readers then fail to open."""
    fs, partition = lake.fs, lake.path(table, f"shard={shard}")
    published = published_path(lake, table, shard, write_id, fingerprint)
    if len(pieces) > 1:
        merged = lake.path(STAGING, write_id, table, f"shard={shard}.parquet")
        write_parquet(lake, pa.concat_tables([pq.read_table(p, filesystem=lake.arrow_fs) for p in pieces]), merged)
        pieces = [merged, *pieces]
    if pieces:
        if lake.is_local:
            fs.makedirs(partition, exist_ok=True)
        fs.mv(pieces[0], published)
    for older in lake.partition_files(table, shard):
        if write_of(older) < write_id:
            fs.rm_file(older)
    for piece in pieces[1:]:
        fs.rm_file(piece)


class IncompleteShard(Exception):
    """A shard's staged rows do not add up to what the job counted: it is not published."""


# Ray retries it if its worker dies; a store that does not answer, its client retries (rayclust.lake)
publish_remotely = ray.remote(num_cpus=0, max_retries=3)(publish_shard)


@dataclass
class CommitSummary:
    shards: int = 0
    rows: int = 0
    bad: int = 0
    reasons: Counter = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)  # shard names, as they were published

    def add(self, result: ShardResult) -> None:
        self.published.append(result.shard)
        self.shards += 1
        self.rows += result.rows
        self.bad += result.bad
        self.reasons.update(result.reasons)


def commit_as_shards_finish(records: ray.data.Dataset, lake: Lake, write_id: str, tables: tuple[str, ...],
                            primary: str, progress: Progress,
                            fingerprints: dict[str, dict[str, str]] | None = None,
                            before_publish: Callable[[], None] = lambda: None,
                            on_published: Callable[[ShardResult], None] = lambda result: None) -> CommitSummary:
    """Drive the pipeline whose output is ``records`` and publish each shard once it is complete.

    ``primary`` is the table whose rows, with the errors, make up a shard's count; ``fingerprints``
    (shard -> table -> fingerprint) name what each shard's files were made from (``publish_shard``);
    ``before_publish`` runs before each publication (the lock's check); ``on_published`` after.
    Shards whose rows never add up are reported in ``failures`` and keep their old files.
    """
    summary, waiting, in_flight = CommitSummary(), {}, {}

    def settle(wait: bool) -> None:
        """Take the publications that have finished; ``wait``: block until at least one has."""
        ready, _ = ray.wait(list(in_flight), num_returns=1 if wait else len(in_flight), timeout=None if wait else 0)
        for ref in ready:
            shard, pieces = in_flight.pop(ref)
            try:
                ray.get(ref)
            except Exception as exn:  # one shard failing must not stop the others: reported at the end
                summary.failures[shard] = one_line(exn)
                continue
            result = ShardResult(shard, pieces.rows[primary], pieces.rows[ERRORS], pieces.reasons)
            summary.add(result)
            on_published(result)
            progress.update(shards=1, rows=result.rows)

    # a block's records arrive together: a shard is judged complete only after all of them
    for batch in records.iter_batches(batch_size=None, batch_format="pyarrow"):
        touched = set()
        for record in batch.to_pylist():
            waiting.setdefault(record["shard"], ShardPieces()).add(record)
            touched.add(record["shard"])
        for shard in sorted(s for s in touched if waiting[s].complete(primary)):
            pieces = waiting.pop(shard)
            before_publish()
            ref = publish_remotely.remote(lake, write_id, shard, pieces.pieces, dict(pieces.rows), tables,
                                          (fingerprints or {}).get(shard))
            in_flight[ref] = (shard, pieces)
        while len(in_flight) >= PUBLISHERS_IN_FLIGHT:
            settle(wait=True)
        if in_flight:
            settle(wait=False)
    while in_flight:
        settle(wait=True)
    for shard, pieces in waiting.items():
        summary.failures[shard] = (f"incomplete: {pieces.counted(primary)} rows staged of "
                                   f"{pieces.expected if pieces.expected is not None else 'an unknown number'}")
    lake.discard_write(write_id)  # what is left there belongs to shards that failed: a run again redoes them
    return summary


def one_line(exn: BaseException) -> str:
    """The first line of an error, unwrapped from Ray's task error."""
    cause = getattr(exn, "cause", None) or exn
    return f"{type(cause).__name__}: {cause}".splitlines()[0]
