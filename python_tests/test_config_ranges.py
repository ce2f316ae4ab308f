"""config.validate: the values that used to be accepted and made a run train wrong (gradient
ascent, no improvement ever, no training clips, every step skipped), refused with the field named,
and the train command turning each refusal into one `error:` line before anything runs."""
import pytest

from cnnlstm_ext.cli import main
from cnnlstm_ext.train.config import Config, apply_overrides, validate


@pytest.mark.parametrize("overrides,message", [
    (["optim.min_lr=-1"], "optim.min_lr (the end of the cosine schedule) must be in [0, optim.lr = "
                          "0.001], got -1.0"),
    (["optim.min_lr=0.01"], "optim.min_lr (the end of the cosine schedule) must be in [0, optim.lr "
                            "= 0.001], got 0.01"),
    (["train.min_delta=nan"], "train.min_delta must be a finite number, got nan"),
    (["train.min_delta=-0.1"], "train.min_delta must be >= 0, got -0.1"),
    (["data.val_fraction=2"], "data.val_fraction must be in (0, 1), got 2.0"),
    (["data.val_fraction=-0.1"], "data.val_fraction must be in (0, 1), got -0.1"),
    (["data.std=[0,0,0]"], "data.std must be > 0 in every channel (it divides), got [0.0, 0.0, 0.0]"),
    (["optim.lr=inf"], "optim.lr must be a finite number, got inf"),
    (["train.grad_clip=nan"], "train.grad_clip must be a finite number, got nan"),
    (["data.crop_scale=[2,1]"], "data.crop_scale must be [min, max] with 0 < min <= max <= 1, got "
                                "[2.0, 1.0]"),
    (["data.crop_scale=[0,1]"], "data.crop_scale must be [min, max] with 0 < min <= max <= 1, got "
                                "[0.0, 1.0]"),
    (["data.color_jitter=-1"], "data.color_jitter must be >= 0, got -1.0"),
    (["data.orientation=upright"], "data.orientation must be display (as players show frames) or "
                                   "stored (as the files store them), got 'upright'"),
    (["data.noise=-1"], "data.noise must be >= 0, got -1.0"),
    (["train.max_rollbacks=-1"], "train.max_rollbacks must be >= 0, got -1"),
    (["train.checkpoint_every=-1"], "train.checkpoint_every must be >= 0 (0: never), got -1"),
    (["train.eval_every=0"], "train.eval_every must be >= 1, got 0"),
    (["data.frame_size=32", "data.resize_to=24"],
     "data.resize_to (the short side before the 32-pixel crop) must be in [data.frame_size = 32, "
     "4096] or null, got 24"),
    (["data.frame_size=100000"], "data.frame_size must be <= 4096, got 100000"),
    (["optim.weight_decay=-1e-4"], "optim.weight_decay must be >= 0, got -0.0001"),
    (["optim.betas=[0.9,1.0]"], "optim.betas must both be in [0, 1), got [0.9, 1.0]"),
    (["data.num_classes=1"], "data.num_classes (synthetic motions) must be in [2, 6], got 1"),
    (["data.min_frames=20"], "data.min_frames must be in [3, data.num_frames = 12] or null, got 20"),
    (["data.num_workers=-1"], "data.num_workers must be >= 0, got -1"),
    (["data.max_classes=1"], "data.max_classes must be >= 2 or null, got 1"),
    (["data.val_samples=0"], "data.train_samples and data.val_samples must be >= 1, got 1536 and 0"),
])
def test_config_validate_refuses_values_that_train_wrong(overrides, message):
    cfg = apply_overrides(Config(), overrides)
    with pytest.raises(ValueError) as e:
        validate(cfg)
    assert str(e.value) == message


def test_config_validate_refuses_nan_in_a_list_field():
    cfg = Config.from_dict({"data": {"std": [0.2, float("nan"), 0.2]}})
    with pytest.raises(ValueError) as e:
        validate(cfg)
    assert str(e.value) == "data.std must be finite numbers, got [0.2, nan, 0.2]"


@pytest.mark.parametrize("overrides", [
    ["optim.min_lr=0.001"], ["optim.min_lr=0"], ["data.resize_to=32"], ["data.resize_to=null"],
    ["data.crop_scale=[1,1]"], ["data.color_jitter=0"], ["data.noise=0"], ["train.max_rollbacks=0"],
    ["train.checkpoint_every=0"], ["train.eval_every=1"], ["data.val_fraction=0.5"],
    ["data.frame_size=4096"], ["data.num_classes=2"], ["data.min_frames=3"],
])
def test_config_validate_accepts_the_edge_of_the_new_ranges(overrides):
    cfg = apply_overrides(Config(), overrides)
    assert validate(cfg) is cfg


def test_train_command_refuses_min_lr_below_zero_before_running(tmp_path, capsys):
    rc = main(["train", "--output-dir", str(tmp_path), "--set", "optim.min_lr=-1", "--no-progress"])
    err = capsys.readouterr().err
    assert (rc, err.strip().splitlines()) == (2, ["error: optim.min_lr (the end of the cosine schedule) "
                                                  "must be in [0, optim.lr = 0.001], got -1.0"])
    assert list(tmp_path.iterdir()) == []
