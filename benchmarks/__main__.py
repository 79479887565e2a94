"""`python -m benchmarks`: minisd beside diffusers, in numbers (no timed tests: a benchmark prints, a reader judges).

    python -m benchmarks [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--fast] ...   speed and memory (speed.py)
    python -m benchmarks load FILE                                                   loading (load.py)
    python -m benchmarks compile [--regional] [--size N]                             torch.compile (compiled.py)
    python -m benchmarks picture FILE [--steps N]                  one picture per process: time, peak RSS (picture.py)

`python -m minisd.bench ...` is the same command under its old name.
"""

import argparse
import json
import sys

from benchmarks import compiled, load, picture, speed


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("load", "_child", "compile", "picture", "_picture"):
        speed.bench_speed(speed.speed_parser().parse_args(argv))
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=load.__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    load_command = commands.add_parser("load", help="load time and peak RSS, minisd vs diffusers, on one SD v1 file")
    load_command.add_argument("file")
    load_command.add_argument("--repeat", type=int, default=2, help="runs per loader (the best is shown)")
    compile_command = commands.add_parser("compile", help="torch.compile vs eager vs minisd.fast, the CPU UNet step")
    compile_command.add_argument("--model", choices=["sd-v1", "sd-v2", "tiny"], default="sd-v1")
    compile_command.add_argument("--size", type=int, help="image height = width in pixels (default 512; tiny: 64)")
    compile_command.add_argument("--repeat", type=int, default=3, help="timed steps per runner after the warm-up")
    compile_command.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    compile_command.add_argument("--regional", action="store_true", help="compile each block, not the network")
    picture_command = commands.add_parser("picture", help="a whole picture from FILE, each runner in a fresh process")
    picture_command.add_argument("file")
    picture_command.add_argument("--steps", type=int, default=2, help="DDIM steps (2: the peak does not grow)")
    picture_command.add_argument("--size", type=int, default=512, help="height = width in pixels (512)")
    picture_command.add_argument("--runners", default=",".join(picture.RUNNERS), help="comma-separated, in order")
    picture_child = commands.add_parser("_picture")  # internal: one picture in a fresh process
    for name in ("runner", "file", "config_folder", "steps", "size", "out"):
        picture_child.add_argument(name)
    child = commands.add_parser("_child")  # internal: one measurement in a fresh process
    child.add_argument("loader", choices=["minisd", "diffusers"])
    child.add_argument("file")
    child.add_argument("config_folder")
    args = parser.parse_args(argv)
    if args.command == "compile":
        compiled.bench_compile(args)
    elif args.command == "picture":
        picture.bench_picture(args.file, args.steps, args.size, args.runners.split(","))
    elif args.command == "_picture":
        result = picture.child(args.runner, args.file, args.config_folder, int(args.steps), int(args.size), args.out)
        print(json.dumps(result))
    elif args.command == "load":
        load.bench_load(args.file, args.repeat)
    else:
        print(json.dumps(load.child(args.loader, args.file, args.config_folder)))


if __name__ == "__main__":
    main()
