"""Config loading: overlays, overrides and one-line errors that name the key."""
from __future__ import annotations

import pytest

from pipeline.config import Config, load_config, parse_override, redact_conf
from pipeline.errors import ConfigError


def test_base_yaml_equals_model_defaults():
    # base.yaml documents the defaults; drifting apart would confuse users.
    assert load_config() == Config()


@pytest.mark.parametrize("overlay", ["local.yaml", "cluster.yaml", "gpu.yaml", "photos.yaml", "fashion_mnist.yaml"])
def test_every_shipped_overlay_loads(overlay):
    cfg = load_config([overlay])
    assert isinstance(cfg, Config)


def test_overlays_apply_in_order_and_set_wins(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("train: {epochs: 5, batch_size: 32}\nspark: {conf: {spark.x: '1'}}\n")
    b = tmp_path / "b.yaml"
    b.write_text("train: {epochs: 7}\nspark: {conf: {spark.y: 2}}\n")
    cfg = load_config([a, b], ["train.batch_size=16", "spark.conf.spark.sql.shuffle.partitions=3"])
    assert cfg.train.epochs == 7
    assert cfg.train.batch_size == 16
    assert cfg.spark.conf == {"spark.x": "1", "spark.y": "2", "spark.sql.shuffle.partitions": "3"}


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.train.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.epochs=0", "'train.epochs'"),
        ("train.epochs=many", "'train.epochs'"),
        ("train.optimizer=lamb", "'train.optimizer'"),
        ("train.epoch=3", "unknown config key 'train.epoch'"),
        ("ingest.split_fractions={train: 0.5, val: 0.1, test: 0.1}", "'ingest.split_fractions'"),
        ("bogus.key=1", "unknown config key 'bogus'"),
        ("ingest.color_mode=CMYK", "'ingest.color_mode'"),
        ("loader.augment.crop_scale=[0.5,0.2]", "'loader.augment.crop_scale'"),
        ("loader.augment.crop_scale=[0.1,1.5]", "needs 0 < low <= high <= 1"),
        ("loader.augment.crop_ratio=[0,1]", "'loader.augment.crop_ratio'"),
    ],
)
def test_bad_values_name_the_key_in_one_line(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[override])
    msg = str(exc.value)
    assert needle in msg
    assert "\n" not in msg


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match=r"allowed: .*epochs"):
        load_config(overrides=["train.epoch=3"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "nope.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([bad])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config([lst])


def test_parse_override_forms():
    assert parse_override("train.epochs=3") == (("train", "epochs"), 3)
    assert parse_override("train.nics=null") == (("train", "nics"), None)
    assert parse_override("spark.conf.spark.sql.a.b=x") == (("spark", "conf", "spark.sql.a.b"), "x")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.epochs")


def test_manifest_label_source_needs_uri():
    with pytest.raises(ConfigError, match="manifest_uri"):
        load_config(overrides=["ingest.label_source=manifest"])


def test_secrets_are_redacted():
    red = redact_conf({"spark.hadoop.fs.s3a.secret.key": "abc", "spark.hadoop.fs.s3a.access.key": "AKIA",
                       "spark.x.token": "t", "spark.sql.shuffle.partitions": "4"})
    assert red["spark.sql.shuffle.partitions"] == "4"
    assert all("abc" not in v and "AKIA" not in v and v != "t" for k, v in red.items() if k != "spark.sql.shuffle.partitions")
    cfg = load_config(overrides=["spark.conf.spark.hadoop.fs.s3a.secret.key=abc"])
    assert "abc" not in str(cfg.to_dict())


def test_near_duplicates_off_survives_yaml(tmp_path):
    # YAML 1.1 reads a bare `off` as false; the user wrote the policy's name.
    f = tmp_path / "q.yaml"
    f.write_text("ingest: {near_duplicates: off}\n")
    assert load_config([f]).ingest.near_duplicates == "off"
    assert load_config([], ["ingest.near_duplicates=off"]).ingest.near_duplicates == "off"
    with pytest.raises(ConfigError, match="near_duplicates"):
        load_config([], ["ingest.near_duplicates=true"])


def test_log_level_off_survives_yaml(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("spark: {log_level: OFF}\n")
    assert load_config([f]).spark.log_level == "OFF"
    assert load_config([], ["spark.log_level=off"]).spark.log_level == "OFF"
    assert load_config([], ["spark.log_level=error"]).spark.log_level == "ERROR"
    with pytest.raises(ConfigError, match="log_level"):
        load_config([], ["spark.log_level=true"])
