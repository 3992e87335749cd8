"""The `kvmw` command: ``serve``, ``inspect``, ``bench <name>``, ``demo``.

Only the command (and bench) named on the line is imported, so ``kvmw --help``,
``kvmw bench --help`` and ``kvmw serve`` start without torch or the benches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from types import ModuleType

#: bench name -> (module, one line for `kvmw bench --help`)
BENCHES: dict[str, tuple[str, str]] = {
    "tiers": ("kvmw.bench.tiers", "put/get GB/s of each tier beside the raw limit"),
    "codecs": ("kvmw.bench.codecs", "size, speed and model fidelity of every codec on real KV"),
    "prefix": ("kvmw.bench.prefix", "HF generate: TTFT cold vs warm per tier and codec"),
    "server": ("kvmw.bench.server", "kvmw serve beside Redis: GB/s and latency per client count"),
    "rag": ("kvmw.bench.rag", "RAG answers from separately cached documents, per blending strategy"),
    "eviction": ("kvmw.bench.eviction", "token eviction policies: accuracy and fidelity vs budget"),
    "vllm": ("kvmw.bench.vllm", "vLLM offline: TTFT cold vs warm from kvmw's tiers vs vLLM's prefix cache"),
    "serve": ("kvmw.bench.serve", "vLLM's OpenAI server under load, with and without kvmw"),
    "faults": ("kvmw.bench.faults", "fault campaign: damaged blobs, killed servers, hostile clients; what was lost"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or any(action.default is v for v in (None, False, "", argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def _module(path: str) -> ModuleType:
    return importlib.import_module(path)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the options of the command `argv` names (all of them when
    `argv` is None: tests and docs)."""
    words = [a for a in argv if not a.startswith("-")] if argv is not None else None

    def chosen(*path: str) -> bool:
        return words is None or words[:len(path)] == list(path)

    parser = argparse.ArgumentParser(prog="kvmw", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO (serve always does)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, module: str | None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
        if module is not None and chosen(name):
            mod = _module(module)
            p.description = mod.__doc__
            p.formatter_class = _Raw
            mod.add_arguments(p)
        return p

    command("serve", "the shared KV cache server (RESP protocol: Redis clients talk to it)",
            "kvmw.integrations.server.server")
    p_inspect = command("inspect", "what a store holds: keys, sizes, tiers, counters", None)
    p_inspect.add_argument("--config", default=None, help="YAML config (default: KVMW_CONFIG / KVMW_* env)")
    p_inspect.add_argument("--tiers", default="", help="comma list overriding the config's tiers")
    p_inspect.add_argument("--limit", type=int, default=20, help="keys listed per tier")

    p_bench = command("bench", "benchmarks: kvmw beside its baseline in one run, ratios printed", None)
    bench_sub = p_bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, (module, summary) in BENCHES.items():
        p = bench_sub.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter)
        if chosen("bench", name):
            mod = _module(module)
            p.description, p.formatter_class = mod.__doc__, _Raw
            mod.add_arguments(p)

    command("demo", "the end-to-end demo (make demo): a shared document asked over a restart", "kvmw.demo")
    return parser


class _Raw(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """A module's docstring as the description, line breaks kept; defaults as HelpFormatter."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    args.command_line = "kvmw " + shlex.join(argv)  # stamped on the benches' figures
    verbose = args.verbose or args.command == "serve"  # a server's log says what happened
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "inspect":
        from kvmw.inventory import inspect_store

        return inspect_store(args.config, args.tiers, args.limit)
    if args.command == "bench":
        bench = _module(BENCHES[args.bench][0])
        if hasattr(bench, "finalize_args"):
            bench.finalize_args(args)
        bench.run(args)
        return 0
    if args.command == "demo":
        return _module("kvmw.demo").run(args)
    if args.command == "serve":
        return _module("kvmw.integrations.server.server").run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
