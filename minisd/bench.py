"""`python -m minisd.bench ...`: the benchmarks' old name, kept so that the commands already written down still work.

The benchmarks compare minisd with diffusers, so they import diffusers: they live outside the run-time package, in
the repository's top-level benchmarks/ (`python -m benchmarks ...`, the same arguments). This module only hands the
command line on to them, and imports nothing of theirs.
"""

import runpy
import sys

if __name__ == "__main__":
    try:
        runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)
    except ImportError as error:
        sys.exit(f"python -m minisd.bench: the benchmarks come with a checkout of minisd: run from its root ({error})")
