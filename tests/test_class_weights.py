"""``train.class_weight``: the weights, the config's one-line errors, and the effect on a real imbalanced subset.

The slow test trains the same model twice with real Horovod (2 ranks) on real Fashion-MNIST
images where one class is about 5% of the train split, then scores the balanced official test
images with the score stage: with ``balanced`` the minority class's recall must rise.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from outputs import version_dir
from pipeline.errors import ConfigError
from pipeline.train.class_weights import balanced_weights, resolve


def test_balanced_weights_are_n_over_k_times_n_c_and_average_one_over_the_train_split():
    counts = [500, 500, 500, 79]
    w = balanced_weights(counts)
    assert w == pytest.approx([1579 / (4 * 500)] * 3 + [1579 / (4 * 79)])
    assert sum(n * x for n, x in zip(counts, w)) == pytest.approx(sum(counts))
    # A class with no train rows never weighs an example; it gets 1 and does not count in k.
    assert balanced_weights([30, 0, 10]) == pytest.approx([40 / 60, 1.0, 40 / 20])


def test_a_mapping_weighs_the_named_classes_and_leaves_the_others_at_one():
    classes, counts = ("coat", "pullover", "shirt"), [10, 10, 2]
    assert resolve(None, classes, counts) is None
    assert resolve({"shirt": 4.0}, classes, counts) == [1.0, 1.0, 4.0]
    with pytest.raises(ConfigError) as e:
        resolve({"shrt": 4.0}, classes, counts)
    assert str(e.value) == ("config key 'train.class_weight': unknown class 'shrt' "
                            "(the data's classes: coat, pullover, shirt)")


@pytest.mark.parametrize("value, needle", [
    ("{shirt: 0}", "got {'shirt': 0}"),
    ("{shirt: -2.5}", "got {'shirt': -2.5}"),
    ("{shirt: heavy}", "got {'shirt': 'heavy'}"),
    ("{}", "got an empty mapping"),
    ("balance", "must be null, balanced or a mapping"),
])
def test_bad_class_weight_is_a_one_line_config_error(value, needle):
    from pipeline.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"train.class_weight={value}"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config key 'train.class_weight'") and needle in msg


def test_config_accepts_balanced_and_a_mapping():
    from pipeline.config import load_config

    assert load_config(overrides=["train.class_weight=balanced"]).train.class_weight == "balanced"
    assert load_config(overrides=["train.class_weight={shirt: 3}"]).train.class_weight == {"shirt": 3.0}
    assert load_config().train.class_weight is None


# --- a real imbalanced subset ---------------------------------------------------------------

#: Four upper-body classes that Fashion-MNIST models confuse; shirt is the minority.
CLASSES = ("t-shirt_top", "pullover", "coat", "shirt")
MINORITY = "shirt"
PER_CLASS_TRAIN, MINORITY_TRAIN, PER_CLASS_TEST = 500, 79, 250


def _write_imbalanced_fashion_mnist(root: Path) -> dict:
    """``root/<train|test>/<class>/*.png``: train 500 per class but 79 shirts (5%), test 250 per class."""
    import numpy as np
    from PIL import Image

    from pipeline.sample_data import CLASSES as ALL, load_split, locate_fashion_mnist

    src = locate_fashion_mnist()
    counts = {}
    for split, want in (("train", {c: PER_CLASS_TRAIN for c in CLASSES} | {MINORITY: MINORITY_TRAIN}),
                        ("test", {c: PER_CLASS_TEST for c in CLASSES})):
        images, labels = load_split(src, split)
        for name, n in want.items():
            idx = np.flatnonzero(labels == ALL.index(name))[:n]
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(images[i]).save(root / split / name / f"{split}_{i:05d}.png")
            counts[(split, name)] = len(idx)
    return counts


@pytest.mark.slow
def test_balanced_class_weight_raises_the_minority_recall(spark, test_config, tmp_path):
    from pipeline import ingest, score, train
    from pipeline.config import load_config
    from pipeline.report import per_class_rows

    counts = _write_imbalanced_fashion_mnist(tmp_path / "raw")
    cfg = load_config(["local.yaml", "fashion_mnist.yaml"], [
        "spark.ui_enabled=false", "spark.log_level=ERROR", "ingest.max_train_procs=2",
        "train.epochs=5", "train.batch_size=64", "train.learning_rate=0.002", "train.lr_schedule=constant",
        "train.warmup_epochs=0.5", "train.early_stopping.patience=10", "train.restore_best=false",
        "loader.shuffle_buffer=2048"])
    data = "file://" + str(tmp_path / "ingest")
    ingest.run(spark, cfg, input_uri="file://" + str(tmp_path / "raw"), output_uri=data, mode="error")

    recalls, cards = {}, {}
    for weighting in (None, "balanced"):
        run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"class_weight": weighting})})
        model_dir = tmp_path / f"model-{weighting}"
        out = train.run(spark, run_cfg, data_uri=data, model_dir="file://" + str(model_dir), mode="overwrite")
        assert out["weights_sha256"][0] == out["weights_sha256"][1]  # both ranks applied the same weights
        scored = score.run(spark, run_cfg, data_uri=data, model_uri="file://" + str(model_dir),
                           output_uri="file://" + str(tmp_path / f"scores-{weighting}"), split="test",
                           mode="overwrite")
        metrics = json.loads((version_dir(tmp_path / f"scores-{weighting}") / "_metrics.json").read_text())
        recalls[weighting] = {c: metrics["per_class"][c]["recall"] for c in CLASSES}
        recalls[weighting]["accuracy"] = scored["metrics"]["accuracy"]
        cards[weighting] = json.loads((model_dir / "model.json").read_text())

    print(f"\n{MINORITY} recall: unweighted {recalls[None][MINORITY]:.3f} -> balanced "
          f"{recalls['balanced'][MINORITY]:.3f}; accuracy {recalls[None]['accuracy']:.4f} -> "
          f"{recalls['balanced']['accuracy']:.4f}; all recalls {json.dumps(recalls)}")
    assert recalls["balanced"][MINORITY] > recalls[None][MINORITY]

    # The model card records the train split's counts (val was carved out of them) and the weights.
    balance = cards["balanced"]["class_balance"]
    train_counts = balance["train_counts"]
    assert set(train_counts) == set(CLASSES)
    manifest = json.loads((version_dir(tmp_path / "ingest") / "_manifest.json").read_text())
    assert sum(train_counts.values()) == manifest["splits"]["train"]
    assert train_counts[MINORITY] / sum(train_counts.values()) == pytest.approx(0.05, abs=0.01)
    assert balance["class_weight"] == "balanced"
    assert balance["weights"] == pytest.approx(dict(zip(
        CLASSES, balanced_weights([train_counts[c] for c in CLASSES]))))
    assert cards[None]["class_balance"]["weights"] is None
    # Resuming the unweighted run with weights would train another loss: refused.
    with pytest.raises(ConfigError, match="--mode overwrite"):
        train.run(spark, cfg.model_copy(update={"train": cfg.train.model_copy(update={"class_weight": "balanced",
                                                                                       "epochs": 6})}),
                  data_uri=data, model_dir="file://" + str(tmp_path / "model-None"), mode="resume")
    # The report's per-class table puts the train counts and weights next to the recall.
    rows = {r[0]: r for r in per_class_rows(metrics, balance)}
    assert rows[MINORITY][1] == train_counts[MINORITY]
    assert rows[MINORITY][3] == pytest.approx(balance["weights"][MINORITY])
    assert rows[MINORITY][5] == pytest.approx(recalls["balanced"][MINORITY])
