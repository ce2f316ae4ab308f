"""Checkpoints: a plain PyTorch script's files, resume, verify, inspect, export, error paths."""
import collections
import importlib.util
import json
import os
import pathlib
import stat
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

from cnnlstm_ext import CNNLSTM
from cnnlstm_ext.checkpoint import (CheckpointError, CheckpointMismatchError, apply_key_map,
                                    atomic_write, find_checkpoints, inspect_checkpoint, invert_key_map,
                                    load_checkpoint, save_checkpoint, verify_checkpoint)
from cnnlstm_ext.cli import main as cli

HERE = pathlib.Path(__file__).parent
_spec = importlib.util.spec_from_file_location("legacy_run", HERE / "legacy_run.py")
legacy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(legacy)

# The legacy script's names -> CNNLSTM's (one rule a regex, to cover both kinds).
KEY_MAP = {"cnn.": "backbone.", "proj.": "spatial_proj.", r"re:^rnn\.": "lstm.",
           "head.": "classifier."}
PLAIN_KEY_MAP = {"cnn.": "backbone.", "proj.": "spatial_proj.", "rnn.": "lstm.",
                 "head.": "classifier."}
LEGACY_CONFIG = dict(num_classes=legacy.NUM_CLASSES, spatial_dim=legacy.SPATIAL,
                     temporal_dim=legacy.HIDDEN, num_layers=legacy.LAYERS, backbone="tiny")
SMALL = dict(num_classes=4, spatial_dim=16, temporal_dim=8, num_layers=2, backbone="tiny")


# Two shared cores: more intra-op threads only add contention for these tiny models.
pytestmark = pytest.mark.usefixtures("one_thread")


def truncate(path, fraction=0.8):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


@pytest.fixture(scope="module")
def legacy_dir(tmp_path_factory, one_thread):
    """6 epochs of the plain script; epoch 6 diverges to NaN; epoch 3's file is cut short."""
    out = tmp_path_factory.mktemp("legacy") / "checkpoints"
    legacy.train(str(out), epochs=6, nan_epoch=6)
    truncate(out / "checkpoint_epoch_0003.pth")
    return out


def fresh(config=LEGACY_CONFIG, epochs=6, fused=True):
    model = CNNLSTM(fused=fused, **config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=legacy.LR,
                                  weight_decay=legacy.WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return model, optimizer, scheduler


def trained_small(steps=2, seed=0):
    """A small CNNLSTM with AdamW moments after a few steps."""
    torch.manual_seed(seed)
    model, optimizer, scheduler = fresh(SMALL, epochs=10)
    x = torch.randn(2, 3, 3, 16, 16)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


# --- the legacy folder ---------------------------------------------------------------------------

def test_resume_from_legacy_file_matches_the_plain_script(legacy_dir, tmp_path):
    start = legacy_dir / "checkpoint_epoch_0004.pth"
    model, optimizer, scheduler = fresh()
    ckpt = load_checkpoint(start, model, optimizer, scheduler, key_map=KEY_MAP)
    assert ckpt["epoch"] == 4
    x, y, _, _ = legacy.make_data()
    for epoch in (5, 6):
        legacy.train_epoch(model, optimizer, x, y, epoch)
        scheduler.step()
    plain_model, plain_optimizer, _ = legacy.train(str(tmp_path / "plain"), epochs=6,
                                                   resume=str(start))
    expected = apply_key_map(plain_model.state_dict(), KEY_MAP)
    ours = model.state_dict()
    assert list(sorted(expected)) == list(sorted(ours))
    for k in ours:
        torch.testing.assert_close(ours[k], expected[k], rtol=1e-4, atol=1e-5, msg=k)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(plain_optimizer.param_groups[0]["lr"])


def test_legacy_moments_land_on_their_parameters(legacy_dir):
    # The plain model registers head first; CNNLSTM the backbone first. Moments follow names.
    path = legacy_dir / "checkpoint_epoch_0004.pth"
    model, optimizer, _ = fresh()
    load_checkpoint(path, model, optimizer, key_map=KEY_MAP)
    raw = torch.load(path, weights_only=True)
    names = [k for k in raw["model_state_dict"] if not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked"))]
    params = dict(model.named_parameters())
    for position, name in enumerate(names):
        ours = optimizer.state[params[apply_key_map({name: 0}, KEY_MAP).popitem()[0]]]
        torch.testing.assert_close(ours["exp_avg"],
                                   raw["optimizer_state_dict"]["state"][position]["exp_avg"])


def test_our_file_loads_in_the_plain_script(legacy_dir, tmp_path):
    model, optimizer, scheduler = fresh()
    ckpt = load_checkpoint(legacy_dir / "checkpoint_epoch_0004.pth", model, optimizer, scheduler,
                           key_map=KEY_MAP)
    out = save_checkpoint(tmp_path / "ours.pth", model=model, optimizer=optimizer,
                          scheduler=scheduler, epoch=4, history=ckpt["history"],
                          key_map=invert_key_map(PLAIN_KEY_MAP), key_order=ckpt["source_keys"])
    # In a fresh interpreter that never imports cnnlstm_ext.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, str(HERE / "legacy_run.py"), "load", str(out)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("loaded")
    # And in this one: every moment sits on the parameter it belongs to.
    plain_model, plain_optimizer, _, _ = legacy.load(str(out))
    ours = dict(model.named_parameters())
    for name, p in plain_model.named_parameters():
        assert p.shape == ours[apply_key_map({name: 0}, PLAIN_KEY_MAP).popitem()[0]].shape


def test_our_file_without_key_map_loads_with_weights_only(tmp_path):
    model, optimizer, scheduler = trained_small()
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=optimizer,
                           scheduler=scheduler, epoch=3,
                           metrics={"val_acc": 0.5, "val_f1": 0.25, "train_loss": 1.5},
                           best={"best_val_acc": 0.5, "best_val_f1": 0.25, "best_epoch": 3},
                           history={"train_loss": [2.0, 1.7, 1.5]}, config={"lr": 1e-3},
                           extra={"rng_state": torch.get_rng_state()})
    raw = torch.load(path, weights_only=True)
    for key in ("epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict",
                "history", "best_val_acc", "best_val_f1", "best_epoch", "val_acc", "val_f1",
                "train_loss", "lr", "config", "rng_state"):
        assert key in raw, key
    assert raw["epoch"] == 3 and raw["lr"] == optimizer.param_groups[0]["lr"]
    plain = CNNLSTM(fused=False, **SMALL)
    plain.load_state_dict(raw["model_state_dict"])  # nn.LSTM names


def test_verify_flags_exactly_the_bad_files(legacy_dir):
    problems = {p.name: verify_checkpoint(p) for p in find_checkpoints(legacy_dir)}
    bad = {name for name, found in problems.items() if found}
    assert bad == {"checkpoint_epoch_0003.pth", "checkpoint_epoch_0006.pth",
                   "latest_checkpoint.pth"}
    assert "truncated" in problems["checkpoint_epoch_0003.pth"][0]
    nan = " ".join(problems["checkpoint_epoch_0006.pth"])
    assert "NaN/Inf in" in nan and "model tensors" in nan and "optimizer moments" in nan


def test_verify_cli_exit_codes(legacy_dir, capsys):
    assert cli(["verify", str(legacy_dir / "checkpoint_epoch_0002.pth")]) == 0
    assert cli(["verify", str(legacy_dir)]) == 1
    out = capsys.readouterr().out
    assert "BAD  checkpoint_epoch_0003.pth" in out and "OK   checkpoint_epoch_0002.pth" in out
    assert "3 bad" in out
    assert cli(["verify", str(legacy_dir / "missing.pth")]) == 2


def test_summary_of_the_legacy_folder(legacy_dir, tmp_path):
    from cnnlstm_ext.report import summarize
    md = summarize(legacy_dir, tmp_path / "report", patience=2).read_text()
    for name in ("checkpoint_epoch_0001.pth", "checkpoint_epoch_0003.pth",
                 "checkpoint_epoch_0006.pth", "best_checkpoint.pth", "latest_checkpoint.pth"):
        assert "| %s |" % name in md
    assert "NaN loss from epoch 6" in md and "truncated" in md
    for png in ("loss.png", "accuracy.png", "lr.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_reads_the_architecture(legacy_dir, capsys):
    r = inspect_checkpoint(legacy_dir / "checkpoint_epoch_0002.pth")
    a = r["architecture"]
    assert r["epoch"] == 2
    assert (a["lstm"]["num_layers"], a["lstm"]["hidden_size"], a["lstm"]["bidirectional"]) == \
        (legacy.LAYERS, legacy.HIDDEN, True)
    assert a["classifier"]["num_classes"] == legacy.NUM_CLASSES
    assert a["backbone"]["name"] == "tiny"
    assert r["param_count"] == sum(p.numel() for p in legacy.LegacyCNNLSTM().parameters())
    assert r["optimizer"]["kind"] == "AdamW" and r["optimizer"]["states"] == 29
    # Headers aside, a file is its tensors plus two moments per parameter.
    assert 0.9 < r["size_ratio"] < 1.2
    assert cli(["inspect", str(legacy_dir / "checkpoint_epoch_0002.pth")]) == 0
    out = capsys.readouterr().out
    assert "2 layers x 2 directions" in out and "5 classes" in out and "key_map" in out
    assert cli(["inspect", "--json", str(legacy_dir / "checkpoint_epoch_0002.pth")]) == 0
    assert json.loads(capsys.readouterr().out)["epoch"] == 2
    assert cli(["inspect", str(legacy_dir / "checkpoint_epoch_0003.pth")]) == 2
    assert "truncated" in capsys.readouterr().err  # (errors on stderr, as every command's)


# --- save ----------------------------------------------------------------------------------------

def test_roundtrip_restores_model_optimizer_scheduler(tmp_path):
    model, optimizer, scheduler = trained_small()
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=optimizer,
                           scheduler=scheduler, epoch=2, metrics={"val_acc": 0.25})
    model2, optimizer2, scheduler2 = fresh(SMALL, epochs=10)
    ckpt = load_checkpoint(path, model2, optimizer2, scheduler2)
    assert ckpt["epoch"] == 2 and ckpt["val_acc"] == 0.25
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], optimizer2.state[p2][key])
    assert scheduler2.last_epoch == scheduler.last_epoch
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_moments_follow_names_when_the_optimizer_order_differs(tmp_path):
    model, optimizer, _ = trained_small()
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=optimizer, epoch=1)
    model2 = CNNLSTM(**SMALL)
    reversed_opt = torch.optim.AdamW(list(model2.parameters())[::-1], lr=1.0)
    load_checkpoint(path, model2, reversed_opt)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(reversed_opt.state[p2]["exp_avg"], optimizer.state[p]["exp_avg"]), name


def test_unwraps_data_parallel(tmp_path):
    model, optimizer, _ = trained_small()
    path = save_checkpoint(tmp_path / "c.pth", model=nn.DataParallel(model), epoch=1)
    assert not any(k.startswith("module.") for k in torch.load(path, weights_only=True)
                   ["model_state_dict"])


def test_save_converts_common_types_to_plain_ones(tmp_path):
    import argparse
    import numpy as np
    model = CNNLSTM(**SMALL)
    path = save_checkpoint(tmp_path / "c.pth", model=model, epoch=np.int64(3),
                           metrics={"val_acc": np.float32(0.5)},
                           config={"out": pathlib.Path("/x"), "args": argparse.Namespace(a=1),
                                   "dtype": torch.float16, "weights": np.ones(2)})
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3 and isinstance(raw["val_acc"], float)
    assert raw["config"]["out"] == "/x" and raw["config"]["args"] == {"a": 1}
    assert raw["config"]["dtype"] == "torch.float16"
    assert torch.equal(raw["config"]["weights"], torch.ones(2, dtype=torch.float64))


def test_save_converts_enums_and_str_subclasses(tmp_path):
    import enum
    import numpy as np

    class Mode(enum.IntEnum):
        FAST = 2
    path = save_checkpoint(tmp_path / "c.pth", model=CNNLSTM(**SMALL), epoch=1,
                           config={"mode": Mode.FAST, "name": np.str_("run")})
    config = torch.load(path, weights_only=True)["config"]
    assert config == {"mode": 2, "name": "run"} and type(config["name"]) is str


def test_save_refuses_metrics_that_shadow_fields(tmp_path):
    with pytest.raises(ValueError, match="metrics key 'epoch'"):
        save_checkpoint(tmp_path / "c.pth", model=CNNLSTM(**SMALL), epoch=1,
                        metrics={"epoch": 2})


def test_save_rejects_objects_weights_only_cannot_read(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['config'\]\['loss'\]"):
        save_checkpoint(tmp_path / "c.pth", model=CNNLSTM(**SMALL), epoch=1,
                        config={"loss": nn.CrossEntropyLoss()})
    assert not list(tmp_path.iterdir())


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    model = CNNLSTM(**SMALL)
    path = save_checkpoint(tmp_path / "latest.pth", model=model, epoch=1)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]  # no temp file left


class DurabilityLog:
    """Monkeypatches os.fsync and os.replace to record, in order, what each did: ("fsync",
    "file"|"dir", inode, size) for the descriptor synced, ("replace", src inode, dst name)."""

    def __init__(self, monkeypatch):
        self.events = []
        fsync, replace = os.fsync, os.replace

        def recording_fsync(fd):
            st = os.fstat(fd)
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "file"
            self.events.append(("fsync", kind, st.st_ino, st.st_size))
            return fsync(fd)

        def recording_replace(src, dst, *args, **kwargs):
            self.events.append(("replace", os.stat(src).st_ino, pathlib.Path(dst).name))
            return replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "fsync", recording_fsync)
        monkeypatch.setattr(os, "replace", recording_replace)

    def index(self, kind, inode):
        found = [i for i, e in enumerate(self.events) if e[:3] == ("fsync", kind, inode)]
        assert found, "no fsync of the %s (inode %d): %s" % (kind, inode, self.events)
        return found[0]

    def replace_index(self):
        found = [i for i, e in enumerate(self.events) if e[0] == "replace"]
        assert len(found) == 1, self.events
        return found[0]


def random_payload(n=4096):
    return bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n),
                               dtype=torch.uint8).tolist())


@pytest.mark.parametrize("exists", [False, True])
def test_atomic_write_fsyncs_the_whole_file_before_the_rename(tmp_path, monkeypatch, exists):
    path = tmp_path / "run" / "latest.pth"
    if exists:
        path.parent.mkdir()
        path.write_bytes(b"old")
    payload = random_payload()
    log = DurabilityLog(monkeypatch)
    atomic_write(path, lambda f: f.write(payload))
    inode = path.stat().st_ino  # the temp file, renamed
    synced = log.index("file", inode)
    assert synced < log.replace_index() and log.events[synced][3] == len(payload)


@pytest.mark.parametrize("exists", [False, True])
def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch, exists):
    path = tmp_path / "run" / "latest.pth"
    if exists:
        path.parent.mkdir()
        path.write_bytes(b"old")
    log = DurabilityLog(monkeypatch)
    atomic_write(path, lambda f: f.write(random_payload()))
    assert log.index("dir", path.parent.stat().st_ino) > log.replace_index()


def test_atomic_write_renames_its_temp_file_over_the_path(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    payload = random_payload()
    log = DurabilityLog(monkeypatch)
    atomic_write(path, lambda f: f.write(payload))
    assert log.events[log.replace_index()][1:] == (path.stat().st_ino, "latest.pth")
    assert path.read_bytes() == payload and [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


def test_save_checkpoint_goes_through_the_durable_write(tmp_path, monkeypatch):
    log = DurabilityLog(monkeypatch)
    path = save_checkpoint(tmp_path / "latest.pth", model=CNNLSTM(**SMALL), epoch=1)
    file_synced, dir_synced = log.index("file", path.stat().st_ino), log.index("dir", tmp_path.stat().st_ino)
    assert file_synced < log.replace_index() < dir_synced


def test_save_key_map_collision_raises(tmp_path):
    with pytest.raises(ValueError, match="maps both"):
        save_checkpoint(tmp_path / "c.pth", model=CNNLSTM(**SMALL), epoch=1,
                        key_map={"classifier.": "x.", "spatial_proj.": "x."})


# --- load: layouts and aliases -------------------------------------------------------------------

def small_state():
    model, optimizer, scheduler = trained_small()
    return model, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict()}


@pytest.mark.parametrize("layout", [
    dict(model="state_dict", optimizer="optimizer", scheduler="scheduler",
         history="train_history"),
    dict(model="model", optimizer="optimizer_state_dict", scheduler="lr_scheduler",
         history="training_history"),
    dict(model="model_state_dict", optimizer="optimizer", scheduler="scheduler_state_dict",
         history="history"),
])
def test_aliases_are_normalised(tmp_path, layout):
    model, parts = small_state()
    raw = {layout["model"]: parts["model"], layout["optimizer"]: parts["optimizer"],
           layout["scheduler"]: parts["scheduler"],
           layout["history"]: {"val_acc": [0.1, 0.3], "train_loss": [2.0, 1.0]},
           "epoch": 2, "best_metrics": {"val_acc": 0.3, "val_f1": 0.2, "epoch": 2}}
    torch.save(raw, tmp_path / "c.pth")
    model2, optimizer2, scheduler2 = fresh(SMALL, epochs=10)
    ckpt = load_checkpoint(tmp_path / "c.pth", model2, optimizer2, scheduler2)
    assert ckpt["history"]["val_acc"] == [0.1, 0.3]
    assert (ckpt["best_val_acc"], ckpt["best_val_f1"], ckpt["best_epoch"]) == (0.3, 0.2, 2)
    assert (ckpt["val_acc"], ckpt["train_loss"]) == (0.3, 1.0)  # this epoch's history entry
    assert torch.equal(model2.classifier.weight, model.classifier.weight)
    assert scheduler2.last_epoch == 2


def test_bare_state_dict_with_ddp_prefix_loads(tmp_path):
    model, parts = small_state()
    torch.save(collections.OrderedDict(("module." + k, v) for k, v in parts["model"].items()),
               tmp_path / "bare.pth")
    model2 = CNNLSTM(**SMALL)
    ckpt = load_checkpoint(tmp_path / "bare.pth", model2)
    assert ckpt["epoch"] is None and ckpt["optimizer_state_dict"] is None
    assert torch.equal(model2.lstm.weight_hh_l1_reverse, model.lstm.weight_hh_l1_reverse)


def test_key_map_rules_prefix_regex_and_drop():
    sd = collections.OrderedDict([("cnn.conv1.weight", 1), ("rnn.weight_ih_l0", 2),
                                  ("head.0.weight", 3), ("aux.weight", 4)])
    out = apply_key_map(sd, ["cnn.=backbone.", (r"re:^rnn\.(\w+)$", r"lstm.\1"),
                             ("head.0.", "classifier."), ("aux.", None)])
    assert list(out.items()) == [("backbone.conv1.weight", 1), ("lstm.weight_ih_l0", 2),
                                 ("classifier.weight", 3)]


@pytest.mark.parametrize("key_map, error, match", [
    ({"a.": "x.", "b.": "x."}, CheckpointError, "maps both"),
    (["no-equals-sign"], ValueError, "OLD=NEW"),
    ({"re:(": "x"}, ValueError, "regular expression"),
    ("cnn.=backbone.", TypeError, "list of rules"),
])
def test_bad_key_maps_raise(key_map, error, match):
    with pytest.raises(error, match=match):
        apply_key_map({"a.w": 1, "b.w": 2}, key_map)


def test_mismatch_lists_missing_unexpected_and_wrong_shapes(tmp_path):
    model, parts = small_state()
    sd = collections.OrderedDict(parts["model"])
    sd["classifier.weight"] = torch.zeros(9, 16)
    sd["extra.weight"] = torch.zeros(3)
    del sd["lstm.bias_hh_l1"]
    torch.save({"model_state_dict": sd}, tmp_path / "c.pth")
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(tmp_path / "c.pth", CNNLSTM(**SMALL))
    message = str(e.value)
    assert "1 missing, 1 unexpected, 1 wrongly-shaped" in message
    assert "lstm.bias_hh_l1 [32]" in message and "extra.weight [3]" in message
    assert "classifier.weight: file [9, 16], model [4, 16]" in message
    assert e.value.missing == ["lstm.bias_hh_l1"] and e.value.unexpected == ["extra.weight"]


def test_mismatch_suggests_a_key_map_for_renamed_files(legacy_dir):
    with pytest.raises(CheckpointMismatchError, match=r"try key_map=.*'rnn\.': 'lstm\.'"):
        load_checkpoint(legacy_dir / "checkpoint_epoch_0001.pth", CNNLSTM(**LEGACY_CONFIG))


def test_non_strict_loads_what_fits_and_warns(tmp_path):
    model, parts = small_state()
    sd = collections.OrderedDict(parts["model"])
    sd["extra.weight"] = torch.zeros(3)
    del sd["classifier.bias"]
    torch.save({"model_state_dict": sd}, tmp_path / "c.pth")
    model2 = CNNLSTM(**SMALL)
    with pytest.warns(UserWarning, match="extra.weight"):
        load_checkpoint(tmp_path / "c.pth", model2, strict=False)
    assert torch.equal(model2.classifier.weight, model.classifier.weight)


def test_wrong_shape_raises_even_when_not_strict(tmp_path):
    model, parts = small_state()
    parts["model"]["classifier.weight"] = torch.zeros(9, 16)
    torch.save({"model_state_dict": parts["model"]}, tmp_path / "c.pth")
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        load_checkpoint(tmp_path / "c.pth", CNNLSTM(**SMALL), strict=False)


# --- load: optimizer and scheduler errors -------------------------------------------------------

def test_reordered_optimizer_state_is_refused(tmp_path):
    # The old optimizer was built over the parameters in another order and the file has no
    # param_names: by state-dict order its moments would sit on the wrong parameters.
    torch.manual_seed(0)
    model = CNNLSTM(**SMALL)
    optimizer = torch.optim.AdamW(list(model.parameters())[::-1])
    model(torch.randn(1, 2, 3, 16, 16)).sum().backward()
    optimizer.step()
    torch.save({"model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict()}, tmp_path / "c.pth")
    model2, optimizer2, _ = fresh(SMALL)
    with pytest.raises(CheckpointError, match="do not line up"):
        load_checkpoint(tmp_path / "c.pth", model2, optimizer2)
    assert "do not line up" in " ".join(verify_checkpoint(tmp_path / "c.pth"))


def test_optimizer_group_count_mismatch_raises(tmp_path):
    model, optimizer, _ = trained_small()
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=optimizer, epoch=1)
    model2 = CNNLSTM(**SMALL)
    two_groups = torch.optim.AdamW([{"params": model2.backbone.parameters()},
                                    {"params": [p for n, p in model2.named_parameters()
                                                if not n.startswith("backbone.")]}])
    with pytest.raises(CheckpointError, match="1 param groups|2 param groups"):
        load_checkpoint(path, model2, two_groups)


def test_missing_optimizer_state_raises(tmp_path):
    path = save_checkpoint(tmp_path / "c.pth", model=CNNLSTM(**SMALL), epoch=1)
    model2, optimizer2, _ = fresh(SMALL)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(path, model2, optimizer2)


def test_scheduler_of_another_kind_raises(tmp_path):
    model, optimizer, _ = trained_small()
    step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=optimizer, scheduler=step,
                           epoch=1)
    model2, optimizer2, cosine = fresh(SMALL)
    with pytest.raises(CheckpointError, match="T_max"):
        load_checkpoint(path, model2, optimizer2, cosine)


# --- load: unreadable files ---------------------------------------------------------------------

def test_truncated_file_raises_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "c.pth", model=CNNLSTM(**SMALL), epoch=1)
    truncate(path, 0.5)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, CNNLSTM(**SMALL))


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "nope.pth")


class Pickled:
    """An object only full unpickling can rebuild."""


def test_non_plain_objects_are_refused_with_weights_only(tmp_path):
    torch.save({"model_state_dict": CNNLSTM(**SMALL).state_dict(), "args": Pickled()},
               tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="plain types"):
        load_checkpoint(tmp_path / "c.pth")


def test_file_without_a_model_state_raises(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="no model state dict"):
        load_checkpoint(tmp_path / "c.pth")


# --- verify: each kind of damage ----------------------------------------------------------------

def test_verify_passes_a_sound_file(tmp_path):
    model, optimizer, scheduler = trained_small()
    path = save_checkpoint(tmp_path / "checkpoint_epoch_0002.pth", model=model,
                           optimizer=optimizer, scheduler=scheduler, epoch=2,
                           metrics={"train_loss": 1.0})
    assert verify_checkpoint(path) == []


def test_verify_reports_missing_optimizer_state(tmp_path):
    path = save_checkpoint(tmp_path / "c.pth", model=CNNLSTM(**SMALL), epoch=1)
    assert any("no optimizer state" in p for p in verify_checkpoint(path))


def test_verify_reports_nan_in_moments_only(tmp_path):
    model, optimizer, _ = trained_small()
    optimizer.state[model.classifier.weight]["exp_avg_sq"][0, 0] = float("inf")
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=optimizer, epoch=1)
    problems = verify_checkpoint(path)
    assert problems == ["NaN/Inf in 1 optimizer moment: classifier.weight.exp_avg_sq"]


def test_verify_reports_a_crc_error(tmp_path):
    model, optimizer, _ = trained_small()
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=optimizer, epoch=1)
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:  # flip a byte inside the largest tensor's data
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert any("CRC" in p for p in verify_checkpoint(path))


def test_verify_reports_an_epoch_that_disagrees_with_the_name(tmp_path):
    model, optimizer, _ = trained_small()
    path = save_checkpoint(tmp_path / "checkpoint_epoch_0007.pth", model=model,
                           optimizer=optimizer, epoch=8)
    assert verify_checkpoint(path) == ["the file name says epoch 7 but it holds epoch 8"]


def test_verify_reports_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pth").write_text("hello")
    assert "not a torch.save file" in verify_checkpoint(tmp_path / "notes.pth")[0]


# --- export --------------------------------------------------------------------------------------

def test_export_safetensors_holds_the_weights_only(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file
    model, optimizer, _ = trained_small()
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=optimizer, epoch=5,
                           best={"best_val_acc": 0.5, "best_epoch": 5})
    out = tmp_path / "weights.safetensors"
    assert cli(["export", str(path), "--safetensors", str(out)]) == 0
    tensors = load_file(str(out))
    assert list(sorted(tensors)) == list(sorted(model.state_dict()))
    for k, v in model.state_dict().items():
        assert torch.equal(tensors[k], v), k
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["epoch"] == "5" and meta["best_val_acc"] == "0.5"
    assert json.loads(meta["cnnlstm_config"])["num_classes"] == 4
    assert "wrote" in capsys.readouterr().out


def test_export_applies_a_key_map_and_reports_errors(legacy_dir, tmp_path, capsys):
    from safetensors.torch import load_file
    out = tmp_path / "w.safetensors"
    args = ["export", str(legacy_dir / "checkpoint_epoch_0001.pth"), "--safetensors", str(out)]
    for old, new in PLAIN_KEY_MAP.items():
        args += ["--key-map", "%s=%s" % (old, new)]
    assert cli(args) == 0
    CNNLSTM(**LEGACY_CONFIG).load_state_dict(load_file(str(out)))
    assert cli(["export", str(legacy_dir / "checkpoint_epoch_0003.pth"),
                "--safetensors", str(tmp_path / "x.safetensors")]) == 2  # as predict and train
    assert "truncated" in capsys.readouterr().err


@pytest.mark.cuda  # skipped without a GPU and the CUDA kernels (conftest.py)
def test_checkpoint_moves_between_cuda_and_cpu(tmp_path):
    torch.manual_seed(0)
    model = CNNLSTM(**SMALL).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 3, 16, 16, device="cuda")).square().mean().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=optimizer, epoch=1)
    raw = torch.load(path, weights_only=True)  # no map_location: the file holds CPU tensors
    assert all(v.device.type == "cpu" for v in raw["model_state_dict"].values())
    assert all(t.device.type == "cpu" for s in raw["optimizer_state_dict"]["state"].values()
               for t in s.values())
    cpu_model, cpu_optimizer, _ = fresh(SMALL)
    load_checkpoint(path, cpu_model, cpu_optimizer)
    for (name, p), q in zip(model.named_parameters(), cpu_model.parameters()):
        assert torch.equal(p.cpu(), q), name
        assert torch.equal(optimizer.state[p]["exp_avg"].cpu(), cpu_optimizer.state[q]["exp_avg"])
    gpu_model = CNNLSTM(**SMALL).cuda()
    gpu_optimizer = torch.optim.AdamW(gpu_model.parameters(), lr=1e-3)
    load_checkpoint(path, gpu_model, gpu_optimizer)
    assert gpu_optimizer.state[gpu_model.classifier.weight]["exp_avg"].is_cuda
    gpu_model(torch.randn(2, 3, 3, 16, 16, device="cuda")).square().mean().backward()
    gpu_optimizer.step()  # resumes on the GPU


# --- files that are not checkpoints: a torch.export program, safetensors weights -----------------

def tiny_pt2(path):
    """A torch.export program saved as torch.export.save writes it (what `export --pt2` does)."""
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    program = torch.export.export(Double(), (torch.randn(2, 3),))
    torch.export.save(program, str(path), extra_files={"metadata.json": "{}"})
    return path


def exported_safetensors(tmp_path, name="w.safetensors"):
    """(the .safetensors of `cnnlstm-ext export`, the model it holds)."""
    from cnnlstm_ext.commands.export import export_safetensors  # what the command runs
    model, optimizer, _ = trained_small()
    ckpt = save_checkpoint(tmp_path / "c.pth", model=model, optimizer=optimizer, epoch=5,
                           best={"best_val_acc": 0.5, "best_epoch": 5},
                           extra={"trainer_state": {"classes": ["a", "b", "c", "d"]}})
    out = tmp_path / name
    export_safetensors(ckpt, out)
    return out, model


def test_a_pt2_program_is_named_as_such_by_content_not_by_name(tmp_path):
    from cnnlstm_ext.checkpoint import file_format, read_checkpoint
    program = tiny_pt2(tmp_path / "model.pt2")
    renamed = tmp_path / "model.pth"
    renamed.write_bytes(program.read_bytes())
    for path in (program, renamed):
        assert file_format(path) == "pt2"
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(path)
        text = str(e.value)
        assert text.startswith("%s: a torch.export program (.pt2" % path), text
        assert "torch.export.load(path).module()" in text and ".safetensors" in text
        assert "data.pkl" not in text and "corrupt" not in text and "\n" not in text
    assert file_format(save_checkpoint(tmp_path / "c.pth", model=nn.Linear(2, 2),
                                       epoch=1)) == "checkpoint"


def test_every_command_that_reads_a_checkpoint_names_a_pt2_program(tmp_path, capsys):
    program = str(tiny_pt2(tmp_path / "model.pt2"))
    for argv, rc in ((["inspect", program], 2),
                     (["verify", program], 1),
                     (["evaluate", program, "synthetic", "--out", str(tmp_path / "eval")], 2),
                     (["train", "--resume", program, "--output-dir", str(tmp_path / "runs")], 2),
                     (["export", program, "--safetensors", str(tmp_path / "x.safetensors")], 2)):
        assert cli(argv) == rc, argv
        out = capsys.readouterr()
        text = out.out + out.err
        assert "Traceback" not in text and "a torch.export program (.pt2" in text, (argv, text)
        assert "unreadable" not in text and "data.pkl" not in text
    assert sorted(os.listdir(tmp_path)) == ["model.pt2"]  # nothing written


def test_a_safetensors_file_given_as_a_checkpoint_says_what_reads_it(tmp_path, capsys):
    out, _ = exported_safetensors(tmp_path)
    assert cli(["train", "--resume", str(out), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: %s: safetensors weights" % out) and err.count("\n") == 1
    assert "`predict`" in err and "need a checkpoint (.pth)" in err


def test_verify_accepts_the_safetensors_export(tmp_path, capsys):
    out, _ = exported_safetensors(tmp_path)
    assert verify_checkpoint(out) == []
    assert cli(["verify", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == ["OK   w.safetensors", "1 file checked, 0 bad"]


def test_inspect_shows_what_the_safetensors_export_holds(tmp_path, capsys):
    out, model = exported_safetensors(tmp_path)
    r = inspect_checkpoint(out)
    assert r["format"] == "safetensors" and r["epoch"] == 5 and r["best"]["best_val_acc"] == 0.5
    assert {t["name"]: t["shape"] for t in r["tensors"]} == \
        {k: list(v.shape) for k, v in model.state_dict().items()}
    assert r["classes"] == ["a", "b", "c", "d"] and r["metadata"]["source"] == "c.pth"
    assert r["param_count"] == sum(p.numel() for p in model.parameters())
    assert r["architecture"]["cnnlstm_config"]["num_classes"] == 4
    assert cli(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "safetensors format" in text and "tensors: %d (" % len(model.state_dict()) in text
    assert "classifier.weight" in text and "F32  [4, " in text and "source c.pth" in text
    assert "epoch 5" in text and "best_val_acc 0.5" in text and "classes: 4 (a, b, c, d)" in text
    assert "fits CNNLSTM(" in text
    assert cli(["inspect", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "safetensors"


def test_verify_and_inspect_name_a_truncated_safetensors_file(tmp_path, capsys):
    out, _ = exported_safetensors(tmp_path)
    data = out.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) - 1000])
    assert cli(["verify", str(cut)]) == 1
    text = capsys.readouterr().out
    assert "BAD  cut.safetensors" in text and "truncated: the bytes of " in text
    assert "lie beyond its end" in text and "not a torch.save file" not in text
    assert cli(["inspect", str(cut)]) == 2
    text = capsys.readouterr().err
    assert text.startswith("error: %s: truncated" % cut) and text.count("\n") == 1
    head = tmp_path / "head.safetensors"
    head.write_bytes(data[:200])  # the write stopped inside the header
    assert "its header alone takes" in verify_checkpoint(head)[0]
    assert cli(["inspect", str(head)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_verify_checks_the_metadata_and_the_values_of_a_safetensors_file(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    out, _ = exported_safetensors(tmp_path)
    tensors = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "meta.safetensors"),
              metadata=dict(meta, param_count="12", classes='["a"]', epoch="five"))
    problems = verify_checkpoint(tmp_path / "meta.safetensors")
    assert "metadata epoch is 'five', not a number" in problems
    assert any(p.startswith("metadata param_count is 12, but the tensors hold") for p in problems)
    assert "metadata names 1 classes, but its cnnlstm_config has 4" in problems
    tensors["classifier.weight"][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    assert verify_checkpoint(tmp_path / "nan.safetensors") == [
        "NaN/Inf in 1 of %d tensors: classifier.weight" % len(tensors)]
    tensors["classifier.weight"][0, 0] = 0.0
    save_file(tensors, str(tmp_path / "plain.safetensors"))  # no metadata: nothing to check
    assert verify_checkpoint(tmp_path / "plain.safetensors") == []


def test_a_safetensors_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    from safetensors.torch import save
    from cnnlstm_ext.checkpoint import file_format
    for pad in range(256):  # a header length whose low byte is 0x80, a pickle's first byte
        data = save({"w": torch.ones(3)}, metadata={"pad": "x" * pad})
        if data[0] == 0x80:
            break
    (tmp_path / "w.safetensors").write_bytes(data)
    assert file_format(tmp_path / "w.safetensors") == "safetensors"
    assert verify_checkpoint(tmp_path / "w.safetensors") == []
