"""CPU seconds per training step of a config (process time, so a busy shared machine inflates it little),
measured between the first and the last log line of a short run into a temporary folder:

    PYTHONPATH=python python scripts/step_time.py configs/emoji_multires_cpu.yaml --steps 40 --log-every 10

Prints the wall and CPU seconds per step over steps log_every+1 .. steps (the first interval holds the
warm-up). Extra arguments are config overrides (section.key=value).
"""

import argparse
import sys
import tempfile
import time

from jitrope.config import load_config
from jitrope.training import train


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    a = p.parse_args()
    stamps = []

    def log(line):
        if line.startswith("step "):
            stamps.append((time.perf_counter(), time.process_time()))
        print(line, flush=True)

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            a.config,
            [
                f"train.out_dir={out}",
                f"train.steps={a.steps}",
                f"train.log_every={a.log_every}",
                "train.progress=false",
                "train.tensorboard=false",
                f"train.ckpt_every={a.steps}",
                "train.sample_every=0",
                *a.overrides,
            ],
        )
        train(cfg, log=log)
    n = a.steps - a.log_every
    if len(stamps) < 2 or n <= 0:
        print("error: need --steps > --log-every to time anything", file=sys.stderr)
        return 2
    (w0, c0), (w1, c1) = stamps[0], stamps[-1]
    print(f"steps {a.log_every + 1}..{a.steps}: {(w1 - w0) / n:.3f} s/step wall, {(c1 - c0) / n:.3f} s/step CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
