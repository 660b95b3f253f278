"""A folder of images becomes WebDataset shards.

Images directly in the folder are unlabelled (what rayclust is for); images in its sub-folders
carry the sub-folder's name as a label, which only the quality report uses. Each sample gets
``<key>.<ext>`` (the original image bytes) and ``<key>.json`` (source path, and the class name if
any); a labelled one also ``<key>.cls`` (the class's index in sorted sub-folder order).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import webdataset as wds

from rayclust.errors import UserError
from rayclust.lake import filesystem_for
from rayclust.shards import IMAGE_SUFFIXES


def images_by_class(folder: Path) -> list[tuple[str | None, Path]]:
    """(class name or None, image path) for every image in ``folder`` (unlabelled) and one level
    below it (labelled by sub-folder), in a stable order."""
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    items: list[tuple[str | None, Path]] = [(None, image) for image in images_in(folder)]
    for sub_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        items += [(sub_folder.name, image) for image in images_in(sub_folder)]
    if not items:
        raise UserError(f"no images in {folder} or its sub-folders (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_SUFFIXES)


def sample_keys(items: list[tuple[str | None, Path]]) -> list[str]:
    """A key per image, unique in the corpus: WebDataset keys may not contain dots (the first dot
    starts the member's extension), so other characters become ``_``, and names that then collide
    (``a.jpg`` and ``a.png``, ``a b.jpg`` and ``a_b.jpg``) get ``_2``, ``_3``, ... in order."""
    keys, seen = [], set()
    for class_name, image in items:
        base = re.sub(r"[^A-Za-z0-9_-]", "_", image.stem if class_name is None else f"{class_name}_{image.stem}")
        key, n = base, 1
        while key in seen:
            n += 1
            key = f"{base}_{n}"
        seen.add(key)
        keys.append(key)
    return keys


def sample_of(key: str, class_name: str | None, image: Path, folder: Path, class_index: dict[str, int]) -> dict:
    source = str(image.relative_to(folder))
    sample = {"__key__": key, image.suffix.lower().lstrip("."): image.read_bytes()}
    if class_name is None:
        return {**sample, "json": json.dumps({"source": source}).encode()}
    return {**sample, "cls": str(class_index[class_name]).encode(),
            "json": json.dumps({"label": class_name, "source": source}).encode()}


def write_shards(folder: str | Path, out: str, prefix: str = "shard", per_shard: int = 1000) -> list[str]:
    """Write ``out/<prefix>-000000.tar``, … and return their URIs."""
    folder = Path(folder)
    items = images_by_class(folder)
    keys = sample_keys(items)
    class_index = {name: i for i, name in enumerate(sorted({c for c, _ in items if c is not None}))}
    fs, root = filesystem_for(out)
    fs.makedirs(root, exist_ok=True)
    scheme = out.split("://", 1)[0] + "://" if "://" in out else ""
    uris = []
    for start in range(0, len(items), per_shard):
        path = f"{root}/{prefix}-{start // per_shard:06d}.tar"
        with fs.open(path, "wb") as stream, wds.TarWriter(stream) as tar:
            for key, (class_name, image) in zip(keys[start:start + per_shard], items[start:start + per_shard]):
                tar.write(sample_of(key, class_name, image, folder, class_index))
        uris.append(scheme + path)
    return uris
