"""Point-cloud tokenizer shared by Point-BERT (ULIP) and Uni3D: FPS centres, kNN groups, mini-PointNet.

Both upstream models use CUDA extensions here (pointnet2_ops' furthest point sampling, knn_cuda);
these are plain-PyTorch equivalents that run on any device:

* centres: farthest point sampling starting from the first point (pointnet2's kernel, including
  its exclusion of points at the origin);
* groups: the ``group_size`` nearest points of each centre (the centre itself included), expressed
  relative to the centre; Uni3D appends each point's colour;
* tokens: a shared two-stage PointNet (conv1x1-BN-ReLU-conv1x1, max-pool, concatenate the
  pooled feature in front of every point feature, conv1x1-BN-ReLU-conv1x1, max-pool).
"""

from __future__ import annotations

import torch
from torch import nn


def farthest_point_sample(xyz: torch.Tensor, count: int) -> torch.Tensor:
    """Indices [B, count] of farthest point sampling, as pointnet2_ops computes it.

    Starts at point 0 of every cloud; like the CUDA kernel, points with squared norm <= 1e-3
    (within ~0.03 of the origin) are never picked after the first."""
    batch, num, _ = xyz.shape
    index = torch.zeros(batch, count, dtype=torch.long, device=xyz.device)
    distance = torch.full((batch, num), 1e10, device=xyz.device, dtype=xyz.dtype)
    distance[(xyz**2).sum(-1) <= 1e-3] = -1.0  # excluded from the argmax for good
    farthest = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    for i in range(count):
        index[:, i] = farthest
        centre = xyz[rows, farthest][:, None, :]
        distance = torch.where(distance < 0, distance, torch.minimum(distance, ((xyz - centre) ** 2).sum(-1)))
        farthest = distance.argmax(-1)
    return index


def gather(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """points [B, N, C], index [B, ...] -> [B, ..., C]."""
    batch = points.shape[0]
    flat = index.reshape(batch, -1)
    out = torch.gather(points, 1, flat[..., None].expand(-1, -1, points.shape[-1]))
    return out.reshape(*index.shape, points.shape[-1])


class Group(nn.Module):
    def __init__(self, num_group: int, group_size: int) -> None:
        super().__init__()
        self.num_group = num_group
        self.group_size = group_size

    def forward(self, xyz: torch.Tensor, colors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """xyz [B, N, 3] (+ colors [B, N, 3]) -> (groups [B, G, K, 3 or 6], centres [B, G, 3])."""
        centre = gather(xyz, farthest_point_sample(xyz, self.num_group))
        knn = torch.cdist(centre, xyz).topk(self.group_size, dim=-1, largest=False).indices  # [B, G, K]
        neighbourhood = gather(xyz, knn) - centre[:, :, None, :]
        if colors is not None:
            neighbourhood = torch.cat([neighbourhood, gather(colors, knn)], dim=-1)
        return neighbourhood, centre


class PointNetTokens(nn.Module):
    """Mini-PointNet over each group: [B, G, K, C_in] -> [B, G, out_channels]."""

    def __init__(self, out_channels: int, in_channels: int = 3) -> None:
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv1d(in_channels, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Conv1d(512, out_channels, 1)
        )
        self.out_channels = out_channels

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        batch, num_group, size, channels = groups.shape
        x = groups.reshape(batch * num_group, size, channels).transpose(2, 1)
        feature = self.first_conv(x)  # [BG, 256, K]
        pooled = feature.max(dim=2, keepdim=True).values
        feature = torch.cat([pooled.expand(-1, -1, size), feature], dim=1)  # [BG, 512, K]
        feature = self.second_conv(feature).max(dim=2).values
        return feature.reshape(batch, num_group, self.out_channels)


def position_mlp(width: int) -> nn.Sequential:
    """Centre coordinates -> token width (Linear-GELU-Linear)."""
    return nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))
