"""HY3D-Bench-style evaluation, usable without Ray.

* :mod:`know3d.evaluation.meshes` — safe geometry-only loading, the benchmark's normalization, seeded
  surface sampling and farthest point sampling;
* :mod:`know3d.evaluation.geometry` — Chamfer-L1/L2, F-score, normal consistency, voxel IoU;
* :mod:`know3d.evaluation.images` — PSNR, SSIM, LPIPS of back views;
* :mod:`know3d.evaluation.semantic` and :mod:`know3d.evaluation.models` — ULIP / Uni3D image–shape scores;
* :mod:`know3d.evaluation.shapes` — everything measured for one uid; :mod:`know3d.evaluation.results`,
  :mod:`know3d.evaluation.report` — tables and the HTML report; :mod:`know3d.evaluation.demo` — a demo set.

The command line and the Ray orchestration are in :mod:`know3d.pipeline.evaluate`.
"""
