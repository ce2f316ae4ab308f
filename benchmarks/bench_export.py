"""Latency of the exported ONNX model in onnxruntime against the eager model, on the CPU.

    python -m pytest benchmarks/bench_export.py --benchmark-json=export_cpu.json

Model: the default `wlasl100` shape, CNNLSTM(num_classes=100) (ResNet-18, 3-layer BiLSTM 512,
mean pooling; configs/wlasl100.toml), random weights, eval mode. One clip: B=1, T=16, 112x112
(the config's data.num_frames and frame_size), float32. "baseline": the eager model under
torch.no_grad (the fused CPU kernels); "onnxruntime": `cnnlstm-ext export --onnx`'s file
(cnnlstm_ext.export.save_onnx) in onnxruntime's CPU provider with its default threads. The eager
model runs one timed call before every onnxruntime round (pytest-benchmark's setup), so the ratio
compares calls made under the same machine load; extra_info holds both medians and
speedup_vs_eager = eager / onnxruntime (above 1: onnxruntime is faster).
"""
import pytest
import torch

from cnnlstm_ext import CNNLSTM

import interleave

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FRAMES, SIZE, BATCH = 16, 112, 1


def test_onnx_latency_cpu(benchmark, tmp_path):
    from cnnlstm_ext.export import save_onnx

    torch.manual_seed(0)
    model = CNNLSTM(num_classes=100).eval()
    path = str(tmp_path / "wlasl100.onnx")
    save_onnx(model, path, frames=FRAMES, frame_size=SIZE)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.randn(BATCH, FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    feed = {"clips": x.numpy()}

    def eager():
        with torch.no_grad():
            return model(x)

    # Same logits first: a fast wrong model is no result.
    torch.testing.assert_close(torch.from_numpy(session.run(["logits"], feed)[0]), eager(),
                               rtol=1e-4, atol=1e-4)
    benchmark.group = "export_cpu:latency"
    eager_median = interleave.time_interleaved(benchmark, lambda: session.run(["logits"], feed),
                                               eager, rounds=7)
    ort_median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "impl": "onnxruntime", "shape": [BATCH, FRAMES, 3, SIZE, SIZE],
        "eager_median_ms": round(eager_median * 1e3, 2),
        "onnxruntime_median_ms": round(ort_median * 1e3, 2),
        "speedup_vs_eager": round(eager_median / ort_median, 3),
        "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__})
