"""Parity of our ULIP Point-BERT and Uni3D point encoders with the upstream modules.

Usage (checkouts of salesforce/ULIP and baaivision/Uni3D; nothing is downloaded here):
    .venv/bin/python scripts/upstream_parity.py --ulip ../ULIP --uni3d ../Uni3D

Imports the upstream ``PointTransformer`` (ULIP) and ``PointcloudEncoder`` (Uni3D) from the
checkouts — their CUDA-only imports (pointnet2_ops, knn_cuda) and unused ones (matplotlib,
termcolor, easydict, h5py, open3d) replaced by small stand-ins; FPS uses our pointnet2-equivalent
kernel on both sides — gives both implementations the same random weights and BatchNorm
statistics, and prints the largest output difference on random clouds. Uni3D runs 4 of its 40
EVA blocks (identical blocks) to stay CPU-friendly.
"""

import argparse
import sys
import types
from pathlib import Path

import torch

from know3d.evaluation.models.pointtok import farthest_point_sample

cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
cli.add_argument("--ulip", type=Path, required=True, help="salesforce/ULIP checkout")
cli.add_argument("--uni3d", type=Path, required=True, help="baaivision/Uni3D checkout")
opts = cli.parse_args()


def stub(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


stub("matplotlib")
stub("matplotlib.pyplot")
stub("mpl_toolkits")
stub("mpl_toolkits.mplot3d", Axes3D=object)
stub("knn_cuda", KNN=lambda **kw: None)


def fps(xyz, n):
    return farthest_point_sample(xyz, n).int()


def gather_operation(features, idx):
    return torch.gather(features, 2, idx.long()[:, None, :].expand(-1, features.shape[1], -1))


p2 = stub("pointnet2_ops.pointnet2_utils", furthest_point_sample=fps, gather_operation=gather_operation)
stub("pointnet2_ops", pointnet2_utils=p2)


class EasyDict(dict):
    def __getattr__(self, k):
        return self[k]

    def __setattr__(self, k, v):
        self[k] = v


stub("easydict", EasyDict=EasyDict)
stub("h5py")
stub("open3d")
stub("termcolor", colored=lambda s, *a, **k: s)

torch.manual_seed(0)
pts = torch.rand(2, 2048, 3) * 1.96 - 0.98

# ---------------- ULIP
sys.path.insert(0, str(opts.ulip))
from models.pointbert.point_encoder import PointTransformer

from know3d.evaluation.models.ulip import UlipConfig, UlipPointBert

cfg = types.SimpleNamespace(
    trans_dim=384, depth=12, drop_path_rate=0.1, cls_dim=40, num_heads=6, group_size=32, num_group=512, encoder_dims=256
)
up = PointTransformer(cfg, args=types.SimpleNamespace(evaluate_3d=True)).eval()
ours = UlipPointBert(UlipConfig()).eval()
sd = {k[len("point_encoder.") :]: v for k, v in ours.state_dict().items() if k.startswith("point_encoder.")}
missing, unexpected = up.load_state_dict(sd, strict=False)
print("ULIP upstream missing", missing, "unexpected", unexpected)
# random BN stats so BatchNorm is not the identity
with torch.no_grad():
    for name, m in up.named_modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    ours.point_encoder.load_state_dict(up.state_dict())
    a, b = up(pts), ours.point_encoder(pts)
print("ULIP point features", tuple(a.shape), "max abs diff", (a - b).abs().max().item(), "scale", a.abs().mean().item())
sys.path.pop(0)
for k in [k for k in sys.modules if k == "models" or k.startswith("models.")]:
    del sys.modules[k]

# ---------------- Uni3D
sys.path.insert(0, str(opts.uni3d))
import timm
from models.point_encoder import PointcloudEncoder

from know3d.evaluation.models.uni3d import Uni3d, Uni3dModelConfig

args = types.SimpleNamespace(
    pc_feat_dim=1408, embed_dim=1024, group_size=64, num_group=512, pc_encoder_dim=512, patch_dropout=0.0
)
arch = Uni3dModelConfig(pc_model_overrides=dict(depth=4))  # 4 of the 40 blocks: same block, CPU-friendly
vis = timm.create_model("eva_giant_patch14_560", pretrained=False, drop_path_rate=0.0, depth=4)
up = PointcloudEncoder(vis, args).eval()
ours = Uni3d(arch).eval()
sd = {k[len("point_encoder.") :]: v for k, v in ours.state_dict().items() if k.startswith("point_encoder.")}
print("Uni3D load", up.load_state_dict(sd, strict=True))
with torch.no_grad():
    for m in up.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    ours.point_encoder.load_state_dict(up.state_dict())
    colors = torch.full_like(pts, 100 / 255)
    a = up(pts, colors)
    b = ours.encode_pc(torch.cat([pts, colors], -1))
print("Uni3D embeddings", tuple(a.shape), "max abs diff", (a - b).abs().max().item(), "scale", a.abs().mean().item())
