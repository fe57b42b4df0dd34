"""torchrun entry point for tests/test_distributed.py: ``qkv train ...`` that can lose a worker.

With QKV_TEST_KILL="RANK:STEP", worker RANK SIGKILLs itself just before optimizer step STEP, on
the job's first attempt only (TORCHELASTIC_RESTART_COUNT = 0), as a crashed node would. With
QKV_TEST_PIDS=DIR every worker writes its pid to DIR/rank_R_attempt_A.pid, so the test can check
that none is left running.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from qkv import train
from qkv.cli import main


def die_before(step: int) -> None:
    real = train.Trainer._step

    def step_or_die(self):
        if self.state.step + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self)

    train.Trainer._step = step_or_die


if __name__ == "__main__":
    rank, attempt = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if os.environ.get("QKV_TEST_PIDS"):
        Path(os.environ["QKV_TEST_PIDS"], f"rank_{rank}_attempt_{attempt}.pid").write_text(str(os.getpid()))
    kill = os.environ.get("QKV_TEST_KILL")
    if kill and attempt == 0:
        kill_rank, kill_step = map(int, kill.split(":"))
        if rank == kill_rank:
            die_before(kill_step)
    sys.exit(main(sys.argv[1:]))
