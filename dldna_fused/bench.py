"""`dldna-fused bench`: one optimizer step of the fused ops against torch.optim, pure-PyTorch
(foreach and per-tensor loop) versions, popular libraries where installed, and the references.

Every row is measured in the same run: a warm-up, then repeated steps in interleaved rounds,
reporting the median. Each row gives the speed-up over the baseline (`x base`: torch.optim's fused
step for AdamW; the fastest pure-PyTorch implementation for Lion and Sophia, which torch.optim does
not have, and the faster mode of torch.optim.Adafactor for AdaFactor), the effective bandwidth (bytes the step must move / time) and, as the practical ceiling,
the bandwidth of a plain copy of the same number of bytes measured in the same run. Results can be
written as JSON and CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import math
import time
from dataclasses import asdict, dataclass

import torch

import dldna_fused
from dldna_fused import optim, reference
from dldna_fused.bench_baselines import ClipThenStep, ForeachLion, ForeachSophia

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP_MAX_NORM = 1.0
# A median copy slower than this multiple of the fastest round means the machine is busy.
BUSY_SPREAD = 2.0


@dataclass
class Row:
    optimizer: str
    shape: str
    implementation: str
    median_ms: float
    speedup: float | None  # baseline time / this row's time
    baseline: str | None
    effective_gbps: float
    copy_gbps: float
    state_bytes: int
    repeats: int
    error: str | None = None  # the implementation failed on this case (e.g. a zero-size tensor)


@dataclass
class Benchmark:
    title: str
    default_shapes: str
    bytes_per_element: float  # elements of the param dtype read plus written per step (bytes / its size)
    implementations: dict  # name -> factory(params)
    pure_pytorch: tuple  # names that count as pure PyTorch (baseline candidates)
    baseline: str | None = None  # fixed baseline; None: the fastest pure-PyTorch row
    dtype: str | None = None  # the params' dtype whatever --dtype says (the bf16 param writes)


def _lion_pytorch():
    try:
        from lion_pytorch import Lion
    except ImportError:
        return {}
    return {"lion_pytorch": lambda ps: Lion(ps, lr=1e-4, weight_decay=0.1)}


def _transformers_adafactor():
    try:
        from transformers.optimization import Adafactor
    except ImportError:
        return {}
    return {"transformers": lambda ps: Adafactor(ps)}


def _bitsandbytes(name: str):
    """bitsandbytes' optimizer ``name`` as a bench row, where bitsandbytes is installed."""
    try:
        import bitsandbytes
    except ImportError:
        return {}
    cls = getattr(bitsandbytes.optim, name)
    kwargs = {"lr": 1e-4, "weight_decay": 0.1} if name.startswith("Lion") else {"lr": 1e-3}
    return {"bitsandbytes": lambda ps: cls(ps, **kwargs)}


def _torchao(name: str):
    try:
        from torchao import optim as torchao_optim
    except ImportError:
        return {}
    cls = getattr(torchao_optim, name)
    return {"torchao": lambda ps: cls(ps, lr=1e-3)}


def _deepspeed_cpu_adam():
    """DeepSpeed's CPU Adam (AdamW mode), the optimizer ZeRO-Offload steps on the host by default,
    where DeepSpeed is installed; its C++ op builds on first use (~1 min)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no GPU: DeepSpeed's CPU build of the op
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError:
        return {}
    return {"DeepSpeedCPUAdam": lambda ps: DeepSpeedCPUAdam(ps, lr=1e-3, weight_decay=0.01, adamw_mode=True)}


# The libraries with a version of each benchmark's optimizer (rows only where installed).
PEER_LIBRARIES = {"adamw8bit": ("bitsandbytes", "torchao"), "adamw4bit": ("torchao",), "lion8bit": ("bitsandbytes",),
                  "offload": ("DeepSpeedCPUAdam",)}


def _lowbit(title: str, bytes_per_element: float, ours, fp32, peers: dict) -> Benchmark:
    """A low-bit optimizer against our fp32 one (the baseline) and the libraries that have it. "all
    quantized" sets min_8bit_size=0, so that params below the default 4096 elements are quantized too."""
    return Benchmark(
        title, "1x20000000,2000x2000", bytes_per_element,
        {
            "dldna_fused": ours,
            "dldna_fused all quantized": lambda ps: ours(ps, min_8bit_size=0),
            "dldna_fused fp32": fp32,
            **peers,
        },
        (), baseline="dldna_fused fp32")


def _bf16_writes(title: str, bytes_per_element: float, make) -> Benchmark:
    """One optimizer on bf16 params with each param write: round to nearest (the baseline),
    stochastic rounding and Kahan summation."""
    return Benchmark(
        f"{title}: round to nearest, stochastic rounding, Kahan summation", "1x20000000,2000x2000",
        bytes_per_element,
        {
            "round to nearest": make,
            "stochastic rounding": lambda ps: make(ps, bf16_stochastic_round=True, seed=0),
            "Kahan summation": lambda ps: make(ps, kahan_sum=True),
        },
        (), baseline="round to nearest", dtype="bfloat16")


def benchmarks() -> dict:
    """The benchmarked optimizers: AdamW reads p, g, m, v and writes p, m, v; Lion reads p, g, m and
    writes p, m; Sophia's step reads p, g, m, h and writes p, m. AdaFactor on matrices makes three
    passes (common/adafactor_math.h): it reads g three times and p twice and writes p once; its
    table also times our AdamW on the same params, for the state size next to AdaFactor's."""
    return {
        "adamw": Benchmark(
            "AdamW step", "1x20000000,100x200000,2000x2000", 7,
            {
                "dldna_fused": lambda ps: optim.AdamW(ps, lr=1e-3),
                # torch's fused CPU kernel exists since 2.4.
                "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
                "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
                "torch for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
                "reference": lambda ps: reference.AdamW(ps, lr=1e-3),
            },
            ("torch foreach", "torch for-loop", "reference"), baseline="torch fused"),
        "lion": Benchmark(
            "Lion step", "1x20000000,2000x10000", 5,
            {
                "dldna_fused": lambda ps: optim.Lion(ps, lr=1e-4, weight_decay=0.1),
                "torch foreach": lambda ps: ForeachLion(ps, lr=1e-4, weight_decay=0.1),
                **_lion_pytorch(),
                "reference": lambda ps: reference.Lion(ps, lr=1e-4, weight_decay=0.1),
            },
            ("torch foreach", "lion_pytorch", "reference")),
        # Low-bit states move p (read, write) and g as 3 fp32 elements, plus 1 (8-bit) or 0.5 (4-bit)
        # bytes per element and state, read and written.
        "adamw8bit": _lowbit("AdamW step, 8-bit states", 4,
                             lambda ps, **kw: optim.AdamW8bit(ps, lr=1e-3, **kw), lambda ps: optim.AdamW(ps, lr=1e-3),
                             {**_bitsandbytes("AdamW8bit"), **_torchao("AdamW8bit")}),
        "adamw4bit": _lowbit("AdamW step, 4-bit states", 3.5,
                             lambda ps, **kw: optim.AdamW4bit(ps, lr=1e-3, **kw), lambda ps: optim.AdamW(ps, lr=1e-3),
                             _torchao("AdamW4bit")),
        "lion8bit": _lowbit("Lion step, 8-bit state", 3.5,
                            lambda ps, **kw: optim.Lion8bit(ps, lr=1e-4, weight_decay=0.1, **kw),
                            lambda ps: optim.Lion(ps, lr=1e-4, weight_decay=0.1), _bitsandbytes("Lion8bit")),
        "sophia": Benchmark(
            "Sophia step", "1x20000000,2000x10000", 6,
            {
                "dldna_fused": lambda ps: optim.Sophia(ps, lr=1e-4),
                "torch foreach": lambda ps: ForeachSophia(ps, lr=1e-4),
                "reference": lambda ps: reference.Sophia(ps, lr=1e-4),
            },
            ("torch foreach", "reference")),
        "adafactor": Benchmark(
            "AdaFactor step", "1x4096x4883,200x316x316", 6,
            {
                "dldna_fused": lambda ps: optim.Adafactor(ps),
                # torch.optim.Adafactor (2.5+): lr only caps the relative step there.
                "torch foreach": lambda ps: torch.optim.Adafactor(ps, foreach=True),
                "torch for-loop": lambda ps: torch.optim.Adafactor(ps, foreach=False),
                **_transformers_adafactor(),
                "reference": lambda ps: reference.Adafactor(ps),
                "AdamW (ours)": lambda ps: optim.AdamW(ps, lr=1e-3),
            },
            ("torch foreach", "torch for-loop")),
        # --clip: the global-norm clip that precedes most steps, with max_norm 1 (the N(0, 1)
        # grads' norm is in the thousands, so the first call clips; later calls keep scaling by
        # factors <= 1, and every implementation multiplies each time). The step table reads g
        # twice (norm, update) at best: 8 elements moved; the clip alone reads g, then reads and
        # writes it: 3.
        "adamw-clip": Benchmark(
            "AdamW step with gradient clipping (max_norm 1.0)", "1x20000000,2000x2000", 8,
            {
                "dldna folded": lambda ps: optim.AdamW(ps, lr=1e-3, max_grad_norm=CLIP_MAX_NORM),
                "dldna clip+step": lambda ps: ClipThenStep(ps, dldna_fused.clip_grad_norm_, CLIP_MAX_NORM,
                                                           optim.AdamW(ps, lr=1e-3)),
                "torch clip+fused": lambda ps: ClipThenStep(ps, torch.nn.utils.clip_grad_norm_, CLIP_MAX_NORM,
                                                            torch.optim.AdamW(ps, lr=1e-3, fused=True)),
            },
            (), baseline="torch clip+fused"),
        # --offload: the host step of ZeRO-Offload, which hands the optimizer one flat fp32 partition
        # per group. fp32 AdamW moves 7 elements (28 bytes); "state MB" is the host state.
        "offload": Benchmark(
            "AdamW step on an offloaded flat partition (host memory)", "1x100000000", 7,
            {
                "dldna_fused": lambda ps: optim.AdamW(ps, lr=1e-3),
                "dldna_fused 8-bit": lambda ps: optim.AdamW8bit(ps, lr=1e-3),
                **_deepspeed_cpu_adam(),
                "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
            },
            (), baseline="torch fused"),
        # bf16 params written three ways ([Note: bf16 param writes] in csrc/common/rounding_math.h).
        # The plain step with fp32 states moves p (2 + 2 bytes), g (2) and m, v (8 + 8): 11 bf16
        # elements; Kahan summation also reads and writes the bf16 compensation, 2 more.
        "adamw-bf16": _bf16_writes("AdamW step on bf16 params with fp32 states", 11,
                                   lambda ps, **kw: optim.AdamW(ps, lr=1e-3, state_dtype=torch.float32, **kw)),
        # With 8-bit states: p (4 bytes), g (2), the codes (1 + 1, read and written) and the absmax: 5.
        "adamw8bit-bf16": _bf16_writes("AdamW8bit step on bf16 params", 5,
                                       lambda ps, **kw: optim.AdamW8bit(ps, lr=1e-3, **kw)),
        "clip": Benchmark(
            "clip_grad_norm_ alone (max_norm 1.0)", "1x20000000,2000x2000", 3,
            {
                "dldna_fused": lambda ps: ClipThenStep(ps, dldna_fused.clip_grad_norm_, CLIP_MAX_NORM),
                "torch": lambda ps: ClipThenStep(ps, torch.nn.utils.clip_grad_norm_, CLIP_MAX_NORM),
                "torch foreach": lambda ps: ClipThenStep(
                    ps, lambda p, m: torch.nn.utils.clip_grad_norm_(p, m, foreach=True), CLIP_MAX_NORM),
            },
            (), baseline="torch"),
    }


def parse_shapes(text: str) -> list[tuple[int, tuple[int, ...]]]:
    """"COUNTxNUMEL,..." or "COUNTxROWSxCOLS,..." -> [(count, shape)]."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) < 2 or not all(p.isdigit() for p in parts):
            raise argparse.ArgumentTypeError(
                f"shape {item!r} is not COUNTxNUMEL or COUNTxROWSxCOLS, e.g. 2000x2000 or 200x316x316")
        shapes.append((int(parts[0]), tuple(int(p) for p in parts[1:])))
    return shapes


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str, warmup: int, repeats: int, budget_s: float) -> list[float]:
    return _time_interleaved({"": fn}, device, warmup, repeats, budget_s)[""]


def _time_interleaved(fns: dict, device: str, warmup: int, repeats: int, budget_s: float) -> dict:
    """Seconds per call of each function, timed in rounds (one call of each per round), so that
    every implementation sees the same machine noise; a function whose calls have taken more than
    ``budget_s`` in all stops after at least 3 (the slow per-tensor baselines)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if len(times[name]) >= 3 and sum(times[name]) > budget_s:
                continue
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of memory the optimizer's state tensors occupy (shared buffers counted once)."""
    storages = {}
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                for t in _plain_tensors(value):
                    storage = t.untyped_storage()
                    storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _plain_tensors(t: torch.Tensor):
    """The tensors that hold a tensor subclass's data (torchao's quantized states, DTensor), or t."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            inner = getattr(t, name)
            if isinstance(inner, torch.Tensor):  # DTensor's flatten names its mesh as well
                yield from _plain_tensors(inner)
    else:
        yield t


def copy_bandwidth(numel: int, dtype: torch.dtype, device: str, warmup: int, repeats: int) -> float:
    """GB/s of dst.copy_(src) over numel elements, counting bytes read plus bytes written (the
    median round), with a warning on stderr when the rounds spread so far that the machine is
    evidently busy."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    times = _time(lambda: dst.copy_(src), device, warmup, repeats, budget_s=5.0)
    median, best = statistics.median(times), min(times)
    if median > BUSY_SPREAD * best:
        print(f"warning: the copy of {numel} elements took {best * 1e3:.2f} ms at best but {median * 1e3:.2f} ms "
              f"in the median round: the machine is busy ({torch.get_num_threads()} threads here). The ratios stay "
              "comparable (implementations are timed interleaved); the GB/s do not. On a small shared machine "
              "run with OMP_NUM_THREADS=1, or when it is idle.", file=sys.stderr)
    return 2 * src.nbytes / median / 1e9


def run(bench: Benchmark, optimizer_name: str, shapes, dtype: torch.dtype, device: str, warmup: int, repeats: int,
        implementations=None, progress: bool = True, budget_s: float = 10.0) -> list[Row]:
    from tqdm.auto import tqdm

    impls = bench.implementations
    names = [n for n in (implementations or list(impls)) if n in impls]
    element_size = torch.tensor([], dtype=dtype).element_size()
    rows: list[Row] = []
    tasks = [(s, n) for s in shapes for n in names]
    bar = tqdm(total=len(tasks), desc="bench", disable=not progress, file=sys.stderr)
    for count, shape in shapes:
        label = f"{count} x {'x'.join(map(str, shape))}"
        total = count * math.prod(shape)
        copy_gbps = copy_bandwidth(total, dtype, device, warmup, repeats)
        optimizers = {}
        for name in names:
            bar.set_postfix_str(f"{label}: {name}")
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(shape, device=device).to(dtype)) for _ in range(count)]
            for p in params:
                p.grad = torch.randn_like(p)
            optimizers[name] = impls[name](params)
        failed = {}
        for name, opt in list(optimizers.items()):
            # A library that cannot take this case gets an error row instead of ending the run.
            try:
                opt.step()
            except Exception as e:  # noqa: BLE001 - any failure of a third-party step is reported
                failed[name] = f"{type(e).__name__}: {e}"
                del optimizers[name]
        times = _time_interleaved({name: opt.step for name, opt in optimizers.items()}, device, warmup,
                                  repeats, budget_s)
        results = {name: (statistics.median(times[name]), len(times[name]), optimizer_state_bytes(opt))
                   for name, opt in optimizers.items()}
        del optimizers
        bar.update(len(names))
        for name, error in failed.items():
            rows.append(Row(optimizer=optimizer_name, shape=label, implementation=name, median_ms=float("nan"),
                            speedup=None, baseline=None, effective_gbps=float("nan"), copy_gbps=copy_gbps,
                            state_bytes=0, repeats=0, error=error))
        baseline = bench.baseline
        if baseline is None:
            candidates = [n for n in bench.pure_pytorch if n in results]
            baseline = min(candidates, key=lambda n: results[n][0]) if candidates else None
        base_time = results[baseline][0] if baseline in results else None
        for impl, (median, n, state_bytes) in results.items():
            rows.append(Row(
                optimizer=optimizer_name, shape=label, implementation=impl, median_ms=median * 1e3,
                speedup=base_time / median if base_time else None,
                baseline=baseline if base_time else None,
                effective_gbps=bench.bytes_per_element * element_size * total / median / 1e9,
                copy_gbps=copy_gbps, state_bytes=state_bytes, repeats=n,
            ))
    bar.close()
    return rows


def format_table(rows: list[Row]) -> str:
    width = max([16] + [len(r.implementation) + 2 for r in rows])  # the implementation column
    shape_width = max([18] + [len(r.shape) + 2 for r in rows])
    header = (f"{'shape':<{shape_width}}{'implementation':<{width}}{'median ms':>11}{'x base':>8}{'GB/s':>8}{'copy GB/s':>11}"
              f"{'state MB':>10}  baseline")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.error is not None:
            lines.append(f"{r.shape:<{shape_width}}{r.implementation:<{width}}  failed: {r.error[:80]}")
            continue
        x = f"{r.speedup:.2f}" if r.speedup is not None else "-"
        lines.append(f"{r.shape:<{shape_width}}{r.implementation:<{width}}{r.median_ms:>11.2f}{x:>8}{r.effective_gbps:>8.1f}"
                     f"{r.copy_gbps:>11.1f}{r.state_bytes / 2**20:>10.3f}  {r.baseline or '-'}")
    return "\n".join(lines)


def machine_description(device: str, threads: int | None = None) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = torch.get_num_threads() if threads is None else threads
    return (f"{platform.processor() or platform.machine()}, {threads} thread{'s' if threads != 1 else ''}, "
            f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--optimizer", type=lambda s: s.split(","), default=["adamw"],
                        help="comma-separated: " + ", ".join(benchmarks()) + " (default adamw)")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="COUNTxNUMEL or COUNTxROWSxCOLS tensors per case, comma-separated (default per optimizer: "
                             + "; ".join(f"{k} {b.default_shapes}" for k, b in benchmarks().items()) + ")")
    parser.add_argument("--clip", action="store_true",
                        help="time each optimizer's step with gradient clipping (e.g. adamw -> adamw-clip: "
                             "torch clip_grad_norm_ + fused step, ours, and ours folded into the step) and "
                             "clip_grad_norm_ alone")
    parser.add_argument("--offload", action="store_true",
                        help="the host step of CPU offload: AdamW (fp32 and 8-bit states) on one flat partition "
                             "of 100M elements against DeepSpeedCPUAdam (where installed) and torch's fused AdamW; "
                             "same as --optimizer offload")
    parser.add_argument("--fsdp-layers", type=int, default=100, metavar="N",
                        help="with --offload, also the FSDP2 rows: N Linear(W, W) layers under fully_shard with "
                             "CPUOffloadPolicy on 2 gloo ranks of one thread, AdamW on the DTensor shards "
                             "(ours, torch fused and foreach) and ours on the same shards as plain tensors "
                             "(default 100; 0 skips them)")
    parser.add_argument("--fsdp-width", type=int, default=256, metavar="W", help="the FSDP2 layers' width (default 256)")
    parser.add_argument("--hessian", action="store_true",
                        help="the loss Hessian's top-3 eigenpairs and trace on the digits MLP and CNN (full batch): "
                             "our Lanczos against power iteration, PyHessian and curvlinops + scipy eigsh (where "
                             "installed), with time, Hessian-vector products and errors; Hutchinson against Hutch++")
    parser.add_argument("--hessian-models", type=lambda s: s.split(","), default=["mlp", "cnn"],
                        help="with --hessian: which models, of mlp and cnn (default both)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the params' and grads' dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the params live")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each implementation first")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed rounds (one step of each implementation per round); the median is reported")
    parser.add_argument("--implementations", type=lambda s: s.split(","), default=None,
                        help="comma-separated subset of the implementations (default all): "
                             + "; ".join(f"{k}: {', '.join(b.implementations)}" for k, b in benchmarks().items()))
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def main(args: argparse.Namespace) -> int:
    if getattr(args, "hessian", False):
        return _main_hessian(args)
    known = benchmarks()
    if args.clip:
        missing = [name for name in args.optimizer if f"{name}-clip" not in known]
        if missing:
            raise SystemExit(f"--clip: no clipping benchmark for {', '.join(missing)} (have: "
                             + ", ".join(n[:-5] for n in known if n.endswith("-clip")) + ")")
        args.optimizer = [f"{name}-clip" for name in args.optimizer] + ["clip"]
    if getattr(args, "offload", False):
        args.optimizer = ["offload"]
    for name in args.optimizer:
        if name not in known:
            raise SystemExit(f"--optimizer: unknown '{name}' (have: {', '.join(known)})")
    every = {impl for name in args.optimizer for impl in known[name].implementations}
    for impl in args.implementations or []:
        if impl not in every:
            raise SystemExit(f"--implementations: unknown '{impl}' (have: {', '.join(sorted(every))})")
    rows: list[Row] = []
    for name in args.optimizer:
        bench = known[name]
        shapes = args.shapes or parse_shapes(bench.default_shapes)
        dtype = bench.dtype or args.dtype
        result = run(bench, name, shapes, DTYPES[dtype], args.device, args.warmup, args.repeats,
                     args.implementations, progress=not args.no_progress)
        print(f"{bench.title}, {dtype}, {machine_description(args.device)}")
        print(format_table(result))
        if name in PEER_LIBRARIES:
            missing = [lib for lib in PEER_LIBRARIES[name] if lib not in bench.implementations]
            if missing:
                print(f"(no {' or '.join(missing)} rows: not installed; they are optional, see README)")
        print()
        rows += result
        if name == "offload" and args.fsdp_layers > 0:
            from dldna_fused import bench_fsdp

            fsdp_rows = bench_fsdp.run(args.fsdp_layers, args.fsdp_width, args.warmup, args.repeats)
            if fsdp_rows:
                print(f"AdamW step on FSDP2 shards with CPUOffloadPolicy (host memory), float32, rank 0 of "
                      f"{bench_fsdp.WORLD} ranks, each {machine_description('cpu', threads=1)}")
                print(format_table(fsdp_rows))
            else:
                print("(no FSDP2 rows: torch.distributed with gloo is not available)")
            print()
            rows += fsdp_rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(args.device), "dtype": args.dtype,
                       "rows": [asdict(r) for r in rows]}, f, indent=2)
    if args.csv and rows:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    return 0


def _main_hessian(args: argparse.Namespace) -> int:
    from dldna_fused import bench_hessian

    unknown = [m for m in args.hessian_models if m not in ("mlp", "cnn")]
    if unknown:
        raise SystemExit(f"--hessian-models: unknown {', '.join(unknown)} (have: mlp, cnn)")
    rows = bench_hessian.run(args.hessian_models)
    print(f"Loss Hessian, float32, {machine_description('cpu')}")
    print(bench_hessian.format_table(rows))
    for peer in ("pyhessian", "curvlinops"):
        if not any(peer.lower() in r.implementation.lower() for r in rows):
            print(f"(no {peer} rows: not installed; it is optional)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description("cpu"), "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0
