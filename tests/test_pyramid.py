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


def pretrained_model(**overrides) -> torch.nn.Module:
    return build_model(model_config("pyramid-effnet-lite0", **overrides), 0, CLUSTERS)


def test_pretrained_stages_feed_twin_heads_and_end_in_the_embed_jobs_feature():
    from rayclust.encoders import load_encoder
    from rayclust.views import MEAN, STD

    model = pretrained_model(image_size=64).eval()
    pixels = torch.rand(2, 3, 64, 64)
    as_map = lambda values: torch.tensor(values).view(1, 3, 1, 1)  # noqa: E731
    with torch.no_grad():
        maps = model.pyramid((pixels - as_map(MEAN)) / as_map(STD))  # what rayclust.views makes
        embedded = load_encoder("effnet-lite0:64").forward((pixels - 0.5) / 0.5)  # the embed job's input
    assert [tuple(m.shape) for m in maps] == [(2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4), (2, 1280, 2, 2)]
    assert torch.allclose(maps[-1].mean((2, 3)), embedded, atol=1e-4)
    with torch.no_grad():
        heads = model(maps[0].new_zeros(2, 3, 64, 64), maps[0].new_ones(2, 3, 64, 64))
    assert [tuple(t.shape) for t in heads[-1]] == [(2, 128), (2, 128), (2, CLUSTERS), (2, CLUSTERS)]


def one_step(model: torch.nn.Module, config: dict) -> tuple[dict, dict]:
    """The model's state before and after one optimizer step of the contrastive loss on noise."""
    from rayclust.models import parameter_groups

    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = parameter_groups(model, config)
    assert [g.get("lr") for g in groups] == [config["backbone_lr"], None]
    optimizer = torch.optim.Adam(groups, lr=config["lr"])
    loss, _ = contrastive_clustering_loss(model(torch.randn(16, 3, 64, 64), torch.randn(16, 3, 64, 64)))
    loss.backward()
    optimizer.step()
    return before, model.state_dict()


def test_frozen_stages_keep_weights_the_backbone_learns_slower_and_keeps_its_batchnorm_statistics():
    torch.manual_seed(0)
    config = model_config("pyramid-effnet-lite0", image_size=64)
    model = build_model(config, 0, CLUSTERS).train()
    assert not model.backbone.stem[1].training and not model.backbone.stages[2][0]._bn0.training
    assert model.heads[0].instance[0].training  # the heads' own BatchNorm learns its statistics
    before, after = one_step(model, config)
    frozen = [k for k in after if k.startswith(("backbone.stem.", "backbone.stages.0.", "backbone.stages.1."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    statistics = [k for k in after if k.startswith("backbone.") and k.endswith(("running_mean", "running_var"))]
    assert len(statistics) == 2 * 49 and all(torch.equal(before[k], after[k]) for k in statistics)
    assert not torch.equal(before["backbone.stages.3.0._expand_conv.weight"],
                           after["backbone.stages.3.0._expand_conv.weight"])
    assert not torch.equal(before["backbone.stages.3.0._bn0.weight"], after["backbone.stages.3.0._bn0.weight"])
    with pytest.raises(UserError, match="frozen_stages is 0 to 3"):
        pretrained_model(frozen_stages=4)


def test_without_pretrained_batchnorm_the_trained_stages_follow_their_batches():
    torch.manual_seed(0)
    config = model_config("pyramid-effnet-lite0", image_size=64, pretrained_batchnorm=False)
    model = build_model(config, 0, CLUSTERS).train()
    assert not model.backbone.stem[1].training and model.backbone.stages[2][0]._bn0.training
    before, after = one_step(model, config)
    assert torch.equal(before["backbone.stages.1.0._bn0.running_mean"], after["backbone.stages.1.0._bn0.running_mean"])
    assert not torch.equal(before["backbone.head.1.running_mean"], after["backbone.head.1.running_mean"])


def test_a_timm_backbone_takes_its_own_checkpoint_through_init(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    model = pretrained_model(backbone="timm:fastvit_t8", image_size=64, frozen_stages=1).eval()
    with torch.no_grad():
        maps = model.pyramid(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 48, 16, 16), (1, 96, 8, 8), (1, 192, 4, 4), (1, 384, 2, 2)]
    assert not any(p.requires_grad for p in model.backbone.body.model.stages[0].parameters())
    assert all(p.requires_grad for p in model.backbone.body.model.stages[1].parameters())

    pretrained = timm.create_model("fastvit_t8", pretrained=False)  # what a downloaded timm checkpoint holds
    save_file(pretrained.state_dict(), str(tmp_path / "fastvit_t8.safetensors"))
    matched = pretrained_state(str(tmp_path / "fastvit_t8.safetensors"), model)
    backbone_keys = [k for k in model.state_dict() if k.startswith("backbone.")]
    assert sorted(matched) == sorted(backbone_keys)
    model.load_state_dict(matched, strict=False)
    assert torch.equal(model.backbone.body.model.stem[0].conv_kxk[0].conv.weight,
                       pretrained.stem[0].conv_kxk[0].conv.weight)
    assert "checkpoint's unused" in capsys.readouterr().out  # its classifier head
    with pytest.raises(UserError, match="unknown timm model"):
        pretrained_model(backbone="timm:no_such_net")
    with pytest.raises(UserError, match="unknown backbone"):
        pretrained_model(backbone="resnet-from-nowhere")


def test_a_sample_of_images_spreads_over_the_shards_and_skips_bad_images(tmp_path, drawn_shards):
    from rayclust.views import sample_of_images

    write_tar(tmp_path / "bad-000000.tar", {"broken": {"jpg": b"\xff\xd8\xff broken"}, "no-image": {"cls": b"1"},
                                            "good": {"jpg": jpeg(40, 30, 0)}})
    uris = [str(drawn_shards / f"drawn-{i:06d}.tar") for i in range(4)]
    assert tuple(sample_of_images(uris, 8, 32, spread=2).shape) == (8, 3, 32, 32)  # 4 from shard 0, 4 from 2
    assert len(sample_of_images([str(tmp_path / "bad-000000.tar")], 5, 32)) == 1
    assert len(sample_of_images(uris, 1_000, 32)) == 400  # all there are


def test_warm_start_fits_each_cluster_head_to_kmeans_of_its_stage(drawn_shards):
    from rayclust.views import sample_of_images

    torch.manual_seed(0)
    model = pretrained_model(image_size=64)
    images = sample_of_images([str(drawn_shards / f"drawn-{i:06d}.tar") for i in range(2)], 200, 64)
    kmeans = model.warm_start(images, seed=0)
    assert model.training and not model.backbone.stem[1].training  # modes as they were
    assert len(kmeans) == 4 and all(len(np.unique(labels)) == CLUSTERS for labels in kmeans)
    predicted = model.eval().predict(images).argmax(1).numpy()
    assert (predicted == kmeans[-1].numpy()).mean() >= 0.9  # the head learnt its stage's k-means labels


def test_ward_seeded_kmeans_is_one_partition_of_every_row_whatever_rows_ward_sees():
    from sklearn.datasets import load_digits

    from rayclust.evaluation import cluster_accuracy
    from rayclust.models.pyramid import ward_seeded_kmeans

    digits = load_digits()
    unit = digits.data / np.linalg.norm(digits.data, axis=1, keepdims=True)
    labels = ward_seeded_kmeans(unit, CLUSTERS, ward_rows=300)
    assert len(labels) == len(unit) and len(np.unique(labels)) == CLUSTERS
    assert np.array_equal(labels, ward_seeded_kmeans(unit, CLUSTERS, ward_rows=300))  # no random start
    assert cluster_accuracy(digits.target, labels) >= 0.6  # pixels; chance is about 0.11


@pytest.mark.slow
def test_pretrained_pyramid_trains_and_labels_better_than_chance(ray_session, tmp_path, drawn_shards):
    """The EfficientNet-Lite0 pyramid at 64 px, its one epoch on 400 drawn images, then the infer job."""
    lake = Lake.open(str(tmp_path / "lake"))
    pattern = str(drawn_shards / "drawn-*.tar")
    latest = train(TrainSettings(lake.uri, "pyramid-effnet-lite0", clusters=CLUSTERS, batch_size=50,
                                 run="effnet", shards=pattern, overrides={"image_size": 64}))
    assert latest["model_version"] == "effnet/epoch-1"
    summary = infer(lake.uri)
    assert summary.rows == 400
    report = evaluate_image_labels(lake, expand_shards(pattern))
    # a random labelling of 400 images into 10 clusters scores ACC ~0.13 (Hungarian matching)
    assert report.rows["rayclust labels"]["acc"] >= 0.3, report.rows
