"""``xdpnet metrics``: the counters of every attached VM as Prometheus metrics.

A custom collector reads the registry and the counter files at each
scrape (nothing is cached, nothing touches a datapath).  Labels: ``vm``
(the VM's name) and ``queue`` (the queue pair index; ``xdpnet_queue_info``
maps it to the NIC queue).  Names follow the Prometheus conventions:
``_total`` counters, base units (bytes), gauges for ring occupancy.
The full list is in docs/cli.md.
"""

from __future__ import annotations

import signal
import threading

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from xdpnet import stats
from xdpnet.errors import BusyError, PrivilegeError, UsageError
from xdpnet.operator.registry import Registry
from xdpnet.operator.snapshot import read_all

DEFAULT_LISTEN = "127.0.0.1:9407"

# (metric name without _total, counter field, help)
COUNTERS = (
    ("xdpnet_rx_frames", "rx_frames", "Frames delivered to the VM (wire to VM)."),
    ("xdpnet_rx_bytes", "rx_bytes", "Bytes of frames delivered to the VM."),
    ("xdpnet_rx_zero_copy_frames", "rx_zero_copy_frames",
     "Frames written by the kernel or NIC straight into a guest buffer."),
    ("xdpnet_rx_copied_frames", "rx_copied_frames",
     "Received frames copied once through the bounce area."),
    ("xdpnet_rx_copied_bytes", "rx_copied_bytes", "Bytes of those copies."),
    ("xdpnet_tx_frames", "tx_frames", "Frames the VM sent that left on the NIC."),
    ("xdpnet_tx_bytes", "tx_bytes", "Bytes of frames the VM sent."),
    ("xdpnet_tx_zero_copy_frames", "tx_zero_copy_frames",
     "Sent frames handed to the NIC from guest memory."),
    ("xdpnet_tx_copied_frames", "tx_copied_frames",
     "Sent frames linearised once into the bounce area."),
    ("xdpnet_tx_copied_bytes", "tx_copied_bytes", "Bytes of those copies."),
    ("xdpnet_notifications", "rx_notify", "Interrupts (call eventfd writes) for the rx ring."),
    ("xdpnet_tx_notifications", "tx_notify", "Interrupts (call eventfd writes) for the tx ring."),
    ("xdpnet_wakeups", "wakeups", "Datapath thread wake-ups."),
)


def parse_listen(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``[V6ADDR]:PORT`` or ``:PORT`` (all addresses) → (addr, port)."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise UsageError(f"listen address {text!r}: expected ADDR:PORT (e.g. {DEFAULT_LISTEN})")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_s)


class XdpnetCollector:
    """Prometheus collector over the registry's counter files."""

    def __init__(self, reg: Registry):
        self.reg = reg

    def describe(self):
        return []           # no fixed set: VMs come and go

    def collect(self):
        readings = read_all(self.reg)
        ctr = {name: CounterMetricFamily(name, help_, labels=["vm", "queue"])
               for name, _, help_ in COUNTERS}
        drops = CounterMetricFamily("xdpnet_drops", "Frames dropped, by cause.",
                                    labels=["vm", "queue", "cause"])
        ring = GaugeMetricFamily("xdpnet_ring_entries",
                                 "AF_XDP ring entries the other side has not consumed.",
                                 labels=["vm", "queue", "ring"])
        held = GaugeMetricFamily("xdpnet_held_descriptors",
                                 "Guest descriptors the backend holds (not yet on the used ring).",
                                 labels=["vm", "queue", "direction"])
        broken = GaugeMetricFamily("xdpnet_queue_broken",
                                   "1 if the guest broke the virtqueue protocol and the ring "
                                   "was stopped (NEEDS_RESET).",
                                   labels=["vm", "queue", "direction"])
        qinfo = GaugeMetricFamily("xdpnet_queue_info", "Queue pair to NIC queue (always 1).",
                                  labels=["vm", "queue", "iface", "nic_queue"])
        up = GaugeMetricFamily("xdpnet_vm_up", "1 while the VM's serve process runs.",
                               labels=["vm"])
        start = GaugeMetricFamily("xdpnet_vm_start_time_seconds",
                                  "When the VM was attached (Unix time).", labels=["vm"])
        info = GaugeMetricFamily("xdpnet_vm_info", "The VM's attachment (always 1).",
                                 labels=["vm", "iface", "mac", "xdp_mode", "xsk_mode"])
        verdicts = CounterMetricFamily("xdpnet_steering_frames",
                                       "Frames per verdict of the NIC's XDP program.",
                                       labels=["iface", "verdict"])
        seen_nics: set[str] = set()
        for r in readings:
            rec = r.record
            vm = rec.name
            up.add_metric([vm], 1 if r.state != "dead" else 0)
            start.add_metric([vm], rec.started)
            info.add_metric([vm, rec.iface, rec.mac, rec.xdp_mode or "", rec.xsk_mode or ""], 1)
            if r.steering and r.steering.get("verdicts") and rec.iface not in seen_nics:
                seen_nics.add(rec.iface)
                for verdict, v in r.steering["verdicts"].items():
                    verdicts.add_metric([rec.iface, verdict], v)
            for p in r.pairs:
                q = str(p.pair)
                qinfo.add_metric([vm, q, rec.iface, "" if p.queue is None else str(p.queue)], 1)
                s = p.counters
                if s is None:
                    continue
                for name, fld, _ in COUNTERS:
                    ctr[name].add_metric([vm, q], s[fld])
                for cause, v in stats.drops(s).items():
                    drops.add_metric([vm, q, cause], v)
                for label, v in stats.rings(s).items():     # fill, rx, tx, rx_held, tx_held
                    if label.endswith("_held"):
                        held.add_metric([vm, q, label[:-len("_held")]], v)
                    else:
                        ring.add_metric([vm, q, label], v)
                for d, why in stats.broken(s).items():
                    broken.add_metric([vm, q, d], 1 if why else 0)
        yield from ctr.values()
        yield from (drops, ring, held, broken, qinfo, up, start, info, verdicts)


def serve(reg: Registry, listen: str = DEFAULT_LISTEN,
          stop: threading.Event | None = None) -> int:
    """Serve ``/metrics`` on *listen* until SIGINT/SIGTERM (or *stop*)."""
    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(XdpnetCollector(reg))
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except PermissionError:
        raise PrivilegeError(f"cannot listen on {listen}: permission denied") from None
    except OSError as e:
        if e.errno == 98:           # EADDRINUSE
            raise BusyError(f"cannot listen on {listen}: address already in use") from None
        raise UsageError(f"cannot listen on {listen}: {e.strerror or e}") from None
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    print(f"xdpnet metrics: serving http://{listen}/metrics", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    return 0
