"""Run ``state tx train`` in this process and print the wall time of every training step as JSON.

    python bench/train_step_times.py <state tx train overrides...>

Used by the end-to-end loader benchmark: the steady-state step time is the median over the steps
after the first two, so start-up (data module set-up, the first batches, the sanity check) and its
run-to-run variance stay out of the figure. A step is one call of Lightning's training-epoch
``advance``: fetching the batch, forward, backward, optimizer step and the callbacks.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> int:
    from lightning.pytorch.loops import training_epoch_loop

    seconds: list[float] = []
    advance = training_epoch_loop._TrainingEpochLoop.advance

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return advance(self, *args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    training_epoch_loop._TrainingEpochLoop.advance = timed
    from state.__main__ import main as state_main

    code = state_main(["tx", "train", *sys.argv[1:]])
    print(json.dumps({"step_seconds": seconds}))
    return code


if __name__ == "__main__":
    sys.exit(main())
