from pathlib import Path

import pytest
import yaml

from know3d.pipeline.config import BuildConfig, ConfigError, dump_config, load_config


def test_defaults_match_the_paper_profile():
    cfg = load_config()
    assert cfg.render.profile == "backview"
    assert cfg.render.resolution == 512
    assert cfg.load.max_texture_size == 2048
    assert cfg.source.kind == "local"


def test_yaml_file_then_overrides(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("render:\n  resolution: 128\n  profile: geometry\nshard:\n  max_samples: 10\n")
    cfg = load_config(f, ["render.resolution=256", "source.local.input=[a, b]", "render.fov_range_deg=[20, 40]"])
    assert cfg.render.resolution == 256
    assert cfg.render.profile == "geometry"
    assert cfg.shard.max_samples == 10
    assert cfg.source.local.input == ["a", "b"]
    assert cfg.render.fov_range_deg == (20.0, 40.0)


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["render.resolutoin=256"])
    msg = str(exc.value)
    assert "render.resolutoin" in msg and "Did you mean 'render.resolution'" in msg
    assert "profile" in msg  # lists the valid keys of the section


def test_unknown_key_in_yaml(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("shard:\n  max_sample: 3\n")
    with pytest.raises(ConfigError, match="shard.max_sample"):
        load_config(f)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("render.resolution=abc", "render.resolution"),
        ("render.profile=sideview", "render.profile"),
        ("render.fov_range_deg=[90, 10]", "fov_range_deg"),
        ("shard.val_fraction=1.5", "shard.val_fraction"),
        ("noequals", "key.path=value"),
        ("render.resolution.x=3", "render.resolution"),
    ],
)
def test_bad_values_are_clear_errors(override: str, fragment: str):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("url", "where"),
    [
        ("http://u:s3cret@127.0.0.1:5000", "a password"),
        ("https://u@mlflow.lab", "a user name"),
        ("postgresql://u@db:5432/mlflow?password=s3cret", "'password' query"),
        ("https://mlflow.lab/?token=abc", "'token' query"),
        ("https://llm.lab/v1?api-key=abc", "'api-key' query"),
        ("https://llm.lab/v1?X-Amz-Signature=abc", "'X-Amz-Signature' query"),
        ("postgresql://u@db:5432/mlflow", None),  # the password comes from PGPASSWORD / .pgpass
        ("postgresql://u@db/m?sslmode=require&sslkey=/etc/ssl/k.pem", None),
        ("sqlite:////tmp/mlflow.db", None),
        ("http://127.0.0.1:8000/v1", None),
    ],
)
def test_credentials_in_urls_are_found(url: str, where: str | None):
    from know3d.core.config import url_credentials
    from know3d.core.tracking import check_uri

    found = url_credentials(url)
    assert (found is None) if where is None else (where in found), found
    if where is None:
        assert check_uri(url) == url
    else:
        with pytest.raises(ValueError, match="must not contain credentials") as err:
            check_uri(url)
        assert "s3cret" not in str(err.value) and "abc" not in str(err.value)


def test_a_key_in_the_annotation_servers_url_is_refused():
    with pytest.raises(ConfigError, match=r"annotate\.openai\.base_url.*must not contain credentials") as err:
        load_config(None, ["annotate.openai.base_url=https://llm.lab/v1?api-key=k3y"])
    assert "k3y" not in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("render: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path: Path):
    cfg = load_config(None, ["render.resolution=64", "seed=7"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_config(cfg))
    again = load_config(f)
    assert again == cfg
    assert yaml.safe_load(f.read_text())["seed"] == 7
    assert isinstance(again, BuildConfig)


def test_every_shipped_config_validates_against_its_stage():
    """configs/*.yaml stay valid as the config classes move between packages."""
    from know3d.evaluation.config import EvalConfig
    from know3d.pipeline.cycle import Cycle, CycleConfig
    from know3d.training.config import TrainBackviewConfig
    from know3d.training.generator.config import TrainGeneratorConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    models = {
        "backview_": TrainBackviewConfig,
        "eval_": EvalConfig,
        "generator_": TrainGeneratorConfig,
        "retrain": CycleConfig,
    }
    checked = []
    for path in sorted(root.glob("*.yaml")):
        model = next((m for prefix, m in models.items() if path.name.startswith(prefix)), BuildConfig)
        if path.name == "backview.yaml":  # the data build's back-view profile
            model = BuildConfig
        checked.append((path.name, type(load_config(path, [], model)).__name__))
    assert len(checked) == 19
    for name in ("retrain.yaml", "retrain_quickstart.yaml"):  # the stage configs a cycle names, with its --set
        cycle = Cycle(load_config(root / name, ["mlflow.tracking_uri=sqlite:///x.db"], CycleConfig))
        assert type(cycle.build_config()).__name__ == "BuildConfig"
        assert cycle.train_config("data", Path("out")).data.shards == ["data"]
    assert ("generator_shape_know3d.yaml", "TrainGeneratorConfig") in checked
    assert ("backview_debug.yaml", "TrainBackviewConfig") in checked and ("quickstart.yaml", "BuildConfig") in checked


def test_stage_config_sections_reject_moved_or_misspelt_keys():
    with pytest.raises(ConfigError, match="unknown config key 'shard.include_depth'.*Valid keys here: max_bytes"):
        load_config(None, ["shard.include_depth=false"])
