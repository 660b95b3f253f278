"""The feature models' shapes and the properties the MFAVB paper names, and the training pairs."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from rayclust.losses import contrastive_clustering_loss
from rayclust.models import build_model, model_config
from rayclust.models.heads import co_assignments
from rayclust.training import nearest_rows, training_pairs, view_pair

DIM, CLUSTERS, BATCH = 64, 5, 12


def mfavb(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    config = model_config("mfavb", tokens=4, width=16, heads=2, dropout=0.0, **overrides)
    return build_model(config, DIM, CLUSTERS).eval()


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_mfavb_outputs_instance_and_cluster_spaces(blocks):
    model = mfavb(blocks=blocks)
    assert len(model.blocks) == blocks
    heads = model(torch.randn(BATCH, DIM), torch.randn(BATCH, DIM))
    cluster_heads = model_config("mfavb")["cluster_heads"]
    for z_a, z_b, c_a, c_b in heads:
        assert z_a.shape == z_b.shape == (BATCH, 128)
        assert c_a.shape == c_b.shape == (cluster_heads, BATCH, CLUSTERS)
        torch.testing.assert_close(c_a.sum(2), torch.ones(cluster_heads, BATCH))
    clean = torch.randn(BATCH, DIM)
    probabilities = model.predict(clean)
    assert probabilities.shape == (BATCH, CLUSTERS)
    per_head = model(clean)  # one view: what the self-labelling step trains
    assert per_head.shape == (cluster_heads, BATCH, CLUSTERS)
    torch.testing.assert_close(probabilities, per_head.mean(0))  # not aligned yet: the heads' plain mean


def test_mfavb_fuses_the_two_views():
    """Each view's output depends on the other view: the fused block mixes them."""
    model = mfavb(contrast="pair", layer_scale=None)  # full-strength blocks: the effect is plain to see
    a, b = torch.randn(BATCH, DIM), torch.randn(BATCH, DIM)
    with torch.no_grad():
        z_a, _, _, _ = model(a, b)[-1]
        z_a_other, _, _, _ = model(a, torch.randn(BATCH, DIM))[-1]
    assert not torch.allclose(z_a, z_a_other, atol=1e-4)


def test_mfavb_view_blocks_share_weights():
    """Swapping the two views swaps the outputs: both views pass through the same weights."""
    model = mfavb(contrast="pair", layer_scale=None)  # full-strength blocks: the effect is plain to see
    a, b = torch.randn(BATCH, DIM), torch.randn(BATCH, DIM)
    with torch.no_grad():
        z_a, z_b, c_a, c_b = model(a, b)[-1]
        s_a, s_b, d_a, d_b = model(b, a)[-1]
    torch.testing.assert_close(z_a, s_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(c_b, d_a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["ccmlp", "mfavb"])
def test_cluster_heads_label_together_once_aligned_and_the_checkpoint_keeps_it(name):
    """Head 2 is head 0 with its clusters renumbered: aligned, the two give the same probabilities."""
    torch.manual_seed(0)
    model = build_model(model_config(name, cluster_heads=3), DIM, CLUSTERS).eval()
    heads = model.cluster_head.heads
    renumbered = torch.tensor([3, 0, 4, 1, 2])
    heads[2].load_state_dict(heads[0].state_dict())
    with torch.no_grad():
        last = heads[2][0][2]  # the projector's last Linear: one output row per cluster
        last.weight.copy_(last.weight[renumbered])
        last.bias.copy_(last.bias[renumbered])
    clean = torch.randn(200, DIM)
    every_head = model(clean, clean)[0][2]
    assert every_head.shape == (3, 200, CLUSTERS)
    reference, agreement = model.cluster_head.align(co_assignments(every_head))
    assert reference in (0, 2) and agreement[2 - reference] == 1.0
    aligned = [every_head[h][:, model.cluster_head.alignment[h]] for h in range(3)]
    torch.testing.assert_close(aligned[2], aligned[0])
    torch.testing.assert_close(model.predict(clean), torch.stack(aligned).mean(0))
    restored = build_model(model_config(name, cluster_heads=3), DIM, CLUSTERS).eval()
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored.cluster_head.alignment, model.cluster_head.alignment)


def test_ccmlp_heads_and_a_loss_that_trains():
    torch.manual_seed(0)
    model = build_model(model_config("ccmlp"), DIM, CLUSTERS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    a = torch.randn(64, DIM)
    b = a + 0.1 * torch.randn(64, DIM)
    losses = []
    for _ in range(30):
        loss, _ = contrastive_clustering_loss(model(a, b))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_nearest_rows_finds_the_closest_other_rows():
    features = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0]], np.float32)
    nearest = nearest_rows(features, 1, chunk=2)
    assert nearest[:, 0].tolist() == [1, 0, 3, 2, 2]  # [-1, 0] is least unlike [0, 1]
    assert nearest_rows(features[:2], 3).tolist() == [[1, 0, 0], [0, 1, 1]]  # a tiny last block still has k


def test_training_pairs_carry_views_and_neighbours():
    rows, views = 6, 3
    rng = np.random.default_rng(0)
    batch = pa.table({
        "embedding": pa.array(list(rng.standard_normal((rows, DIM)).astype(np.float32))),
        "views": pa.array([list(v) for v in rng.standard_normal((rows, views, DIM)).astype(np.float32)]),
    })
    pairs = training_pairs(batch, neighbours=2)
    assert pairs["views"].shape == (rows, 1 + views, DIM)
    np.testing.assert_allclose(pairs["views"][:, 0], np.stack(batch.column("embedding").to_numpy(zero_copy_only=False)))
    assert pairs["neighbours"].shape == (rows, 2, DIM)
    tensors = {k: torch.from_numpy(v) for k, v in pairs.items()}
    first, second = view_pair(tensors, torch.Generator().manual_seed(0))
    assert first.shape == second.shape == (rows, DIM)
    for row in range(rows):  # the second of each pair is one of that row's neighbours
        assert any(torch.equal(second[row], n) for n in tensors["neighbours"][row])
