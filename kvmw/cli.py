"""The `kvmw` command: ``inspect``, ``bench <name>``, ``demo``."""

from __future__ import annotations

import argparse
import logging
import sys

BENCHES = {"tiers": "kvmw.bench.tiers", "codecs": "kvmw.bench.codecs", "prefix": "kvmw.bench.prefix",
           "server": "kvmw.bench.server", "rag": "kvmw.bench.rag", "eviction": "kvmw.bench.eviction",
           "vllm": "kvmw.bench.vllm", "serve": "kvmw.bench.serve"}


def _bench_module(name: str):
    import importlib

    return importlib.import_module(BENCHES[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvmw", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p_inspect = sub.add_parser("inspect", help="what a store holds: keys, sizes, tiers, counters")
    p_inspect.add_argument("--config", default=None, help="YAML config (default: KVMW_CONFIG / env)")
    p_inspect.add_argument("--tiers", default="", help="comma list overriding the config's tiers")
    p_inspect.add_argument("--limit", type=int, default=20, help="keys listed per tier")

    p_bench = sub.add_parser("bench", help="benchmarks: kvmw beside its baseline, ratios printed")
    bench_sub = p_bench.add_subparsers(dest="bench", required=True)
    for name in BENCHES:
        p = bench_sub.add_parser(name, help=(_bench_module(name).__doc__ or "").splitlines()[0])
        _bench_module(name).add_arguments(p)

    p_serve = sub.add_parser("serve", help="the shared KV cache server (RESP protocol)")
    from kvmw.integrations.server import server as kv_server

    kv_server.add_arguments(p_serve)

    p_demo = sub.add_parser("demo", help="the end-to-end demo (make demo)")
    from kvmw import demo

    demo.add_arguments(p_demo)

    args = parser.parse_args(argv)
    verbose = args.verbose or args.command == "serve"  # a server's log says what happened
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "inspect":
        from kvmw.inventory import inspect_store

        return inspect_store(args.config, args.tiers, args.limit)
    if args.command == "bench":
        module = _bench_module(args.bench)
        if hasattr(module, "finalize_args"):
            module.finalize_args(args)
        module.run(args)
        return 0
    if args.command == "demo":
        return demo.run(args)
    if args.command == "serve":
        return kv_server.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
