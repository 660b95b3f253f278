"""Cluster centres become names, with the encoder that made the features.

- open_clip encoders: the text tower embeds one prompt per word of a vocabulary ("a photo of a
  {word}."), and each cluster takes the words nearest its centre (cosine), as TAC (ICML 2024)
  names clusters from WordNet nouns. The default vocabulary is the ImageNet-1k class names that
  open_clip ships; a user's own is a text file, one name per line.
- ``effnet-lite0``: its own ImageNet classifier head applied to the cluster's mean embedding (the
  mean of a linear head's logits over the members is the head's logits of their mean).
- Any other encoder (features imported under another name): clusters are numbered.
Each cluster also gets one name of its own (``ClusterNames.name``): words are matched one to one
to clusters (the assignment with the highest total log score), so two clusters that both look
most like "chain" are not both called "chain"; with fewer words than clusters, repeats are
numbered ("chain 2").
Names run on the driver, once per model version, on K centres: nothing here grows with the corpus.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rayclust.encoders import load_encoder, parse_spec
from rayclust.errors import UserError

TOP_NAMES = 5
PROMPT = "a photo of a {}."
SCORE_TEMPERATURE = 100.0  # CLIP's logit scale: softmax over cosine similarities


@dataclass(frozen=True)
class ClusterName:
    name: str
    score: float  # the name's share of the cluster's softmax over the vocabulary


@dataclass(frozen=True)
class ClusterNames:
    name: str | None  # the cluster's own name; None: no centre, nothing to name
    top: list[ClusterName]  # the best words, best first


def read_vocabulary(path: str) -> list[str]:
    """One name per line; blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"vocabulary file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"vocabulary file {path}: not UTF-8 text") from None
    words = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not words:
        raise UserError(f"vocabulary file {path}: no names in it")
    return words


def encoder_kind(encoder: str) -> str | None:
    """open_clip, effnet, or None for features made elsewhere (an import names its own encoder)."""
    try:
        return parse_spec(encoder).kind
    except UserError:
        return None


def check_vocabulary_fits(encoder: str, vocabulary: list[str] | None) -> None:
    """A user vocabulary needs a text tower: only open_clip encoders have one."""
    if vocabulary is not None and encoder_kind(encoder) != "open_clip":
        raise UserError(f"--vocabulary names clusters with an open_clip text tower; the features were made with "
                        f"{encoder}, which names them with its own ImageNet classes")


def name_clusters(encoder: str, unit_centres: np.ndarray, mean_embeddings: np.ndarray,
                  vocabulary: list[str] | None = None) -> list[ClusterNames]:
    """Each cluster's own name and its TOP_NAMES best words (none for a cluster without a centre)."""
    check_vocabulary_fits(encoder, vocabulary)
    kind = encoder_kind(encoder)
    if kind == "effnet":
        scores = effnet_class_scores(encoder, mean_embeddings)
        words: list[str] = imagenet_classnames()
    elif kind == "open_clip":
        words = vocabulary or imagenet_classnames()
        scores = text_tower_scores(encoder, unit_centres, words)
    else:
        return [ClusterNames(None, []) for _ in unit_centres]
    named = np.isfinite(scores).all(1)
    own = own_names(scores[named], words)
    chosen = iter(own)
    return [ClusterNames(next(chosen), top_names(row, words)) if ok else ClusterNames(None, [])
            for row, ok in zip(scores, named)]


def own_names(scores: np.ndarray, words: list[str]) -> list[str]:
    """One word per cluster (rows of ``scores``), distinct while there are words enough."""
    from scipy.optimize import linear_sum_assignment

    if len(scores) <= len(words):
        rows, columns = linear_sum_assignment(np.log(np.maximum(scores, 1e-12)), maximize=True)
        return [words[c] for _, c in sorted(zip(rows, columns))]
    seen: dict[str, int] = {}
    names = []
    for word in (words[i] for i in scores.argmax(1)):
        seen[word] = seen.get(word, 0) + 1
        names.append(word if seen[word] == 1 else f"{word} {seen[word]}")
    return names


def top_names(scores: np.ndarray, words: list[str]) -> list[ClusterName]:
    best = np.argsort(-scores)[:TOP_NAMES]
    return [ClusterName(words[i], round(float(scores[i]), 4)) for i in best]


def imagenet_classnames() -> list[str]:
    import open_clip

    return list(open_clip.IMAGENET_CLASSNAMES)


def effnet_class_scores(encoder: str, mean_embeddings: np.ndarray) -> np.ndarray:
    """Softmax of the ImageNet head over each cluster's mean embedding [K, 1000] (NaN rows stay NaN)."""
    head = load_encoder(encoder).model._fc
    with torch.no_grad():
        logits = head(torch.from_numpy(mean_embeddings.astype(np.float32)))
    return torch.softmax(logits, dim=1).numpy()


def text_tower_scores(encoder: str, unit_centres: np.ndarray, words: list[str]) -> np.ndarray:
    """Softmax over the vocabulary of each centre's cosine similarity to the words' prompts [K, V]."""
    import open_clip

    clip = load_encoder(encoder).model
    tokenizer = open_clip.get_tokenizer(parse_spec(encoder).model)
    with torch.no_grad():
        words_vectors = open_clip.build_zero_shot_classifier(clip, tokenizer, words, (PROMPT,),
                                                             num_classes_per_batch=100)
        similarity = torch.from_numpy(unit_centres.astype(np.float32)) @ words_vectors
    return torch.softmax(SCORE_TEMPERATURE * similarity, dim=1).numpy()
