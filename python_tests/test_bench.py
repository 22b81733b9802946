"""`dldna-fused bench` end to end on tiny shapes: every optimizer's rows, the baseline rule, and the
JSON/CSV outputs."""

import argparse
import csv
import importlib.util
import json

import pytest

from dldna_fused import bench, bench_fsdp


def test_bench_runs_every_optimizer_and_picks_its_baseline(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--optimizer", ",".join(bench.benchmarks()), "--shapes", "3x20x25,1x0",
                              "--warmup", "1",
                              "--repeats", "3", "--device", "cpu", "--no-progress",
                              "--json", str(tmp_path / "rows.json"), "--csv", str(tmp_path / "rows.csv")])
    assert bench.main(args) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    with open(tmp_path / "rows.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for name, spec in bench.benchmarks().items():
        ours = [r for r in rows if r["optimizer"] == name and r["shape"] == "3 x 20x25"]
        assert {r["implementation"] for r in ours} == set(spec.implementations)
        baseline = ours[0]["baseline"]
        if spec.baseline is not None:
            assert baseline == spec.baseline
        else:
            # The fastest pure-PyTorch row is the baseline, so no pure-PyTorch row beats it.
            pure = [r for r in ours if r["implementation"] in spec.pure_pytorch]
            assert baseline == min(pure, key=lambda r: r["median_ms"])["implementation"]
        assert all(r["repeats"] >= 3 and r["median_ms"] > 0 for r in ours)
        assert next(r for r in ours if r["implementation"] == baseline)["speedup"] == 1.0
    assert "Sophia step" in capsys.readouterr().out
    # torch.optim.Adafactor divides by zero on a zero-size param: reported as an error row.
    empty = {r["implementation"]: r for r in rows if r["optimizer"] == "adafactor" and r["shape"] == "1 x 0"}
    assert empty["dldna_fused"]["error"] is None
    assert all(r["error"] is None or r["repeats"] == 0 for r in empty.values())


def test_clip_flag_times_the_clipping_tables(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--optimizer", "adamw", "--clip", "--shapes", "4x300", "--warmup", "1", "--repeats", "3",
                              "--device", "cpu", "--no-progress"])
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "AdamW step with gradient clipping" in out and "clip_grad_norm_ alone" in out
    assert "dldna folded" in out and "torch clip+fused" in out
    with pytest.raises(SystemExit, match="no clipping benchmark for lion"):
        bench.main(parser.parse_args(["--optimizer", "lion", "--clip"]))


def test_adafactor_memory_script_runs_on_a_small_list():
    # benchmarks/adafactor_memory.py is what gpu_check.sh runs at LLaMA-7B shapes; here on the CPU.
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "adafactor_memory.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--dtype", "float32", "--shrink", "32",
                          "--layers", "1"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("12 tensors,")


def test_offload_flag_times_the_flat_partition_and_fsdp2_shards(tmp_path, capsys):
    # A small partition here; the default is ZeRO's 100M elements. DeepSpeed is a test dependency,
    # so its CPU Adam row is there where it is installed (its op builds on first use).
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--offload", "--shapes", "1x40000", "--warmup", "1", "--repeats", "3", "--device", "cpu",
                              "--no-progress", "--fsdp-layers", "3", "--fsdp-width", "16",
                              "--json", str(tmp_path / "rows.json")])
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    # The FSDP2 rows: 2 gloo ranks, each stepping its half of every layer (16 x 16 + 16, halved).
    fsdp = {r["implementation"]: r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]
            if r["optimizer"] == "offload-fsdp2"}
    assert set(fsdp) == set(bench_fsdp.IMPLEMENTATIONS)
    assert fsdp[bench_fsdp.BASELINE]["speedup"] == 1.0
    for row in fsdp.values():
        assert row["shape"] == "3 x 16x16, 2 ranks" and row["median_ms"] > 0 and row["repeats"] >= 3
        # exp_avg and exp_avg_sq of rank 0's 3 * (8 * 16 + 8) elements, plus steps and alignment padding
        assert 2 * 408 * 4 <= row["state_bytes"] <= 1.25 * 2 * 408 * 4, row
    assert "AdamW step on FSDP2 shards with CPUOffloadPolicy" in out
    assert "AdamW step on an offloaded flat partition" in out and "failed" not in out
    rows = [line for line in out.splitlines() if line.startswith("1 x 40000")]
    expected = ["dldna_fused", "dldna_fused 8-bit", "torch fused"]
    if importlib.util.find_spec("deepspeed") is not None:
        expected.append("DeepSpeedCPUAdam")
    for name in expected:
        assert any(line[18:].startswith(name + " ") for line in rows), (name, rows)


def test_hessian_flag_compares_lanczos_with_power_iteration(tmp_path, capsys):
    """The MLP's rows (peers where installed): our Lanczos reaches the residual it promises with
    fewer products than power iteration, and both traces come with a standard error."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--hessian", "--hessian-models", "mlp", "--json", str(tmp_path / "h.json")])
    assert bench.main(args) == 0
    assert "Loss Hessian" in capsys.readouterr().out
    rows = {r["implementation"].split(" (")[0]: r for r in json.loads((tmp_path / "h.json").read_text())["rows"]}
    ours, power = rows["dldna_fused Lanczos"], rows["power iteration + deflation"]
    assert ours["max_residual"] <= 1e-5 and ours["max_relative_error"] <= 1e-5
    assert power["max_relative_error"] <= 1e-4
    assert ours["products"] < power["products"]
    for method in ("dldna_fused hutchinson", "dldna_fused hutch++"):
        assert rows[method]["products"] == 99 and "+-" in rows[method]["value"]
    with pytest.raises(SystemExit, match="unknown vgg"):
        bench.main(parser.parse_args(["--hessian", "--hessian-models", "vgg"]))
