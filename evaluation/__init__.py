"""HY3D-Bench-style evaluation, usable without Ray.

* :mod:`evaluation.meshes` — safe geometry-only loading, the benchmark's normalization, seeded
  surface sampling and farthest point sampling;
* :mod:`evaluation.geometry` — Chamfer-L1/L2, F-score, normal consistency, voxel IoU;
* :mod:`evaluation.images` — PSNR, SSIM, LPIPS of back views;
* :mod:`evaluation.semantic` and :mod:`evaluation.models` — ULIP / Uni3D image–shape scores;
* :mod:`evaluation.shapes` — everything measured for one uid; :mod:`evaluation.results`,
  :mod:`evaluation.report` — tables and the HTML report; :mod:`evaluation.demo` — a demo set.

The command line and the Ray orchestration are in :mod:`pipeline.evaluate`.
"""
