"""`python -m benchmarks`: minisd beside diffusers, in numbers (no timed tests: a benchmark prints, a reader judges).

    python -m benchmarks [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--fast] ...   speed and memory (speed.py)
    python -m benchmarks load FILE                                                   loading (load.py)

`python -m minisd.bench ...` is the same command under its old name.
"""

import argparse
import json
import sys

from benchmarks import load, speed


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("load", "_child"):
        speed.bench_speed(speed.speed_parser().parse_args(argv))
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=load.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    load_command = commands.add_parser("load", help="load time and peak RSS, minisd vs diffusers, on one SD v1 file")
    load_command.add_argument("file")
    load_command.add_argument("--repeat", type=int, default=2, help="runs per loader (the best is shown)")
    child = commands.add_parser("_child")  # internal: one measurement in a fresh process
    child.add_argument("loader", choices=["minisd", "diffusers"])
    child.add_argument("file")
    child.add_argument("config_folder")
    args = parser.parse_args(argv)
    if args.command == "load":
        load.bench_load(args.file, args.repeat)
    else:
        print(json.dumps(load.child(args.loader, args.file, args.config_folder)))


if __name__ == "__main__":
    main()
