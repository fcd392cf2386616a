"""Steering of NIC frames to VMs: the BPF programs of ``bpf/`` (loaded by
bcc, pinned per NIC) and their maps.  See docs/steering.md."""

from xdpnet.steering.nic import (NicSteering, VmInfo, VmSteering, read_pinned, release_dead,
                                 sweep_gone_nics)
from xdpnet.steering.xdp import attached_prog_ids

__all__ = ["NicSteering", "VmSteering", "VmInfo", "read_pinned", "release_dead",
           "sweep_gone_nics", "attached_prog_ids"]
