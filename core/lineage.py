"""Walk the MLflow links between the runs of one model's chain: data build -> training ->
evaluation (the tags and datasets written by :mod:`know3d.core.tracking`).

In the MLflow UI the same walk is: an evaluation run's ``know3d.train.run_id`` tag, the
training run's ``know3d.data.run_id`` tag and its input dataset (the digest the build logged as
its output); forward, search runs with ``tags."know3d.data.run_id" LIKE '%<build run id>%'``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from know3d.core.tracking import DATA_RUN_TAG, MODEL_URI_TAG, TRAIN_RUN_TAG

MODEL_META_GLOB = "know3d_*.json"  # an exported model's metadata (e.g. know3d_lora.json)


def model_tags(model: str | None) -> dict[str, str]:
    """Lineage tags of an evaluation that measured ``model``: a ``runs:/<run id>/...`` URI or an
    exported model folder whose metadata names its training run."""
    if not model:
        return {}
    tags = {MODEL_URI_TAG: model}
    if model.startswith("runs:/"):
        tags[TRAIN_RUN_TAG] = model[len("runs:/") :].split("/", 1)[0]
        return tags
    folder = Path(model).expanduser()
    for meta_file in sorted(folder.glob(MODEL_META_GLOB)) if folder.is_dir() else []:
        try:
            run_id = json.loads(meta_file.read_text()).get("mlflow_run_id")
        except (OSError, ValueError, AttributeError):
            continue
        if run_id:
            tags[TRAIN_RUN_TAG] = run_id
            tags[MODEL_URI_TAG] = f"runs:/{run_id}/{folder.name}"
            break
    return tags


def _experiments(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def upstream(client: Any, run_id: str) -> list[Any]:
    """``run_id``'s run followed by its ancestors: an evaluation -> its training run -> the data
    build(s) of the training data (runs whose tags name no parent end the chain)."""
    chain = [client.get_run(run_id)]
    while True:
        tags = chain[-1].data.tags
        parent = tags.get(TRAIN_RUN_TAG) or (tags.get(DATA_RUN_TAG) or "").split(",")[0]
        if not parent:
            return chain
        chain.append(client.get_run(parent))


def trained_on(client: Any, build_run_id: str) -> list[Any]:
    """Every training run whose input includes the data build ``build_run_id``."""
    query = f"tags.`{DATA_RUN_TAG}` LIKE '%{build_run_id}%'"
    return list(client.search_runs(_experiments(client), filter_string=query))


def evaluations_of(client: Any, train_run_id: str) -> list[Any]:
    """Every evaluation of a model from training run ``train_run_id``."""
    query = f"tags.`{TRAIN_RUN_TAG}` = '{train_run_id}'"
    return list(client.search_runs(_experiments(client), filter_string=query))
