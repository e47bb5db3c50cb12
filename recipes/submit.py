"""Submit a shield-ds recipe to Slurm (or run it locally) with submitit, one task per GPU.

    python recipes/submit.py selfcheck --nodes 2 --gpus-per-node 8
    python recipes/submit.py train --nodes 8 --gpus-per-node 8 --time 2880 --partition gpu -- \\
        --model /models/llava-72b --neurons runs/identify-72b --ds-config ds_configs/zero3_bf16.json
    python recipes/submit.py selfcheck --cluster local --gpus-per-node 2 --cpu

See shield_ds/launch/submit.py for how timeouts and preemption requeue the job.
"""

import sys

from shield_ds.process_group import exit_on_error
from shield_ds.launch.submit import main

if __name__ == "__main__":
    sys.exit(exit_on_error(main)())
