"""TEMI: many cluster heads on frozen features, an EMA teacher and a pointwise-mutual-information loss.

Adaloglou et al., "Exploring the limits of deep image clustering using pretrained models",
BMVC 2023. Each head is an MLP into a bottleneck, L2-normalised, then a weight-normalised
linear layer into K clusters. A teacher copy of the heads follows the student by an
exponential moving average; the loss (``losses.pmi_loss``) makes the student's clusters of a
row agree with the teacher's clusters of one of its nearest rows, divided by the teacher's
running cluster marginal (so agreeing on a large cluster earns less than on a small one). The
head whose loss is lowest over the last epoch labels: an unsupervised choice. See
docs/models.md for what differs from the paper.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from rayclust.losses import PMISettings
from rayclust.models.mfavb import FusingEncoder


class Prototypes(nn.Module):
    """A weight-normalised linear map into K clusters: each cluster's weight row is a direction and
    a length, learned apart. (torch's ``weight_norm`` parametrization would do the same, but a
    parametrized module cannot be pickled, and the infer job ships the model to its actors.)"""

    def __init__(self, width: int, clusters: int):
        super().__init__()
        weight = nn.Linear(width, clusters, bias=False).weight.detach()
        self.direction = nn.Parameter(weight.clone())
        self.length = nn.Parameter(weight.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.length * F.normalize(self.direction, dim=1)).T


class PMIHead(nn.Module):
    def __init__(self, width: int, clusters: int, hidden: int, bottleneck: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = Prototypes(bottleneck, clusters)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.prototypes(F.normalize(self.mlp(features), dim=-1))


class PMIHeads(nn.Module):
    def __init__(self, width: int, clusters: int, count: int, hidden: int, bottleneck: int):
        super().__init__()
        self.heads = nn.ModuleList(PMIHead(width, clusters, hidden, bottleneck) for _ in range(count))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Every head's logits [H, B, K]."""
        return torch.stack([head(features) for head in self.heads])


class TEMI(nn.Module):
    """``fusing``: MFAVB's fusing blocks under the heads (``FusingEncoder``'s settings), trained by
    the PMI loss; the teacher keeps an EMA copy of them too. The student sees each row fused with
    its partner, the teacher each row fused with itself (what ``predict`` computes): MFAVB's
    "self" contrast, since a half fused with its partner could agree with it by copying."""

    def __init__(self, feature_dim: int, clusters: int, heads: int = 16, hidden: int = 512, bottleneck: int = 256,
                 student_temperature: float = 0.1, teacher_temperature: float = 0.05, beta: float = 0.6,
                 teacher_momentum: float = 0.99, marginal_momentum: float = 0.9, fusing: dict | None = None):
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads must be at least 1, not {heads}")
        self.loss_settings = PMISettings(student_temperature, teacher_temperature, beta, marginal_momentum)
        self.teacher_momentum = teacher_momentum
        self.encoder = FusingEncoder(feature_dim, **fusing) if fusing else None
        self.teacher_encoder = copy.deepcopy(self.encoder).requires_grad_(False) if fusing else None
        width = self.encoder.width if fusing else feature_dim
        # standardises each feature over the batches seen (TEMI's heads expect centred inputs); its
        # running statistics standardise at predict time
        self.norm = nn.BatchNorm1d(width, affine=False)
        self.student = PMIHeads(width, clusters, heads, hidden, bottleneck)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("marginal", torch.full((heads, clusters), 1.0 / clusters))
        self.register_buffer("labelling_head", torch.tensor(0))

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of rows and of their partners [B, D] -> (student logits, teacher logits), each
        [H, 2B, K] over the rows [a; b]."""
        pair = torch.cat([view_a, view_b])
        if self.encoder is None:
            pair = self.norm(pair)
            with torch.no_grad():
                teacher = self.teacher(pair)
            return self.student(pair), teacher
        with torch.no_grad():
            teacher = self.teacher(self.norm(self.teacher_encoder.encode(pair, pair)[0]))
        return self.student(self.norm(torch.cat(self.encoder.encode(view_a, view_b)))), teacher

    @torch.no_grad()
    def follow_student(self, epoch: int, epochs: int) -> None:
        """One EMA step of the teacher towards the student, at this epoch's momentum: a cosine from
        ``teacher_momentum`` to 1 over the epochs, so the teacher settles as training ends."""
        momentum = 1 - (1 - self.teacher_momentum) * (math.cos(math.pi * epoch / epochs) + 1) / 2
        pairs = [(self.teacher, self.student)] + ([(self.teacher_encoder, self.encoder)] if self.encoder else [])
        for teachers, students in pairs:
            for teacher, student in zip(teachers.parameters(), students.parameters()):
                teacher.mul_(momentum).add_(student.detach(), alpha=1 - momentum)

    def choose_head(self, head_loss: torch.Tensor) -> int:
        """The head with the lowest mean loss [H] labels from now on."""
        self.labelling_head.fill_(int(head_loss.argmin()))
        return int(self.labelling_head)

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Cluster probabilities [B, K] of the labelling head of the teacher."""
        head = self.teacher.heads[int(self.labelling_head)]
        return F.softmax(head(self.representation(features)) / self.loss_settings.teacher_temperature, -1)

    def representation(self, features: torch.Tensor) -> torch.Tensor:
        """The standardised features [B, D]; with fusing blocks, the teacher's fusion of each row with itself."""
        if self.teacher_encoder is not None:
            features = self.teacher_encoder.encode(features, features)[0]
        return self.norm(features)
