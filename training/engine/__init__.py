"""What every trainer shares (the back-view LoRA, the 3D generator): config sections, worker env,
launchers (Ray Train, in-process, torchrun), DeepSpeed setup, checkpoints and resume, metrics, MLflow, EMA.

A trainer keeps only its model: building it, the loss, validation and export; its worker
function composes the pieces below (see :func:`know3d.training.backview_train.run_worker`).
"""
