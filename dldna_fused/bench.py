"""`dldna-fused bench`: one optimizer step of the fused ops against torch.optim and the references.

Every row is measured in the same run: a warm-up, then repeated steps, reporting the median. Each
row gives the speed-up over torch.optim's fused step (`x fused`), the effective bandwidth (bytes
the step must move / time) and, as the practical ceiling, the bandwidth of a plain copy of the same
number of bytes measured in the same run. Results can be written as JSON and CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from dldna_fused import optim, reference

DEFAULT_SHAPES = "1x20000000,100x200000,2000x2000"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    shape: str
    implementation: str
    median_ms: float
    x_vs_torch_fused: float | None
    effective_gbps: float
    copy_gbps: float
    state_bytes: int
    repeats: int


def _implementations(device: str):
    """name -> factory(params) for AdamW; torch's fused CPU kernel exists since 2.4."""
    impls = {
        "dldna_fused": lambda ps: optim.AdamW(ps, lr=1e-3),
        "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
        "reference": lambda ps: reference.AdamW(ps, lr=1e-3),
    }
    return impls


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"COUNTxNUMEL,..." -> [(count, numel)]."""
    shapes = []
    for item in text.split(","):
        count, _, numel = item.strip().lower().partition("x")
        if not numel:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not COUNTxNUMEL, e.g. 2000x2000")
        shapes.append((int(count), int(numel)))
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
        for t in state.values():
            if torch.is_tensor(t):
                storage = t.untyped_storage()
                storages[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def copy_bandwidth(numel: int, dtype: torch.dtype, device: str, warmup: int, repeats: int) -> float:
    """GB/s of dst.copy_(src) over numel elements, counting bytes read plus bytes written."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    times = _time(lambda: dst.copy_(src), device, warmup, repeats, budget_s=5.0)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def adam_bytes_per_step(numel: int, dtype: torch.dtype) -> int:
    """Bytes an AdamW step must move: read p, g, m, v and write p, m, v (states in the param dtype)."""
    return 7 * numel * torch.tensor([], dtype=dtype).element_size()


def run(shapes, dtype: torch.dtype, device: str, warmup: int, repeats: int, implementations=None,
        progress: bool = True, budget_s: float = 10.0) -> list[Row]:
    from tqdm.auto import tqdm

    impls = _implementations(device)
    names = implementations or list(impls)
    rows: list[Row] = []
    tasks = [(s, n) for s in shapes for n in names]
    bar = tqdm(total=len(tasks), desc="bench", disable=not progress, file=sys.stderr)
    for count, numel in shapes:
        label = f"{count} x {numel}"
        total = count * numel
        copy_gbps = copy_bandwidth(total, dtype, device, warmup, repeats)
        optimizers = {}
        for name in names:
            bar.set_postfix_str(f"{label}: {name}")
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(numel, device=device).to(dtype)) for _ in range(count)]
            for p in params:
                p.grad = torch.randn_like(p)
            optimizers[name] = impls[name](params)
        times = _time_interleaved({name: opt.step for name, opt in optimizers.items()}, device, warmup,
                                  repeats, budget_s)
        results = {name: (statistics.median(times[name]), len(times[name]), optimizer_state_bytes(opt))
                   for name, opt in optimizers.items()}
        del optimizers
        bar.update(len(names))
        fused = results.get("torch fused")
        for name, (median, n, state_bytes) in results.items():
            rows.append(Row(
                shape=label, implementation=name, median_ms=median * 1e3,
                x_vs_torch_fused=(fused[0] / median) if fused else None,
                effective_gbps=adam_bytes_per_step(total, dtype) / median / 1e9,
                copy_gbps=copy_gbps, state_bytes=state_bytes, repeats=n,
            ))
    bar.close()
    return rows


def format_table(rows: list[Row]) -> str:
    header = f"{'shape':<18}{'implementation':<16}{'median ms':>11}{'x fused':>9}{'GB/s':>8}{'copy GB/s':>11}{'state MB':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        x = f"{r.x_vs_torch_fused:.2f}" if r.x_vs_torch_fused is not None else "-"
        lines.append(f"{r.shape:<18}{r.implementation:<16}{r.median_ms:>11.2f}{x:>9}{r.effective_gbps:>8.1f}"
                     f"{r.copy_gbps:>11.1f}{r.state_bytes / 2**20:>10.1f}")
    return "\n".join(lines)


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES),
                        help=f"COUNTxNUMEL tensors per case, comma-separated (default {DEFAULT_SHAPES})")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--implementations", type=lambda s: s.split(","), default=None,
                        help="comma-separated subset of: " + ", ".join(_implementations("cpu")))
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    known = _implementations(args.device)
    for name in args.implementations or []:
        if name not in known:
            raise SystemExit(f"--implementations: unknown '{name}' (have: {', '.join(known)})")
    rows = run(args.shapes, DTYPES[args.dtype], args.device, args.warmup, args.repeats,
               args.implementations, progress=not args.no_progress)
    print(f"AdamW step, {args.dtype}, {machine_description(args.device)}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_description(args.device), "dtype": args.dtype,
                       "rows": [asdict(r) for r in rows]}, f, indent=2)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    return 0
