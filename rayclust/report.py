"""The LATEST model's labels become one static HTML page a person reads, that opens from disk.

``LAKE/reports/<model_version>/index.html`` by default (local or ``s3://``): a summary (images,
clusters, model, encoder, when labelled, bad samples), a cluster-size chart, a confidence
histogram, a 2-D map (t-SNE) of sampled embeddings coloured by cluster, the refresh history, and
per cluster its name, size, mean confidence, a contact sheet of its most typical images (nearest
its centre) and a strip of its least confident ones. Images are the thumbnails embed stored, inlined.

Bounded reads, whatever the size of the lake: sizes and mean confidences are aggregated by Ray
Data (K rows reach the driver); examples, the histogram and the map come from at most
SAMPLE_SHARDS shards (drawn with a fixed seed), file by file, keeping only the rows shown.
"""
from __future__ import annotations

import base64
import datetime
import html
import random
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayclust.clusters import LabelCounts, label_counts, read_clusters
from rayclust.errors import UserError
from rayclust.lake import ERRORS, FEATURES, LABELS, Lake, filesystem_for, list_to_numpy
from rayclust.models.checkpoint import latest_model
from rayclust.refresh_history import RefreshRecord, read_refresh_history
from rayclust.runtime import init_ray

REPORTS = "reports"
SAMPLE_SHARDS = 32
TYPICAL, BOUNDARY = 12, 6  # images per cluster: the contact sheet, the boundary strip
MAP_POINTS = 2000
HISTOGRAM_BINS = 20
LATER_LABEL_COLUMNS = {"source": pa.string(), "distance": pa.float32()}
PALETTE_SATURATION, PALETTE_LIGHTNESS = 65, 45


@dataclass
class Example:
    key: str
    confidence: float
    source: str | None = None  # the original file or URL, from the shard's .json
    thumbnail: bytes | None = None


@dataclass
class ClusterSection:
    cluster: int
    name: str
    top_names: list[tuple[str, float]]
    size: int
    mean_confidence: float | None
    duplicates: int
    typical: list[Example] = field(default_factory=list)
    boundary: list[Example] = field(default_factory=list)


@dataclass
class ReportData:
    lake: str
    model_version: str
    encoder: str
    labelled_at: str
    images: int
    bad_samples: int
    sections: list[ClusterSection]
    confidence_histogram: np.ndarray
    map_points: np.ndarray  # [N, 2]
    map_clusters: np.ndarray  # [N]
    refreshes: list[RefreshRecord]


@dataclass
class ReportSummary:
    path: str
    clusters: int
    images: int
    seconds: float

    def __str__(self) -> str:
        return f"report of {self.clusters} clusters, {self.images} images: {self.path} ({self.seconds:.1f}s)"


def write_report(lake_uri: str, out: str | None = None) -> ReportSummary:
    """Write the report of the LATEST model's labels to ``out`` (default: in the lake)."""
    started = time.time()
    lake = Lake.open(lake_uri)
    latest = latest_model(lake)
    clusters = read_clusters(lake, latest["model_version"])
    if clusters is None:
        raise UserError(f"no clusters table for {latest['model_version']} in {lake.uri}: run jobs/infer.py first")
    label_files, feature_files = lake.newest_files(LABELS), lake.newest_files(FEATURES)
    init_ray()
    data = gather(lake, latest, clusters, label_files, feature_files)
    target = out or lake.path(REPORTS, latest["model_version"], "index.html")
    save_page(target, render(data), lake if out is None else None)
    return ReportSummary(target if out else f"{lake.uri}/{REPORTS}/{latest['model_version']}/index.html",
                         len(data.sections), data.images, time.time() - started)


def save_page(target: str, page: str, lake: Lake | None) -> None:
    """``target``: a path in ``lake``, or (no lake) a local path or URI of its own."""
    fs, path = (lake.fs, target) if lake else filesystem_for(target)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w", encoding="utf-8") as f:
        f.write(page)


def gather(lake: Lake, latest: dict, clusters: pa.Table, label_files: dict[str, str],
           feature_files: dict[str, str]) -> ReportData:
    version, k = latest["model_version"], latest["clusters"]
    counts = label_counts(lake, list(label_files.values()), k)
    sampled = sample_labels(lake, label_files, feature_files, version)
    sections = cluster_sections(clusters, counts, sampled)
    shown = {e.key for s in sections for e in s.typical + s.boundary}
    map_rows = sampled.take(np.random.default_rng(0).permutation(sampled.num_rows)[:MAP_POINTS])
    features = sample_features(lake, feature_files, set(sampled.column("shard").to_pylist()),
                               shown | set(map_rows.column("key").to_pylist()))
    attach_thumbnails(sections, features)
    points, point_clusters = embedding_map(map_rows, features)
    histogram, _ = np.histogram(sampled.column("confidence").to_numpy(), HISTOGRAM_BINS, (0.0, 1.0))
    return ReportData(lake.uri, version, encoder_of(features), labelled_when(sampled), int(counts.sizes.sum()),
                      bad_sample_count(lake), sections, histogram, points, point_clusters,
                      read_refresh_history(lake))


def sample_labels(lake: Lake, label_files: dict[str, str], feature_files: dict[str, str], version: str) -> pa.Table:
    """The model's label rows of up to SAMPLE_SHARDS shards that have features, with their shard."""
    shards = sorted(set(label_files) & set(feature_files))
    chosen = sorted(random.Random(0).sample(shards, min(len(shards), SAMPLE_SHARDS)))
    pieces = []
    for shard in chosen:
        rows = pq.read_table(label_files[shard], filesystem=lake.arrow_fs)
        for column, kind in LATER_LABEL_COLUMNS.items():  # absent from labels written before they existed
            if column not in rows.column_names:
                rows = rows.append_column(column, pa.nulls(rows.num_rows, kind))
        rows = rows.select(["key", "source", "cluster", "confidence", "distance", "model_version", "labeled_at"])
        rows = rows.filter(pc.equal(rows.column("model_version"), version))
        pieces.append(rows.append_column("shard", pa.array([shard] * rows.num_rows, pa.string())))
    if not pieces or sum(p.num_rows for p in pieces) == 0:
        raise UserError(f"no labels of {version} in {lake.uri}: run jobs/infer.py first")
    return pa.concat_tables(pieces)


def cluster_sections(clusters: pa.Table, counts: LabelCounts, sampled: pa.Table) -> list[ClusterSection]:
    by_cluster = sampled.column("cluster").to_numpy()
    sections = []
    for row in clusters.to_pylist():
        k = row["cluster"]
        members = sampled.filter(pa.array(by_cluster == k))
        sections.append(ClusterSection(
            k, row["name"], [(n["name"], n["score"]) for n in row["top_names"] or []],
            int(counts.sizes[k]), None if np.isnan(counts.confidence[k]) else float(counts.confidence[k]),
            int(counts.duplicates[k]),
            examples(members, most_typical(members)[:TYPICAL]),
            examples(members, np.argsort(members.column("confidence").to_numpy())[:BOUNDARY])))
    return sections


def most_typical(members: pa.Table) -> np.ndarray:
    """Rows nearest the centre first; without distances, the most confident first."""
    distance = members.column("distance")
    if distance.null_count < len(distance):
        return np.argsort(pc.fill_null(distance, np.inf).to_numpy())
    return np.argsort(-members.column("confidence").to_numpy())


def examples(members: pa.Table, order: np.ndarray) -> list[Example]:
    rows = members.take(pa.array(order, pa.int64())) if len(order) else members.slice(0, 0)
    return [Example(key, float(conf), source) for key, conf, source in zip(
        rows.column("key").to_pylist(), rows.column("confidence").to_pylist(), rows.column("source").to_pylist())]


def sample_features(lake: Lake, feature_files: dict[str, str], shards: set[str], keys: set[str]) -> pa.Table:
    """key, embedding, encoder and (where embed stored one) thumbnail of ``keys``, read file by file."""
    wanted = pa.array(sorted(keys), pa.string())
    pieces = []
    for shard in sorted(shards):
        schema = pq.read_schema(feature_files[shard], filesystem=lake.arrow_fs)
        columns = ["key", "embedding", "encoder"] + (["thumbnail"] if "thumbnail" in schema.names else [])
        rows = pq.read_table(feature_files[shard], columns=columns, filesystem=lake.arrow_fs)
        rows = rows.filter(pc.is_in(rows.column("key"), wanted))
        if "thumbnail" not in columns:
            rows = rows.append_column("thumbnail", pa.nulls(rows.num_rows, pa.binary()))
        pieces.append(rows)
    return pa.concat_tables(pieces)


def attach_thumbnails(sections: list[ClusterSection], features: pa.Table) -> None:
    thumbnails = dict(zip(features.column("key").to_pylist(), features.column("thumbnail").to_pylist()))
    for section in sections:
        for example in section.typical + section.boundary:
            example.thumbnail = thumbnails.get(example.key)


def embedding_map(map_rows: pa.Table, features: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """t-SNE of the sampled rows' embeddings (after PCA to 50 dimensions), and their clusters."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    row_of = {key: i for i, key in enumerate(features.column("key").to_pylist())}
    pairs = [(row_of[key], cluster) for key, cluster in zip(map_rows.column("key").to_pylist(),
                                                            map_rows.column("cluster").to_pylist()) if key in row_of]
    if len(pairs) < 5:
        return np.zeros((0, 2)), np.zeros(0, np.int64)
    rows, clusters = (np.array(column) for column in zip(*pairs))
    chosen = features.column("embedding").take(pa.array(rows))
    embedding = list_to_numpy(chosen, len(chosen[0]))
    unit = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    reduced = PCA(min(50, *unit.shape), random_state=0).fit_transform(unit)
    perplexity = min(30.0, (len(reduced) - 1) / 3)
    points = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(reduced)
    return points, clusters


def encoder_of(features: pa.Table) -> str:
    return features.column("encoder")[0].as_py() if features.num_rows else "unknown"


def labelled_when(sampled: pa.Table) -> str:
    newest = pc.max(sampled.column("labeled_at")).as_py()
    return newest.strftime("%Y-%m-%d %H:%M UTC") if newest else "unknown"


def bad_sample_count(lake: Lake) -> int:
    """Rows of the errors table, from the files' footers (no rows read)."""
    return sum(lake.footer_rows(list(lake.newest_files(ERRORS).values())))


# --- the page ---------------------------------------------------------------------------------

def render(data: ReportData) -> str:
    colours = palette(len(data.sections))
    body = "\n".join([
        f"<h1>rayclust report: {esc(data.model_version)}</h1>",
        summary_table(data),
        "<h2>Cluster sizes</h2>", size_chart(data.sections, colours), size_caption(data.sections),
        "<h2>Confidence</h2>", histogram_chart(data.confidence_histogram),
        f"<p>Labels' confidence from 0 (left) to 1 (right) in {HISTOGRAM_BINS} bins, "
        f"{int(data.confidence_histogram.sum()):,} sampled labels.</p>",
        "<h2>Map of the embeddings</h2>",
        f"<p>t-SNE of {len(data.map_points)} sampled images, coloured by cluster.</p>",
        scatter_chart(data.map_points, data.map_clusters, colours),
        refresh_section(data.refreshes),
        "<h2>Clusters</h2>",
        *(cluster_html(section, colours[section.cluster]) for section in
          sorted(data.sections, key=lambda s: -s.size)),
    ])
    return PAGE.format(title=esc(f"rayclust: {data.model_version}"), body=body)


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def palette(n: int) -> list[str]:
    return [f"hsl({round(360 * i / max(n, 1))}, {PALETTE_SATURATION}%, {PALETTE_LIGHTNESS}%)" for i in range(n)]


def summary_table(data: ReportData) -> str:
    rows = [("images", f"{data.images:,}"), ("clusters", len(data.sections)), ("model", data.model_version),
            ("encoder", data.encoder), ("labelled", data.labelled_at), ("bad samples", f"{data.bad_samples:,}"),
            ("lake", data.lake),
            ("written", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))]
    cells = "".join(f"<tr><th>{esc(name)}</th><td>{esc(value)}</td></tr>" for name, value in rows)
    return f'<table class="summary">{cells}</table>'


def size_chart(sections: list[ClusterSection], colours: list[str]) -> str:
    ordered = sorted(sections, key=lambda s: -s.size)
    largest = max((s.size for s in ordered), default=0) or 1
    width, height = 900, 160
    bar = width / max(len(ordered), 1)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - height * s.size / largest:.1f}" width="{max(bar - 1, 0.5):.1f}" '
        f'height="{height * s.size / largest:.1f}" fill="{colours[s.cluster]}"><title>{esc(s.name)}: '
        f'{s.size:,}</title></rect>' for i, s in enumerate(ordered))
    return svg(width, height, bars, "cluster sizes, largest first")


def size_caption(sections: list[ClusterSection]) -> str:
    sizes = sorted((s.size for s in sections), reverse=True)
    empty = sizes.count(0)
    return (f"<p>{len(sizes)} clusters, largest first: from {sizes[0]:,} to {sizes[-1]:,} images"
            f"{f'; {empty} empty' if empty else ''}.</p>") if sizes else ""


def histogram_chart(counts: np.ndarray) -> str:
    width, height = 600, 140
    top = int(counts.max()) or 1
    bar = width / len(counts)
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - height * c / top:.1f}" width="{bar - 1:.1f}" '
        f'height="{height * c / top:.1f}" fill="#4a6fa5"><title>{i / len(counts):.2f}-{(i + 1) / len(counts):.2f}: '
        f'{c}</title></rect>' for i, c in enumerate(counts))
    return svg(width, height, bars, "label confidence from 0 (left) to 1 (right), sampled rows")


def scatter_chart(points: np.ndarray, clusters: np.ndarray, colours: list[str]) -> str:
    size = 600
    if len(points) == 0:
        return "<p>(too few sampled embeddings for a map)</p>"
    low, high = points.min(0), points.max(0)
    scaled = (points - low) / np.where(high > low, high - low, 1) * (size - 10) + 5
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colours[c]}"/>'
                   for (x, y), c in zip(scaled, clusters))
    return svg(size, size, dots, "t-SNE map coloured by cluster")


def svg(width: int, height: int, content: str, label: str) -> str:
    return (f'<svg role="img" aria-label="{esc(label)}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">{content}</svg>')


def refresh_section(refreshes: list[RefreshRecord]) -> str:
    if not refreshes:
        return "<h2>Refreshes</h2><p>No refresh has run on this lake.</p>"
    header = ("<tr><th>finished</th><th>model</th><th>new</th><th>changed</th><th>samples</th>"
              "<th>mean confidence (new / baseline)</th><th>cluster shift</th><th>drift</th></tr>")
    rows = "".join(
        f"<tr><td>{esc(r.finished_at)}</td><td>{esc(r.model_version)}</td><td>{r.new}</td><td>{r.changed}</td>"
        f"<td>{r.samples}</td><td>{fmt(r.mean_confidence)} / {fmt(r.baseline_confidence)}</td>"
        f"<td>{fmt(r.cluster_shift)}</td><td>{'DRIFT' if r.drift_detected else 'no'}</td></tr>" for r in refreshes)
    return f'<h2>Refreshes</h2><table class="history">{header}{rows}</table>'


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cluster_html(section: ClusterSection, colour: str) -> str:
    names = ", ".join(f"{esc(n)} ({s:.2f})" for n, s in section.top_names) or "no names: the encoder has none"
    return (f'<section class="cluster" id="cluster-{section.cluster}" data-cluster="{section.cluster}">'
            f'<h3><span class="swatch" style="background:{colour}"></span>{esc(section.name)} '
            f'<small>cluster {section.cluster}</small></h3>'
            f'<p>{section.size:,} images; mean confidence {fmt(section.mean_confidence)}; '
            f'{section.duplicates:,} near-duplicates; names: {names}</p>'
            f'<h4>Most typical</h4>{sheet(section.typical)}'
            f'<h4>Least confident</h4>{sheet(section.boundary)}</section>')


def sheet(shown: list[Example]) -> str:
    if not shown:
        return '<p class="empty">none in the sample</p>'
    return '<div class="sheet">' + "".join(tile(e) for e in shown) + "</div>"


def tile(example: Example) -> str:
    caption = f"{example.key} ({example.confidence:.2f})"
    title = f"{caption}: {example.source}" if example.source else caption
    if example.thumbnail:
        image = base64.b64encode(example.thumbnail).decode("ascii")
        return (f'<figure><img src="data:image/jpeg;base64,{image}" alt="{esc(example.key)}" '
                f'title="{esc(title)}"><figcaption>{esc(caption)}</figcaption></figure>')
    return f'<figure><div class="missing">no thumbnail</div><figcaption>{esc(caption)}</figcaption></figure>'


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ text-align: left; padding: 2px 12px 2px 0; }}
section.cluster {{ border-top: 1px solid #ccc; padding-top: 0.5em; }}
.swatch {{ display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em; border-radius: 2px; }}
.sheet {{ display: flex; flex-wrap: wrap; gap: 6px; }}
figure {{ margin: 0; width: 100px; font-size: 10px; overflow: hidden; }}
figure img {{ width: 96px; height: 96px; object-fit: contain; background: #eee; image-rendering: pixelated; }}
.missing {{ width: 96px; height: 96px; background: #eee; color: #888; display: flex; align-items: center;
           justify-content: center; }}
figcaption {{ white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }}
</style></head>
<body>
{body}
</body></html>
"""
