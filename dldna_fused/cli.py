"""The `dldna-fused` command (also `python -m dldna_fused`)."""

from __future__ import annotations

import argparse

from dldna_fused import bench
from dldna_fused.experiments import compare
from dldna_fused.init import cli as init_cli
from dldna_fused.landscape import cli as landscape_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dldna-fused", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench_parser = sub.add_parser("bench", help="time fused optimizer steps against torch.optim",
                                  description=bench.__doc__)
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench.main)
    compare_parser = sub.add_parser("compare", help="train a model with each optimizer and compare the curves",
                                    description=compare.__doc__)
    compare.add_arguments(compare_parser)
    compare_parser.set_defaults(run=compare.main)
    init_parser = sub.add_parser("init", help="compare weight initializations: training, diagnostics, variance",
                                 description=init_cli.__doc__)
    init_cli.add_arguments(init_parser)
    init_parser.set_defaults(run=init_cli.main)
    landscape_parser = sub.add_parser("landscape", help="loss-landscape figures of a trained MLP",
                                      description=landscape_cli.__doc__)
    landscape_cli.add_arguments(landscape_parser)
    landscape_parser.set_defaults(run=landscape_cli.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
