"""The main job: `accelerate launch train_edit.py --config trainer_configs/<name>.yaml [--option value ...]`.

The same as `memedit edit`; see `hf_memedit.cli` and `python train_edit.py --help`.
Single process: `python train_edit.py ...`; DDP: `accelerate launch --multi_gpu --num_processes N train_edit.py ...`.
"""

import sys

from hf_memedit.cli import main


if __name__ == "__main__":
    main(["edit", *sys.argv[1:]])
