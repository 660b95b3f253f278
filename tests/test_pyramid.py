"""The pyramid (PCLC) model: shapes, losses, image views, --init, and train -> LATEST -> infer on images."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from rayclust.errors import UserError
from rayclust.labels import evaluate_image_labels, infer
from rayclust.shards import expand_shards
from rayclust.lake import ERRORS, LABELS, MODELS, Lake
from rayclust.losses import contrastive_clustering_loss
from rayclust.models import build_model, model_config, pretrained_state
from rayclust.shards import SAMPLE_SCHEMA
from rayclust.training import TrainSettings, train
from rayclust.views import clean_images, training_views

from conftest import REPO

TINY = {"depths": [1, 1, 1, 1], "widths": [8, 16, 32, 64], "heads": [1, 1, 2, 2], "stem_width": 8,
        "mlp_ratio": 2.0, "instance_dim": 32}
CLUSTERS = 10


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Two threads on 2 busy cores run these small models several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(**overrides) -> torch.nn.Module:
    return build_model(model_config("pyramid", **{**TINY, **overrides}), 32, CLUSTERS)


@pytest.mark.parametrize("name", ["pyramid", "pyramid-cmt-ti"])
def test_four_stage_maps_and_twin_heads_have_the_right_shapes(name):
    config = model_config(name)
    model = build_model(config, config["image_size"], CLUSTERS).eval()
    size, batch = config["image_size"], 2
    images = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        maps = model.pyramid(images)
        heads = model(images, images)
    sides = [size // config["stem_stride"] // 2 ** (i + 1) for i in range(4)]
    assert [tuple(m.shape) for m in maps] == [(batch, w, s, s) for w, s in zip(config["widths"], sides)]
    assert len(heads) == 4
    for z_a, z_b, c_a, c_b in heads:
        assert z_a.shape == z_b.shape == (batch, config["instance_dim"])
        assert c_a.shape == c_b.shape == (batch, CLUSTERS)
        assert torch.allclose(c_a.sum(1), torch.ones(batch))
    assert model.predict(images).shape == (batch, CLUSTERS)


def test_predict_uses_the_last_stage_or_the_mean_of_all():
    model = tiny_model().eval()
    images = torch.randn(4, 3, 32, 32)
    stages = [c_a for _, _, c_a, _ in model(images, images)]
    assert torch.allclose(model.predict(images), stages[-1])
    model.predict_stages = "all"
    assert torch.allclose(model.predict(images), torch.stack(stages).mean(0), atol=1e-6)


def test_a_config_that_cannot_build_is_a_one_line_error():
    with pytest.raises(UserError, match="smaller than kv_reduction"):
        tiny_model(kv_reduction=[16, 1, 1, 1])
    with pytest.raises(UserError, match="divide by its heads"):
        tiny_model(heads=[3, 1, 1, 1])


def test_loss_is_finite_and_falls_over_steps_on_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    weak, strong = torch.randn(32, 3, 32, 32), torch.randn(32, 3, 32, 32)
    losses = []
    for _ in range(8):
        loss, parts = contrastive_clustering_loss(model(weak, strong))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert all(np.isfinite(v) for v in parts.values())
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def test_views_have_the_model_size_and_bad_images_are_skipped():
    rows = [
        {"key": "wide", "shard": "s", "label": 1, "image": jpeg(48, 40, 0)},
        {"key": "small", "shard": "s", "label": 2, "image": jpeg(20, 20, 1)},
        {"key": "bad", "shard": "s", "label": 3, "image": b"\xff\xd8 not a jpeg"},
        {"key": "no-image", "shard": "s", "error": "no image member (has cls)"},
    ]
    batch = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    views = training_views(batch, 32)
    assert views["weak"].shape == views["strong"].shape == (2, 3, 32, 32)
    assert not np.array_equal(views["weak"], views["strong"])
    clean = clean_images(batch, 32)
    assert clean["pixels"].shape == (4, 3, 32, 32)
    assert list(clean["error"][:2]) == ["", ""]
    assert clean["error"][2].startswith(("not an image", "undecodable image"))
    assert clean["error"][3] == "no image member (has cls)"


def test_init_loads_the_tensors_that_match_by_name_and_shape(tmp_path, capsys):
    from safetensors.torch import save_file

    source = tiny_model()
    save_file(source.state_dict(), str(tmp_path / "tiny.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ddp.pth")
    for path in (tmp_path / "tiny.safetensors", tmp_path / "ddp.pth"):
        target = tiny_model()
        matched = pretrained_state(str(path), target)
        assert len(matched) == len(target.state_dict())
        target.load_state_dict(matched, strict=False)
        assert torch.equal(target.stem[0].conv.weight, source.stem[0].conv.weight)
    wider = tiny_model(widths=[8, 16, 32, 128])  # the last stage differs
    partial = pretrained_state(str(tmp_path / "tiny.safetensors"), wider)
    assert 0 < len(partial) < len(wider.state_dict())
    assert "stages.2.0.weight" in partial and not any(k.startswith("stages.3") and v.dim() for k, v in partial.items())
    assert "tensors loaded" in capsys.readouterr().out
    with pytest.raises(UserError, match="not found"):
        pretrained_state(str(tmp_path / "missing.pt"), source)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a checkpoint of tensors"):
        pretrained_state(str(tmp_path / "junk.pt"), source)


def test_wrong_input_is_a_one_line_error_before_ray_starts(tmp_path, drawn_shards):
    shard = str(drawn_shards / "drawn-000000.tar")
    with pytest.raises(UserError, match="give --shards"):
        train(TrainSettings(str(tmp_path / "lake"), "pyramid"))
    with pytest.raises(UserError, match="not on --shards"):
        train(TrainSettings(str(tmp_path / "lake"), "mfavb", shards=shard))
    env = {**os.environ, "RAY_ADDRESS": "validation-must-fail-before-ray-starts"}
    cases = {
        "give --shards": ["--model", "pyramid"],
        "--init checkpoint not found": ["--model", "pyramid", "--shards", shard, "--init", str(tmp_path / "no.pt")],
        "self-labelling is for feature models": ["--model", "pyramid", "--shards", shard, "--self-label-epochs", "2"],
    }

    def run(args):
        command = [sys.executable, str(REPO / "jobs" / "train.py"), "--lake", str(tmp_path / "lake"), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = dict(zip(cases, pool.map(run, cases.values())))
    for phrase, done in runs.items():
        assert done.returncode != 0 and done.stderr.count("\n") == 1 and phrase in done.stderr, done.stderr
    assert not (tmp_path / "lake").exists()


def write_tar(path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_train_then_infer_labels_every_good_image(ray_session, tmp_path, drawn_shards):
    """3 drawn shards (300 images) + a shard with one good and one broken image: 1 epoch, then infer."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        (shards / f"drawn-{i:06d}.tar").symlink_to(drawn_shards / f"drawn-{i:06d}.tar")
    write_tar(shards / "extra-000000.tar", {"good": {"jpg": jpeg(32, 32, 2), "cls": b"3"},
                                            "broken": {"jpg": b"\xff\xd8\xff broken", "cls": b"1"}})
    lake = Lake.open(str(tmp_path / "lake"))
    latest = train(TrainSettings(lake.uri, "pyramid", clusters=CLUSTERS, epochs=1, batch_size=64, run="pyr",
                                 shards=str(shards / "*.tar"), overrides=TINY))
    assert latest["model_version"] == "pyr/epoch-1" and np.isfinite(latest["metrics"]["loss"])
    assert lake.read_json(MODELS, "LATEST")["run"] == "pyr"
    with lake.fs.open(lake.path(latest["checkpoint"], "config.json")) as f:
        description = json.load(f)
    assert description["shards"] == str(shards / "*.tar") and description["model_config"]["input"] == "images"

    summary = infer(lake.uri)
    assert (summary.rows, summary.shards) == (301, 4)
    labels = pads.dataset(lake.path(LABELS), partitioning="hive").to_table()
    assert labels.num_rows == 301 and len(set(labels.column("key").to_pylist())) == 301
    assert set(labels.column("model_version").to_pylist()) == {"pyr/epoch-1"}
    assert set(labels.column("cluster").to_pylist()) <= set(range(CLUSTERS))
    errors = pads.dataset(lake.path(ERRORS), partitioning="hive").to_table().to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [("broken", "infer")]
    assert errors[0]["reason"].startswith(("not an image", "undecodable image"))
    report = evaluate_image_labels(lake, expand_shards(description["shards"]))
    assert report.samples == 301 and 0 <= report.rows["rayclust labels"]["acc"] <= 1
