"""cnnlstm_ext.load_model on our .pth, the legacy script's .pth and an exported .safetensors;
CNNLSTM.from_state_dict on safetensors' sorted keys; backbone weights carried by checkpoints
(the file a run started from may be gone)."""
import importlib.util
import os
import pathlib
import random

import pytest
import torch

from cnnlstm_ext import CNNLSTM, load_model
from cnnlstm_ext.checkpoint import (CheckpointError, CheckpointMismatchError, describe_state_dict,
                                    load_checkpoint)
from cnnlstm_ext.cli import main
from cnnlstm_ext.train import Config, Trainer

HERE = pathlib.Path(__file__).parent
_spec = importlib.util.spec_from_file_location("legacy_run", HERE / "legacy_run.py")
legacy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(legacy)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tmp_path, run="run", epochs=2, **model):
    cfg = Config()
    cfg.model.update(spatial_dim=16, temporal_dim=8, pooling="max", frame_pool="max", **model)
    d = cfg.data
    d.num_classes, d.num_frames, d.frame_size = 3, 4, 16
    d.train_samples, d.val_samples, d.num_workers = 16, 8, 0
    d.mean, d.std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    t = cfg.train
    t.output_dir, t.run_name = str(tmp_path), run
    t.epochs, t.batch_size, t.progress, t.tensorboard = epochs, 8, False, False
    return cfg


@pytest.fixture(scope="module")
def ours(tmp_path_factory, one_thread):
    """(config, best checkpoint) of a 2-epoch synthetic run."""
    out = tmp_path_factory.mktemp("ours")
    cfg = tiny_config(out)
    Trainer(cfg).fit()
    return cfg, out / "run" / "checkpoints" / "best_checkpoint.pth"


def _reference(cfg, path):
    """The checkpoint loaded the way the trainer's code does it."""
    model = CNNLSTM(**cfg.model)
    load_checkpoint(str(path), model=model)
    return model.eval()


def _clips(frames=4, batch=3, size=16, seed=0):
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_load_model_of_our_checkpoint_is_the_trained_model(ours):
    cfg, path = ours
    model = load_model(path)
    assert isinstance(model, CNNLSTM) and not model.training
    assert model.config["pooling"] == "max" and model.config["frame_pool"] == "max"
    assert model.classes == torch.load(path, weights_only=True)["trainer_state"]["classes"]
    assert len(model.classes) == 3
    assert model.preprocessing == {"num_frames": 4, "frame_size": 16, "resize_to": None,
                                   "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.4],
                                   "orientation": "display"}
    assert next(model.parameters()).device.type == "cpu"
    x = _clips()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(cfg, path)(x), rtol=0, atol=0)


def test_load_model_puts_the_model_on_the_device(ours):
    _, path = ours
    model = load_model(path, device="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    model = load_model(path, torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_load_model_of_the_legacy_layout_reads_the_architecture_off_the_weights(tmp_path):
    out = tmp_path / "legacy"
    trained, _, _ = legacy.train(str(out), epochs=2)
    model = load_model(out / "best_checkpoint.pth")
    assert model.config["backbone"] == "tiny" and model.config["num_layers"] == legacy.LAYERS
    assert model.config["temporal_dim"] == legacy.HIDDEN
    assert model.classes == [str(i) for i in range(legacy.NUM_CLASSES)]
    assert model.preprocessing["num_frames"] == Config().data.num_frames  # no config: defaults
    saved = torch.load(out / "best_checkpoint.pth", weights_only=True)["model_state_dict"]
    trained.load_state_dict(saved)
    trained.eval()
    x = _clips(frames=legacy.FRAMES, size=legacy.SIZE)
    with torch.no_grad():  # the script's model and ours compute the same function
        torch.testing.assert_close(model(x), trained(x), rtol=1e-5, atol=1e-5)


def test_load_model_of_an_exported_safetensors_file_needs_nothing_else(ours, tmp_path, capsys):
    cfg, path = ours
    out = tmp_path / "model.safetensors"
    assert main(["export", str(path), "--safetensors", str(out)]) == 0
    moved = tmp_path / "elsewhere" / "m.safetensors"
    moved.parent.mkdir()
    os.replace(out, moved)
    model = load_model(moved)
    reference = load_model(path)
    assert model.config == reference.config and model.classes == reference.classes
    assert model.preprocessing == reference.preprocessing
    x = _clips()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    renamed = tmp_path / "elsewhere" / "weights.pth"  # read by its content, whatever its name
    os.replace(moved, renamed)
    with torch.no_grad():
        torch.testing.assert_close(load_model(renamed)(x), reference(x), rtol=0, atol=0)


def test_from_state_dict_reads_safetensors_sorted_keys(ours, tmp_path):
    from safetensors.torch import load_file

    _, path = ours
    assert main(["export", str(path), "--safetensors", str(tmp_path / "m.safetensors")]) == 0
    sd = load_file(str(tmp_path / "m.safetensors"))
    reference = load_model(path)
    assert list(sd) != list(reference.state_dict())  # safetensors' order, not the modules'
    model = CNNLSTM.from_state_dict(sd, pooling="max", frame_pool="max").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_clips()), reference(_clips()), rtol=0, atol=0)


@pytest.mark.parametrize("backbone", ["tiny", "resnet18", "resnet50"])
def test_the_backbone_is_identified_in_any_key_order(backbone):
    with torch.device("meta"):
        model = CNNLSTM(num_classes=4, backbone=backbone, spatial_dim=16, temporal_dim=8)
    items = list(model.state_dict().items())
    random.Random(0).shuffle(items)
    for sd in (dict(sorted(items)), dict(items)):
        info = describe_state_dict(sd)
        assert info["backbone"]["name"] == backbone, info["mismatch"]
        assert info["cnnlstm_config"]["backbone"] == backbone
        assert info["backbone"]["features"] == model.backbone_features


def test_a_backbone_under_foreign_inner_names_is_still_identified_by_shapes():
    model = CNNLSTM(num_classes=4, backbone="tiny", spatial_dim=16, temporal_dim=8)
    renamed = {k.replace("conv", "c").replace("bn", "norm"): v
               for k, v in model.state_dict().items()}
    assert describe_state_dict(renamed)["backbone"]["name"] == "tiny"
    assert describe_state_dict(dict(sorted(renamed.items())))["backbone"]["name"] == "tiny"


def test_load_model_errors_name_the_file(tmp_path, ours):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "none.pth")
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        load_model(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_model(tmp_path / "bad.safetensors")
    torch.save({"model_state_dict": {"w": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="CNN-LSTM"):
        load_model(tmp_path / "other.pth")
    _, path = ours
    state = torch.load(path, weights_only=True)
    state.pop("integrity")
    state["config"]["model"]["temporal_dim"] = 12  # the config says another model
    torch.save(state, tmp_path / "mismatch.pth")
    with pytest.raises(CheckpointMismatchError, match="mismatch.pth does not fit CNNLSTM"):
        load_model(tmp_path / "mismatch.pth")


# --- backbone weights are part of the checkpoints, not a path ---------------------------------

@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, one_thread):
    """A run that started from a backbone weights file, which is deleted afterwards."""
    out = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(7)
    weights = out / "tiny-pretrained.pth"
    torch.save(CNNLSTM(backbone="tiny", spatial_dim=16, temporal_dim=8).backbone.state_dict(),
               weights)
    start = torch.load(weights, weights_only=True)
    cfg = tiny_config(out, backbone_weights=str(weights), epochs=1)
    Trainer(cfg).fit()
    os.remove(weights)
    return cfg, out / "run" / "checkpoints" / "latest_checkpoint.pth", start


def test_the_run_started_from_the_backbone_weights_and_its_checkpoint_holds_them(pretrained_run):
    cfg, path, start = pretrained_run
    saved = torch.load(path, weights_only=True)
    assert saved["config"]["model"]["backbone_weights"] == cfg.model["backbone_weights"]
    sd = saved["model_state_dict"]
    # one epoch moved the weights away from the file, but not far: they started there
    w, w0 = sd["backbone.conv1.weight"], start["conv1.weight"]
    assert not torch.equal(w, w0) and (w - w0).norm() < 0.5 * w0.norm()


def test_a_run_whose_backbone_file_is_gone_loads_evaluates_and_resumes(pretrained_run, capsys,
                                                                      tmp_path):
    cfg, path, _ = pretrained_run
    assert not os.path.exists(cfg.model["backbone_weights"])
    model = load_model(path)
    sd = torch.load(path, weights_only=True)["model_state_dict"]
    torch.testing.assert_close(model.backbone.conv1.weight, sd["backbone.conv1.weight"])
    assert main(["evaluate", str(path), "synthetic", "--no-progress",
                 "--out", str(tmp_path / "eval")]) == 0
    assert (tmp_path / "eval" / "metrics.json").is_file()
    rc = main(["train", "--resume", str(path), "--epochs", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert torch.load(path, weights_only=True)["epoch"] == 2


def test_a_new_run_names_the_missing_backbone_file(pretrained_run, capsys, tmp_path):
    cfg, _, _ = pretrained_run
    rc = main(["train", "--set", "model.backbone_weights=%s" % cfg.model["backbone_weights"],
               "--output-dir", str(tmp_path), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: model.backbone_weights: %s not found"
                          % cfg.model["backbone_weights"])
