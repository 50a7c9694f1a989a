"""Run by tests/test_run_folder.py in a fresh process: `memedit edit` of the shipped bert_tiny_ftm
config at its full length, saving every 50 steps. With MEMEDIT_KILL_AT=N the process SIGKILLs
itself right after optimizer step N, as an out-of-memory killer or a pre-empted node would."""

import os
import signal
import sys

from transformers import TrainerCallback

from hf_memedit.cli import main
from hf_memedit.edit_trainer import ConstrainedEditTrainer


class _Kill(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    kill_at = os.environ.get("MEMEDIT_KILL_AT")
    if kill_at:
        init = ConstrainedEditTrainer.__init__

        def killing_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.add_callback(_Kill(int(kill_at)))

        ConstrainedEditTrainer.__init__ = killing_init
    main(["edit", *sys.argv[1:]])
