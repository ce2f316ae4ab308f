"""`cnnlstm-ext export --onnx/--pt2/--safetensors` and cnnlstm_ext.export: the exported models
compute the eager model's logits (float32, 1e-4) at other batch sizes and clip lengths than the
example they were traced with; the ONNX file runs in onnxruntime in a process without torch or
this package; the .pt2 program loads with torch.export.load in a fresh process.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cnnlstm_ext import CNNLSTM, load_model
from cnnlstm_ext.checkpoint import save_checkpoint
from cnnlstm_ext.cli import main
from cnnlstm_ext.train.config import Config

from conftest import subprocess_env

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# Two shared cores: more intra-op threads only add contention for these tiny models.
pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = dict(backbone="tiny", spatial_dim=24, temporal_dim=32, num_layers=2, bidirectional=True,
             pooling="mean", dropout=0.0)
CLASSES = ["hello", "thanks", "yes", "no", "please"]
FRAMES, SIZE = 4, 32
# (B, T): two batch sizes and two clip lengths, none of them the example's (2, FRAMES).
SHAPES = ((1, 3), (3, 7))


def write_checkpoint(path, seed=0, data=None, **model):
    torch.manual_seed(seed)
    spec = dict(MODEL, **model)
    net = CNNLSTM(num_classes=len(CLASSES), **spec)
    with torch.no_grad():  # non-zero biases everywhere: a lowering that drops one shows
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = Config()
    cfg.model.update(spec, num_classes=len(CLASSES))
    cfg.data.num_frames, cfg.data.frame_size = FRAMES, SIZE
    for key, value in (data or {}).items():
        setattr(cfg.data, key, value)
    return save_checkpoint(path, model=net, epoch=3, config=cfg.to_dict(),
                           extra={"trainer_state": {"classes": CLASSES}})


def clips(B, T, seed):
    return torch.randn(B, T, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def run_child(code, cwd):
    """A fresh Python process; its output if it succeeds."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A checkpoint, its eager model and the three exports of one `cnnlstm-ext export` call."""
    d = tmp_path_factory.mktemp("export")
    ckpt = write_checkpoint(d / "best.pth")
    out = {"onnx": d / "model.onnx", "pt2": d / "model.pt2", "safetensors": d / "w.safetensors"}
    args = ["export", str(ckpt)]
    for flag, path in out.items():
        args += ["--" + flag, str(path)]
    assert main(args) == 0
    return dict(out, dir=d, ckpt=ckpt, model=load_model(ckpt))


def eager(model, x, lengths=None):
    with torch.no_grad():
        return model(x) if lengths is None else model(x, lengths)


def test_onnx_runs_in_onnxruntime_without_torch_or_this_package(exported):
    d = exported["dir"]
    for i, (B, T) in enumerate(SHAPES):
        np.save(d / f"clips{i}.npy", clips(B, T, seed=i).numpy())
    run_child(f"""
        import sys
        import numpy as np
        import onnxruntime
        session = onnxruntime.InferenceSession({str(exported["onnx"])!r},
                                               providers=["CPUExecutionProvider"])
        for i in range({len(SHAPES)}):
            x = np.load("clips%d.npy" % i)
            np.save("onnx%d.npy" % i, session.run(["logits"], {{"clips": x}})[0])
        assert "torch" not in sys.modules and "cnnlstm_ext" not in sys.modules, sorted(sys.modules)
    """, cwd=d)
    for i, (B, T) in enumerate(SHAPES):
        got = torch.from_numpy(np.load(d / f"onnx{i}.npy"))
        assert got.shape == (B, len(CLASSES))
        torch.testing.assert_close(got, eager(exported["model"], clips(B, T, seed=i)),
                                   rtol=1e-4, atol=1e-4)


def test_onnx_holds_standard_operators_and_the_metadata(exported):
    proto = onnx.load(str(exported["onnx"]))
    onnx.checker.check_model(proto)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert "LSTM" in {n.op_type for n in proto.graph.node}  # the recurrence is ONNX's LSTM
    (clips_input,) = proto.graph.input
    dims = clips_input.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims][2:] == [3, SIZE, SIZE]
    assert dims[0].dim_param and dims[1].dim_param  # batch and frames are dynamic
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == CLASSES
    pre = json.loads(meta["preprocessing"])
    assert (pre["num_frames"], pre["frame_size"]) == (FRAMES, SIZE)
    assert json.loads(meta["cnnlstm_config"])["temporal_dim"] == MODEL["temporal_dim"]


def test_pt2_loads_in_a_fresh_process_and_matches_eager(exported):
    """The program holds this package's ops (the LSTM recurrence over a dynamic T): loading it
    needs `import cnnlstm_ext`, and without it torch.export.load fails."""
    d = exported["dir"]
    inputs = [clips(B, T, seed=10 + i) for i, (B, T) in enumerate(SHAPES)]
    torch.save(inputs, d / "pt2_inputs.pt")
    run_child(f"""
        import torch
        refused = False
        try:  # (torch logs the op it cannot resolve; the exception only says "deserializing")
            torch.export.load({str(exported["pt2"])!r})
        except RuntimeError:
            refused = True
        assert refused, "loaded without the package's ops"
        import cnnlstm_ext  # registers torch.ops.cnnlstm_ext.*
        extra = {{"metadata.json": ""}}
        program = torch.export.load({str(exported["pt2"])!r}, extra_files=extra).module()
        outputs = [program(x) for x in torch.load("pt2_inputs.pt")]
        torch.save({{"outputs": outputs, "metadata": extra["metadata.json"]}}, "pt2_outputs.pt")
    """, cwd=d)
    result = torch.load(d / "pt2_outputs.pt")
    for x, got in zip(inputs, result["outputs"]):
        torch.testing.assert_close(got, eager(exported["model"], x), rtol=1e-4, atol=1e-4)
    meta = json.loads(result["metadata"])
    assert json.loads(meta["classes"]) == CLASSES


def test_safetensors_export_loads_back_with_load_model(exported):
    model = load_model(exported["safetensors"])
    assert model.classes == CLASSES
    assert model.preprocessing["frame_size"] == SIZE
    x = clips(2, 5, seed=20)
    torch.testing.assert_close(eager(model, x), eager(exported["model"], x), rtol=0, atol=0)


def test_export_with_lengths(tmp_path):
    """--lengths: both exports take (clips, lengths); clips of partial lengths give the eager
    model's logits (here "last" pooling, which reads each clip's last valid step)."""
    ckpt = write_checkpoint(tmp_path / "c.pth", seed=1, pooling="last")
    onnx_path, pt2_path = tmp_path / "m.onnx", tmp_path / "m.pt2"
    assert main(["export", str(ckpt), "--onnx", str(onnx_path), "--pt2", str(pt2_path),
                 "--lengths"]) == 0
    model = load_model(ckpt)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(pt2_path)).module()
    for (B, T), lengths in zip(SHAPES, ([2], [7, 1, 4])):
        x, lengths = clips(B, T, seed=B), torch.tensor(lengths)
        want = eager(model, x, lengths)
        got = session.run(["logits"], {"clips": x.numpy(), "lengths": lengths.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(program(x, lengths), want, rtol=1e-4, atol=1e-4)
    assert not torch.equal(eager(model, clips(3, 7, 3), torch.tensor([7, 1, 4])),
                           eager(model, clips(3, 7, 3)))  # the lengths matter


def test_export_at_another_frame_size_describes_that_input_in_its_metadata(tmp_path):
    """--frame-size 64 of a run at 32: the metadata's preprocessing is the exported model's (the
    README's recipe prepares clips the file takes), its resize_to scaled with the frame size."""
    ckpt = write_checkpoint(tmp_path / "c.pth", data={"resize_to": 36})
    onnx_path, pt2_path = tmp_path / "m.onnx", tmp_path / "m.pt2"
    assert main(["export", str(ckpt), "--onnx", str(onnx_path), "--pt2", str(pt2_path),
                 "--frame-size", "64"]) == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    extra = {"metadata.json": ""}
    program = torch.export.load(str(pt2_path), extra_files=extra).module()
    for metadata in (meta, json.loads(extra["metadata.json"])):
        prep = json.loads(metadata["preprocessing"])
        assert (prep["frame_size"], prep["resize_to"], prep["num_frames"]) == (64, 72, FRAMES)
        assert metadata["inputs"] == "clips [B, T, 3, 64, 64] float32"
    S = prep["frame_size"]
    x = torch.randn(2, prep["num_frames"], 3, S, S, generator=torch.Generator().manual_seed(5))
    got = session.run(["logits"], {"clips": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), eager(load_model(ckpt), x),
                               rtol=1e-4, atol=1e-4)
    assert program(x).shape == (2, len(CLASSES))


@pytest.mark.parametrize("pooling", ["mean", "max", "attention"])
def test_onnx_with_lengths_for_each_temporal_pooling(tmp_path, pooling):
    """--lengths with mean, max and attention pooling: the masked reductions over each clip's
    valid steps give the eager model's logits."""
    ckpt = write_checkpoint(tmp_path / "c.pth", seed=3, pooling=pooling)
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(ckpt), "--onnx", str(onnx_path), "--lengths"]) == 0
    model = load_model(ckpt)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for (B, T), lengths in zip(SHAPES, ([2], [7, 1, 4])):
        x, lengths = clips(B, T, seed=B + 1), torch.tensor(lengths)
        want = eager(model, x, lengths)
        assert not torch.allclose(want, eager(model, x), rtol=1e-3, atol=1e-3)  # lengths matter
        got = session.run(["logits"], {"clips": x.numpy(), "lengths": lengths.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [dict(pooling="max", bidirectional=False),
                                  dict(pooling="attention", num_layers=1, fused=False),
                                  dict(frame_pool="max")],
                         ids=["max-unidirectional", "attention-one-layer-unfused", "frame-max"])
def test_onnx_lowering_of_other_poolings_and_layouts(tmp_path, spec):
    """Max and attention pooling, one direction, a model with torch's nn.LSTM (exported
    through the fused op, whose export keeps T dynamic), and the frame pooling's maximum."""
    from cnnlstm_ext.export import save_onnx

    torch.manual_seed(2)
    model = CNNLSTM(num_classes=3, **dict(MODEL, **spec)).eval()
    save_onnx(model, str(tmp_path / "m.onnx"), frames=FRAMES, frame_size=SIZE)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for B, T in SHAPES:
        x = clips(B, T, seed=B + T)
        got = torch.from_numpy(session.run(["logits"], {"clips": x.numpy()})[0])
        torch.testing.assert_close(got, eager(model, x), rtol=1e-4, atol=1e-4)
    if spec.get("frame_pool") == "max":  # a maximum in the file, not the average
        ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
        assert ops & {"ReduceMax", "GlobalMaxPool", "MaxPool"}, sorted(ops)


def test_onnx_of_a_fused_lstm_with_projections_runs_in_onnxruntime(tmp_path):
    """ONNX takes a projected layer's steps in standard operators (its export op, which keeps T
    dynamic in a torch.export program, has no ONNX lowering), at the traced sequence length."""
    from cnnlstm_ext import FusedLSTM

    torch.manual_seed(4)
    lstm = FusedLSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3).eval()
    x = torch.randn(7, 2, 5)
    torch.onnx.export(lstm, (x,), str(tmp_path / "p.onnx"), dynamo=True,
                      input_names=["x"], output_names=["y", "h_n", "c_n"])
    domains = {n.domain for n in onnx.load(str(tmp_path / "p.onnx")).graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    session = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 2, 5)
    got = session.run(None, {"x": x.numpy()})
    y, (h_n, c_n) = lstm(x)
    for g, want in zip(got, (y, h_n, c_n)):
        torch.testing.assert_close(torch.from_numpy(g), want, rtol=1e-4, atol=1e-5)


# --- errors ---------------------------------------------------------------------------------------

def error_line(capsys):
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    return lines[0]


def test_export_without_an_output_is_a_usage_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "c.pth")]) == 2
    assert "--safetensors, --onnx and/or --pt2" in error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--frames", "0"], "--frames must be >= 1"),
    (["--frame-size", "4"], "--frame-size must be >= 8"),
    (["--opset", "11"], "--opset must be >= 18"),
])
def test_export_refuses_bad_shapes(tmp_path, capsys, args, message):
    assert main(["export", str(tmp_path / "c.pth"), "--onnx", str(tmp_path / "m.onnx")] + args) == 2
    assert message in error_line(capsys)


@pytest.mark.parametrize("flag, name, hint", [
    ("--pt2", "m.onnx", "--pt2 {}: --pt2 writes a .pt2 program, not a .onnx file; give a name "
                        "ending in .pt2, or --onnx {} to write an ONNX model"),
    ("--onnx", "m.PT2", "--onnx {}: --onnx writes an ONNX model, not a .pt2 file"),
    ("--safetensors", "m.onnx", "or --onnx {} to write an ONNX model"),
    ("--pt2", "m.safetensors", "or --safetensors {} to write safetensors weights"),
])
def test_an_output_named_for_another_format_is_a_usage_error(tmp_path, capsys, flag, name, hint):
    out = str(tmp_path / name)
    assert main(["export", str(tmp_path / "c.pth"), flag, out]) == 2
    assert hint.format(out, out) in error_line(capsys)
    assert os.listdir(tmp_path) == []


def test_export_to_a_folder_or_from_a_missing_file_leaves_nothing(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["export", str(tmp_path / "c.pth"), "--onnx", str(tmp_path / "out")]) == 1
    assert "is a folder" in error_line(capsys)
    # An input file that cannot be read: 2, as for predict, evaluate and train.
    assert main(["export", str(tmp_path / "missing.pth"), "--pt2", str(tmp_path / "m.pt2")]) == 2
    assert "missing.pth" in error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no output, no temp file


def test_a_failed_export_keeps_the_previous_file(tmp_path, capsys, monkeypatch):
    import cnnlstm_ext.export as export

    ckpt = write_checkpoint(tmp_path / "c.pth")
    target = tmp_path / "m.pt2"
    target.write_bytes(b"previous")

    def broken(*args, **kwargs):
        raise RuntimeError("the exporter failed")
    monkeypatch.setattr(export, "export_program", broken)
    assert main(["export", str(ckpt), "--pt2", str(target)]) == 1
    assert "the exporter failed" in error_line(capsys)
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["c.pth", "m.pt2"]


# --- the exports given to the other commands ------------------------------------------------------

def test_predict_says_a_pt2_program_is_not_what_it_takes(exported, tmp_path, capsys):
    from video_runs import write_clip
    video = tmp_path / "a.mp4"
    write_clip(video, 0, 6, seed=1)
    program = exported["pt2"]
    renamed = tmp_path / "model.pth"  # recognised by its content, not its name
    renamed.write_bytes(program.read_bytes())
    for path in (program, renamed):
        assert main(["predict", str(path), str(video), "--no-progress", "--num-workers", "0"]) == 2
        line = error_line(capsys)
        assert line.startswith("error: %s: a torch.export program (.pt2" % path), line
        assert "`predict` and `export --onnx/--pt2` also read the .safetensors weights" in line
        assert "torch.export.load(path).module()" in line
        assert "data.pkl" not in line and "unreadable" not in line
    # What it names instead: the .safetensors of the same export predicts.
    assert main(["predict", str(exported["safetensors"]), str(video), "--no-progress",
                 "--num-workers", "0"]) == 0
    assert capsys.readouterr().out.startswith(str(video))


def test_commands_say_an_onnx_model_is_not_a_checkpoint(exported, tmp_path, capsys):
    model = exported["onnx"]
    renamed = tmp_path / "model.pth"  # recognised by its content too
    renamed.write_bytes(model.read_bytes())
    for path in (model, renamed):
        assert main(["inspect", str(path)]) == 2
        line = error_line(capsys)
        assert line.startswith("error: %s: an ONNX model (as `cnnlstm-ext export --onnx`" % path)
        assert "run it with onnxruntime" in line, line


def test_verify_and_inspect_take_the_safetensors_of_an_export(exported, tmp_path, capsys):
    weights = str(exported["safetensors"])
    assert main(["verify", weights]) == 0
    assert capsys.readouterr().out.splitlines() == ["OK   w.safetensors", "1 file checked, 0 bad"]
    # a folder: its checkpoints and its .safetensors (an export's size is not a checkpoint's)
    for name in ("best.pth", "w.safetensors", "model.onnx"):
        (tmp_path / name).write_bytes((exported["dir"] / name).read_bytes())
    main(["verify", str(tmp_path)])  # (best.pth here has no optimizer state: BAD)
    out = capsys.readouterr().out.splitlines()
    assert "OK   w.safetensors" in out and out[-1].startswith("2 files checked")
    assert not any(line.strip().startswith("note:") for line in out)
    assert main(["inspect", weights]) == 0
    out = capsys.readouterr().out
    assert "safetensors format" in out and "classes: 5 (%s)" % ", ".join(CLASSES) in out
    assert "epoch 3" in out and "source best.pth" in out and "fits CNNLSTM(" in out
