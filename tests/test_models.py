"""The feature models' shapes and the properties the MFAVB paper names, and the training pairs."""
from __future__ import annotations

import pytest
import torch

from rayclust.losses import contrastive_clustering_loss
from rayclust.models import build_model, model_config
from rayclust.models.heads import ClusterHeads, CoAssignments
from rayclust.train_loop import view_pair

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
    counter = CoAssignments(3, CLUSTERS)
    counter.add(every_head[:, :120])
    counter.add(every_head[:, 120:])  # counted over batches
    reference, agreement = model.cluster_head.align(counter.table())
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


def test_pairs_are_two_views_of_a_row_or_a_view_and_its_neighbour():
    rows, views = 6, 3
    generator = torch.Generator().manual_seed(0)
    batch = {"views": torch.randn(rows, 1 + views, DIM)}
    first, second = view_pair(batch, generator)
    for row in range(rows):  # two different views of the same row
        matches = [v for v in range(1 + views) if torch.equal(batch["views"][row, v], first[row])]
        assert matches and not torch.equal(first[row], second[row])
        assert any(torch.equal(batch["views"][row, v], second[row]) for v in range(1 + views))
    batch["neighbour"] = torch.randn(rows, DIM)
    first, second = view_pair(batch, generator)
    assert torch.equal(second, batch["neighbour"])
    assert all(any(torch.equal(batch["views"][r, v], first[r]) for v in range(1 + views)) for r in range(rows))


def one_hot(assigned: torch.Tensor, clusters: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(assigned, clusters).float()


def test_co_assignments_count_each_pair_of_clusters():
    counter = CoAssignments(2, 3)
    counter.add(torch.stack([one_hot(torch.tensor([0, 1, 2, 2]), 3), one_hot(torch.tensor([1, 1, 0, 0]), 3)]))
    table = counter.table()
    assert table[0, 1].tolist() == [[0, 1, 0], [0, 1, 0], [2, 0, 0]]
    assert table[1, 0].tolist() == table[0, 1].T.tolist() and torch.equal(table[0, 0].diag(), torch.tensor([1., 1, 2]))


def test_a_thousand_clusters_align_across_five_heads():
    """K = 1,000: the counts stay one [H, H, K, K] tensor and the matching recovers a renumbering."""
    clusters, heads, rows = 1000, 5, 20_000
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(clusters, (rows,), generator=generator)
    renumberings = [torch.randperm(clusters, generator=generator) for _ in range(heads)]
    counter = CoAssignments(heads, clusters)
    for batch in torch.arange(rows).split(256):  # as training counts it: batch by batch
        counter.add(torch.stack([one_hot(r[first[batch]], clusters) for r in renumberings]))
    assert counter.counts.numel() == heads * heads * clusters * clusters
    assert counter.table().sum() == heads * heads * rows
    model_heads = build_model(model_config("ccmlp", cluster_heads=heads), DIM, clusters).cluster_head
    reference, agreement = model_heads.align(counter.table())
    assert agreement == [1.0] * heads


def three_blobs(rows: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows near three corners of the positive octant [3 x rows, 3], and which corner."""
    generator = torch.Generator().manual_seed(0)
    corner = torch.arange(3).repeat_interleave(rows)
    return 10 * torch.eye(3)[corner] + 0.3 * torch.randn(3 * rows, 3, generator=generator).abs(), corner


def heads_that_merge_two_corners(count: int = 2) -> ClusterHeads:
    """``count`` heads, each: corners 0 and 1 -> cluster 0, corner 2 -> cluster 1, cluster 2 empty."""
    heads = ClusterHeads(3, 3, count=count)
    with torch.no_grad():
        for head in heads.heads:
            first, last = head[0][0], head[0][2]
            first.weight.copy_(torch.eye(3)), first.bias.zero_()
            last.weight.copy_(torch.tensor([[1.0, 1, 0], [0, 0, 1], [0, 0, 0]]))
            last.bias.copy_(torch.tensor([0, 0, -100.0]))
    return heads


@pytest.mark.parametrize("count", [1, 2])
def test_a_cluster_the_heads_leave_empty_is_refilled_by_splitting_the_merged_one(count):
    representation, corner = three_blobs()
    heads = heads_that_merge_two_corners(count).eval()
    before = heads(representation)
    assert set(before.argmax(1).tolist()) == {0, 1}
    assert heads.refill(representation) == 1
    after = heads(representation)
    cluster = after.argmax(1)
    assert len(set(zip(corner.tolist(), cluster.tolist()))) == 3  # each corner its own cluster
    assert set(cluster.tolist()) == {0, 1, 2}
    torch.testing.assert_close(after.sum(1), torch.ones(len(after)))
    torch.testing.assert_close(after.max(1).values, before.max(1).values)  # the heads' confidence
    restored = heads_that_merge_two_corners(count).eval()
    restored.load_state_dict(heads.state_dict())
    torch.testing.assert_close(restored(representation), after)


def test_a_checkpoint_from_before_refills_loads_without_any():
    heads = heads_that_merge_two_corners()
    old = {k: v for k, v in heads.state_dict().items() if not k.startswith("refill_")}
    restored = ClusterHeads(3, 3, count=2)
    restored.load_state_dict(old)
    assert (restored.refill_child == -1).all()
    torch.testing.assert_close(restored(three_blobs()[0]), heads(three_blobs()[0]))


def test_warm_started_heads_each_label_the_partition_of_their_own_k_means():
    corners, corner = three_blobs(rows=200)
    representation = torch.cat([corners, torch.zeros(len(corners), 13)], 1)  # a head 3 ReLUs wide can die at the start
    heads = ClusterHeads(16, 3, count=2)
    partitions = heads.warm_start(representation, seed=0)
    labelled = heads.all(representation).argmax(2)
    for partition, head in zip(partitions, labelled):
        assert len(set(zip(corner.tolist(), partition.tolist()))) == 3  # k-means finds the three corners
        assert (head.numpy() == partition).all()
