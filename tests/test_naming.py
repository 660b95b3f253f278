"""Cluster names (rayclust.naming): EfficientNet-Lite0's ImageNet head and an open_clip text tower."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_ENCODER
from rayclust.decode import normalise
from rayclust.encoders import load_encoder, load_preprocessing
from rayclust.errors import UserError
from rayclust.naming import TOP_NAMES, imagenet_classnames, name_clusters, own_names, read_vocabulary
from rayclust.synthetic import draw_image

EFFNET = "effnet-lite0:96"


def test_effnet_names_a_cluster_of_one_image_as_its_own_classifier_does():
    """The head on the stored (pooled) embedding gives the network's own answer for the image."""
    encoder, preprocessing = load_encoder(EFFNET), load_preprocessing(EFFNET)
    images = [draw_image(label, np.random.default_rng(label), size=96) for label in range(3)]
    pixels = normalise(torch.stack([preprocessing.clean(image) for image in images]),
                       preprocessing.mean, preprocessing.std)
    with torch.no_grad():
        embeddings = encoder.forward(pixels).numpy()
        classified = encoder.model(pixels).argmax(1).numpy()  # the whole network, head included
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    names = name_clusters(EFFNET, unit, embeddings)
    words = imagenet_classnames()
    assert [n.top[0].name for n in names] == [words[i] for i in classified]
    assert all(len(n.top) == TOP_NAMES and 0 < n.top[0].score <= 1 and n.top[0].score >= n.top[-1].score >= 0
               for n in names)


def test_text_tower_names_a_centre_after_the_word_it_points_at(tmp_path):
    import open_clip

    vocabulary = tmp_path / "words.txt"
    vocabulary.write_text("# animals\nzebra\n\ntabby cat\ngolden retriever\nfire truck\n")
    words = read_vocabulary(str(vocabulary))
    assert words == ["zebra", "tabby cat", "golden retriever", "fire truck"]
    clip = load_encoder(TINY_ENCODER).model
    tokenizer = open_clip.get_tokenizer("rayclust-tiny-vit")
    with torch.no_grad():
        text = clip.encode_text(tokenizer(["a photo of a fire truck.", "a photo of a zebra."])).numpy()
    centres = text / np.linalg.norm(text, axis=1, keepdims=True)
    no_centre = np.full((1, centres.shape[1]), np.nan, np.float32)
    names = name_clusters(TINY_ENCODER, np.vstack([centres, no_centre]), np.vstack([centres, no_centre]), words)
    assert [n.top[0].name for n in names[:2]] == [n.name for n in names[:2]] == ["fire truck", "zebra"]
    assert names[2].name is None and names[2].top == []  # no members in the sample: no centre, no name
    assert sorted(n.name for n in names[0].top) == sorted(words)  # fewer words than TOP_NAMES: all, ranked


def test_clusters_that_look_alike_get_names_of_their_own():
    scores = np.array([[0.7, 0.2, 0.1], [0.6, 0.35, 0.05], [0.5, 0.1, 0.4]])
    assert own_names(scores, ["chain", "hook", "screw"]) == ["chain", "hook", "screw"]
    assert own_names(scores, ["chain"]) == ["chain", "chain 2", "chain 3"]


def test_features_of_an_encoder_rayclust_does_not_know_give_numbered_clusters():
    names = name_clusters("imported-features", np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32))
    assert [(n.name, n.top) for n in names] == [(None, [])] * 3


def test_a_vocabulary_needs_a_text_tower_and_some_words(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(UserError, match="no names in it"):
        read_vocabulary(str(empty))
    with pytest.raises(UserError, match="not found"):
        read_vocabulary(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="open_clip text tower"):
        name_clusters(EFFNET, np.zeros((1, 1280)), np.zeros((1, 1280)), ["zebra"])
