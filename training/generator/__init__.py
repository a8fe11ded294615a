"""The Know3D 3D generator (paper §3.2) and what it trains on: sparse-structure targets
(occupancy, SS-VAE latents), DINOv3 front features and the hidden states of the frozen back-view
model. Model-independent training infrastructure is in :mod:`know3d.training.engine`."""
