"""A benchmark-layout evaluation set with known perturbations (demo, tests, benchmarks).

From a folder of meshes (e.g. the procedural assets of a data build) this writes::

    <out>/gt/<uid>/000.glb       the mesh (geometry only)
    <out>/image/<uid>/000.png    a front render (the "condition image")
    <out>/pred/<uid>/000.glb     a fake "prediction": the GT with one known perturbation

Perturbations cycle over the uids, so their metrics must order as expected:
``identity`` (CD ~ sampling noise), ``similarity`` (translated + uniformly scaled: the
normalization removes it, metrics equal identity's), ``noise`` (Gaussian vertex noise),
``rotate`` (20° about the vertical axis), ``cut`` (the faces of the outer 30 % along x
removed). With
``broken=True`` one extra uid gets a truncated GLB (must become an error entry) and one an image
but no prediction (must be reported as missing).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from know3d.evaluation.meshes import load_mesh, normalize, uid_rng
from know3d.rendering.assets import MESH_EXTENSIONS

PERTURBATIONS = ("identity", "similarity", "noise", "rotate", "cut")


def perturb(mesh: object, kind: str, rng: np.random.Generator) -> object:
    """A perturbed copy of a normalized mesh (longest side 1.96)."""
    import trimesh

    out = mesh.copy()
    if kind == "identity":
        return out
    if kind == "similarity":
        out.apply_scale(float(rng.uniform(0.3, 3.0)))
        out.apply_translation(rng.uniform(-2.0, 2.0, size=3))
    elif kind == "noise":
        out.vertices = out.vertices + rng.normal(0.0, 0.01, size=out.vertices.shape)
    elif kind == "rotate":
        out.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(20.0), [0.0, 1.0, 0.0]))
    elif kind == "cut":
        lo, hi = out.bounds[:, 0]
        keep = out.triangles_center[:, 0] < lo + 0.7 * (hi - lo)  # drop the outer 30% along x
        out.update_faces(keep)
        out.remove_unreferenced_vertices()
    else:
        raise ValueError(f"unknown perturbation {kind!r} (one of {PERTURBATIONS})")
    return out


def make_demo_set(
    meshes: list[Path], out: Path, seed: int = 0, resolution: int = 256, backend: str = "egl", broken: bool = True
) -> dict[str, str]:
    """Write the set; returns uid -> perturbation kind (also in ``<out>/perturbations.json``)."""
    from know3d.evaluation.shapes import mesh_asset
    from know3d.rendering.camera import make_camera
    from know3d.rendering.process import compose_background
    from know3d.rendering.render import ViewRenderer

    out = Path(out)
    kinds: dict[str, str] = {}
    renderer = ViewRenderer(resolution, backend)
    try:
        for i, path in enumerate(sorted(meshes)):
            uid = Path(path).stem
            mesh, _ = load_mesh(Path(path), allow_non_manifold=True)
            mesh = normalize(mesh)
            kind = PERTURBATIONS[i % len(PERTURBATIONS)]
            for sub in ("gt", "image", "pred"):
                (out / sub / uid).mkdir(parents=True, exist_ok=True)
            mesh.export(out / "gt" / uid / "000.glb")
            view = renderer.render(mesh_asset(mesh), [make_camera(0.0, 10.0, 40.0, resolution)])[0]
            Image.fromarray(compose_background(view.rgba, "white")[..., :3]).save(out / "image" / uid / "000.png")
            perturb(mesh, kind, uid_rng(uid, seed, "demo")).export(out / "pred" / uid / "000.glb")
            kinds[uid] = kind
    finally:
        renderer.close()
    if broken and kinds:
        first = next(iter(kinds))
        (out / "pred" / "broken_prediction").mkdir(parents=True, exist_ok=True)
        data = (out / "pred" / first / "000.glb").read_bytes()
        (out / "pred" / "broken_prediction" / "000.glb").write_bytes(data[: len(data) // 3])
        kinds["broken_prediction"] = "truncated file"
        (out / "image" / "missing_prediction").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (resolution, resolution), "white").save(out / "image" / "missing_prediction" / "000.png")
        kinds["missing_prediction"] = "no prediction"
    (out / "perturbations.json").write_text(json.dumps(kinds, indent=2))
    return kinds


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meshes", type=Path, required=True, help="Folder of meshes (searched recursively).")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None, help="Use the first N meshes (sorted).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    meshes = sorted(p for p in args.meshes.rglob("*") if p.suffix.lower().lstrip(".") in MESH_EXTENSIONS)
    kinds = make_demo_set(meshes[: args.limit], args.output, args.seed)
    print(f"{len(kinds)} uids -> {args.output} (gt/, pred/, image/, perturbations.json)")


if __name__ == "__main__":
    main()
