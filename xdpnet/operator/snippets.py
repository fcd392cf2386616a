"""What a VM needs to use an attachment: QEMU options and libvirt XML.

Both describe the same VM:

* guest RAM is a shared memfd (``memory-backend-memfd,share=on`` /
  ``<source type='memfd'/><access mode='shared'/>``): xdpnet maps it
  and registers it as the AF_XDP UMEM, so the kernel writes received
  frames straight into the guest's buffers;
* one vhost-user netdev on the VM's socket with N queue pairs;
* virtio-net-pci with ``mq=on`` and ``vectors=2N+2`` (one MSI-X vector
  per virtqueue, one for config, one for the control queue) and
  1024-entry rings (every posted rx buffer is a frame the kernel can
  deliver without waiting for the guest; docs/benchmarks.md).

Never a balloon with free-page reporting or deflate-on-oom, nor
virtio-mem: the UMEM pins the pages that were there at registration; a
page the guest gives back and gets again is a *new* page, and frames
written into the old, pinned one are silently lost.
"""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

RING_SIZE = 1024
NO_DISCARD_WHY = ("xdpnet pins guest RAM as the AF_XDP UMEM: pages a balloon (free-page "
                  "reporting, deflate-on-oom) or virtio-mem gives back come back as new pages, "
                  "and frames written into the old, pinned ones are silently lost")


def vectors(pairs: int) -> int:
    """MSI-X vectors of a virtio-net-pci device with *pairs* queue pairs."""
    return 2 * pairs + 2


def qemu_args(socket: str, mac: str, pairs: int, mem: str = "1G", *, name: str = "net0",
              msix: bool = True) -> list[str]:
    """The QEMU options (argv words) for a VM on vhost-user *socket*.

    ``msix=False`` sets ``vectors=0`` (legacy INTx): QEMU 7.2 under TCG
    (no KVM) can crash with vhost-user and MSI-X.
    """
    netdev = f"vhost-user,id={name},chardev=chr-{name}"
    dev = (f"virtio-net-pci,netdev={name},mac={mac},"
           f"rx_queue_size={RING_SIZE},tx_queue_size={RING_SIZE}")
    if pairs > 1:
        netdev += f",queues={pairs}"
        dev += ",mq=on"
    dev += f",vectors={vectors(pairs) if msix else 0}"
    return [
        "-m", mem,
        "-object", f"memory-backend-memfd,id=mem-{name},size={mem},share=on",
        "-machine", f"memory-backend=mem-{name}",
        "-chardev", f"socket,id=chr-{name},path={socket}",
        "-netdev", netdev,
        "-device", dev,
    ]


def qemu_text(args: list[str]) -> str:
    """*args* as one line of shell words (quoted where needed)."""
    import shlex

    return shlex.join(args)


def libvirt_xml(socket: str, mac: str, pairs: int, vm: str = "") -> str:
    """The parts of a libvirt domain a VM on vhost-user *socket* needs.

    A well-formed ``<domain>`` holding only those elements: merge them
    into the domain's XML (``virsh edit DOMAIN``).
    """
    q = quoteattr
    driver = f"<driver rx_queue_size='{RING_SIZE}' tx_queue_size='{RING_SIZE}'"
    if pairs > 1:
        driver += f" queues='{pairs}'"
    driver += "/>"
    title = f" for VM {vm}" if vm else ""
    return f"""\
<!-- xdpnet{title}: merge these elements into the domain (virsh edit DOMAIN). -->
<domain type='kvm'>
  <!-- Guest RAM is a shared memfd: xdpnet registers it as the AF_XDP UMEM. -->
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <devices>
    <interface type='vhostuser'>
      <mac address={q(mac)}/>
      <source type='unix' path={q(socket)} mode='client'/>
      <model type='virtio'/>
      {driver}
    </interface>
    <!-- No memory balloon and no virtio-mem: {NO_DISCARD_WHY}. -->
    <memballoon model='none'/>
  </devices>
</domain>
"""
