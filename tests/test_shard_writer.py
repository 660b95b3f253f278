"""A folder of images becomes WebDataset shards: unlabelled images at the top, labelled ones in sub-folders."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from rayclust.errors import UserError
from rayclust.shard_writer import write_shards


def draw(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), shade, np.uint8)).save(path)


def samples(uris: list[str]) -> list[dict]:
    return [sample for uri in uris for sample in wds.WebDataset(uri, shardshuffle=False)]


@pytest.fixture
def photos(tmp_path) -> Path:
    """A new user's folder: photos at the top (two of them share a stem), a few in a labelled
    sub-folder, and a file that is not an image."""
    folder = tmp_path / "photos"
    for i, name in enumerate(["beach.jpg", "beach.png", "my dog.jpg", "my_dog.jpg"]):
        draw(folder / name, 40 * i)
    draw(folder / "cats" / "tom.png", 200)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_a_flat_folder_becomes_unlabelled_samples_with_their_source(photos, tmp_path):
    uris = write_shards(photos, str(tmp_path / "shards"), prefix="p", per_shard=2)
    assert [Path(u).name for u in uris] == ["p-000000.tar", "p-000001.tar", "p-000002.tar"]
    written = samples(uris)
    keys = [s["__key__"] for s in written]
    assert len(keys) == len(set(keys)) == 5, keys  # the colliding names got distinct keys
    by_source = {json.loads(s["json"])["source"]: s for s in written}
    assert set(by_source) == {"beach.jpg", "beach.png", "my dog.jpg", "my_dog.jpg", "cats/tom.png"}
    unlabelled = [s for source, s in by_source.items() if "/" not in source]
    assert all("cls" not in s and "label" not in json.loads(s["json"]) for s in unlabelled)
    tom = by_source["cats/tom.png"]
    assert tom["cls"] == b"0" and json.loads(tom["json"])["label"] == "cats"
    assert tom["png"] == (photos / "cats" / "tom.png").read_bytes()  # the original bytes, not re-encoded


def test_a_folder_without_images_is_one_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no images in"):
        write_shards(tmp_path / "empty", str(tmp_path / "shards"))
    with pytest.raises(UserError, match="image folder not found"):
        write_shards(tmp_path / "nope", str(tmp_path / "shards"))
    assert not (tmp_path / "shards").exists()
