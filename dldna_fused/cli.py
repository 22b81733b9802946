"""The `dldna-fused` command (also `python -m dldna_fused`)."""

from __future__ import annotations

import argparse

from dldna_fused import bench
from dldna_fused.experiments import compare
from dldna_fused.init import cli as init_cli
from dldna_fused.landscape import cli as landscape_cli


# name -> (module with add_arguments/main and a docstring, one-line help)
SUBCOMMANDS = {
    "bench": (bench, "time fused optimizer steps against torch.optim"),
    "compare": (compare, "train a model with each optimizer and compare the curves"),
    "init": (init_cli, "compare weight initializations: training, diagnostics, variance"),
    "landscape": (landscape_cli, "loss-landscape figures of a trained MLP"),
}


class _DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it (it then printed twice)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dldna-fused", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        # Every option's default shows in --help.
        command = sub.add_parser(name, help=help_text, description=module.__doc__,
                                 formatter_class=_DefaultsOnceFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
