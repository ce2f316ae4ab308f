"""Shared test set-up: the CUDA skip and a seeded random generator.

Tests that need a GPU carry ``@pytest.mark.cuda`` (the marker is declared in pyproject.toml).
Without a visible GPU, or with a build that lacks the CUDA kernels, every such test is skipped at
collection, so ``pytest -m cuda`` on a GPU machine runs all of them and elsewhere skips all of them.
``requires_cuda`` is the same condition as a decorator, for use next to ``pytest.mark.cuda``.
"""
import os
import zlib

import pytest
import torch

import cnnlstm_ext

CUDA_READY = torch.cuda.is_available() and cnnlstm_ext.cuda_kernels_built()
CUDA_SKIP_REASON = (
    "needs a CUDA GPU and cnnlstm_ext built with its CUDA kernels (torch.cuda.is_available()=%s, "
    "cnnlstm_ext.cuda_kernels_built()=%s)"
    % (torch.cuda.is_available(), cnnlstm_ext.cuda_kernels_built()))

requires_cuda = pytest.mark.skipif(not CUDA_READY, reason=CUDA_SKIP_REASON)


def pytest_collection_modifyitems(config, items):
    if CUDA_READY:
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def rng(request) -> torch.Generator:
    """Seeds torch's global RNG (module initialisation, dropout) and returns a CPU generator for
    test data, both from a seed derived from the test's id: reproducible, and distinct per case."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def subprocess_env(**extra) -> dict:
    """Environment for a child Python that must import the same cnnlstm_ext as this process (the
    installed package in CI, an in-place build in development). Run the child with a cwd outside
    the source tree too: `python -m`/`-c` put the cwd first on sys.path, and the source folder has
    no built _C."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(cnnlstm_ext.__file__)))
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""), **extra)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (tiny models: more threads only add contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_tf32():
    """Exact float32 on the GPU (cuBLAS and cuDNN; FusedLSTM follows cuDNN's flag), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def assert_compiled_matches_eager(model, x, backend="inductor") -> None:
    """torch.compile(model, fullgraph=True) gives the eager output and parameter gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out_c = compiled(x)
    grads_c = torch.autograd.grad(out_c.square().sum(), list(model.parameters()))
    out_e = model(x)
    grads_e = torch.autograd.grad(out_e.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for (name, _), gc, ge in zip(model.named_parameters(), grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def assert_no_cuda_sync(step) -> None:
    """step() makes no host-device synchronisation: run once to warm up (lazy initialisation may
    synchronise), then again with every synchronising CUDA call made an error."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def captured(fn):
    """fn captured in a CUDA graph, after two warm-up calls on a side stream (torch.cuda.graphs'
    recipe: the first calls plan the kernels and allocate cached state). Returns the graph and
    the outputs of the captured call, which each replay rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def assert_device_assert(code: str, cwd) -> None:
    """`code` (Python, after `import torch, cnnlstm_ext`) trips a CUDA device-side assertion. It
    runs in a child process: such an assertion leaves the CUDA context unusable."""
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", "import torch, cnnlstm_ext\n" + code +
                          "\ntorch.cuda.synchronize()\n"],
                         env=subprocess_env(), cwd=cwd, capture_output=True, text=True)
    assert run.returncode != 0 and "device-side assert" in run.stderr, run.stdout[-2000:] + run.stderr[-2000:]


def reference_lstm(module, x, hx, dtype, round_to=None):
    """`module` (FusedLSTM or nn.LSTM, batch_first=False, no dropout) computed layer by layer with
    cnnlstm_ext.reference in `dtype` on its own parameters: x [T, B, I], hx = (h0, c0)
    [layers * D, B, H]. round_to: the 16-bit semantics of reference.lstm_layer (float32 sums and
    cell state; the product's operand h and the outputs rounded). Differentiable in x, hx and
    the parameters. Returns output [T, B, D*H], h_n, c_n."""
    from cnnlstm_ext import reference
    D = 2 if module.bidirectional else 1
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if module.bias else [])
    y, h_n, c_n = x.to(dtype), [], []
    for layer in range(module.num_layers):
        weights = [getattr(module, f"{n}_l{layer}{'_reverse' if d else ''}").to(dtype)
                   for d in range(D) for n in names]
        rows = slice(layer * D, (layer + 1) * D)
        y, h, c = reference.lstm_layer(y, weights, hx[0][rows].to(dtype), hx[1][rows].to(dtype),
                                       round_to=round_to)
        h_n.append(h)
        c_n.append(c)
    return y, torch.cat(h_n), torch.cat(c_n)


def low_precision_errors(module, dtype, steps, batch, seed):
    """Relative errors (norm of the difference / norm of the gold) of output, h_n, c_n and every
    gradient (input, h0, c0, parameters) of a random projection of them, against a float64 gold on
    the same rounded inputs and weights, for three computations of `module` (in `dtype`, 16-bit):
      "fused": the module itself;
      "reference": the float32-accumulating reference (reference_lstm with round_to=dtype), what
        the README promises for 16-bit layers;
      "all_low": the reference computed entirely in `dtype` (the cell state and the gate math
        too), which the accuracy bar must reject.
    Returns {computation: {tensor name: error}}."""
    p = next(module.parameters())
    g = torch.Generator().manual_seed(seed)
    D = 2 if module.bidirectional else 1
    shape_h = (module.num_layers * D, batch, module.hidden_size)
    inputs = [torch.randn(steps, batch, module.input_size, generator=g, dtype=torch.float64),
              torch.randn(shape_h, generator=g, dtype=torch.float64),
              torch.randn(shape_h, generator=g, dtype=torch.float64)]
    inputs = [t.to(p.device, dtype) for t in inputs]
    projections = None
    results = {}
    runs = {"gold": lambda x, hx: reference_lstm(module, x, hx, torch.float64),
            "fused": lambda x, hx: _flat(module(x, hx)),
            "reference": lambda x, hx: reference_lstm(module, x, hx, torch.float32, round_to=dtype),
            "all_low": lambda x, hx: reference_lstm(module, x, hx, dtype)}
    for name, run in runs.items():
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        outs = run(leaves[0], (leaves[1], leaves[2]))
        if projections is None:
            projections = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(p.device)
                           for o in outs]
        loss = sum((o.double() * w).sum() for o, w in zip(outs, projections))
        grads = torch.autograd.grad(loss, leaves + list(module.parameters()))
        results[name] = [t.detach().double().cpu() for t in (*outs, *grads)]
    labels = ["output", "h_n", "c_n", "grad_input", "grad_h0", "grad_c0"] + [
        "grad_" + n for n, _ in module.named_parameters()]
    gold = results.pop("gold")
    return {name: {label: ((a - b).norm() / b.norm()).item()
                   for label, a, b in zip(labels, values, gold)}
            for name, values in results.items()}


def _flat(result):
    out, (h_n, c_n) = result
    return out, h_n, c_n


def low_precision_verdict(errors, computation):
    """The 16-bit accuracy rule on low_precision_errors' result: the error of each forward output
    (output, h_n, c_n) at most twice the float32-accumulating reference's, and the root mean
    square of the gradients' errors at most twice the reference's. Returns the failures, as
    {what: (error, reference's error)}: empty when `computation` meets the rule. (Measured on the
    CPU at T=40: the fused kernels at 1.2x to 1.5x, the all-16-bit LSTM at 2.9x to 3.9x.)"""
    got, ref = errors[computation], errors["reference"]
    failures = {k: (got[k], ref[k]) for k in ("output", "h_n", "c_n") if got[k] > 2 * ref[k]}
    grads = [k for k in got if k.startswith("grad_")]
    rms = lambda e: (sum(e[k] ** 2 for k in grads) / len(grads)) ** 0.5  # noqa: E731
    if rms(got) > 2 * rms(ref):
        failures["gradients (rms)"] = (rms(got), rms(ref))
    return failures
