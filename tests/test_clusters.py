"""Cluster launch files name configs and overrides that exist and validate."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import shlex
from importlib.metadata import version
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from know3d.evaluation.config import EvalConfig
from know3d.pipeline.config import BuildConfig, load_config
from know3d.pipeline.cycle import CycleConfig
from know3d.training.config import TrainBackviewConfig

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "clusters" / "kuberay"
SLURM = ROOT / "clusters" / "slurm"
CRDS = KUBERAY / "crds"  # KubeRay's CRDs of one release (crds/VERSION)
KUBERAY_RELEASE = "v1.7.0"
# Built-in kinds are checked against the schemas kubernetes-validate bundles for this Kubernetes
# release, in its strict variant (unknown fields are errors, as with kubectl's default
# server-side field validation). Every kubernetes-validate the dev extra allows (>= 1.30) has it.
KUBERNETES_RELEASE = "1.30"
KNOW3D_IMAGE = "ghcr.io/your-org/know3d:latest"
RETRAIN = KUBERAY / "retrain-cronjob.yaml"
RETRAIN_COMMAND = ["know3d", "run", "configs/retrain.yaml"]


def _check_entrypoint(cmd: str) -> None:
    argv = shlex.split(cmd)
    assert argv[0] == "know3d"
    models = {
        ("train", "backview"): TrainBackviewConfig,
        ("data", "build"): BuildConfig,
        ("eval", "shapes"): EvalConfig,
        ("run",): CycleConfig,
    }
    command = next((c for c in models if tuple(argv[1 : 1 + len(c)]) == c), None)
    assert command is not None, argv[:3]
    model = models[command]
    config = ROOT / argv[1 + len(command)]
    assert config.is_file(), config
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(config, overrides, model=model)
    if model is CycleConfig:  # the stages' own configs exist and validate with the cycle's overrides
        load_config(ROOT / cfg.data.config, cfg.data.set, model=BuildConfig)
        load_config(ROOT / cfg.backview.config, cfg.backview.set, model=TrainBackviewConfig)
    if model is TrainBackviewConfig:
        assert cfg.lora.rank == 64 and cfg.deepspeed.zero_stage == 2
    if model is EvalConfig:  # the protocol's numbers, and every scorer checkpoint given
        assert (cfg.points.surface_samples, cfg.points.fps_points, cfg.points.fps_h) == (300_000, 8192, 5)
        assert {"--pred", "--images", "--gt", "--output", "--ulip-ckpt", "--uni3d-ckpt", "--clip-ckpt"} <= set(argv)


def _objects(path: Path) -> list[tuple[str, dict]]:
    """The objects of a (multi-document) manifest, plus the manifests a ConfigMap carries as
    `*.yaml` data (the retraining CronJob's RayJob), each with a label saying where it is."""
    found = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        found.append((f"{path.name}: {doc['kind']} {_name(doc)}", doc))
        if doc["kind"] == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                if key.endswith((".yaml", ".yml")):
                    for inner in yaml.safe_load_all(text):
                        if inner:
                            found.append((f"{path.name}: ConfigMap {_name(doc)} [{key}]: {inner['kind']}", inner))
    return found


def _name(obj: dict) -> str:
    meta = obj.get("metadata") or {}
    return meta.get("name") or meta.get("generateName", "?") + "*"


def _all_objects() -> list[tuple[str, dict]]:
    return [o for f in sorted(KUBERAY.glob("*.yaml")) for o in _objects(f)]


def _rayjobs() -> list[tuple[str, dict]]:
    return [(where, o) for where, o in _all_objects() if o["kind"] == "RayJob"]


def _pod_templates(obj: dict) -> list[dict]:
    """The pod templates of a RayJob or RayCluster (head, worker groups, the submitter)."""
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec", {}) if obj["kind"] == "RayJob" else spec
    templates = [cluster["headGroupSpec"]["template"]] if cluster else []
    templates += [group["template"] for group in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        templates.append(spec["submitterPodTemplate"])
    return templates


def test_rayjob_entrypoints_validate():
    jobs = _rayjobs()
    assert len(jobs) >= 4  # three one-off jobs and the retraining cycle inside the CronJob's ConfigMap
    for _where, job in jobs:
        _check_entrypoint(job["spec"]["entrypoint"])


@pytest.mark.parametrize(
    ("name", "workers"), [("backview_qwen_image_edit_2511.yaml", 32), ("backview_qwen_image_edit_2511_8gpu.yaml", 8)]
)
def test_paper_config_matches_the_paper(name: str, workers: int):
    cfg = load_config(ROOT / "configs" / name, model=TrainBackviewConfig)
    assert cfg.model.name == "Qwen/Qwen-Image-Edit-2511" and cfg.lora.rank == 64
    assert cfg.ray.num_workers == workers
    assert cfg.ray.num_workers * cfg.schedule.micro_batch_size * cfg.schedule.grad_accum == 32  # global batch
    assert cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.bf16 == "on" and cfg.ray.use_gpu == "on"


def test_sbatch_scripts_parse_and_use_existing_commands():
    import subprocess

    for f in sorted((ROOT / "clusters" / "slurm").glob("*.sbatch")):
        subprocess.run(["bash", "-n", str(f)], check=True)
        text = f.read_text()
        words = text.split('know3d" ', 1)[1].split()  # <command> [<sub>] <config> ...
        config = next(w for w in words[1:3] if w.endswith(".yaml") or w.startswith('"$'))
        assert (ROOT / config).is_file() or config.startswith('"$'), (f.name, config)


def test_the_image_is_built_by_the_install_ci_runs():
    """One install for CI and the cluster image: the Dockerfile runs scripts/install.sh (which
    scripts/setup.sh runs too) and installs scripts/apt-packages.txt (setup.sh's list too); every
    KubeRay manifest runs that image; the GPU render group has EGL's graphics capability."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "scripts/install.sh" in dockerfile and "bash scripts/install.sh .venv/bin/python" in setup
    assert "scripts/apt-packages.txt" in dockerfile and "scripts/apt-packages.txt" in setup
    assert "pip install" not in setup.replace("install.sh", "")  # no second, diverging pip install
    lines = (ROOT / "scripts" / "apt-packages.txt").read_text().splitlines()
    packages = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert {"libegl1", "libegl-mesa0", "libosmesa6", "libglvnd0"} <= set(packages)
    assert not any("x11" in p.lower() or p.startswith("libx") for p in packages)
    images = {c["image"] for _, job in _rayjobs() for t in _pod_templates(job) for c in t["spec"]["containers"]}
    assert images == {KNOW3D_IMAGE} and "know3d:latest" in dockerfile
    spec = yaml.safe_load((KUBERAY / "data-build-rayjob.yaml").read_text())
    gpu = next(g for g in spec["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu-render")
    container = gpu["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "graphics" in env["NVIDIA_DRIVER_CAPABILITIES"] and env["__EGL_VENDOR_LIBRARY_FILENAMES"].endswith(".json")
    assert container["resources"]["limits"]["nvidia.com/gpu"]


# ---------------------------------------------------------------- schema validation of the manifests


def _structural(node: dict) -> dict:
    """A CRD's openAPIV3Schema as the API server applies it, for jsonschema: an object with
    `properties` admits no other fields unless it says x-kubernetes-preserve-unknown-fields
    (unknown fields are errors under kubectl's default strict field validation), `nullable`
    admits null, x-kubernetes-int-or-string admits both. CEL rules (x-kubernetes-validations)
    are not evaluated."""
    out = dict(node)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _structural(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_structural(s) for s in out[key]]
    if "properties" in out:
        out["properties"] = {k: _structural(v) for k, v in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _list_type(validator, value, instance, schema):
    """x-kubernetes-list-type: `set` items are unique, `map` items unique by their map keys
    (two env entries or two containers of one name are rejected)."""
    if not validator.is_type(instance, "array") or value not in ("set", "map"):
        return
    names = schema.get("x-kubernetes-list-map-keys", [])
    keys = [
        json.dumps([i.get(k) for k in names] if value == "map" and isinstance(i, dict) else i, sort_keys=True)
        for i in instance
    ]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        yield jsonschema.ValidationError(f"duplicate entries {duplicates} in a list-type={value} list {names or ''}")


_CRDValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type})


@functools.cache
def _crd_validator(kind: str, api_version: str):
    plural = {"RayJob": "rayjobs", "RayCluster": "rayclusters"}[kind]
    crd = yaml.load((CRDS / f"ray.io_{plural}.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    group, version_name = api_version.split("/")
    assert group == crd["spec"]["group"], api_version
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version_name in served, f"{api_version} is not served by KubeRay {KUBERAY_RELEASE}"
    return _CRDValidator(_structural(served[version_name]["schema"]["openAPIV3Schema"]))


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top)"


def _crd_errors(obj: dict) -> list[str]:
    """KubeRay's schema for the object, plus Kubernetes' own for its metadata and pod templates."""
    validator = _crd_validator(obj["kind"], obj["apiVersion"])
    errors = [f"{_where(e)}: {e.message}" for e in validator.iter_errors(obj)]
    # the CRD leaves `metadata` to the API server: check it as an ObjectMeta (of a stand-in ConfigMap)
    meta = _k8s_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj.get("metadata", {})})
    errors += [e.replace("ConfigMap metadata", "metadata (ObjectMeta)", 1) for e in meta]
    for template in _pod_templates(obj):
        errors += _k8s_errors(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        )
    return errors


def _k8s_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_RELEASE, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{obj['kind']} {_where(e)}: {e.message}"]
    return []


def _errors(obj: dict) -> list[str]:
    return _crd_errors(obj) if obj["apiVersion"].startswith("ray.io/") else _k8s_errors(obj)


def test_vendored_crds_are_the_recorded_kuberay_release():
    record = yaml.safe_load((CRDS / "VERSION").read_text())
    assert record["kuberay"] == KUBERAY_RELEASE and "ray-operator/config/crd/bases" in record["source"]
    for name, digest in record["sha256"].items():
        assert hashlib.sha256((CRDS / name).read_bytes()).hexdigest() == digest, (
            f"{name} differs from {record['kuberay']}"
        )
    assert set(record["sha256"]) == {p.name for p in CRDS.glob("*.yaml")}


def test_manifests_match_the_kuberay_and_kubernetes_schemas():
    objects = _all_objects()
    kinds = {o["kind"] for _, o in objects}
    assert {"RayJob", "CronJob", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"} <= kinds
    assert kinds <= {"RayJob", "RayCluster", "CronJob", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"}, kinds
    problems = {where: errs for where, obj in objects if (errs := _errors(obj))}
    assert not problems, json.dumps(problems, indent=1)
    # each RayJob's cluster is also a valid RayCluster (the other vendored CRD), e.g. to keep one up
    for where, job in _rayjobs():
        cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "c"}}
        assert not _errors({**cluster, "spec": job["spec"]["rayClusterSpec"]}), where


def _retrain_objects() -> dict[str, dict]:
    return {obj["kind"]: obj for _, obj in _objects(RETRAIN)}


def _broken_rayjob_typo(objs):
    cluster = objs["RayJob"]["spec"]["rayClusterSpec"]
    cluster["workerGroupSpec"] = cluster.pop("workerGroupSpecs")
    return objs["RayJob"]


def _broken_rayjob_replicas(objs):
    objs["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    return objs["RayJob"]


def _broken_rayjob_auth_mode(objs):
    objs["RayJob"]["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"
    return objs["RayJob"]


def _broken_rayjob_duplicate_env(objs):
    env = objs["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append(copy.deepcopy(env[0]))
    return objs["RayJob"]


def _broken_rayjob_container_field(objs):
    container = objs["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    return objs["RayJob"]


def _broken_rayjob_metadata(objs):
    objs["RayJob"]["metadata"]["label"] = objs["RayJob"]["metadata"].pop("labels")
    return objs["RayJob"]


def _broken_cronjob_typo(objs):
    spec = objs["CronJob"]["spec"]
    spec["startingDeadlineSecond"] = spec.pop("startingDeadlineSeconds")
    return objs["CronJob"]


def _broken_cronjob_type(objs):
    objs["CronJob"]["spec"]["successfulJobsHistoryLimit"] = "4"
    return objs["CronJob"]


def _broken_role(objs):
    objs["Role"]["rules"][0]["verb"] = objs["Role"]["rules"][0].pop("verbs")
    return objs["Role"]


@pytest.mark.parametrize(
    "breaks",
    [
        _broken_rayjob_typo,
        _broken_rayjob_replicas,
        _broken_rayjob_auth_mode,
        _broken_rayjob_duplicate_env,
        _broken_rayjob_container_field,
        _broken_rayjob_metadata,
        _broken_cronjob_typo,
        _broken_cronjob_type,
        _broken_role,
    ],
)
def test_schema_checks_reject_a_broken_manifest(breaks):
    """The checks above are not vacuous: one typo'd field or one wrongly typed value is an error."""
    objs = _retrain_objects()
    broken = breaks(copy.deepcopy(objs))
    assert not _errors(objs[broken["kind"]])  # the same object, unbroken, passes
    assert _errors(broken), breaks.__name__


# ---------------------------------------------------------------- the retraining schedules


def _cron_fields(schedule: str) -> list[str]:
    fields = schedule.split()
    assert len(fields) == 5, schedule
    minute, hour, dom, month, dow = fields
    assert minute.isdigit() and hour.isdigit() and dom == "*" and month == "*", schedule
    assert dow.isdigit() and 0 <= int(dow) <= 7, f"not weekly: {schedule}"
    return fields


def test_retrain_cronjob_submits_one_cycle_a_week():
    objs = _retrain_objects()
    cron, configmap, job = objs["CronJob"], objs["ConfigMap"], objs["RayJob"]
    spec = cron["spec"]
    _cron_fields(spec["schedule"])
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0 and spec["timeZone"]
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    # the pod creates the ConfigMap's RayJob with kubectl, as the ServiceAccount the Role is bound to
    (container,) = pod["containers"]
    argv = container.get("command", []) + container.get("args", [])
    assert argv[0].endswith("kubectl") and argv[1:3] == ["create", "-f"], argv
    mount = next(m for m in container["volumeMounts"] if argv[3].startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert argv[3].rsplit("/", 1)[1] in configmap["data"]
    assert re.fullmatch(r"registry\.k8s\.io/kubectl:v\d+\.\d+\.\d+", container["image"]), container["image"]
    account = objs["ServiceAccount"]["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    binding, role = objs["RoleBinding"], objs["Role"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    namespace = cron["metadata"]["namespace"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
    assert {o["metadata"].get("namespace") for k, o in objs.items() if k != "RayJob"} == {namespace}
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    # each cycle is its own RayJob whose Ray cluster goes away when it ends, before the next one
    meta, rj = job["metadata"], job["spec"]
    assert meta.get("generateName") and "name" not in meta and "namespace" not in meta
    assert rj["shutdownAfterJobFinishes"] is True and rj["ttlSecondsAfterFinished"] >= 0
    assert 0 < rj["activeDeadlineSeconds"] < 7 * 24 * 3600
    argv = shlex.split(rj["entrypoint"])
    assert argv[:3] == RETRAIN_COMMAND and argv[argv.index("--address") + 1] == "auto"
    # the cycle's state, data set and Ray Train storage lie on the shared volume in every pod
    cycle = load_config(ROOT / RETRAIN_COMMAND[2], model=CycleConfig)
    train = load_config(ROOT / cycle.backview.config, cycle.backview.set, model=TrainBackviewConfig)
    shared = [cycle.state, cycle.data.output, *([train.ray.storage_path] if train.ray.storage_path else [])]
    for template in _pod_templates(job):
        claimed = {v["name"] for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}
        mounts = [
            m["mountPath"] for c in template["spec"]["containers"] for m in c["volumeMounts"] if m["name"] in claimed
        ]
        assert all(any(p.startswith(m.rstrip("/") + "/") for m in mounts) for p in shared), (shared, mounts)
    # same image, Ray version and volume as the other RayJobs; the Ray of this checkout
    others = [o for where, o in _rayjobs() if not where.startswith(RETRAIN.name)]
    assert others
    ray_versions = {o["spec"]["rayClusterSpec"]["rayVersion"] for o in [job, *others]}
    assert ray_versions == {version("ray")}
    for obj in [job, *others]:
        for template in _pod_templates(obj):
            assert {c["image"] for c in template["spec"]["containers"]} == {KNOW3D_IMAGE}
            claims = {
                v["persistentVolumeClaim"]["claimName"]
                for v in template["spec"]["volumes"]
                if "persistentVolumeClaim" in v
            }
            assert claims == {"know3d-data"}


def test_ray_clusters_are_not_exposed_and_the_cycle_uses_token_auth():
    for where, job in _rayjobs():
        cluster = job["spec"]["rayClusterSpec"]
        assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", where
        assert not cluster["headGroupSpec"].get("enableIngress", False), where
    cycle = _retrain_objects()["RayJob"]["spec"]["rayClusterSpec"]
    assert cycle["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cycle["authOptions"] == {"mode": "token"}
    started = [p for p in sorted(SLURM.glob("*.sbatch")) if 'ray" start --head' in p.read_text()]
    assert {p.name for p in started} >= {"retrain.sbatch", "data-build.sbatch", "train-backview.sbatch"}
    for path in started:  # every Slurm job that opens a Ray cluster on the network authenticates
        sbatch = path.read_text()
        assert "export RAY_AUTH_MODE=token" in sbatch and "export RAY_AUTH_TOKEN" in sbatch, path.name
        assert sbatch.index("export RAY_AUTH_TOKEN") < sbatch.index("start --head"), path.name
        head_start = next(line for line in sbatch.replace("\\\n", " ").splitlines() if "start --head" in line)
        assert "--dashboard-host=127.0.0.1" in head_start, path.name  # the dashboard on the head's loopback only


def _scrontab() -> tuple[dict[str, str], list[str], str, list[str]]:
    """(#SCRON options, schedule, command, the commented plain-cron alternative's line)."""
    lines = (SLURM / "retrain.scrontab").read_text().splitlines()
    options = dict(line.split(None, 1)[1].split("=", 1) for line in lines if line.startswith("#SCRON"))
    entries = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert len(entries) == 1, entries
    fields = entries[0].split(None, 5)
    alternative = [line.lstrip("# ") for line in lines if re.match(r"#\s*(\S+\s+){5}cd ", line)]
    assert len(alternative) == 1, alternative
    return options, fields[:5], fields[5], alternative[0].split(None, 5)


def test_scrontab_runs_the_same_cycle_once_a_week():
    assert not (SLURM / "retrain.cron").exists()  # replaced by retrain.scrontab
    options, schedule, command, alternative = _scrontab()
    assert {"--partition", "--time", "--job-name", "--output", "--chdir"} <= set(options)
    assert _cron_fields(" ".join(schedule)) == _cron_fields(_retrain_objects()["CronJob"]["spec"]["schedule"])
    argv = shlex.split(command)
    assert argv[:2] == ["sbatch", "clusters/slurm/retrain.sbatch"] and (ROOT / argv[1]).is_file()
    # the plain-cron line: the same schedule and command, from the same folder
    assert alternative[:5] == schedule
    assert alternative[5].startswith(f"cd {options['--chdir']} && {command}")
    # retrain.sbatch runs `know3d run CONFIG` with the config it is given on its Ray cluster
    sbatch = (SLURM / "retrain.sbatch").read_text()
    assert '"$venv/know3d" run "$config" --address "$head_ip:$port" "$@"' in sbatch
    assert "config=${1:?" in sbatch and "#SBATCH --dependency=singleton" in sbatch
    assert ["know3d", "run", *argv[2:]] == RETRAIN_COMMAND
    _check_entrypoint(shlex.join(["know3d", "run", *argv[2:]]))


_CREDENTIAL_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|API_?KEY|ACCESS_?KEY", re.IGNORECASE)
_CREDENTIAL_TEXT = [
    re.compile(p)
    for p in (
        r"hf_[A-Za-z0-9]{30,}",
        r"gh[pousr]_[A-Za-z0-9]{30,}",
        r"AKIA[0-9A-Z]{16}",
        r"sk-[A-Za-z0-9_-]{20,}",
        r"(?i)bearer\s+[A-Za-z0-9._~+/-]{16,}",
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        r"://[^/\s:@]+:[^/\s@]+@",
    )
]


def _inline_credentials(obj, where: str = "") -> list[str]:
    """Env entries (containers, Ray runtime envs) that carry a credential-named value inline."""
    found = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "env" and isinstance(value, list):
                found += [
                    f"{where}.env.{e['name']}"
                    for e in value
                    if isinstance(e, dict) and _CREDENTIAL_NAME.search(e.get("name", "")) and "value" in e
                ]
            elif key == "runtimeEnvYAML":
                env_vars = (yaml.safe_load(value) or {}).get("env_vars", {})
                found += [f"{where}.runtimeEnvYAML.{k}" for k in env_vars if _CREDENTIAL_NAME.search(k)]
            found += _inline_credentials(value, f"{where}.{key}")
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            found += _inline_credentials(item, f"{where}[{i}]")
    return found


def _values(obj, key: str):
    """Every value stored under `key`, at any depth."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(obj, list):
        for item in obj:
            yield from _values(item, key)


def test_no_manifest_holds_a_credential():
    planted = {"env": [{"name": "MLFLOW_TRACKING_TOKEN", "value": "abc"}], "runtimeEnvYAML": "env_vars: {HF_TOKEN: x}"}
    assert len(_inline_credentials(planted)) == 2  # the scans find what they look for
    assert any(p.search("HF_TOKEN: hf_" + "x" * 34) for p in _CREDENTIAL_TEXT)
    objects = _all_objects()
    assert not [where for where, o in objects if o["kind"] == "Secret"]
    assert not [f for where, o in objects for f in _inline_credentials(o, where)]
    secret_refs = {ref["name"] for _, o in objects for ref in _values(o, "secretKeyRef")}
    assert secret_refs == {"know3d-secrets"}
    files = [*KUBERAY.glob("*.yaml"), *SLURM.iterdir()]
    for f in files:
        text = f.read_text()
        assert not [p.pattern for p in _CREDENTIAL_TEXT if p.search(text)], f.name
        # shell: a credential-named variable is only ever set from a command or another variable
        for name, value in re.findall(r"\b([A-Z_]*(?:TOKEN|SECRET|PASSW\w*|KEY))=(\S+)", text):
            assert value.startswith(("$", '"$')), (f.name, name)
