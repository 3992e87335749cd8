"""PNG figures of the benches, each stamped with the command and the machine it came from.

A figure without its provenance cannot be checked or reproduced, so `save` writes
both under the plot: ``kvmw bench ...`` as it was typed and a one-line machine
description. Every bench with a figure takes ``--plot PATH`` (default: next to
``--json``, same stem) through `add_plot_argument` / `plot_path`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any


def add_plot_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--plot", default="", help=f"write a PNG of {what} here (default: --json's path with .png)")


def plot_path(args: argparse.Namespace) -> str:
    """Where the figure goes: ``--plot``, else beside ``--json``, else nowhere ('')."""
    if args.plot:
        return args.plot
    return str(Path(args.json).with_suffix(".png")) if args.json else ""


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (`kvmw.cli` records it), else rebuilt from this process's argv."""
    return getattr(args, "command_line", "") or "kvmw " + shlex.join(sys.argv[1:])


def machine_line() -> str:
    """`common.machine()` in a line: '2 CPU cores (Intel Xeon), no GPU, torch 2.13.0, Python 3.11.7, 2026-12-03'."""
    from kvmw.bench.common import machine

    m = machine()
    return (f"{m['cpus']} CPU cores ({m['cpu_model']}), {m['gpu'] or 'no GPU'}, torch {m['torch']}, "
            f"Python {m['python']}, {time.strftime('%Y-%m-%d')}")


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (benches run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_log_ticks(ax: Any) -> None:
    """A log y axis labelled 0.3, 1, 6 rather than 3x10^-1, 10^0, 6x10^0."""
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))


def save(fig: Any, path: str, title: str, args: argparse.Namespace) -> str:
    """Title the figure, stamp command and machine under it (and in the PNG's ``Description``
    and ``Source`` text chunks), write the PNG."""
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    command, machine = command_line(args), machine_line()
    fig.text(0.01, 0.035, command, fontsize=7, family="monospace")
    fig.text(0.01, 0.008, machine, fontsize=7, color="0.35")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # also as PNG text chunks, so a reader (or a test) gets them without OCR
    fig.savefig(path, dpi=110, metadata={"Title": title, "Description": command, "Source": machine})
    pyplot().close(fig)
    print(f"wrote {path}")
    return path
