"""The ops' argument checks on meta tensors (the fake kernels, which serve the Meta key) and the
Python faces' checks of their arguments: each refusal names the argument."""
import pytest
import torch

from cnnlstm_ext import FusedLSTM, ops

T, B, D = 5, 2, 4


def test_temporal_pool_meta_lengths_with_cpu_x_is_refused():
    x = torch.randn(T, B, D)
    with pytest.raises(RuntimeError, match=r"temporal_pool: lengths must be on the CPU or on cpu "
                                           r"\(x's device\), got meta"):
        ops.temporal_pool(x, torch.tensor([3, 5], device="meta"))


def test_temporal_pool_meta_x_checks_known_cpu_lengths():
    x = torch.randn(T, B, D, device="meta")
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 9; every length must be <= T = 5"):
        ops.temporal_pool(x, torch.tensor([3, 9]))


def test_temporal_pool_meta_x_refuses_zero_length():
    x = torch.randn(T, B, D, device="meta")
    with pytest.raises(RuntimeError, match=r"lengths\[0\] = 0; every length must be >= 1"):
        ops.temporal_pool(x, torch.tensor([0, 2]))


def test_temporal_pool_meta_x_with_valid_lengths_gives_meta_output():
    out = ops.temporal_pool(torch.randn(T, B, D, device="meta"), torch.tensor([3, 5]))
    assert (out.device.type, tuple(out.shape)) == ("meta", (B, D))


def test_temporal_pool_meta_lengths_of_wrong_shape_are_refused():
    x = torch.randn(T, B, D, device="meta")
    with pytest.raises(RuntimeError, match=r"lengths must be \[B\] = \[2\], got shape \[3\]"):
        ops.temporal_pool(x, torch.tensor([1, 2, 3], device="meta"))


@pytest.mark.parametrize("name", ["score_weight", "score_bias"])
def test_temporal_pool_attention_meta_score_with_cpu_x_is_refused(name):
    kw = {"score_weight": torch.randn(D), "score_bias": torch.randn(1)}
    kw[name] = kw[name].to("meta")
    with pytest.raises(RuntimeError, match=r"temporal_pool: %s must be on cpu \(x's device\), got "
                                           r"meta" % name):
        ops.temporal_pool(torch.randn(T, B, D), None, "attention", **kw)


def test_temporal_pool_backward_meta_grad_out_with_cpu_x_is_refused():
    with pytest.raises(RuntimeError, match=r"temporal_pool_backward: grad_out must be on cpu"):
        torch.ops.cnnlstm_ext.temporal_pool_backward(
            torch.randn(B, D, device="meta"), torch.randn(T, B, D), None, torch.empty(0), "mean",
            False, False, None, None)


def test_frame_pool_backward_meta_argmax_with_cpu_grad_is_refused():
    argmax = torch.zeros(4, 3, dtype=torch.int32, device="meta")
    with pytest.raises(RuntimeError, match=r"frame_pool_backward: argmax must be on cpu "
                                           r"\(grad_out's device\), got meta"):
        torch.ops.cnnlstm_ext.frame_pool_backward(torch.randn(2, 2, 3), argmax, [4, 3, 2, 2],
                                                  torch.float32, False, 2, "max", False)


def test_frame_pool_backward_meta_refuses_grad_out_of_wrong_shape():
    argmax = torch.zeros(4, 3, dtype=torch.int32, device="meta")
    with pytest.raises(RuntimeError, match=r"grad_out must be \[T, B, C\] = \[2, 2, 3\], got "
                                           r"\[2, 2, 5\]"):
        torch.ops.cnnlstm_ext.frame_pool_backward(torch.randn(2, 2, 5, device="meta"), argmax,
                                                  [4, 3, 2, 2], torch.float32, False, 2, "max",
                                                  False)


def test_frame_pool_meta_refuses_batch_size_not_dividing_frames():
    with pytest.raises(RuntimeError, match=r"batch_size = 3, but its first dimension 4 is not a "
                                           r"multiple of it"):
        ops.frame_pool(torch.randn(4, 3, 2, 2, device="meta"), 3)


@pytest.mark.parametrize("batch_size", [2.5, 2.0, True, "2"])
def test_frame_pool_non_int_batch_size_is_a_type_error(batch_size):
    with pytest.raises(TypeError, match=r"frame_pool: batch_size must be an int"):
        ops.frame_pool(torch.randn(4, 3, 2, 2), batch_size)


def test_frame_pool_accepts_a_zero_dim_int_tensor_batch_size():
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ops.frame_pool(x, torch.tensor(2)), ops.frame_pool(x, 2))


def _lstm_and_state():
    lstm = FusedLSTM(3, 4)
    return lstm, torch.randn(2, 1, 3), torch.zeros(1, 1, 4)


@pytest.mark.parametrize("count", [1, 3])
def test_fused_lstm_hx_of_wrong_length_is_refused_as_nn_lstm_does(count):
    lstm, x, h = _lstm_and_state()
    with pytest.raises(RuntimeError):  # nn.LSTM's type for three tensors
        torch.nn.LSTM(3, 4)(x, (h,) * 3)
    with pytest.raises(RuntimeError, match=r"hx must be a tuple of two tensors \(h_0, c_0\), got "
                                           r"a tuple of %d" % count):
        lstm(x, (h,) * count)


def test_fused_lstm_hx_as_one_tensor_is_refused():
    lstm, x, h = _lstm_and_state()
    with pytest.raises(RuntimeError, match=r"hx must be a tuple of two tensors .* got a Tensor"):
        lstm(x, h)


def test_fused_lstm_hx_with_none_is_refused():
    lstm, x, h = _lstm_and_state()
    with pytest.raises(RuntimeError, match=r"got a tuple of 2: \(Tensor, NoneType\)"):
        lstm(x, (h, None))


def test_fused_lstm_hx_as_list_of_two_matches_tuple():
    lstm, x, h = _lstm_and_state()
    torch.testing.assert_close(lstm(x, [h, h])[0], lstm(x, (h, h))[0])
