"""Reading WebDataset shards (rayclust.shards): shard patterns expand on S3 as on local disk, and the
driver counts a corpus's images only as far as it needs. How damaged and hostile shards read:
tests/test_features.py, tests/test_security.py, tests/test_write_path.py."""
from __future__ import annotations

from rayclust.shards import count_images, expand_shards
from rayclust.synthetic import write_synthetic_shards

SHARDS = ["drawn-000000.tar", "drawn-000001.tar"]


def test_brace_ranges_and_globs_expand_on_s3(drawn_shards_on_s3):
    expected = [f"{drawn_shards_on_s3}/{name}" for name in SHARDS]
    assert expand_shards(f"{drawn_shards_on_s3}/drawn-{{000000..000001}}.tar") == expected
    assert expand_shards(f"{drawn_shards_on_s3}/*.tar") == expected
    assert expand_shards(f"{drawn_shards_on_s3}/drawn-00000[01].tar") == expected


def test_images_are_counted_only_as_far_as_asked(tmp_path):
    shards = write_synthetic_shards(str(tmp_path / "shards"), shards=3, per_shard=20)
    assert count_images(shards, 25) == 25  # stops inside the second shard
    assert count_images(shards, 1000) == 60


def test_a_samples_source_comes_from_its_json_and_never_fails_the_sample():
    from rayclust.shards import MAX_SOURCE_CHARS, parse_source

    assert parse_source(b'{"source": "photos/cat.jpg", "label": "cat"}') == "photos/cat.jpg"
    assert parse_source(b'{"url": "https://example.com/a.jpg"}') == "https://example.com/a.jpg"  # img2dataset
    long = "x" * (MAX_SOURCE_CHARS + 10)
    assert parse_source(f'{{"source": "{long}"}}'.encode()) == long[:MAX_SOURCE_CHARS]
    for says_nothing in (None, b"not json", b"\xff\xfe", b"[1, 2]", b'{"source": 3}', b'{"source": ""}',
                         b"[" * 100_000):
        assert parse_source(says_nothing) is None, says_nothing
