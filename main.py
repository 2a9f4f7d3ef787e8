"""oats: run the experiment list of OATS_configs.py (or --config FILE.py) and write results.

    python main.py                       # every experiment of OATS_configs.py not done yet
    python main.py --config my.py --only oats-50 --out runs/
    python main.py --list                # each experiment and whether it is done
"""
from __future__ import annotations

import argparse
import logging
import runpy
import sys
from pathlib import Path

log = logging.getLogger("oats")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="OATS_configs.py", help="Python file defining CONFIGS, a list of ConfigDicts")
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run only the experiment(s) of this name")
    p.add_argument("--index", type=int, action="append", default=[], metavar="I", help="run only the experiment(s) at this index")
    p.add_argument("--out", default="results", help="results root (default: results/)")
    p.add_argument("--list", action="store_true", help="print the experiments and whether each is done, then exit")
    p.add_argument("--force", action="store_true", help="rerun experiments even when their result exists")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    return p.parse_args(argv)


def load_configs(path: str) -> list:
    from oats.config import ConfigError

    file = Path(path)
    if not file.is_file():
        raise ConfigError("--config", f"{path!r} is not a file")
    namespace = runpy.run_path(str(file))
    if "CONFIGS" not in namespace:
        raise ConfigError("CONFIGS", f"{path} must define CONFIGS, a list of ml_collections.ConfigDict")
    return namespace["CONFIGS"]


def select(cfgs: list, only: list[str], index: list[int]) -> list:
    from oats.config import ConfigError

    if not only and not index:
        return cfgs
    names = {c.name for c in cfgs}
    for n in only:
        if n not in names:
            raise ConfigError("--only", f"no experiment named {n!r}; names: {sorted(names)}")
    for i in index:
        if not 0 <= i < len(cfgs):
            raise ConfigError("--index", f"{i} is out of range; the list has {len(cfgs)} experiments (0..{len(cfgs) - 1})")
    return [c for i, c in enumerate(cfgs) if c.name in only or i in index]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("urllib3", "filelock", "fsspec", "datasets", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from oats.config import ConfigError, resolve_all

    try:
        cfgs = select(resolve_all(load_configs(args.config)), args.only, args.index)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    from oats.runner import run_all, status_of

    if args.list:
        for i, c in enumerate(cfgs):
            print(f"{i:3d}  {status_of(c, out):8s}  {c.name}")
        return 0
    outcome = run_all(cfgs, out, force=args.force)
    failed = [n for n, s in outcome.items() if s == "failed"]
    log.info("finished: %d ok, %d skipped, %d failed; results in %s/ (summary.md)",
             sum(s == "ok" for s in outcome.values()), sum(s == "skipped" for s in outcome.values()), len(failed), out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
