"""How much a trained MFAVB's fusing-augmenting blocks change what its cluster heads see (issue 13).

Loads an MFAVB checkpoint (a ``checkpoint_*`` folder of ``LAKE/models/<run>/``, as the train job
writes it) and, on the first rows of the CIFAR-10 feature file, reports for each block its
LayerScale weights (mean |gamma|; the blocks start at 1e-4, near the identity) and how far the
tokens move through all blocks (||blocks(tokens) - tokens|| / ||tokens||); then labels the rows
twice, through the blocks and with the blocks skipped (the tokens straight into the read-out), and
prints the share of rows whose cluster is the same, and each labelling's ACC against the CIFAR
labels. A share near 1 means the trained blocks do not change the clustering: the model is then
CC-MLP's heads on tokenised features.

    python benchmarks/mfavb_blocks.py --checkpoint LAKE/models/mfavb-2-seed0/checkpoint_...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CIFAR_FEATURES, REPO, table  # noqa: E402

sys.path.insert(0, str(REPO))


def load_mfavb(folder: Path):
    from rayclust.models import build_model, load_tensors
    from rayclust.models.checkpoint import CHECKPOINT_FILE, CONFIG_FILE

    description = json.loads((folder / CONFIG_FILE).read_text())
    model = build_model(description["model_config"], description["feature_dim"], description["clusters"])
    model.load_state_dict(load_tensors(str(folder / CHECKPOINT_FILE), str(folder))["model"])
    return model.eval(), description


def main() -> None:
    import numpy as np
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    model, description = load_mfavb(args.checkpoint)
    from rayclust.evaluation import cluster_metrics

    data = np.load(CIFAR_FEATURES)
    features, truth = torch.from_numpy(data["clean"][:args.rows].astype(np.float32)), data["labels"][:args.rows]
    rows = []
    with torch.no_grad():
        tokens = model.tokenizer(features)
        a = b = tokens
        for number, block in enumerate(model.blocks, 1):
            gammas = [m.gamma.abs().mean().item() for m in block.modules() if hasattr(m, "gamma")]
            before = a
            a, b = block(a, b)
            rows.append({"block": number, "mean abs gamma": f"{np.mean(gammas):.2e}" if gammas else "none",
                         "tokens moved": f"{((a - before).norm() / before.norm()).item():.4f}"})
        through = model.cluster_head(model.norm(a.flatten(1))).argmax(1)
        skipped = model.cluster_head(model.norm(tokens.flatten(1))).argmax(1)
    print(f"{args.checkpoint} ({description['model_config'].get('blocks')} blocks, "
          f"layer_scale {description['model_config'].get('layer_scale')}), {len(features):,} rows")
    print(table(rows))
    print(f"moved through all blocks: {((a - tokens).norm() / tokens.norm()).item():.4f}; "
          f"same cluster with the blocks skipped: {(through == skipped).float().mean().item():.3f} of rows; "
          f"ACC through the blocks {cluster_metrics(truth, through.numpy())['acc']:.3f}, "
          f"skipped {cluster_metrics(truth, skipped.numpy())['acc']:.3f}")


if __name__ == "__main__":
    main()
