"""Every fused optimizer under DDP, ZeroRedundancyOptimizer and FSDP2 (fully_shard, with and
without CPUOffloadPolicy), with two gloo processes on the CPU, against a single process on the
same global batch; a torch.distributed.checkpoint round trip under FSDP2 (offloaded too); the
global norm of clipping; step counts when a rank skips a parameter;
and examples/train_ddp.py under torchrun. The ranks' side is distributed_worker.py; it runs
once for the module (~15 s)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_worker as worker

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")
WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    mp.spawn(worker.worker, args=(WORLD, str(folder)), nprocs=WORLD)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    return {name: worker.single_process(name) for name in worker.ALL}


def relative(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("mode,name", [(mode, name) for mode in ("ddp", "zero", "fsdp", "fsdp-offload")
                                       for name in worker.OPTIMIZERS]
                         + [(mode, name) for mode in ("ddp", "zero") for name in worker.LOWBIT])
def test_params_match_a_single_process_on_the_global_batch(ranks, single, mode, name):
    model, _ = single[name]
    for rank, results in enumerate(ranks):
        for i, (got, expected) in enumerate(zip(results[(mode, name)]["params"], model.parameters())):
            assert relative(got, expected.detach()) < 1e-6, f"rank {rank} param {i}"


@pytest.mark.parametrize("mode,name", [(mode, name) for mode in ("zero", "fsdp", "fsdp-offload")
                                       for name in worker.OPTIMIZERS]
                         + [("zero", name) for name in worker.LOWBIT])
def test_states_match_a_single_process(ranks, single, mode, name):
    """ZeRO: the consolidated state_dict loaded into an unsharded optimizer; FSDP2: the sharded
    states gathered. Every key, the step counts exactly."""
    model, opt = single[name]
    states = ranks[0][(mode, name)]["state"]
    for i, (state, p) in enumerate(zip(states, model.parameters())):
        assert set(state) == set(opt.state[p]), f"param {i}"
        for key, expected in opt.state[p].items():
            if key == "step":
                assert state[key].item() == expected.item()
            else:
                assert relative(state[key], expected) < 1e-5, f"param {i} {key}"


@pytest.mark.parametrize("mode", ["fsdp", "fsdp-offload"])
@pytest.mark.parametrize("name", list(worker.LOWBIT))
def test_lowbit_states_under_fsdp_quantize_each_shard(ranks, single, name, mode):
    """FSDP2 quantizes the blocks of each rank's shard: the params stay within the quantization
    error of a single process (the blocks differ where a shard boundary cuts one), and the codes
    cover the local shard only, with CPU offload too."""
    model, _ = single[name]
    for results in ranks:
        for i, (got, expected) in enumerate(zip(results[(mode, name)]["params"], model.parameters())):
            assert relative(got, expected.detach()) < 1e-2, f"param {i}"


@pytest.mark.parametrize("checkpoint", ["checkpoint", "checkpoint-offload"])
@pytest.mark.parametrize("name", ["adamw", "adafactor", "adamw8bit"])
def test_fsdp_checkpoint_round_trip_continues_identically(ranks, name, checkpoint):
    for results in ranks:
        for got, expected in zip(results[(checkpoint, name)]["restored"], results[(checkpoint, name)]["original"]):
            if name in worker.LOWBIT:
                # Sharded low-bit states are checkpointed dequantized and quantized again on load:
                # a block whose largest entry is negative gets a slightly smaller absmax (the
                # signed map stops short of -1), so its codes may move by one.
                assert relative(got, expected) < 1e-3
            else:
                assert torch.equal(got, expected)


def test_a_rank_without_a_gradient_keeps_the_same_step_count(ranks):
    steps = [results[("unused", "adamw")]["steps"] for results in ranks]
    assert steps[0] == steps[1] == [3.0] * 4


@pytest.mark.parametrize("write", list(worker.WRITES))
@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_bf16_param_writes_under_fsdp(ranks, name, write):
    """bf16 params under FSDP2 with Kahan summation (a compensation per local shard, the same
    deterministic writes as a single process up to the reductions' order) and stochastic rounding
    (each rank's shard draws its own bits, so the params agree with a single process only as
    closely as two draws of the noise do)."""
    model, opt = worker.single_process_bf16(name, write)
    for rank, results in enumerate(ranks):
        got = results[("fsdp-bf16", name, write)]
        for i, (p, q) in enumerate(zip(got["params"], model.parameters())):
            assert p.dtype == torch.bfloat16
            assert relative(p, q.detach()) < (2e-2 if write == "kahan" else 5e-2), f"rank {rank} param {i}"
            comp = got["comps"][i]
            assert (comp is not None) == (write == "kahan"), f"rank {rank} param {i}"
            if comp is not None:
                # What each write lost, at most half a bf16 ulp (the grads themselves differ from
                # the single process's by bf16 reductions, so p + c agrees only as p does).
                assert bool((comp.float().abs() <= 2 ** -8 * p.float().abs() + 1e-30).all()), f"rank {rank} param {i}"
                expected = q.detach().double() + opt.state[q]["kahan_comp"].double()
                assert relative(p.double() + comp.double(), expected) < 2e-2, f"rank {rank} param {i}"


@pytest.mark.parametrize("folded", [False, True], ids=["clip_grad_norm_", "max_grad_norm"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-offload"])
def test_clipping_uses_the_global_norm_across_ranks(ranks, mode, folded):
    """The norm each rank clips by is the single process's norm of the global batch's grads, and
    the params end the same."""
    model, norms = worker.single_process_clipped()
    assert all(n.item() > worker.CLIP for n in norms)  # every step clipped
    for rank, results in enumerate(ranks):
        got = results[("clip", mode, folded)]
        for step, (a, b) in enumerate(zip(got["norms"], norms)):
            assert relative(a, b) < 1e-5, f"rank {rank} step {step}: {a.item()} vs {b.item()}"
        for i, (p, q) in enumerate(zip(got["params"], model.parameters())):
            assert relative(p, q.detach()) < 1e-6, f"rank {rank} param {i}"


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_train_ddp_example_runs_under_torchrun(tmp_path, optimizer):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "examples" / "train_ddp.py"), "--epochs", "2", "--out", str(tmp_path), "--optimizer", optimizer],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/2" in result.stdout and "test accuracy" in result.stdout
    # It says where it wrote the weights.
    assert (tmp_path / "model.pt").exists() and str((tmp_path / "model.pt").resolve()) in result.stdout


def test_train_ddp_example_offers_every_optimizer():
    import importlib.util

    from dldna_fused import optim

    spec = importlib.util.spec_from_file_location("train_ddp", ROOT / "examples" / "train_ddp.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    offered = {cls for cls, _ in example.OPTIMIZERS.values()}
    classes = {getattr(optim, name) for name in optim.__all__
               if isinstance(getattr(optim, name), type) and issubclass(getattr(optim, name), torch.optim.Optimizer)}
    assert classes <= offered, sorted(c.__name__ for c in classes - offered)
