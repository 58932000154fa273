"""Test-only launcher: `trainer` under FSDP2 on CPU ranks (gloo), which Accelerate itself never sets up.

Accelerate takes the FSDP path only for GPU launches: on a CPU machine an FSDP launch gets MULTI_CPU (plain DDP),
and trainer refuses that launch in one line. To test trainer's FSDP code on a machine without a GPU, this script
(as tests/gpu/test_sync_bn_gpu.py forces two ranks onto one GPU) makes Accelerate's state take the FSDP branch it
takes on GPUs, with the plugin built from the launcher's environment, and then runs the unchanged CLI: everything
from build_accelerator on is the product's own code path. Usage, as for `-m trainer`:
    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 --mixed_precision no \\
        tests/e2e/fsdp_on_cpu.py train ...
"""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


def force_fsdp_on_cpu() -> None:
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # What accelerate/state.py does for a GPU launch, including the copy into PartialState's shared state
            # (every later AcceleratorState() re-reads it from there).
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init


if __name__ == "__main__":
    force_fsdp_on_cpu()
    from trainer.cli import main

    sys.exit(main(sys.argv[1:]))
