"""The optimizers' eager hot path: packed state buffers ([Note: flat state]), frozen tensor lists
and EagerOp ([Note: eager calls]), and grads_of. Each must give exactly what the plain path gives."""

import io

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dldna_fused import _C, ops, optim

ADAM_KW = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False,
               maximize=False, decoupled_weight_decay=True)


def adam_lists(n=5, numel=33):
    params = [torch.randn(numel + i) for i in range(n)]
    grads = [torch.randn_like(p) for p in params]
    states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.zeros(()) for _ in params]
    return params, grads, states[0], states[1], [], steps


def clone_lists(lists):
    return [[t.clone() for t in lst] for lst in lists]


def test_states_are_aligned_views_of_one_buffer_per_key():
    params = [torch.nn.Parameter(torch.randn(n)) for n in (1, 17, 4097, 0)]
    params.append(torch.nn.Parameter(torch.randn(9, 6).t()))  # keeps its strides
    opt = optim.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for key in ("exp_avg", "exp_avg_sq", "step"):
        storages = {opt.state[p][key].untyped_storage().data_ptr() for p in params}
        assert len(storages) == 1, key
    for p in params:
        assert opt.state[p]["exp_avg"].stride() == p.stride()
        assert opt.state[p]["exp_avg"].data_ptr() % 64 == 0
        assert opt.state[p]["step"].shape == () and opt.state[p]["step"].item() == 1


def test_load_state_dict_repacks_states_with_their_values():
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 40, 7)]
    reference = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        reference.step()
    opt = optim.AdamW(params, lr=1e-2)
    opt.load_state_dict(reference.state_dict())
    assert len({opt.state[p]["exp_avg_sq"].untyped_storage().data_ptr() for p in params}) == 1
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], reference.state[p][key].to(opt.state[p][key].device)), key


def test_saved_state_dict_stores_each_buffer_once():
    params = [torch.nn.Parameter(torch.randn(1000)) for _ in range(50)]
    opt = optim.Adam(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    state_bytes = 2 * 50 * 1000 * 4
    assert state_bytes < buffer.tell() < 1.2 * state_bytes
    buffer.seek(0)
    loaded = torch.load(buffer)
    fresh = optim.Adam(params)
    fresh.load_state_dict(loaded)
    for p in params:
        assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_frozen_lists_update_exactly_like_python_lists():
    lists = adam_lists()
    expected = clone_lists(lists)
    ops.fused_adam_(*expected, **ADAM_KW)
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
    ops.fused_adam_(ops.freeze(params), grads, ops.freeze(exp_avgs), ops.freeze(exp_avg_sqs),
                    ops.freeze(max_exp_avg_sqs), ops.freeze(steps), **ADAM_KW)
    for got, want in zip(lists, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


class RecordOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_torch_function_mode_sends_the_call_through_torch_ops():
    lists = adam_lists()
    expected = clone_lists(lists)
    ops.fused_adam_(*expected, **ADAM_KW)
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
    with RecordOps() as mode:
        ops.fused_adam_(ops.freeze(params), grads, ops.freeze(exp_avgs), exp_avg_sqs,
                        max_exp_avg_sqs, steps, **ADAM_KW)
    assert any("fused_adam_" in name for name in mode.names), mode.names
    for got, want in zip(lists, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


class LoggingTensor(torch.Tensor):
    """A tensor subclass with its own __torch_function__: EagerOp must hand it to torch.ops."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclass_params_go_through_torch_ops():
    lists = adam_lists()
    expected = clone_lists(lists)
    ops.fused_adam_(*expected, **ADAM_KW)
    LoggingTensor.seen.clear()
    params = [p.as_subclass(LoggingTensor) for p in lists[0]]
    frozen = ops.freeze(params)
    ops.fused_adam_(frozen, *lists[1:], **ADAM_KW)
    assert any("fused_adam_" in name for name in LoggingTensor.seen)
    for a, b in zip(lists[0], expected[0]):
        assert torch.equal(a, b)


def test_eager_op_rejects_bad_arguments_like_torch_ops():
    lists = adam_lists()
    with pytest.raises(RuntimeError, match="missing value for argument 'eps'"):
        ops._adam(*lists, **{k: v for k, v in ADAM_KW.items() if k != "eps"})
    with pytest.raises(RuntimeError, match="unexpected keyword"):
        ops._adam(*lists, **ADAM_KW, betas=(0.9, 0.99))
    with pytest.raises(RuntimeError, match="keyword-only"):
        ops._adam(*lists, 1e-3)
    with pytest.raises(RuntimeError, match="not a Tensor"):
        _C.FrozenTensorList([torch.zeros(1), 3.0])


def test_grads_of_reports_missing_grads_and_sparse_grads():
    a, b, c = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    a.grad = torch.ones(3)
    grads, any_sparse, has_grad = ops.grads_of([a, b])
    assert grads[0] is a.grad and grads[1] is None and not any_sparse
    assert has_grad[3:] == b"\x00\x00\x00" and has_grad[0] != 0
    # The key changes with a param's dtype, so cached lists are rebuilt (and checked) after
    # model.double() or a .data swap.
    a.data, a.grad = a.data.double(), torch.ones(3, dtype=torch.float64)
    assert ops.grads_of([a, b])[2][:3] != has_grad[:3]
    c.grad = torch.ones(3).to_sparse()
    assert ops.grads_of([a, c])[1]
