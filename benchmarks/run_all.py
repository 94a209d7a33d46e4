"""`make bench`: runs every benchmarks/bench_*.py in turn; each prints its table and writes benchmarks/results/."""
import glob
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    sys.path.insert(0, HERE)
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    for script in scripts:
        print(f"\n===== {os.path.basename(script)} =====", flush=True)
        module = runpy.run_path(script)
        module["main"]([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
