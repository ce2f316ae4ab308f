"""Checkpoint integrity: the checksum record every saved file carries, errors instead of
tracebacks for damaged files, disk-full saves, stale temp files, kills during saves and bit flips.

`python python_tests/test_checkpoint_integrity.py` prints the counts of the bit-flip and kill runs
(cases tried, clear errors, identical loads, silent differences, other exceptions).
"""
import collections
import errno
import io
import json
import os
import pathlib
import pickletools
import random
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from cnnlstm_ext.checkpoint import (INTEGRITY_KEY, CheckpointError, CheckpointWriteError,
                                    inspect_checkpoint, load_checkpoint, normalize_checkpoint,
                                    read_checkpoint, remove_stale_temp_files, save_checkpoint,
                                    verify_checkpoint)
from conftest import subprocess_env

try:
    import fcntl
except ImportError:
    fcntl = None

FLIP_SEED = 20261205
TENSOR_FLIPS, PICKLE_FLIPS, HEADER_FLIPS = 100, 200, 100  # per layout, x scale


def tiny(seed=0):
    """A tiny model with AdamW moments, a cosine schedule and a step taken."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    model(torch.randn(2, 4)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def save_tiny(path, numpy_rng=True, epoch=3):
    model, optimizer, scheduler = tiny()
    state = {"python": [3, (1, 2.5), "x"], "lr_scale": 0.5, "classes": ["a", "b", "c"]}
    if numpy_rng:  # the trainer's NumPy RNG state: a uint32 tensor
        state["numpy"] = np.random.RandomState(0).get_state()[1][:16].copy()
    return save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                           epoch=epoch, history={"train_loss": [1.5, 1.25, 1.0],
                                                 "val_acc": [0.25, 0.5, 0.5]},
                           metrics={"val_acc": 0.5, "train_loss": 1.0},
                           best={"best_val_acc": 0.5, "best_epoch": 2},
                           config={"model": {"num_classes": 3}, "optim": {"lr": 1e-3}},
                           extra={"trainer_state": state})


def same(a, b):
    """Identical content: same types, keys in the same order, tensors equal bit for bit in dtype,
    shape, strides and requires_grad."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
                and a.requires_grad == b.requires_grad
                and a.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                == b.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return np.float64(a).tobytes() == np.float64(b).tobytes()
    return a == b


def flip(path, offset, bit, out):
    data = bytearray(pathlib.Path(path).read_bytes())
    data[offset] ^= 1 << bit
    pathlib.Path(out).write_bytes(bytes(data))
    return out


def zip_regions(path):
    """Byte ranges of a torch zip file: tensor bytes, the pickle, and the zip headers and small
    records (local headers, `version`, `byteorder`..., central directory, end record)."""
    data = pathlib.Path(path).read_bytes()
    regions = {"tensor": [], "pickle": [], "header": []}
    end_record = data.rfind(b"PK\x05\x06")
    central = int.from_bytes(data[end_record + 16:end_record + 20], "little")
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            h = info.header_offset
            name_len = int.from_bytes(data[h + 26:h + 28], "little")
            extra_len = int.from_bytes(data[h + 28:h + 30], "little")
            begin = h + 30 + name_len + extra_len
            regions["header"].append((h, begin))
            parts = info.filename.split("/")
            kind = ("tensor" if len(parts) == 3 and parts[1] == "data"
                    else "pickle" if info.filename.endswith("data.pkl") else "header")
            regions[kind].append((begin, begin + info.compress_size))
    regions["header"].append((central, len(data)))
    return regions


def legacy_regions(path):
    """A legacy (non-zip) file: five pickles, then each storage as its 8-byte element count and
    its bytes (every tensor of the file must have one element size)."""
    data = pathlib.Path(path).read_bytes()
    sizes = set()

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            sizes.add(obj.element_size())
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
    walk(torch.load(path, weights_only=True))
    (element_size,) = sizes
    stream = io.BytesIO(data)
    for _ in range(5):  # magic number, protocol, system info, the object, the storage keys
        collections.deque(pickletools.genops(stream), maxlen=0)  # reads one pickle
    end = pos = stream.tell()
    tensor = []
    while pos < len(data):
        nbytes = int.from_bytes(data[pos:pos + 8], "little") * element_size
        tensor.append((pos + 8, pos + 8 + nbytes))
        pos += 8 + nbytes
    assert pos == len(data), (pos, len(data))
    return {"tensor": tensor, "pickle": [(0, end)]}


def pick(regions, n, rng):
    """n (offset, bit) pairs spread over the regions' bytes (every byte once when n allows)."""
    offsets = [o for begin, end in regions for o in range(begin, end)]
    chosen = offsets if len(offsets) <= n else rng.sample(offsets, n)
    return [(o, rng.randrange(8)) for o in sorted(chosen)]


def try_flips(original, cases, scratch):
    """Load each flipped copy; count identical loads, clear errors (CheckpointError naming the
    file), silent differences and other exceptions. verify_checkpoint runs on each too."""
    reference = read_checkpoint(original)
    counts = collections.Counter()
    examples = collections.defaultdict(list)
    target = os.path.join(scratch, "flipped.pth")
    for region, offset, bit in cases:
        flip(original, offset, bit, target)
        counts["cases"] += 1
        try:
            raw = read_checkpoint(target)
            normalize_checkpoint(raw)
            load_checkpoint(target, check_integrity=True)
        except CheckpointError as e:
            counts["clear_errors" if target in str(e) else "errors_without_the_file"] += 1
        except Exception as e:  # noqa: BLE001 - what the test counts
            counts["other_exceptions"] += 1
            examples["other_exceptions"].append("%s@%d/%d: %r" % (region, offset, bit, e))
        else:
            if same(raw, reference):
                counts["identical"] += 1
            else:
                counts["silent_differences"] += 1
                examples["silent_differences"].append("%s@%d/%d" % (region, offset, bit))
        try:
            lines = verify_checkpoint(target)
            if not all(isinstance(p, str) and "\n" not in p for p in lines):
                counts["verify_not_one_line"] += 1
        except Exception as e:  # noqa: BLE001
            counts["verify_raised"] += 1
            examples["verify_raised"].append("%s@%d/%d: %r" % (region, offset, bit, e))
    return counts, examples


def zip_flip_cases(path, seed=FLIP_SEED, scale=1):
    rng = random.Random(seed)
    regions = zip_regions(path)
    return ([("tensor",) + c for c in pick(regions["tensor"], TENSOR_FLIPS * scale, rng)]
            + [("pickle",) + c for c in pick(regions["pickle"], PICKLE_FLIPS * scale, rng)]
            + [("header",) + c for c in pick(regions["header"], HEADER_FLIPS * scale, rng)])


def bit_flip_counts(folder, scale=1):
    """The bit-flip runs of the tests: our zip file, the same re-saved in torch's legacy format,
    and a zip file written without a checksum (the existing run's kind)."""
    folder = pathlib.Path(folder)
    ours = save_tiny(folder / "ours.pth")
    legacy = folder / "legacy.pth"
    torch.save(read_checkpoint(save_tiny(folder / "plain.pth", numpy_rng=False)), legacy,
               _use_new_zipfile_serialization=False)
    bare = folder / "bare.pth"
    raw = read_checkpoint(ours)
    del raw[INTEGRITY_KEY]
    torch.save(raw, bare)
    rng = random.Random(FLIP_SEED)
    lregions = legacy_regions(legacy)
    results = {}
    for name, path, cases in (
            ("zip", ours, zip_flip_cases(ours, scale=scale)),
            ("legacy", legacy,
             [("tensor",) + c for c in pick(lregions["tensor"], TENSOR_FLIPS * scale, rng)]
             + [("pickle",) + c for c in pick(lregions["pickle"], PICKLE_FLIPS * scale, rng)]),
            ("zip_without_checksum", bare, zip_flip_cases(bare, FLIP_SEED + 1, scale))):
        scratch = folder / name
        scratch.mkdir()
        results[name] = try_flips(str(path), cases, str(scratch))
    return results


# --- the checksum record -------------------------------------------------------------------------

def test_save_writes_a_sha256_record_of_every_tensor(tmp_path):
    raw = read_checkpoint(save_tiny(tmp_path / "c.pth"))
    record = raw[INTEGRITY_KEY]
    tensors = [v for v in raw["model_state_dict"].values()] + [
        t for e in raw["optimizer_state_dict"]["state"].values() for t in e.values()] + [
        raw["trainer_state"]["numpy"]]
    assert record["algorithm"] == "sha256" and len(record["tensors"]) == len(tensors)


def test_plain_torch_load_reads_a_file_with_the_record(tmp_path):
    path = save_tiny(tmp_path / "c.pth")
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_load_refuses_a_flipped_tensor_byte_naming_the_file_and_tensor(tmp_path):
    path = save_tiny(tmp_path / "c.pth")
    region = zip_regions(path)["tensor"][0]  # the first storage written: the first weight
    flip(path, region[0] + 1, 3, path)
    with pytest.raises(CheckpointError, match=r"c\.pth: corrupt: 1 tensor does not match its "
                                              r"checksum: checkpoint\['model_state_dict'\]"):
        load_checkpoint(path)


def test_load_refuses_changed_metadata_under_the_old_record(tmp_path):
    path = save_tiny(tmp_path / "c.pth")
    raw = read_checkpoint(path)
    raw["config"]["optim"]["lr"] = 2e-3
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="metadata .* does not match its checksum"):
        load_checkpoint(path)


def test_load_without_the_check_accepts_a_damaged_file(tmp_path):
    path = save_tiny(tmp_path / "c.pth")
    region = zip_regions(path)["tensor"][0]
    flip(path, region[0] + 1, 3, path)
    assert load_checkpoint(path, check_integrity=False)["epoch"] == 3


def test_inspect_refuses_a_damaged_file(tmp_path):
    path = save_tiny(tmp_path / "c.pth")
    region = zip_regions(path)["tensor"][0]
    flip(path, region[0] + 1, 3, path)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        inspect_checkpoint(path)


def test_inspect_reports_the_checked_record(tmp_path):
    assert inspect_checkpoint(save_tiny(tmp_path / "c.pth"))["integrity"] == "sha256 (checked)"


def test_file_without_a_record_still_loads(tmp_path):
    model, optimizer, _ = tiny()
    path = tmp_path / "old.pth"
    torch.save({"epoch": 4, "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict()}, path)
    assert load_checkpoint(path, model=tiny(1)[0])["epoch"] == 4


def test_file_without_a_record_is_checked_by_its_zip_crcs(tmp_path):
    model, _, _ = tiny()
    path = tmp_path / "old.pth"
    torch.save({"epoch": 4, "model_state_dict": model.state_dict()}, path)
    region = zip_regions(path)["tensor"][0]
    flip(path, region[0], 0, path)
    with pytest.raises(CheckpointError, match="old.pth: corrupt: .*CRC"):
        load_checkpoint(path)


def test_a_record_under_a_damaged_key_is_refused(tmp_path):
    path = save_tiny(tmp_path / "c.pth")
    raw = read_checkpoint(path)
    raw["integritx"] = raw.pop(INTEGRITY_KEY)
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="checksum record is stored under a damaged key"):
        load_checkpoint(path)


def test_save_refuses_an_extra_key_named_integrity(tmp_path):
    with pytest.raises(ValueError, match="integrity"):
        save_checkpoint(tmp_path / "c.pth", model=nn.Linear(2, 2), epoch=1,
                        extra={INTEGRITY_KEY: {}})


def test_record_survives_a_legacy_format_resave(tmp_path):
    path = save_tiny(tmp_path / "c.pth", numpy_rng=False)
    torch.save(read_checkpoint(path), path, _use_new_zipfile_serialization=False)
    assert load_checkpoint(path)["epoch"] == 3


def test_legacy_format_resave_of_a_uint32_tensor_is_a_checkpoint_error(tmp_path):
    path = save_tiny(tmp_path / "c.pth")
    torch.save(read_checkpoint(path), path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="c.pth: written in torch's legacy .*uint32"):
        load_checkpoint(path)


# --- verify --------------------------------------------------------------------------------------

def test_verify_reports_a_checksum_mismatch_in_one_line(tmp_path):
    path = save_tiny(tmp_path / "c.pth")
    raw = read_checkpoint(path)
    raw["history"]["val_acc"][0] = 0.75
    torch.save(raw, path)
    (line,) = verify_checkpoint(path)
    assert "metadata" in line and "\n" not in line


def test_verify_reports_an_undecodable_entry_name_instead_of_raising(tmp_path):
    path = save_tiny(tmp_path / "c.pth")
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")  # the last member's central directory entry
    flags = int.from_bytes(data[central + 8:central + 10], "little") | 0x800  # names are UTF-8
    data[central + 8:central + 10] = flags.to_bytes(2, "little")
    data[central + 46] = 0xFF  # never valid UTF-8
    path.write_bytes(bytes(data))
    (line,) = verify_checkpoint(path)
    assert line.startswith(str(path)) and "corrupt" in line


def test_verify_reports_an_unreadable_path_instead_of_raising(tmp_path):
    (line,) = verify_checkpoint(tmp_path / "missing.pth")
    assert "missing.pth" in line


# --- disk full -----------------------------------------------------------------------------------

class FullDisk:
    """A file that takes `room` bytes and then fails as a full disk does."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            self._f.write(bytes(data[:self._room]))
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("room", [0, 700, 3000])
def test_save_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, room):
    path = save_tiny(tmp_path / "latest_checkpoint.pth", epoch=1)
    before = path.read_bytes()
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(fdopen(fd, *a, **k), room))
    with pytest.raises(CheckpointWriteError, match="latest_checkpoint.pth: not written \\(no space "
                                                   "left on device\\)") as info:
        save_tiny(path, epoch=2)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["latest_checkpoint.pth"]


# --- stale temp files ----------------------------------------------------------------------------

def test_save_removes_stale_temp_files_of_its_naming(tmp_path):
    stale = [tmp_path / ".latest_checkpoint.pth.0badf00d.tmp", tmp_path / ".best.pth.12345678.tmp"]
    foreign = [tmp_path / "notes.tmp", tmp_path / ".latest_checkpoint.pth.tmp"]
    for p in stale + foreign:
        p.write_bytes(b"partial")
    save_tiny(tmp_path / "latest_checkpoint.pth")
    assert sorted(os.listdir(tmp_path)) == sorted(["latest_checkpoint.pth"]
                                                   + [p.name for p in foreign])


@pytest.mark.skipif(fcntl is None, reason="needs flock")
def test_save_keeps_a_temp_file_another_writer_holds(tmp_path):
    live = tmp_path / ".latest_checkpoint.pth.abcdef01.tmp"
    with open(live, "wb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # as a running atomic_write does
        assert remove_stale_temp_files(tmp_path) == []
        save_tiny(tmp_path / "latest_checkpoint.pth")
        assert live.exists()


KILL_SCRIPT = r"""
import json, os, random, signal, sys, time
import torch
from torch import nn
from cnnlstm_ext.checkpoint import read_checkpoint, save_checkpoint

folder, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
rng = random.Random(seed)
torch.manual_seed(seed)
model = nn.Linear(256, 256)
path = os.path.join(folder, "latest_checkpoint.pth")


def temps():
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


stats = {"kills": 0, "intact": 0, "refused": [], "killed_leaving_a_temp_file": 0,
         "most_temp_files": 0, "temp_files_after_next_save": 0, "other_files": []}
epoch = 0
for _ in range(rounds):
    epoch += 1
    save_checkpoint(path, model=model, epoch=epoch)  # the next save after the last kill
    stats["temp_files_after_next_save"] += len(temps())
    previous = epoch
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # saves over the file until killed
        os.close(ready_r)
        os.write(ready_w, b"x")
        e = previous
        while True:
            e += 1
            save_checkpoint(path, model=model, epoch=e)
    os.close(ready_w)
    os.read(ready_r, 1)
    os.close(ready_r)
    time.sleep(rng.uniform(0.0, 0.04))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    stats["kills"] += 1
    left = temps()
    stats["most_temp_files"] = max(stats["most_temp_files"], len(left))
    stats["killed_leaving_a_temp_file"] += bool(left)
    stats["other_files"] += [n for n in os.listdir(folder)
                             if n != "latest_checkpoint.pth" and n not in left]
    try:
        epoch_read = read_checkpoint(path)["epoch"]
        assert epoch_read >= previous, (epoch_read, previous)
        epoch = epoch_read
        stats["intact"] += 1
    except Exception as e:
        stats["refused"].append(repr(e))
save_checkpoint(path, model=model, epoch=epoch + 1)
stats["temp_files_after_the_last_save"] = len(temps())
print(json.dumps(stats))
"""


def kill_counts(folder, rounds=40, seed=FLIP_SEED):
    """Kill a process that saves in a loop at random moments, `rounds` times (in a subprocess
    that forks the savers, so torch is imported once)."""
    # With subprocess_env and a cwd outside the source tree, the child imports the same
    # cnnlstm_ext as this process (the installed one in CI, whose _C the source tree lacks).
    out = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(folder), str(rounds), str(seed)],
                         capture_output=True, text=True, timeout=120, env=subprocess_env(),
                         cwd=folder)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kills_during_saves_keep_the_previous_file_and_leave_no_temp_file(tmp_path):
    stats = kill_counts(tmp_path)
    assert stats["kills"] == 40 and stats["intact"] == 40 and stats["refused"] == []
    assert stats["most_temp_files"] <= 1 and stats["other_files"] == []
    assert stats["temp_files_after_next_save"] == 0
    assert stats["temp_files_after_the_last_save"] == 0


# --- bit flips -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flips(tmp_path_factory):
    with warnings.catch_warnings():  # a flipped protocol byte makes torch.load warn first
        warnings.simplefilter("ignore")
        return bit_flip_counts(tmp_path_factory.mktemp("flips"))


@pytest.mark.parametrize("layout", ["zip", "legacy", "zip_without_checksum"])
def test_bit_flips_never_load_a_silent_difference(flips, layout):
    counts, examples = flips[layout]
    assert counts["silent_differences"] == 0, examples["silent_differences"][:5]


@pytest.mark.parametrize("layout", ["zip", "legacy", "zip_without_checksum"])
def test_bit_flips_raise_only_checkpoint_errors_naming_the_file(flips, layout):
    counts, examples = flips[layout]
    assert counts["other_exceptions"] == 0, examples["other_exceptions"][:5]
    assert counts["errors_without_the_file"] == 0


@pytest.mark.parametrize("layout", ["zip", "legacy", "zip_without_checksum"])
def test_bit_flips_leave_verify_one_line_per_file(flips, layout):
    counts, examples = flips[layout]
    assert counts["verify_raised"] == 0, examples["verify_raised"][:5]
    assert counts["verify_not_one_line"] == 0


def test_bit_flips_in_tensor_bytes_and_pickle_are_all_refused(flips):
    counts, _ = flips["zip"]
    assert counts["clear_errors"] >= TENSOR_FLIPS + PICKLE_FLIPS
    assert counts["cases"] == TENSOR_FLIPS + PICKLE_FLIPS + HEADER_FLIPS


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        scale = int(os.environ.get("FLIP_SCALE", "1"))
        for name, (counts, examples) in bit_flip_counts(d, scale).items():
            print("bit flips, %s: %s" % (name, dict(counts)))
            for kind, cases in examples.items():
                print("   %s: %s" % (kind, cases[:5]))
    if hasattr(os, "fork"):
        with tempfile.TemporaryDirectory() as d:
            print("kills: %s" % kill_counts(d, rounds=int(os.environ.get("KILL_ROUNDS", "40"))))


# --- the commands' integrity flag ----------------------------------------------------------------

@pytest.mark.parametrize("flag,rc", [([], 2), (["--no-integrity-check"], 0)])
def test_inspect_checks_the_checksum_unless_told_not_to(tmp_path, capsys, flag, rc):
    from cnnlstm_ext import cli
    path = save_tiny(tmp_path / "c.pth")
    assert cli.main(["inspect", str(path)]) == 0
    assert "checksum: sha256 (checked)" in capsys.readouterr().out
    region = zip_regions(path)["tensor"][0]
    flip(path, region[0] + 1, 3, path)
    assert cli.main(["inspect", str(path), *flag]) == rc
    captured = capsys.readouterr()
    out = captured.out
    if rc:
        assert captured.err.startswith("error: ") and str(path) in captured.err and not out
    else:
        assert "checksum: sha256 (not checked)" in out


def test_resume_removes_stale_temp_files(tmp_path):
    from test_train import tiny_config

    from cnnlstm_ext.train.trainer import Trainer
    cfg = tiny_config(tmp_path, epochs=1)
    Trainer(cfg).fit()
    ckpt_dir = tmp_path / "run" / "checkpoints"
    stale = ckpt_dir / ".latest_checkpoint.pth.0123abcd.tmp"
    stale.write_bytes(b"partial")
    Trainer(tiny_config(tmp_path, run="resumed", epochs=2)).resume(
        str(ckpt_dir / "latest_checkpoint.pth"))
    assert not stale.exists()
