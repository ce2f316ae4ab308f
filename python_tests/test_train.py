"""Trainer: config files and overrides, metrics, guards, the run folder, exact resume, the NaN
guard with rollback, early stopping, and resuming a legacy checkpoint."""
import csv
import importlib.util
import json
import math
import pathlib

import pytest
import torch

from cnnlstm_ext.checkpoint import normalize_checkpoint, read_checkpoint
from cnnlstm_ext.data import ClipReadError, SyntheticVideos
from cnnlstm_ext.train import ClassificationMeter, Config, EarlyStopping, NonFiniteGuard, Trainer
from cnnlstm_ext.train.config import (apply_overrides, config_from_checkpoint, load_config_file,
                                      parse_override, parse_value, save_config, validate)
from cnnlstm_ext.train.guards import nonfinite_tensors
from cnnlstm_ext.train.trainer import HISTORY_KEYS, evaluate_model

HERE = pathlib.Path(__file__).resolve().parent


def tiny_config(tmp_path, run="run", **train):
    """A run of a few seconds: 3 classes, 4 frames of 16x16, a very small CNN-LSTM."""
    cfg = Config()
    cfg.model.update(spatial_dim=16, temporal_dim=8)
    cfg.data.num_classes = 3
    cfg.data.num_frames = 4
    cfg.data.frame_size = 16
    cfg.data.train_samples = 24
    cfg.data.val_samples = 12
    t = cfg.train
    t.output_dir, t.run_name = str(tmp_path), run
    t.epochs, t.batch_size, t.progress, t.tensorboard = 3, 8, False, False
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# --- config ------------------------------------------------------------------------------------

CONFIG_TEXTS = {
    ".toml": '[model]\nnum_layers = 2\n[optim]\nlr = 3e-4\n[train]\nepochs = 7\ngrad_clip = 0.5\n'
             '[data]\ncrop_scale = [0.5, 1.0]\n',
    ".yaml": "model:\n  num_layers: 2\noptim:\n  lr: 3.0e-4\ntrain:\n  epochs: 7\n  grad_clip: 0.5\n"
             "data:\n  crop_scale: [0.5, 1.0]\n",
    ".yml": "model: {num_layers: 2}\noptim: {lr: 3.0e-4}\ntrain: {epochs: 7, grad_clip: 0.5}\n"
            "data: {crop_scale: [0.5, 1.0]}\n",
    ".json": json.dumps({"model": {"num_layers": 2}, "optim": {"lr": 3e-4},
                         "train": {"epochs": 7, "grad_clip": 0.5}, "data": {"crop_scale": [0.5, 1]}}),
}


@pytest.mark.parametrize("ext", sorted(CONFIG_TEXTS))
def test_config_file_formats_give_the_same_config(tmp_path, ext):
    path = tmp_path / ("run" + ext)
    path.write_text(CONFIG_TEXTS[ext])
    cfg = Config.from_dict(load_config_file(str(path)))
    assert cfg.model["num_layers"] == 2 and cfg.model["backbone"] == "tiny"
    assert cfg.optim.lr == 3e-4 and cfg.optim.weight_decay == 1e-4
    assert cfg.train.epochs == 7 and cfg.train.grad_clip == 0.5
    assert cfg.data.crop_scale == (0.5, 1.0)


def test_config_overrides_are_typed():
    cfg = apply_overrides(Config(), ["optim.lr=2e-3", "train.patience=null", "data.hflip=true",
                                     "model.pooling=max", "train.epochs=3.0", "data.root=/x/y"])
    assert cfg.optim.lr == 2e-3 and cfg.train.patience is None and cfg.data.hflip is True
    assert cfg.model["pooling"] == "max" and cfg.train.epochs == 3 and cfg.data.root == "/x/y"
    assert parse_value("[1, 2]") == [1, 2] and parse_value("abc") == "abc"


@pytest.mark.parametrize("ext", sorted(CONFIG_TEXTS))
def test_config_file_with_a_utf8_byte_order_mark_reads_as_without(tmp_path, ext):
    plain, bom = tmp_path / ("plain" + ext), tmp_path / ("bom" + ext)
    plain.write_text(CONFIG_TEXTS[ext], encoding="utf-8")
    bom.write_text(CONFIG_TEXTS[ext], encoding="utf-8-sig")  # what Windows editors write
    assert load_config_file(str(bom)) == load_config_file(str(plain))


@pytest.mark.parametrize("override,match", [
    ("train.epoch=3", "unknown key train.epoch"), ("trian.epochs=3", "unknown config section"),
    ("train.epochs=many", "expects an int"), ("data.hflip=2", "true or false"),
    ("epochs=3", "section.key=value"), ("data.resize_to=big", "data.resize_to expects an int"),
])
def test_config_override_errors_name_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(Config(), [override])


def test_config_rejects_unknown_model_settings():
    cfg = apply_overrides(Config(), ["model.hidden=128"])
    with pytest.raises(ValueError, match="unknown model setting.*hidden.*temporal_dim"):
        validate(cfg)


def test_saved_config_is_a_valid_config_file(tmp_path):
    cfg = apply_overrides(Config(), ["optim.lr=5e-4", "data.crop_scale=[0.7, 0.9]"])
    save_config(cfg, str(tmp_path / "config.json"))
    again = Config.from_dict(load_config_file(str(tmp_path / "config.json")))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("text,value", [
    ("None", None), ("NULL", None), ("~", None), ("True", True), ("YES", True), ("On", True),
    ("False", False), ("No", False), ("OFF", False), ("2.5e-4", 2.5e-4), ("1e-3", 1e-3),
])
def test_config_parse_value_reads_the_words_in_any_case(text, value):
    assert parse_value(" %s " % text) == value and type(parse_value(text)) is type(value)


@pytest.mark.parametrize("item,parsed", [
    ("data.root=/clips/a=b.c", ("data", "root", "/clips/a=b.c")),
    (" model.head.bias = 7", ("model", "head.bias", 7)),
])
def test_config_parse_override_splits_at_the_first_equals_and_dot(item, parsed):
    assert parse_override(item) == parsed


@pytest.mark.parametrize("item", ["epochs=1.5", "epochs=a.b=c", "train.epochs"])
def test_config_parse_override_needs_a_dot_before_the_equals(item):
    with pytest.raises(ValueError) as e:
        parse_override(item)
    assert str(e.value) == "override %r: expected section.key=value, e.g. optim.lr=3e-4" % item


def test_config_override_none_is_a_word_for_string_fields_and_null_for_optional_ones():
    cfg = apply_overrides(Config(), ["optim.scheduler=none", "train.patience=none"])
    assert cfg.optim.scheduler == "none" and cfg.train.patience is None
    assert validate(cfg) is cfg


@pytest.mark.parametrize("overrides", [
    ["train.epochs=1"], ["train.batch_size=1"], ["train.patience=1"], ["train.patience=null"],
    ["train.max_bad_steps=1"], ["train.rollback_lr_factor=1"], ["train.grad_clip=null"],
    ["train.label_smoothing=0"], ["train.precision=fp32"], ["train.precision=bf16"],
    ["train.monitor=val_f1"], ["train.monitor=val_loss"], ["train.monitor=val_top5"],
    ["optim.optimizer=Adam"], ["optim.scheduler=none"],
    ["data.dataset=folder", "data.root=/videos"],
    ["data.dataset=wlasl", "data.root=/videos", "data.annotations=/videos/WLASL_v0.3.json"],
    ["data.num_frames=1", "data.frame_size=8"],
])
def test_config_validate_accepts_the_edge_of_every_range(overrides):
    cfg = apply_overrides(Config(), overrides)
    assert validate(cfg) is cfg


@pytest.mark.parametrize("overrides,message", [
    (["train.epochs=0"], "train.epochs must be >= 1, got 0"),
    (["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
    (["train.precision=fp16"], "train.precision must be auto, fp32 or bf16, got 'fp16'"),
    (["train.monitor=train_loss"],
     "train.monitor must be val_acc, val_f1, val_loss or val_top5, got 'train_loss'"),
    (["train.patience=0"], "train.patience must be >= 1 or null, got 0"),
    (["train.max_bad_steps=0"], "train.max_bad_steps must be >= 1, got 0"),
    (["train.rollback_lr_factor=0"], "train.rollback_lr_factor must be in (0, 1], got 0.0"),
    (["train.rollback_lr_factor=1.5"], "train.rollback_lr_factor must be in (0, 1], got 1.5"),
    (["train.grad_clip=0"], "train.grad_clip must be > 0 or null, got 0.0"),
    (["train.label_smoothing=1"], "train.label_smoothing must be in [0, 1), got 1.0"),
    (["train.label_smoothing=-0.1"], "train.label_smoothing must be in [0, 1), got -0.1"),
    (["optim.optimizer=sgd"], "optim.optimizer must be adamw or adam, got 'sgd'"),
    (["optim.scheduler=step"], "optim.scheduler must be cosine or none, got 'step'"),
    (["optim.lr=0"], "optim.lr must be > 0, got 0.0"),
    (["data.dataset=kinetics"], "data.dataset must be synthetic, folder or wlasl, got 'kinetics'"),
    (["data.dataset=folder"], "data.root is required for data.dataset=folder"),
    (["data.dataset=wlasl", "data.annotations=/videos/WLASL_v0.3.json"],
     "data.root is required for data.dataset=wlasl"),
    (["data.dataset=wlasl", "data.root=/videos"],
     "data.annotations (the WLASL JSON file) is required for data.dataset=wlasl"),
    (["data.num_frames=0"], "data.num_frames must be >= 1 and data.frame_size >= 8"),
    (["data.frame_size=7"], "data.num_frames must be >= 1 and data.frame_size >= 8"),
])
def test_config_validate_rejects_the_value_past_every_range(overrides, message):
    cfg = apply_overrides(Config(), overrides)
    with pytest.raises(ValueError) as e:
        validate(cfg)
    assert str(e.value) == message


def test_config_validate_rejects_a_model_that_is_not_a_mapping():
    cfg = Config()
    cfg.model = [("num_layers", 2)]
    with pytest.raises(ValueError, match="^model must be a mapping of CNNLSTM keyword arguments$"):
        validate(cfg)



def test_config_file_that_does_not_exist_is_named(tmp_path):
    path = str(tmp_path / "run.toml")
    with pytest.raises(FileNotFoundError) as e:
        load_config_file(path)
    assert str(e.value) == "config file not found: %s" % path


def test_config_file_of_another_format_is_refused(tmp_path):
    path = tmp_path / "run.ini"
    path.write_text("[train]\nepochs = 7\n")
    with pytest.raises(ValueError) as e:
        load_config_file(str(path))
    assert str(e.value) == "config file %s: expected .toml, .yaml, .yml or .json" % path


def test_config_from_our_checkpoint_is_its_saved_config():
    cfg = apply_overrides(Config(), ["optim.lr=5e-4", "model.num_layers=2", "train.epochs=3"])
    key_map = {"rnn.": "lstm."}
    got, got_key_map, ours = config_from_checkpoint({"config": cfg.to_dict(), "model_state_dict": {}},
                                                    key_map)
    assert ours is True and got_key_map is key_map and got.to_dict() == cfg.to_dict()


def test_config_from_checkpoint_of_other_weights_says_what_does_not_fit(rng):
    """A `config` entry that is not ours (another script's hyper-parameters) is not read."""
    ckpt = {"config": {"hidden_size": 512}, "model_state_dict": {"fc.weight": torch.randn(3, 4, generator=rng)}}
    with pytest.raises(ValueError, match=r"^cannot read a CNN-LSTM architecture off the checkpoint's "
                                         r"weights \(no LSTM weights [^;]*; no convolution weights [^;]*\); "
                                         r"give the model with --config / --set model\.\* and --key-map$"):
        config_from_checkpoint(ckpt)

# --- metrics -----------------------------------------------------------------------------------

def test_meter_matches_hand_computed_metrics():
    # 6 samples, 3 classes; predictions by argmax of one-hot-ish logits
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 2])
    logits = torch.nn.functional.one_hot(preds, 3).float() * 5
    meter = ClassificationMeter(3, topk=2)
    meter.update(logits[:4], targets[:4], torch.tensor(4.0))
    meter.update(logits[4:], targets[4:], torch.tensor(2.0))
    m = meter.compute()
    assert m["count"] == 6 and m["acc"] == pytest.approx(4 / 6) and m["loss"] == pytest.approx(1.0)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # F1: class 0 p=1/2 r=1/2 -> 1/2; class 1 p=2/3 r=1 -> 4/5; class 2 p=1 r=1/2 -> 2/3
    assert m["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["per_class_acc"] == pytest.approx([0.5, 1.0, 0.5])


def test_meter_topk_counts_hits_in_the_k_best():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    meter = ClassificationMeter(4, topk=2)
    meter.update(logits, torch.tensor([1, 0]))
    m = meter.compute()
    assert m["acc"] == 0.0 and m["top5"] == 0.5 and m["topk"] == 2 and m["loss"] is None


def test_meter_sums_combine_like_one_meter():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(40, 7, generator=g), torch.randint(0, 7, (40,), generator=g)
    whole, a, b = ClassificationMeter(7), ClassificationMeter(7), ClassificationMeter(7)
    whole.update(logits, targets, torch.tensor(1.5))
    a.update(logits[:13], targets[:13], torch.tensor(0.5))
    b.update(logits[13:], targets[13:], torch.tensor(1.0))
    a.sums += b.sums  # what all_reduce does across processes
    assert a.compute() == whole.compute()


def test_meter_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\[B, 3\]"):
        ClassificationMeter(3).update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


# --- guards ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), torch.tensor(-float("inf"))])
def test_guard_is_finite_only_when_every_value_is(bad, rng):
    values = [torch.randn((), generator=rng), float(torch.randn((), generator=rng)), 3]
    assert NonFiniteGuard.is_finite(*values)
    for i in range(len(values) + 1):
        assert not NonFiniteGuard.is_finite(*values[:i], bad, *values[i:])


def test_guard_asks_for_rollback_after_k_consecutive_bad_steps():
    guard = NonFiniteGuard(max_bad_steps=3, max_rollbacks=1)
    assert [guard.record(ok) for ok in (False, False, True, False, False)] == [False] * 5
    assert guard.record(False) is True and guard.skipped_total == 5
    assert guard.on_rollback() is True and guard.on_rollback() is False


# "B" a bad step, "G" a good one; the steps (1-based) at which record() asks for a rollback.
@pytest.mark.parametrize("steps,asks_at", [
    ("BBB", [3]),
    ("BBGBB", []),
    ("BBGBBB", [6]),
    ("GBBGBBGBBG", []),
    ("BGBGBGBGB", []),
    ("BBBB", [3, 4]),
])
def test_guard_asks_for_rollback_only_after_max_bad_steps_in_a_row(steps, asks_at):
    guard = NonFiniteGuard(max_bad_steps=3)
    asked = [guard.record(step == "G") for step in steps]
    assert [i for i, ask in enumerate(asked, 1) if ask] == asks_at


def test_guard_good_step_resets_the_consecutive_count():
    guard = NonFiniteGuard(max_bad_steps=3)
    for ok in (False, False, True):
        guard.record(ok)
    assert guard.consecutive == 0


@pytest.mark.parametrize("steps", ["BBGBB", "BGBGB", "GBBBG"])
def test_guard_skipped_counts_include_every_bad_step(steps):
    guard = NonFiniteGuard(max_bad_steps=10)
    guard.start_epoch()
    for step in steps:
        guard.record(step == "G")
    assert (guard.skipped_total, guard.skipped_epoch) == (steps.count("B"), steps.count("B"))


def test_guard_skipped_total_spans_epochs_and_the_epoch_count_restarts():
    guard = NonFiniteGuard(max_bad_steps=10)
    for epoch_steps in ("BGB", "GBG"):
        guard.start_epoch()
        for step in epoch_steps:
            guard.record(step == "G")
    assert (guard.skipped_total, guard.skipped_epoch) == (3, 1)


@pytest.mark.parametrize("monitor,values,stop_after", [
    ("val_acc", [0.5, 0.6, 0.6, 0.55], 4),     # patience 2: no gain in epochs 3 and 4
    ("val_loss", [1.0, 0.9, 0.95, 0.8, 0.85, 0.9], 6),
])
def test_early_stopping_counts_epochs_without_improvement(monitor, values, stop_after):
    early = EarlyStopping(monitor, patience=2)
    stopped_at = None
    for epoch, value in enumerate(values, 1):
        early.step(value, epoch)
        if early.should_stop:
            stopped_at = epoch
            break
    assert stopped_at == stop_after
    assert early.best == (max if monitor == "val_acc" else min)(values)


def test_early_stopping_min_delta_and_nan():
    early = EarlyStopping("val_acc", patience=5, min_delta=0.05)
    assert early.step(0.5, 1) and not early.step(0.54, 2) and early.step(0.56, 3)
    assert not early.step(float("nan"), 4) and early.best_epoch == 3


# best 0.5, min_delta 0.25 (both exact in binary): the boundary is 0.75 ("max") or 0.25 ("min");
# the boundary itself is not an improvement, the next float beyond it is.
@pytest.mark.parametrize("monitor,mode,value,improves", [
    ("val_acc", "max", math.nextafter(0.75, math.inf), True),
    ("val_acc", "max", 0.75, False),
    ("val_acc", "max", 0.625, False),
    ("val_acc", "max", 0.375, False),
    ("val_loss", "min", math.nextafter(0.25, -math.inf), True),
    ("val_loss", "min", 0.25, False),
    ("val_loss", "min", 0.375, False),
    ("val_loss", "min", 0.625, False),
    ("val_f1", "min", 0.125, True),     # an explicit mode wins over the name
    ("val_loss", "max", 0.875, True),
])
def test_early_stopping_improvement_must_beat_best_by_more_than_min_delta(monitor, mode, value, improves):
    early = EarlyStopping(monitor, patience=5, min_delta=0.25, mode=mode)
    early.step(0.5, 1)
    assert early.step(value, 2) is improves


@pytest.mark.parametrize("monitor,mode", [("val_acc", "max"), ("val_loss", "min"), ("val_top5", "max")])
def test_early_stopping_mode_follows_the_monitored_metric(monitor, mode):
    assert EarlyStopping(monitor).mode == mode


def test_early_stopping_state_dict_round_trip_keeps_the_count_and_the_best():
    early = EarlyStopping("val_loss", patience=4, min_delta=0.01)
    for epoch, value in enumerate([0.9, 0.7, 0.71, 0.8], 1):
        early.step(value, epoch)
    again = EarlyStopping("val_loss", patience=4, min_delta=0.01)
    again.load_state_dict(early.state_dict())
    assert (again.best, again.best_epoch, again.bad_epochs) == (0.7, 2, 2)


def _first_stop(early, values, first_epoch):
    """The epoch after which `early` asks to stop, stepping values from first_epoch on (or None)."""
    for epoch, value in enumerate(values, first_epoch):
        early.step(value, epoch)
        if early.should_stop:
            return epoch
    return None


def test_early_stopping_restored_state_stops_at_the_same_epoch():
    values = [0.5, 0.625, 0.5, 0.5625, 0.625, 0.5, 0.5]  # patience 3: stops after epoch 5
    part = EarlyStopping("val_acc", patience=3)
    assert _first_stop(part, values[:3], 1) is None
    resumed = EarlyStopping("val_acc", patience=3)
    resumed.load_state_dict(part.state_dict())
    assert _first_stop(resumed, values[3:], 4) == _first_stop(EarlyStopping("val_acc", patience=3),
                                                              values, 1) == 5


# --- the run -----------------------------------------------------------------------------------

def test_trainer_writes_the_run_folder(tmp_path):
    cfg = tiny_config(tmp_path, epochs=4, checkpoint_every=2, tensorboard=True)
    result = Trainer(cfg).fit()
    run = tmp_path / "run"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["best_checkpoint.pth", "checkpoint_epoch_0002.pth", "checkpoint_epoch_0004.pth",
                     "latest_checkpoint.pth"]
    for name in ("config.json", "train.log", "history.csv", "final_metrics.json",
                 "confusion_matrix.csv", "per_class_accuracy.csv", "confusion_matrix.png",
                 "summary/summary.md", "summary/loss.png"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    latest = load(run / "checkpoints" / "latest_checkpoint.pth")  # plain types only
    assert latest["epoch"] == 4 and latest["config"]["model"]["num_classes"] == 3
    assert set(HISTORY_KEYS) <= set(latest["history"]) and len(latest["history"]["val_acc"]) == 4
    assert {"optimizer_state_dict", "scheduler_state_dict", "best_val_acc", "best_epoch",
            "trainer_state"} <= set(latest)
    assert latest["scheduler_state_dict"]["T_max"] == 4
    assert latest["history"]["lr"][0] == pytest.approx(1e-3)
    best = load(run / "checkpoints" / "best_checkpoint.pth")
    assert best["epoch"] == result["best_epoch"] == latest["best_epoch"]
    assert best["val_acc"] == pytest.approx(max(latest["history"]["val_acc"]))
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["acc"] == pytest.approx(best["val_acc"]) and len(final["confusion"]) == 3
    assert Config.from_dict(load_config_file(str(run / "config.json"))).train.epochs == 4


def _state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_run_equals_the_uninterrupted_run(tmp_path):
    def config(run):
        cfg = tiny_config(tmp_path, run=run, epochs=4)
        cfg.model["dropout"] = 0.3  # draws from the RNG every step: its state must be restored
        cfg.data.min_frames = 3  # shorter clips: the lengths path too
        cfg.data.num_frames = 5
        return cfg

    Trainer(config("whole")).fit()
    first = Trainer(config("parts"))
    assert first.fit(stop_at_epoch=2)["stop_reason"] == "paused"
    assert not (tmp_path / "parts" / "final_metrics.json").exists()
    second = Trainer(config("parts"))
    assert second.resume(str(tmp_path / "parts" / "checkpoints" / "latest_checkpoint.pth")) == 2
    second.fit()
    whole = load(tmp_path / "whole" / "checkpoints" / "latest_checkpoint.pth")
    parts = load(tmp_path / "parts" / "checkpoints" / "latest_checkpoint.pth")
    assert _state_equal(whole["model_state_dict"], parts["model_state_dict"])
    for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert whole["history"][k] == parts["history"][k], k
    sw, sp = whole["optimizer_state_dict"]["state"], parts["optimizer_state_dict"]["state"]
    assert all(_state_equal(sw[i], sp[i]) for i in sw)
    assert whole["best_epoch"] == parts["best_epoch"]


class NaNLogits:
    """A forward hook on the classifier: NaN logits on the chosen training steps (1-based)."""

    def __init__(self, steps):
        self.steps, self.calls = set(steps), 0

    def __call__(self, module, inputs, output):
        if not module.training:
            return output
        self.calls += 1
        return output * float("nan") if self.calls in self.steps else output


def _model_with_hook(cfg, hook):
    from cnnlstm_ext.models import CNNLSTM
    torch.manual_seed(cfg.train.seed)
    model = CNNLSTM(**dict(cfg.model, num_classes=cfg.data.num_classes))
    model.classifier.register_forward_hook(hook)
    return model


def test_nonfinite_steps_are_skipped_counted_and_never_saved(tmp_path):
    cfg = tiny_config(tmp_path, epochs=3, max_bad_steps=3)  # 3 steps per epoch
    hook = NaNLogits({4, 6})  # two isolated bad steps in epoch 2
    result = Trainer(cfg, model=_model_with_hook(cfg, hook)).fit()
    assert result["stop_reason"] == "completed" and result["rollbacks"] == 0
    assert result["skipped_steps"] == 2
    latest = load(tmp_path / "run" / "checkpoints" / "latest_checkpoint.pth")
    assert latest["history"]["skipped_steps"] == [0, 2, 0]
    assert not nonfinite_tensors(latest["model_state_dict"].items())
    assert all(math.isfinite(x) for x in latest["history"]["train_loss"])
    assert "step skipped" in (tmp_path / "run" / "train.log").read_text()


def test_consecutive_nonfinite_steps_roll_back_and_lower_the_lr(tmp_path):
    cfg = tiny_config(tmp_path, epochs=3, max_bad_steps=2, rollback_lr_factor=0.5)
    hook = NaNLogits({5, 6})  # steps 2 and 3 of epoch 2 in a row: roll back to epoch 1
    result = Trainer(cfg, model=_model_with_hook(cfg, hook)).fit()
    assert result["stop_reason"] == "completed" and result["rollbacks"] == 1
    assert result["lr_scale"] == 0.5
    latest = load(tmp_path / "run" / "checkpoints" / "latest_checkpoint.pth")
    plain = [1e-3 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]  # cosine, T_max=3
    assert latest["history"]["lr"] == pytest.approx([plain[0], plain[1] / 2, plain[2] / 2])
    assert latest["history"]["epoch"] == [1, 2, 3]
    assert "rolled back to the state after epoch 1" in (tmp_path / "run" / "train.log").read_text()


def test_a_run_that_keeps_diverging_stops_with_its_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, epochs=4, max_bad_steps=2, max_rollbacks=1)
    hook = NaNLogits(range(4, 1000))  # every step from epoch 2 on
    result = Trainer(cfg, model=_model_with_hook(cfg, hook)).fit()
    assert result["stop_reason"] == "diverged" and result["epochs_completed"] == 1
    latest = load(tmp_path / "run" / "checkpoints" / "latest_checkpoint.pth")
    assert latest["epoch"] == 1 and not nonfinite_tensors(latest["model_state_dict"].items())


class NaNClips(torch.utils.data.Dataset):
    """A data set whose clip `index` is NaN in epoch `epoch` (a corrupt video)."""

    def __init__(self, base, epoch, index):
        self.base, self.bad, self.epoch = base, (epoch, index), 0
        self.classes = base.classes

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        clip, label, length = self.base[i]
        return (clip * float("nan") if (self.epoch, i) == self.bad else clip), label, length


def test_a_nan_clip_is_an_isolated_skip(tmp_path):
    cfg = tiny_config(tmp_path, epochs=3, max_bad_steps=2)
    d = cfg.data
    train = SyntheticVideos(d.train_samples, d.num_classes, d.num_frames, d.frame_size,
                            resample_each_epoch=True)
    val = SyntheticVideos(d.val_samples, d.num_classes, d.num_frames, d.frame_size, split="val")
    result = Trainer(cfg, datasets=(NaNClips(train, 2, 5), val, train.classes)).fit()
    assert result["skipped_steps"] == 1 and result["rollbacks"] == 0
    latest = load(tmp_path / "run" / "checkpoints" / "latest_checkpoint.pth")
    assert latest["history"]["skipped_steps"] == [0, 1, 0]
    # skipped before the forward pass: BatchNorm statistics stay finite, nothing to roll back
    assert not nonfinite_tensors(latest["model_state_dict"].items())
    assert "non-finite input" in (tmp_path / "run" / "train.log").read_text()


class UnreadableClips(torch.utils.data.Dataset):
    """A data set whose clips cannot be read in the epochs `epochs` (None: any epoch)."""

    def __init__(self, base, epochs=None):
        self.base, self.bad, self.epoch = base, epochs, 0
        self.classes = base.classes

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if self.bad is None or self.epoch in self.bad:
            raise ClipReadError("could not open video v%d.mp4" % i)
        return self.base[i]


def _synthetic(cfg):
    d = cfg.data
    train = SyntheticVideos(d.train_samples, d.num_classes, d.num_frames, d.frame_size,
                            resample_each_epoch=True)
    return train, SyntheticVideos(d.val_samples, d.num_classes, d.num_frames, d.frame_size,
                                  split="val")


def test_a_validation_pass_that_scores_no_clip_is_no_metric(tmp_path):
    """Epoch 1 validates; every validation clip of epochs 2 and 3 is unreadable: those passes
    are no new best (their acc would read 0) and no epoch without improvement (patience 1 would
    stop the run after epoch 2)."""
    cfg = tiny_config(tmp_path, epochs=3, patience=1)
    train, val = _synthetic(cfg)
    result = Trainer(cfg, datasets=(train, UnreadableClips(val, {2, 3}), train.classes)).fit()
    assert (result["stop_reason"], result["epochs_completed"]) == ("completed", 3)
    assert result["best_epoch"] == 1 and "error" not in result
    latest = load(tmp_path / "run" / "checkpoints" / "latest_checkpoint.pth")
    assert latest["history"]["val_acc"][0] is not None
    assert latest["history"]["val_acc"][1:] == [None, None]
    assert latest["trainer_state"]["early_stopping"]["bad_epochs"] == 0
    assert load(tmp_path / "run" / "checkpoints" / "best_checkpoint.pth")["epoch"] == 1
    log = (tmp_path / "run" / "train.log").read_text()
    for epoch in (2, 3):
        assert ("epoch %d: all 12 validation clips were unreadable and skipped" % epoch) in log
    assert log.count("new best") == 1


def test_a_run_that_scores_no_validation_clip_ends_with_an_error(tmp_path, capsys, monkeypatch):
    from cnnlstm_ext.cli import main

    cfg = tiny_config(tmp_path)
    train, val = _synthetic(cfg)
    monkeypatch.setattr("cnnlstm_ext.data.datasets.build_datasets",
                        lambda *a, **k: (train, UnreadableClips(val), train.classes))
    rc = main(["train", "--output-dir", str(tmp_path), "--run-name", "run", "--epochs", "2",
               "--batch-size", "8", "--no-progress", "-q", "--set", "train.tensorboard=false",
               "--set", "model.spatial_dim=16", "--set", "model.temporal_dim=8",
               "--set", "data.num_frames=4", "--set", "data.frame_size=16"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith(
        "error: no validation clip could be read in any epoch (all 12 skipped;")
    assert "new best" not in (tmp_path / "run" / "train.log").read_text()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "latest_checkpoint.pth"]  # no "best" of a pass that scored nothing
    assert not (tmp_path / "run" / "final_metrics.json").exists()


def test_nan_activations_that_poison_batchnorm_are_rolled_back(tmp_path):
    cfg = tiny_config(tmp_path, epochs=3, max_bad_steps=5)
    hook = NaNLogits({5})
    from cnnlstm_ext.models import CNNLSTM
    torch.manual_seed(0)
    model = CNNLSTM(**dict(cfg.model, num_classes=3))
    model.backbone.conv1.register_forward_hook(hook)  # NaN before the first BatchNorm
    result = Trainer(cfg, model=model).fit()
    assert result["rollbacks"] == 1 and result["stop_reason"] == "completed"
    latest = load(tmp_path / "run" / "checkpoints" / "latest_checkpoint.pth")
    assert not nonfinite_tensors(latest["model_state_dict"].items())  # incl. running_mean/var
    assert "poisoned buffers: backbone.bn1.running_mean" in (tmp_path / "run" / "train.log").read_text()


def test_early_stopping_ends_the_run_and_keeps_the_best(tmp_path):
    cfg = tiny_config(tmp_path, epochs=6, patience=2, min_delta=10.0)  # nothing improves by 10
    result = Trainer(cfg).fit()
    assert result["stop_reason"] == "early_stop" and result["epochs_completed"] == 3
    assert result["best_epoch"] == 1
    assert "early stop after epoch 3" in (tmp_path / "run" / "train.log").read_text()
    best = load(tmp_path / "run" / "checkpoints" / "best_checkpoint.pth")
    assert best["epoch"] == 1


def test_resumed_run_early_stops_where_the_uninterrupted_run_does(tmp_path):
    """Patience 2 and an improvement that no epoch reaches: the uninterrupted run stops after
    epoch 3; a run paused after epoch 2 (one epoch without improvement counted) and resumed must
    stop there too, with the same early-stopping state."""
    def config(run):
        return tiny_config(tmp_path, run=run, epochs=5, patience=2, min_delta=10.0)

    whole = Trainer(config("whole")).fit()
    assert whole["stop_reason"] == "early_stop" and whole["epochs_completed"] == 3
    assert Trainer(config("parts")).fit(stop_at_epoch=2)["stop_reason"] == "paused"
    resumed = Trainer(config("parts"))
    resumed.resume(str(tmp_path / "parts" / "checkpoints" / "latest_checkpoint.pth"))
    parts = resumed.fit()
    assert (parts["stop_reason"], parts["epochs_completed"]) == ("early_stop", 3)
    states = [load(tmp_path / run / "checkpoints" / "latest_checkpoint.pth")["trainer_state"]
              ["early_stopping"] for run in ("whole", "parts")]
    assert states[0] == states[1] and states[0]["bad_epochs"] == 2


def test_resume_a_legacy_checkpoint(tmp_path):
    spec = importlib.util.spec_from_file_location("legacy_run", HERE / "legacy_run.py")
    legacy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(legacy)
    legacy.train(str(tmp_path / "legacy"), epochs=2)
    path = str(tmp_path / "legacy" / "latest_checkpoint.pth")

    ckpt = normalize_checkpoint(read_checkpoint(path))
    cfg, key_map, ours = config_from_checkpoint(ckpt)
    assert not ours and key_map and cfg.model["num_layers"] == legacy.LAYERS
    cfg.data.num_classes, cfg.data.num_frames, cfg.data.frame_size = (
        legacy.NUM_CLASSES, legacy.FRAMES, legacy.SIZE)
    cfg.data.train_samples, cfg.data.val_samples = 16, 10
    t = cfg.train
    t.output_dir, t.run_name, t.epochs, t.progress, t.tensorboard = str(tmp_path), "cont", 3, False, False
    trainer = Trainer(cfg)
    assert trainer.resume(path, key_map=key_map) == 2
    legacy_weights = ckpt["model_state_dict"]["rnn.weight_hh_l1_reverse"]
    assert torch.equal(trainer.model.lstm.weight_hh_l1_reverse, legacy_weights)
    result = trainer.fit()
    assert result["epochs_completed"] == 3
    latest = load(tmp_path / "cont" / "checkpoints" / "latest_checkpoint.pth")
    assert latest["epoch"] == 3 and len(latest["history"]["train_loss"]) == 3
    assert latest["history"]["train_loss"][:2] == pytest.approx(ckpt["history"]["train_loss"])
    # the legacy schedule planned 2 epochs; it now spans 3, so epoch 3 still learns
    assert latest["history"]["lr"][2] == pytest.approx(legacy.LR * (1 + math.cos(2 * math.pi / 3)) / 2)


def test_evaluate_model_returns_metrics_and_predictions():
    from cnnlstm_ext.models import CNNLSTM
    ds = SyntheticVideos(10, num_classes=3, num_frames=4, frame_size=16, min_frames=3)
    model = CNNLSTM(num_classes=3, spatial_dim=16, temporal_dim=8, num_layers=1, backbone="tiny")
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    metrics, preds = evaluate_model(model, loader, torch.device("cpu"), 3, collect_predictions=True)
    assert metrics["count"] == 10 and len(preds) == 10
    assert sum(p["label"] == p["prediction"] for p in preds) == round(metrics["acc"] * 10)
    assert all(0 < p["confidence"] <= 1 and len(p["topk"]) == 3 for p in preds)
    assert [p["label"] for p in preds] == [ds[i][1] for i in range(10)]


def test_trainer_rejects_a_model_with_another_class_count(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.model["num_classes"] = 5
    with pytest.raises(ValueError, match="num_classes=5 but the data set has 3"):
        Trainer(cfg)
