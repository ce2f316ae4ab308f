"""FusedLSTM as a module among nn.LSTM's: its repr, pickling, and the conversions both ways
(from_lstm, to_lstm, fuse_lstm/unfuse_lstm)."""
import itertools
import pickle

import pytest
import torch
from torch import nn

from cnnlstm_ext import FusedBiLSTM, FusedLSTM, fuse_lstm, unfuse_lstm

CONFIGS = [dict(num_layers=layers, bias=bias, batch_first=batch_first, dropout=dropout,
                bidirectional=bidirectional)
           for layers, bias, batch_first, dropout, bidirectional
           in itertools.product([1, 2], [True, False], [False, True], [0.0, 0.25], [False, True])]


def _id(config):
    return "-".join(f"{k}={v}" for k, v in config.items())


@pytest.mark.filterwarnings("ignore:dropout option adds dropout")
@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_repr_is_nn_lstm_repr(config):
    fused, reference = FusedLSTM(5, 7, **config), nn.LSTM(5, 7, **config)
    assert repr(fused) == repr(reference).replace("LSTM(", "FusedLSTM(", 1)


@pytest.mark.filterwarnings("ignore:dropout option adds dropout")
@pytest.mark.parametrize("config", CONFIGS[::3], ids=_id)
def test_pickled_module_computes_the_same(config):
    torch.manual_seed(0)
    model = FusedLSTM(5, 7, **config).eval()
    x = torch.randn(4, 3, 5)
    copy = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(copy(x)[0], model(x)[0], rtol=0, atol=0)
    assert [n for n, _ in copy.named_parameters()] == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("proj_size", [1, 3])
def test_from_lstm_and_to_lstm_keep_projections(proj_size):
    lstm = nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=proj_size)
    fused = FusedLSTM.from_lstm(lstm)
    assert fused.proj_size == proj_size
    assert all(a is b for a, b in zip(fused.parameters(), lstm.parameters()))
    x = torch.randn(4, 2, 5)
    torch.testing.assert_close(fused(x), lstm(x))
    back = fused.to_lstm()
    assert back.proj_size == proj_size
    torch.testing.assert_close(back(x), lstm(x))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_from_lstm_and_to_lstm_share_the_parameters(bidirectional):
    lstm = nn.LSTM(5, 7, num_layers=2, bidirectional=bidirectional).train(False)
    fused = FusedLSTM.from_lstm(lstm)
    assert not fused.training
    assert all(a is b for a, b in zip(fused.parameters(), lstm.parameters()))
    back = fused.to_lstm()
    assert all(a is b for a, b in zip(back.parameters(), lstm.parameters()))
    assert all(p.device.type == "cpu" for p in back.parameters())
    x = torch.randn(4, 3, 5)
    torch.testing.assert_close(fused(x)[0], lstm(x)[0], rtol=1e-5, atol=1e-6)


def test_fuse_and_unfuse_lstm_swap_every_lstm_in_place():
    model = nn.Sequential(nn.LSTM(5, 7, bidirectional=True), nn.Identity())
    params = list(model.parameters())
    fuse_lstm(model)
    assert isinstance(model[0], FusedLSTM)
    assert all(a is b for a, b in zip(model.parameters(), params))
    unfuse_lstm(model)
    assert type(model[0]) is nn.LSTM
    assert all(a is b for a, b in zip(model.parameters(), params))


def test_fused_bilstm_is_bidirectional_fused_lstm():
    model = FusedBiLSTM(5, 7, num_layers=2)
    assert isinstance(model, FusedLSTM) and model.bidirectional
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in nn.LSTM(5, 7, num_layers=2, bidirectional=True).named_parameters()]
