"""Contrastive Clustering losses, and the proof that N workers x batch b train like one batch of N*b."""
from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from rayclust.losses import (cluster_entropy, cluster_loss, contrastive_clustering_loss, instance_loss,
                             self_labelling_loss)


def test_instance_loss_prefers_matching_views():
    torch.manual_seed(0)
    a = torch.randn(64, 16)
    matched = instance_loss(a, a + 0.01 * torch.randn(64, 16))
    unmatched = instance_loss(a, torch.randn(64, 16))
    assert matched < unmatched - 1.0


def test_cluster_entropy_is_zero_when_balanced_and_log_k_when_collapsed():
    balanced = torch.eye(4).repeat(8, 1)
    collapsed = torch.zeros(32, 4)
    collapsed[:, 0] = 1
    assert cluster_entropy(balanced).item() == pytest.approx(0.0, abs=1e-6)
    assert cluster_entropy(collapsed).item() == pytest.approx(math.log(4), abs=1e-5)


def test_cluster_loss_penalises_collapse():
    torch.manual_seed(0)
    confident = torch.softmax(5 * torch.randn(64, 10), dim=1)
    collapsed = torch.zeros(64, 10)
    collapsed[:, 3] = 1
    assert cluster_loss(confident, confident) < cluster_loss(collapsed, collapsed)


def test_several_cluster_heads_share_the_cluster_loss():
    torch.manual_seed(0)
    z_a, z_b = torch.randn(32, 8), torch.randn(32, 8)
    c_a, c_b = torch.softmax(torch.randn(3, 32, 4), 2), torch.softmax(torch.randn(3, 32, 4), 2)
    loss, parts = contrastive_clustering_loss([(z_a, z_b, c_a, c_b)])
    each = torch.stack([cluster_loss(a, b) for a, b in zip(c_a, c_b)])
    assert parts["cluster_loss"] == pytest.approx(each.mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(instance_loss(z_a, z_b).item() + each.mean().item(), rel=1e-6)
    _, one_head = contrastive_clustering_loss([(z_a, z_b, c_a[1], c_b[1])])  # [B, K]: one head
    assert one_head["cluster_loss"] == pytest.approx(each[1].item(), rel=1e-6)


def test_self_labelling_loss_learns_only_from_confident_rows():
    targets = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.02, 0.98], [0.5, 0.5]])
    probs = torch.tensor([[0.6, 0.4], [0.1, 0.9], [0.3, 0.7], [0.9, 0.1]], requires_grad=True)
    loss, kept = self_labelling_loss(probs, targets, threshold=0.9)
    assert kept == 0.5
    # rows 0 and 2 are confident (one per class, so equal weights): mean of -log p(pseudo-label)
    assert loss.item() == pytest.approx(-(math.log(0.6) + math.log(0.7)) / 2, rel=1e-5)
    loss.backward()
    assert probs.grad[[1, 3]].abs().sum() == 0  # unconfident rows teach nothing


def test_self_labelling_loss_weighs_rare_pseudo_labels_up_and_survives_no_confident_row():
    targets = torch.tensor([[0.99, 0.01]] * 3 + [[0.01, 0.99]])
    probs = torch.tensor([[0.5, 0.5]] * 3 + [[0.9, 0.1]])
    loss, _ = self_labelling_loss(probs, targets, threshold=0.9)
    # class 1 is a quarter of the kept rows but half of the weight
    assert loss.item() == pytest.approx((-math.log(0.5) - math.log(0.1)) / 2, rel=1e-5)
    probs = torch.full((4, 2), 0.5, requires_grad=True)
    loss, kept = self_labelling_loss(probs, probs.detach(), threshold=0.9)
    assert kept == 0.0 and loss.item() == 0.0
    loss.backward()  # a batch without a confident row still steps (DDP needs every worker's backward)


def small_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Linear(12, 8 + 5)


def outputs(model: nn.Module, a: torch.Tensor, b: torch.Tensor):
    out_a, out_b = model(a), model(b)
    return out_a[:, :8], out_b[:, :8], out_a[:, 8:].softmax(1), out_b[:, 8:].softmax(1)


def distributed_gradients(rank: int, world: int, init_file: str, a, b, result_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = nn.parallel.DistributedDataParallel(small_model())
    per_worker = a.shape[0] // world
    local = slice(rank * per_worker, (rank + 1) * per_worker)
    loss, _ = contrastive_clustering_loss([outputs(model, a[local], b[local])])
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "grad": [p.grad for p in model.parameters()]}, result_file)
    torch.distributed.destroy_process_group()


def test_two_workers_of_batch_b_match_one_batch_of_2b(tmp_path):
    torch.manual_seed(0)
    a, b = torch.randn(16, 12), torch.randn(16, 12)
    single = small_model()
    loss, _ = contrastive_clustering_loss([outputs(single, a, b)])
    loss.backward()

    result_file = str(tmp_path / "rank0.pt")
    mp.spawn(distributed_gradients, args=(2, str(tmp_path / "init"), a, b, result_file), nprocs=2, join=True)
    distributed = torch.load(result_file, weights_only=True)

    assert distributed["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for got, want in zip(distributed["grad"], [p.grad for p in single.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
