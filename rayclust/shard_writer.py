"""A folder of images (class = sub-folder name) becomes WebDataset shards.

Each sample gets ``<key>.<ext>`` (the original image bytes), ``<key>.cls`` (the class's index
in sorted sub-folder order) and ``<key>.json`` (class name and source path).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import webdataset as wds

from rayclust.errors import UserError
from rayclust.lake import filesystem_for
from rayclust.shards import IMAGE_SUFFIXES


def images_by_class(folder: Path) -> list[tuple[str, Path]]:
    """(class name, image path) for every image one level below ``folder``, in a stable order."""
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    items = [
        (c.name, image)
        for c in classes
        for image in sorted(c.iterdir())
        if image.suffix.lower().lstrip(".") in IMAGE_SUFFIXES
    ]
    if not items:
        raise UserError(f"no images in sub-folders of {folder} (expected FOLDER/<class>/<image>)")
    return items


def sample_key(class_name: str, image: Path) -> str:
    """WebDataset keys may not contain dots: the first dot starts the member's extension."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{class_name}_{image.stem}")


def write_shards(folder: str | Path, out: str, prefix: str = "shard", per_shard: int = 1000) -> list[str]:
    """Write ``out/<prefix>-000000.tar``, … and return their URIs."""
    folder = Path(folder)
    items = images_by_class(folder)
    class_index = {name: i for i, name in enumerate(sorted({c for c, _ in items}))}
    fs, root = filesystem_for(out)
    fs.makedirs(root, exist_ok=True)
    scheme = out.split("://", 1)[0] + "://" if "://" in out else ""
    uris = []
    for start in range(0, len(items), per_shard):
        path = f"{root}/{prefix}-{start // per_shard:06d}.tar"
        with fs.open(path, "wb") as stream, wds.TarWriter(stream) as tar:
            for class_name, image in items[start:start + per_shard]:
                tar.write({
                    "__key__": sample_key(class_name, image),
                    image.suffix.lower().lstrip("."): image.read_bytes(),
                    "cls": str(class_index[class_name]).encode(),
                    "json": json.dumps({"label": class_name, "source": str(image.relative_to(folder))}).encode(),
                })
        uris.append(scheme + path)
    return uris
