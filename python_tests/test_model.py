"""CNNLSTM: structure, parameter counts, lengths, fused vs nn.LSTM, architecture inference."""
import collections

import pytest
import torch
from torch import nn

from cnnlstm_ext import CNNLSTM
from cnnlstm_ext.models import describe_state_dict, infer_architecture
from cnnlstm_ext.models.cnnlstm import canonical_names
from conftest import assert_no_cuda_sync

SMALL = dict(num_classes=7, spatial_dim=24, temporal_dim=12, num_layers=2, backbone="tiny")


# Two shared cores: more intra-op threads only add contention for these tiny models.
pytestmark = pytest.mark.usefixtures("one_thread")


def clips(B=3, T=5, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, size, size, generator=g)


def count(module):
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def test_default_model_parameter_count_and_parts():
    with torch.device("meta"):  # shapes only: no memory, no weights
        model = CNNLSTM()
    assert count(model) == 28_080_804
    assert count(model.backbone) == 11_176_512
    assert model.spatial_proj is None
    assert count(model.lstm) == 16_801_792
    assert count(model.temporal_pool) == 0
    assert count(model.classifier) == 102_500
    # The existing run has 33,219,694: 5,138,890 more than these named parts.
    assert 33_219_694 - count(model) == 5_138_890


def test_attention_pooling_adds_a_score_layer():
    with torch.device("meta"):
        model = CNNLSTM(pooling="attention")
    assert count(model) == 28_080_804 + 1024 + 1
    assert tuple(model.temporal_pool.score.weight.shape) == (1, 1024)


def test_state_dict_prefixes_are_canonical():
    model = CNNLSTM(pooling="attention", **SMALL)
    tops = {k.split(".", 1)[0] for k in model.state_dict()}
    assert tops == {"backbone", "spatial_proj", "lstm", "temporal_pool", "classifier"}
    assert "lstm.weight_ih_l1_reverse" in model.state_dict()


def test_spatial_proj_only_when_feature_sizes_differ():
    assert CNNLSTM(**dict(SMALL, spatial_dim=64)).spatial_proj is None  # tiny has 64 features
    proj = CNNLSTM(**SMALL).spatial_proj
    assert (proj.in_features, proj.out_features) == (64, 24)


@pytest.mark.parametrize("pooling", ["mean", "max", "last", "attention"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_forward_gives_logits_per_clip(pooling, bidirectional):
    model = CNNLSTM(pooling=pooling, bidirectional=bidirectional, **SMALL)
    out = model(clips())
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_fused_and_unfused_share_state_dict_and_outputs():
    torch.manual_seed(0)
    fused = CNNLSTM(fused=True, **SMALL).eval()
    plain = CNNLSTM(fused=False, **SMALL).eval()
    assert isinstance(plain.lstm, nn.LSTM) and not isinstance(fused.lstm, nn.LSTM)
    sd = fused.state_dict()
    assert list(sd) == list(plain.state_dict())
    plain.load_state_dict(sd)
    x, lengths = clips(), torch.tensor([5, 2, 4])
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused(x, lengths), plain(x, lengths), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pooling", ["mean", "max", "last", "attention"])
def test_padding_past_lengths_does_not_change_logits(fused, pooling):
    torch.manual_seed(0)
    model = CNNLSTM(pooling=pooling, fused=fused, **SMALL).eval()
    x = clips(B=2, T=6)
    lengths = torch.tensor([6, 3])
    out = model(x, lengths)
    alone = model(x[1:, :3])  # the short clip by itself, no padding
    torch.testing.assert_close(out[1:], alone, rtol=1e-4, atol=1e-5)
    x_garbage = x.clone()
    x_garbage[1, 3:] = 1e3  # whatever sits in the padding is ignored
    torch.testing.assert_close(model(x_garbage, lengths), out, rtol=1e-4, atol=1e-5)


def test_padding_frames_do_not_reach_batchnorm_statistics():
    torch.manual_seed(0)
    a = CNNLSTM(**SMALL).train()
    b = CNNLSTM(**SMALL).train()
    b.load_state_dict(a.state_dict())
    x = clips(B=2, T=4)
    padded = x.clone()
    padded[1, 2:] = 50.0
    a(padded, torch.tensor([4, 2]))
    b(torch.cat([x[0], x[1, :2]])[None])  # the same six valid frames as one clip
    torch.testing.assert_close(a.backbone.bn1.running_mean, b.backbone.bn1.running_mean)
    torch.testing.assert_close(a.backbone.bn1.running_var, b.backbone.bn1.running_var)


def test_backward_reaches_every_parameter():
    model = CNNLSTM(pooling="attention", **SMALL)
    model(clips(), torch.tensor([5, 3, 1])).logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bad, error", [
    (torch.randn(2, 3, 32, 32), ValueError),           # no time axis
    (torch.randn(2, 3, 1, 32, 32), ValueError),        # one channel
    (torch.zeros(2, 3, 3, 32, 32, dtype=torch.long), TypeError),
])
def test_bad_clips_raise(bad, error):
    with pytest.raises(error, match=r"clips|floating"):
        CNNLSTM(**SMALL)(bad)


@pytest.mark.parametrize("lengths", [
    torch.tensor([5, 5]),                    # wrong batch size
    torch.tensor([5, 5, 5], dtype=torch.int32),
    torch.tensor([5, 0, 5]),                 # empty clip
    torch.tensor([5, 6, 5]),                 # longer than T
])
def test_bad_lengths_raise(lengths):
    with pytest.raises(ValueError, match="lengths"):
        CNNLSTM(**SMALL)(clips(), lengths)


@pytest.mark.parametrize("kwargs, match", [
    (dict(backbone="vgg11"), "unknown backbone"),
    (dict(pooling="median"), "pooling"),
    (dict(frame_pool="sum"), "frame_pool"),
    (dict(temporal_dim=0), "temporal_dim"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CNNLSTM(**dict(SMALL, **kwargs))


def test_config_rebuilds_the_same_model():
    model = CNNLSTM(pooling="max", dropout=0.1, fused=False, **SMALL)
    twin = CNNLSTM(**model.config)
    assert twin.config == model.config
    assert {k: v.shape for k, v in twin.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs", [
    SMALL,
    dict(SMALL, pooling="attention", bidirectional=False, num_layers=1),
    dict(SMALL, spatial_dim=64, num_layers=3),
])
def test_infer_architecture_reads_the_config_back(kwargs):
    model = CNNLSTM(**kwargs)
    config = infer_architecture(model.state_dict())
    expected = {k: model.config[k] for k in config}
    expected["pooling"] = "attention" if kwargs.get("pooling") == "attention" else "mean"
    assert config == expected


def test_infer_architecture_of_the_default_model():
    with torch.device("meta"):
        sd = CNNLSTM().state_dict()
    assert infer_architecture(sd) == dict(num_classes=100, spatial_dim=512, temporal_dim=512,
                                          num_layers=3, bidirectional=True, backbone="resnet18",
                                          pooling="mean")


@pytest.mark.parametrize("backbone", ["resnet34", "resnet50", "resnext50_32x4d"])
def test_describe_identifies_torchvision_backbones(backbone):
    with torch.device("meta"):
        sd = CNNLSTM(backbone=backbone, num_layers=1, temporal_dim=8).state_dict()
    info = describe_state_dict(sd)
    assert info["backbone"]["name"] == backbone
    assert info["backbone"]["features"] == (512 if backbone == "resnet34" else 2048)


def test_from_state_dict_rebuilds_and_loads():
    torch.manual_seed(0)
    model = CNNLSTM(pooling="attention", **SMALL).eval()
    twin = CNNLSTM.from_state_dict(model.state_dict(), fused=False).eval()
    x = clips()
    torch.testing.assert_close(twin(x), model(x), rtol=1e-4, atol=1e-5)


def test_from_state_dict_takes_a_ddp_prefix():
    model = CNNLSTM(**SMALL)
    sd = collections.OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    assert CNNLSTM.from_state_dict(sd).config["num_classes"] == 7


class ForeignModel(nn.Module):
    """Another CNN-LSTM: other names, an MLP head and a multi-head attention block."""

    def __init__(self):
        super().__init__()
        self.encoder = CNNLSTM(**SMALL).backbone
        self.rnn = nn.LSTM(64, 12, num_layers=2, bidirectional=True)
        self.attn = nn.MultiheadAttention(24, 2)
        self.fc = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 7))


def test_describe_finds_parts_under_other_names():
    info = describe_state_dict(ForeignModel().state_dict())
    assert info["backbone"]["name"] == "tiny" and info["backbone"]["prefix"] == "encoder."
    assert info["lstm"]["prefix"] == "rnn."
    assert (info["lstm"]["num_layers"], info["lstm"]["hidden_size"]) == (2, 12)
    assert info["classifier"]["prefix"] == "fc."
    assert info["classifier"]["linear_layers"] == [(24, 16), (16, 7)]
    assert info["classifier"]["num_classes"] == 7
    assert info["other"] == {"attn": 24 * 24 * 3 + 24 * 3, "attn.out_proj": 24 * 24 + 24}
    assert info["param_count"] == count(ForeignModel())
    assert info["cnnlstm_config"] is None


def test_infer_architecture_says_what_does_not_fit():
    with pytest.raises(ValueError) as e:
        infer_architecture(ForeignModel().state_dict())
    message = str(e.value)
    assert "2 Linear layers" in message and "attn" in message


def test_infer_architecture_asks_for_a_key_map_when_only_names_differ():
    sd = CNNLSTM(**SMALL).state_dict()
    renamed = collections.OrderedDict((k.replace("lstm.", "rnn.").replace("classifier.", "fc."), v)
                                      for k, v in sd.items())
    assert canonical_names(describe_state_dict(renamed)) == {"rnn.": "lstm.", "fc.": "classifier."}
    with pytest.raises(ValueError, match="key_map"):
        infer_architecture(renamed)


def test_backbone_weights_load_from_a_file(tmp_path):
    torch.manual_seed(1)
    source = CNNLSTM(**SMALL).backbone
    path = tmp_path / "tiny.pth"
    torch.save({"fc.weight": torch.zeros(3, 64), **source.state_dict()}, path)  # fc is ignored
    model = CNNLSTM(backbone_weights=str(path), **SMALL)
    for k, v in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert "backbone_weights" not in model.config


def test_backbone_weights_that_do_not_fit_raise(tmp_path):
    path = tmp_path / "wrong.pth"
    sd = CNNLSTM(**SMALL).backbone.state_dict()
    sd["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(sd, path)
    with pytest.raises(ValueError, match="conv1.weight"):
        CNNLSTM(backbone_weights=str(path), **SMALL)


@pytest.mark.cuda  # skipped without a GPU and the CUDA kernels (conftest.py)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pooling", ["mean", "last", "attention"])
def test_cuda_forward_and_backward_match_cpu(fused, pooling, no_tf32):
    torch.manual_seed(0)
    cpu = CNNLSTM(pooling=pooling, fused=fused, **SMALL).eval()
    gpu = CNNLSTM(pooling=pooling, fused=fused, **SMALL).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    x, lengths = clips(), torch.tensor([5, 2, 4])
    out_cpu = cpu(x, lengths)
    # cuDNN's RNN has no backward in eval mode: the stock model's nn.LSTM runs without cuDNN here.
    with torch.backends.cudnn.flags(enabled=fused, allow_tf32=False):
        out_gpu = gpu(x.cuda(), lengths)  # lengths on the CPU are moved to the clips' device
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-5)
        out_cpu.square().sum().backward()
        out_gpu.square().sum().backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("pooling", ["mean", "max", "last", "attention"])
def test_cuda_training_step_with_cpu_lengths_never_waits_for_the_gpu(pooling):
    torch.manual_seed(0)
    model = CNNLSTM(pooling=pooling, **SMALL).cuda()
    x, lengths = clips().cuda(), torch.tensor([5, 2, 4])
    assert_no_cuda_sync(lambda: model(x, lengths).square().sum().backward())


@pytest.mark.cuda
@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_cuda_graph_replay_matches_eager(pooling):
    # Inference of the whole model (trunk, frame pooling, fused LSTM, temporal pooling, head)
    # replayed from a CUDA graph, every clip full length.
    from conftest import captured
    torch.manual_seed(0)
    model = CNNLSTM(pooling=pooling, **SMALL).cuda().eval()
    x = clips().cuda()

    def forward():
        with torch.no_grad():
            return model(x)
    graph, out = captured(forward)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, forward(), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_lengths_on_the_gpu_are_read_back():
    # The control of the test above: its check does see a read-back.
    model = CNNLSTM(**SMALL).cuda()
    x, lengths = clips().cuda(), torch.tensor([5, 2, 4], device="cuda")
    with pytest.raises(RuntimeError, match="synchronizing CUDA operation"):
        assert_no_cuda_sync(lambda: model(x, lengths))
