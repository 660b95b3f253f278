"""Embed (rayclust.features) on a local lake: damaged and hostile shards never fail a job, good
samples are embedded and bad ones recorded; train and infer then label every feature row once.

One shard mixes real drawn JPEG samples with broken ones (corrupt, truncated, missing, fake and
oversized images, and pickles that must never be loaded); a second shard is a tar cut off in
the middle of a member. Both are embedded once (module fixture); the tests then read the lake.
"""
from __future__ import annotations

import io
import pickle
import random
import struct
import tarfile
import zlib
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from conftest import TINY_ENCODER, CreatesFile

GOOD = 20  # real samples in the mixed shard
CUT_SAMPLES = 10  # real samples written to the shard that is then truncated
CUT_IN = 7  # the truncated shard ends half-way through this sample's image: samples 0..6 survive
MIXED = "mixed-000000"
CUT = "cut-000000"


# --- building shards -----------------------------------------------------------------------

def real_samples(tar: Path, count: int, skip: int = 0) -> dict[str, dict[str, bytes]]:
    """The first ``count`` samples (after ``skip``) of a real shard: key -> {suffix: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as t:
        for member in t:
            key, suffix = member.name.split(".", 1)
            if key not in samples and len(samples) == skip + count:
                break
            samples.setdefault(key, {})[suffix] = t.extractfile(member).read()
    return dict(list(samples.items())[skip:])


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    """A WebDataset tar: samples sorted by key, each sample's members together, in the given order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for key in sorted(samples):
            for suffix in samples[key]:
                data = samples[key][suffix]
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def corrupt_jpeg(jpeg: bytes) -> bytes:
    """A real JPEG's headers (up to and including the start-of-scan) followed by garbage."""
    sos = jpeg.index(b"\xff\xda")
    header_end = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big")
    return jpeg[:header_end] + random.Random(0).randbytes(600) + b"\xff\xd9"


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid, tiny PNG whose IHDR claims ``width`` x ``height`` RGB pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


# key -> words that its reason in LAKE/errors must contain (lower case)
BAD_SAMPLES = {
    "bad_corrupt_jpeg": ["undecodable image"],
    "bad_truncated_jpeg": ["undecodable image", "truncated"],
    "bad_no_image": ["no image member", "cls", "json"],
    "bad_text_as_jpg": ["not an image"],
    "bad_png_bomb": ["image too large"],
}
PICKLE_KEY = "has_pickles"


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory, drawn_shards) -> dict:
    """The mixed shard and the truncated shard, and what each should yield."""
    root = tmp_path_factory.mktemp("bad-input")
    real = real_samples(drawn_shards / "drawn-000000.tar", GOOD + 2)
    keys = list(real)
    good = {k: real[k] for k in keys[:GOOD]}
    spare, pickled = real[keys[GOOD]], real[keys[GOOD + 1]]
    markers = [root / "unpickled-pyd", root / "unpickled-pt"]
    meta = {"cls": spare["cls"], "json": spare["json"]}
    samples = dict(good)
    samples["bad_corrupt_jpeg"] = {"jpg": corrupt_jpeg(spare["jpg"]), **meta}
    samples["bad_truncated_jpeg"] = {"jpg": spare["jpg"][: len(spare["jpg"]) // 2], **meta}
    samples["bad_no_image"] = dict(meta)
    samples["bad_text_as_jpg"] = {"jpg": b"this is a text file, not a JPEG\n" * 4, **meta}
    samples["bad_png_bomb"] = {"png": png_bomb(), **meta}
    samples[PICKLE_KEY] = {**pickled, "pyd": pickle.dumps(CreatesFile(markers[0])),
                           "pt": pickle.dumps(CreatesFile(markers[1]))}
    assert len(samples["bad_png_bomb"]["png"]) < 200
    (root / "shards").mkdir()
    write_shard(root / "shards" / f"{MIXED}.tar", samples)

    # each sample's image first, so that the cut lands inside an image
    cut_source = {key: {"jpg": sample["jpg"], **sample}
                  for key, sample in real_samples(drawn_shards / "drawn-000001.tar", CUT_SAMPLES).items()}
    whole = root / "whole.tar"
    write_shard(whole, cut_source)
    with tarfile.open(whole) as t:
        image = t.getmember(f"{sorted(cut_source)[CUT_IN]}.jpg")
    assert next(iter(cut_source[image.name.split(".")[0]])) == "jpg"  # the image is its sample's first member
    cut_at = image.offset_data + image.size // 2
    (root / "shards" / f"{CUT}.tar").write_bytes(whole.read_bytes()[:cut_at])
    return {
        "root": root,
        "pattern": str(root / "shards" / "*.tar"),
        "good": set(good) | {PICKLE_KEY},
        "cut_good": set(sorted(cut_source)[:CUT_IN]),
        "markers": markers,
    }


@pytest.fixture(scope="module")
def embedded(ray_session, bad_shards) -> dict:
    from rayclust.features import embed

    lake = bad_shards["root"] / "lake"
    summary = embed(bad_shards["pattern"], str(lake), TINY_ENCODER, views=2, batch_size=8)
    return {**bad_shards, "lake": lake, "summary": summary}


def read_table(lake: Path, table: str):
    return pads.dataset(lake / table, format="parquet", partitioning="hive").to_table()


# --- tests ---------------------------------------------------------------------------------

def test_shards_are_built_as_intended(bad_shards):
    with tarfile.open(Path(bad_shards["pattern"]).parent / f"{MIXED}.tar") as t:
        names = t.getnames()
    assert names == sorted(names, key=lambda n: n.split(".", 1)[0])
    assert f"{PICKLE_KEY}.pyd" in names and f"{PICKLE_KEY}.pt" in names
    with pytest.raises(tarfile.ReadError):  # really cut mid-member
        with tarfile.open(Path(bad_shards["pattern"]).parent / f"{CUT}.tar") as t:
            for member in t:
                t.extractfile(member).read()


def test_every_good_sample_has_exactly_one_feature_row(embedded):
    features = read_table(embedded["lake"], "features")
    keys = features.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "duplicate feature rows"
    expected = {(MIXED, k) for k in embedded["good"]} | {(CUT, k) for k in embedded["cut_good"]}
    assert set(zip(features.column("shard").to_pylist(), keys)) == expected
    assert pc.all(pc.is_valid(features.column("label"))).as_py()
    assert {len(v) for v in features.column("views").to_pylist()} == {2}


def test_every_bad_sample_is_recorded_with_a_reason(embedded):
    errors = read_table(embedded["lake"], "errors")
    rows = {(r["shard"], r["key"]): r for r in errors.to_pylist()}
    assert set(rows) == {(MIXED, k) for k in BAD_SAMPLES} | {(CUT, "__shard__")}
    for key, words in BAD_SAMPLES.items():
        reason = rows[(MIXED, key)]["reason"]
        assert all(w in reason.lower() for w in words), f"{key}: {reason!r} should mention {words}"
        assert rows[(MIXED, key)]["stage"] == "embed"
    assert "10000000000 pixels" in rows[(MIXED, "bad_png_bomb")]["reason"]  # 100000 x 100000
    assert "damaged tar" in rows[(CUT, "__shard__")]["reason"]


def test_pickles_in_shards_are_never_loaded(embedded):
    features = read_table(embedded["lake"], "features")
    assert PICKLE_KEY in features.column("key").to_pylist()  # the sample's image was still embedded
    for marker in embedded["markers"]:
        assert not marker.exists(), f"a pickle from the shard was loaded: {marker} exists"
    # the markers do appear when the members are unpickled (so the check above can fail)
    with tarfile.open(Path(embedded["pattern"]).parent / f"{MIXED}.tar") as t:
        pickle.loads(t.extractfile(f"{PICKLE_KEY}.pyd").read()).close()
    assert embedded["markers"][0].exists()
    embedded["markers"][0].unlink()


def test_summary_counts_match_the_lake(embedded):
    summary = embedded["summary"]
    assert summary.shards == 2
    assert summary.samples == len(embedded["good"]) + len(embedded["cut_good"])
    assert summary.bad_samples == len(BAD_SAMPLES) + 1
    assert sum(summary.reasons.values()) == summary.bad_samples
    assert summary.reasons["damaged tar"] == 1
    assert summary.reasons["image too large"] == 1


def test_embedding_a_shard_again_replaces_its_rows(embedded):
    from rayclust.features import embed

    before_features = read_table(embedded["lake"], "features").num_rows
    before_errors = read_table(embedded["lake"], "errors").num_rows
    mixed = str(Path(embedded["pattern"]).parent / f"{MIXED}.tar")
    again = embed(mixed, str(embedded["lake"]), TINY_ENCODER, views=2, batch_size=8)
    assert (again.shards, again.skipped) == (0, 1), "the same shard, encoder and views: nothing to redo"
    summary = embed(mixed, str(embedded["lake"]), TINY_ENCODER, views=2, batch_size=8, redo=True)
    assert summary.samples == len(embedded["good"])
    features = read_table(embedded["lake"], "features")
    assert features.num_rows == before_features
    assert len(set(features.column("key").to_pylist())) == features.num_rows
    assert read_table(embedded["lake"], "errors").num_rows == before_errors


def test_train_and_infer_label_every_feature_row_once(embedded, capsys):
    from rayclust.evaluation import KMEANS
    from rayclust.labels import infer
    from rayclust.models import model_config
    from rayclust.training import TrainSettings, train

    lake = str(embedded["lake"])
    latest = train(TrainSettings(lake, clusters=3, epochs=2, batch_size=8, run="bad-input"))
    epochs = 2 + model_config(TrainSettings.model)["self_label_epochs"]  # the default self-labels after
    assert latest["model_version"] == f"bad-input/epoch-{epochs}"  # as the last progress line counts them
    summary = infer(lake, batch_size=16)
    features = read_table(embedded["lake"], "features")
    labels = read_table(embedded["lake"], "labels")
    assert summary.rows == labels.num_rows == features.num_rows
    assert sorted(zip(labels.column("shard").to_pylist(), labels.column("key").to_pylist())) == sorted(
        zip(features.column("shard").to_pylist(), features.column("key").to_pylist()))
    assert set(labels.column("model_version").to_pylist()) == {latest["model_version"]}
    assert all(0 <= c < 3 for c in labels.column("cluster").to_pylist())
    assert all(0 < c <= 1 for c in labels.column("confidence").to_pylist())
    output = capsys.readouterr().out
    kmeans_rows = [line for line in output.splitlines() if line.startswith(KMEANS)]
    assert len(kmeans_rows) == 2 and kmeans_rows[0] == kmeans_rows[1], output  # once per table: train's, read by infer
    assert f"cluster health on all labels ({features.num_rows} rows, 3 clusters)" in output, output
