"""xdpnet command line: ``xdpnet COMMAND [options]``.

Every command prints one line ``xdpnet: error: ...`` and exits non-zero
on failure (codes in :mod:`xdpnet.errors`); ``--json`` outputs are
documented in docs/cli.md.  The commands that work on attached VMs
(attach, detach, list, stats, top, metrics, qemu-args, libvirt-xml) are
thin: the work is in :mod:`xdpnet.operator`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from xdpnet import __version__
from xdpnet.errors import EXIT_USAGE, UsageError, XdpnetError

EXIT_CODES = """\
exit status:
  0  success
  1  runtime failure (the datapath or a peer failed)
  2  bad arguments or input (unknown interface or VM, malformed MAC, bad queue)
  3  missing privilege (needs root / CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF, CAP_IPC_LOCK)
  4  a resource is busy (queue or interface already in use, VM name or socket path taken)
  5  a missing system dependency (bcc, kernel headers, libxdp)
  130 interrupted (Ctrl-C)
"""

RUN_DIR_NOTE = """\
VMs are recorded under /run/xdpnet/vms (XDPNET_RUN_DIR or --state-dir
moves it); one xdpnet serve process serves each VM.
"""

DEMO_EPILOG = """\
examples:
  xdpnet demo                  # 10 s demo with a live table
  xdpnet demo --seconds 3      # shorter
  xdpnet demo --json           # no table; one JSON object at the end

The demo creates a network namespace holding the "wire" end of a veth
pair whose other end is the NIC, attaches the XDP program, serves a
simulated VM (a virtio-net driver over vhost-user) on NIC queue 0, and
exchanges verified frames both ways: request/response, then a flood in
each direction.  Everything it created is removed on exit, Ctrl-C or
error.

""" + EXIT_CODES

SERVE_EPILOG = """\
examples:
  xdpnet serve --iface eth1 --queue 0 --mac 52:54:00:12:34:56 --socket /run/xdpnet/vm1.sock
  xdpnet serve --iface eth1 --queue 2,3 --mac 52:54:00:12:34:56 --socket /tmp/vm1.sock -v
  xdpnet serve --iface eth1 --queue 0 --mac 52:54:00:12:34:56 --socket /tmp/vm1.sock \\
        --busy-poll 200 --napi-budget 64      # lower latency: the thread spins while busy

Serves one VM in the foreground: frames for MAC (and broadcast/multicast)
arriving on the given NIC queue(s) are written by the kernel (or the NIC)
straight into the VM's rx buffers; the VM's tx frames leave from its own
memory.  Prints the QEMU options the VM needs, then serves until
SIGINT/SIGTERM.  With N queues the VM gets N queue pairs (queues=N, mq=on
in QEMU).  'xdpnet attach' runs this in the background as a named VM.
By default each queue pair's thread sleeps in poll() as soon as it runs
out of work; --busy-poll trades a CPU while traffic flows for fewer guest
kicks and a lower round trip (docs/benchmarks.md has the numbers).

""" + EXIT_CODES

ATTACH_EPILOG = """\
examples:
  xdpnet attach eth1 --queue 0 --mac 52:54:00:12:34:56 --socket /run/vm1.sock
        # VM "vm1" (the socket's name) on queue 0 of eth1
  xdpnet attach eth1 --queue 2,3 --mac 52:54:00:00:00:02 --socket /run/b.sock --name web
        # VM "web" with two queue pairs on NIC queues 2 and 3
  xdpnet attach eth1 --port-only --pairs 2 --mac 52:54:00:00:00:03 --socket /run/c.sock
        # no NIC queue of its own: 2 queue pairs served through the VM's port
  xdpnet qemu-args vm1          # then: the QEMU options for the VM

Checks the privilege, the name, the MAC, the interface and its queues,
and that no attached VM uses the name or socket path; then starts
'xdpnet serve --name NAME' in the background (its own session, output in
/run/xdpnet/vms/NAME/serve.log) and returns once it serves the socket.
If serving fails, its error is printed and nothing stays attached.
One process per VM: a crash serving one VM leaves the others running.

""" + RUN_DIR_NOTE + "\n" + EXIT_CODES

DETACH_EPILOG = """\
examples:
  xdpnet detach vm1             # stop serving vm1 and remove everything it left
  xdpnet detach vm1 --timeout 3 # SIGKILL if it has not stopped after 3 s

SIGTERM to the VM's serve process, which closes its socket and releases
the NIC queues and guest memory; SIGKILL after the timeout.  A dead VM's
leftovers (record, socket, counter files, log, its steering entries) are
removed too.  The VM sees its vhost-user backend disconnect.

""" + RUN_DIR_NOTE + "\n" + EXIT_CODES

LIST_EPILOG = """\
examples:
  xdpnet list                   # one line per VM: state, pid, NIC, queues, MAC, socket
  xdpnet list --json            # the records (keys in docs/cli.md)

State is running, starting, or dead (its process is gone: 'xdpnet detach
NAME' cleans up; the log is in /run/xdpnet/vms/NAME/serve.log).

""" + RUN_DIR_NOTE + "\n" + EXIT_CODES

STATS_EPILOG = """\
examples:
  xdpnet stats                  # every VM, one line per queue pair
  xdpnet stats vm1 --json       # one VM as JSON: per pair and total, drops by cause
  watch -n1 xdpnet stats        # poor man's top (see xdpnet top)

Counters since the VM attached, read from the files its serve process
publishes (nothing is stopped or locked): frames and bytes each way,
zero-copy share, userspace copies, drops by cause (no rx buffer, too
large, invalid descriptor, tx error), rings a guest broke.

""" + RUN_DIR_NOTE + "\n" + EXIT_CODES

TOP_EPILOG = """\
examples:
  xdpnet top                    # live dashboard, 1 s refresh; q quits, s cycles the sort
  xdpnet top --interval 0.5 --sort rx/s
  xdpnet top --once             # print one screen (rates over one interval) and exit

Header: per NIC the XDP mode (native/generic), AF_XDP mode (copy/
zero-copy) and uptime.  One row per VM x queue pair: state, rx/tx frames
per second, Gbit/s, share of zero-copy frames, userspace copies, drops by
cause (no buffer, too large, invalid descriptor, tx error), fill/rx/tx
ring entries pending and guest descriptors held, and a sparkline of the
last minute's frame rate.

""" + RUN_DIR_NOTE + "\n" + EXIT_CODES

METRICS_EPILOG = """\
examples:
  xdpnet metrics                          # http://127.0.0.1:9407/metrics
  xdpnet metrics --listen :9407           # on every address
  curl -s localhost:9407/metrics | grep xdpnet_rx_frames_total

Prometheus exposition of every attached VM's counters, read at each
scrape: xdpnet_rx_frames_total{vm,queue}, xdpnet_drops_total{vm,queue,
cause}, xdpnet_ring_entries{vm,queue,ring}, ... (all in docs/cli.md).

""" + RUN_DIR_NOTE + "\n" + EXIT_CODES

QEMU_EPILOG = """\
examples:
  xdpnet qemu-args vm1                    # options for a 1 GiB VM
  xdpnet qemu-args vm1 --mem 4G           # guest RAM size (the whole RAM is the memfd)
  qemu-system-x86_64 -accel kvm -machine q35 $(xdpnet qemu-args vm1) ...
  xdpnet qemu-args vm1 --no-msix          # QEMU 7.2 under TCG (no KVM): vectors=0

Guest RAM is a shared memfd (xdpnet registers it as the AF_XDP UMEM);
the NIC is virtio-net-pci on a vhost-user netdev with the VM's queue
pairs (mq=on, vectors=2N+2) and 1024-entry rings.  Add no balloon with
free-page reporting or deflate-on-oom and no virtio-mem: xdpnet pins
guest RAM, and frames written into pages the guest gave back are lost.

""" + EXIT_CODES

LIBVIRT_EPILOG = """\
examples:
  xdpnet libvirt-xml vm1                  # merge the printed elements: virsh edit DOMAIN

Prints a <domain> holding only what the VM needs: <memoryBacking> with a
shared memfd, an <interface type='vhostuser'> on the VM's socket (libvirt
is the client) with its queues and 1024-entry rings, and
<memballoon model='none'/> (no free-page reporting, deflate-on-oom or
virtio-mem: xdpnet pins guest RAM as the UMEM).

""" + EXIT_CODES


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-v: debug, including every vhost-user message)")


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR",
                   help="registry directory (default $XDPNET_RUN_DIR, else /run/xdpnet)")


def _sub(sub, name: str, help_: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_serving(p: argparse.ArgumentParser) -> None:
    """Options ``serve`` and ``attach`` share."""
    p.add_argument("--mac", required=True, help="the VM's MAC address")
    p.add_argument("--socket", required=True, metavar="PATH", help="vhost-user socket to create")
    p.add_argument("--xdp-mode", choices=("auto", "native", "generic"), default="auto",
                   help="XDP attach mode (default auto: native, else generic)")
    p.add_argument("--max-frame", type=int, default=1518, metavar="BYTES",
                   help="largest frame delivered to the VM (default 1518; longer ones are "
                        "dropped and counted)")
    p.add_argument("--guest-mem", default="1G", metavar="SIZE",
                   help="guest RAM size used in the printed QEMU options (default 1G)")
    p.add_argument("--group", dest="socket_group", metavar="GROUP",
                   help="make the socket 0660 and owned by GROUP (default 0600)")
    p.add_argument("--busy-poll", dest="busy_poll_us", type=int, default=0, metavar="USEC",
                   help="keep each datapath thread polling USEC microseconds after its last "
                        "frame before it sleeps (default 0: sleep at once; lower latency, "
                        "fewer guest kicks, a CPU spent while traffic flows)")
    p.add_argument("--napi-budget", type=int, default=0, metavar="N",
                   help="with --busy-poll: SO_PREFER_BUSY_POLL with budget N on the AF_XDP "
                        "sockets, so the datapath thread runs the NIC queue's receive work "
                        "itself instead of the CPU the interrupt (veth: the sender) lands on "
                        "(default 0: off; 64 is the kernel's usual budget)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xdpnet",
        description="Copy-free virtio-net for VMs: a vhost-user backend served by AF_XDP "
                    "sockets whose UMEM is the guest's own memory.",
        epilog="examples:\n"
               "  xdpnet demo                       # the end-to-end demo on a veth NIC\n"
               "  xdpnet attach eth1 --queue 0 --mac 52:54:00:12:34:56 --socket /run/vm1.sock\n"
               "  xdpnet top                        # what every VM and queue is doing\n"
               "  xdpnet serve --iface eth1 --queue 0 --mac 52:54:00:12:34:56 --socket /run/vm1.sock\n\n"
               "Run 'xdpnet COMMAND --help' for a command's options.\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"xdpnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _sub(sub, "demo", "attach a simulated VM to a veth NIC and show live stats",
             "Run the end-to-end demo on a veth NIC in a namespace.", DEMO_EPILOG)
    p.add_argument("--seconds", type=float, default=10.0, metavar="N",
                   help="how long the demo runs (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end, no table")
    _add_common(p)
    p.set_defaults(func=_cmd_demo)

    p = _sub(sub, "serve", "serve a VM's virtio-net on a NIC queue, in the foreground",
             "Serve one VM's virtio-net over AF_XDP (vhost-user server).", SERVE_EPILOG)
    p.add_argument("--iface", required=True, metavar="IF", help="the NIC")
    p.add_argument("--queue", "--queues", dest="queues", metavar="Q",
                   help="NIC queue(s) for the VM's queue pairs: 0, 2,5 or 0-3")
    p.add_argument("--port-pairs", type=int, default=0, metavar="N",
                   help="no NIC queue: N queue pairs served through the VM's port")
    _add_serving(p)
    p.add_argument("--name", help="register as this VM (xdpnet list, stats, top, detach)")
    _add_state_dir(p)
    _add_common(p)
    p.set_defaults(func=_cmd_serve)

    p = _sub(sub, "attach", "start serving a VM in the background (one process per VM)",
             "Attach a VM to NIC queues: start its xdpnet serve process and wait until it "
             "serves the vhost-user socket.", ATTACH_EPILOG)
    p.add_argument("iface", metavar="IFACE", help="the NIC")
    p.add_argument("--queue", "--queues", dest="queues", metavar="Q[,Q..]",
                   help="NIC queue of each queue pair: 0, 2,5 or 0-3")
    p.add_argument("--port-only", action="store_true",
                   help="no NIC queue: all traffic through the VM's port (with --pairs)")
    p.add_argument("--pairs", type=int, metavar="N", help="queue pairs of a --port-only VM")
    _add_serving(p)
    p.add_argument("--name", help="the VM's name (default: the socket file's name without "
                                  "extension)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="how long to wait for the VM to be served (default 60)")
    p.add_argument("--json", action="store_true", help="print the VM's record as JSON")
    _add_state_dir(p)
    _add_common(p)
    p.set_defaults(func=_cmd_attach)

    p = _sub(sub, "detach", "stop serving a VM and remove what it left",
             "Detach a VM: stop its serve process and clean up.", DETACH_EPILOG)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="SIGKILL after this many seconds (default 10)")
    _add_state_dir(p)
    _add_common(p)
    p.set_defaults(func=_cmd_detach)

    p = _sub(sub, "list", "list attached VMs", "List the attached VMs.", LIST_EPILOG)
    p.add_argument("--json", action="store_true", help="JSON (keys in docs/cli.md)")
    _add_state_dir(p)
    _add_common(p)
    p.set_defaults(func=_cmd_list)

    p = _sub(sub, "stats", "datapath counters per VM and queue pair",
             "Show counters of attached VMs per queue pair.", STATS_EPILOG)
    p.add_argument("name", metavar="NAME", nargs="?", help="only this VM")
    p.add_argument("--json", action="store_true", help="JSON (keys in docs/cli.md)")
    _add_state_dir(p)
    _add_common(p)
    p.set_defaults(func=_cmd_stats)

    from xdpnet.operator.dashboard import SORT_NAMES

    p = _sub(sub, "top", "live dashboard of every VM and queue pair",
             "Live dashboard: rates, zero-copy share, drops, rings per VM and queue pair.",
             TOP_EPILOG)
    p.add_argument("--interval", type=float, default=1.0, metavar="S",
                   help="refresh interval (default 1)")
    p.add_argument("--sort", choices=SORT_NAMES, default="vm", help="initial sort column")
    p.add_argument("--once", action="store_true",
                   help="print one screen (rates over one interval) and exit")
    p.add_argument("--iterations", type=int, default=0, metavar="N",
                   help="exit after N refreshes (default: until q)")
    _add_state_dir(p)
    _add_common(p)
    p.set_defaults(func=_cmd_top)

    from xdpnet.operator.metrics import DEFAULT_LISTEN

    p = _sub(sub, "metrics", "serve Prometheus metrics of every VM",
             "Serve the counters of every attached VM as Prometheus metrics.", METRICS_EPILOG)
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="ADDR:PORT",
                   help=f"where to listen (default {DEFAULT_LISTEN})")
    _add_state_dir(p)
    _add_common(p)
    p.set_defaults(func=_cmd_metrics)

    p = _sub(sub, "qemu-args", "QEMU options for an attached VM",
             "Print the QEMU options a VM needs to use its attachment.", QEMU_EPILOG)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--mem", default="1G", metavar="SIZE", help="guest RAM (default 1G)")
    p.add_argument("--id", default="net0", help="QEMU id of the netdev (default net0)")
    p.add_argument("--no-msix", action="store_true",
                   help="vectors=0: for QEMU 7.2 under TCG, which can crash with vhost-user "
                        "and MSI-X")
    p.add_argument("--json", action="store_true", help='{"args": [...]} instead of shell text')
    _add_state_dir(p)
    _add_common(p)
    p.set_defaults(func=_cmd_qemu_args)

    p = _sub(sub, "libvirt-xml", "libvirt domain XML for an attached VM",
             "Print the libvirt domain elements a VM needs to use its attachment.",
             LIBVIRT_EPILOG)
    p.add_argument("name", metavar="NAME")
    _add_state_dir(p)
    _add_common(p)
    p.set_defaults(func=_cmd_libvirt_xml)
    return parser


# ---- commands ------------------------------------------------------------------

def _cmd_demo(args: argparse.Namespace) -> int:
    from xdpnet.demo import DemoOptions, run

    return run(DemoOptions(seconds=args.seconds, json=args.json))


def _serve_options(args: argparse.Namespace, queues: str | None, port_pairs: int):
    from xdpnet.serve import ServeOptions, parse_queues

    # NIC queues vs port-only pairs: checked by serve.validate
    return ServeOptions(args.iface, parse_queues(queues) if queues is not None else (),
                        args.mac, args.socket, args.xdp_mode, args.max_frame, args.guest_mem,
                        args.socket_group, name=args.name, state_dir=args.state_dir,
                        port_pairs=port_pairs, busy_poll_us=args.busy_poll_us,
                        napi_budget=args.napi_budget)


def _cmd_serve(args: argparse.Namespace) -> int:
    from xdpnet.serve import run

    return run(_serve_options(args, args.queues, args.port_pairs))


def _cmd_attach(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from xdpnet.operator.registry import check_name
    from xdpnet.operator.snapshot import list_json
    from xdpnet.operator.spawn import attach

    if args.pairs is not None and not args.port_only:
        raise UsageError("--pairs is for --port-only VMs (a VM on NIC queues gets one pair "
                         "per queue)")
    if args.port_only and not args.pairs:
        raise UsageError("--port-only needs --pairs N")
    if args.name is None:
        args.name = os.path.splitext(os.path.basename(args.socket))[0]
    check_name(args.name)
    opts = _serve_options(args, args.queues, args.pairs if args.port_only else 0)
    opts = dataclasses.replace(opts, socket=os.path.abspath(opts.socket))
    rec = attach(opts, timeout=args.timeout, verbose=args.verbose)
    if args.json:
        print(json.dumps(list_json([rec])["vms"][0], indent=2))
    else:
        where = (f"{rec.iface} queue{'s' if len(rec.queues) > 1 else ''} "
                 f"{','.join(map(str, rec.queues))}" if rec.queues
                 else f"{rec.iface} port ({rec.port_pairs} pairs)")
        print(f"attached {rec.name}: {where}, MAC {rec.mac}, socket {rec.socket} "
              f"(pid {rec.pid}, XDP {rec.xdp_mode}, AF_XDP {rec.xsk_mode})")
        print(f"  QEMU options: xdpnet qemu-args {rec.name}    log: {rec.log}")
    return 0


def _cmd_detach(args: argparse.Namespace) -> int:
    from xdpnet.operator.spawn import detach

    res = detach(args.name, args.state_dir, args.timeout)
    how = {"dead": " (its process had died; leftovers removed)",
           "starting": " (it was still starting)"}.get(res.was, "")
    print(f"detached {res.name}{how}")
    if res.killed:
        print(f"xdpnet: {res.name} did not stop within {args.timeout:g} s: killed (SIGKILL)",
              file=sys.stderr)
    return 0


def _show(items: list, as_json: bool, to_json, to_table) -> int:
    """``list`` / ``stats`` output: JSON (always, even empty), else a table,
    or a line saying there is nothing."""
    if as_json:
        print(json.dumps(to_json(items), indent=2))
    elif not items:
        print("no VMs attached")
    else:
        _console().print(to_table(items))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from xdpnet.operator.dashboard import list_table
    from xdpnet.operator.registry import Registry
    from xdpnet.operator.snapshot import list_json

    return _show(Registry(args.state_dir).records(), args.json, list_json, list_table)


def _cmd_stats(args: argparse.Namespace) -> int:
    from xdpnet.operator.dashboard import stats_table
    from xdpnet.operator.registry import Registry
    from xdpnet.operator.snapshot import read_all, stats_json

    readings = read_all(Registry(args.state_dir), args.name)
    return _show(readings, args.json, stats_json, stats_table)


def _cmd_top(args: argparse.Namespace) -> int:
    from xdpnet.operator.dashboard import run
    from xdpnet.operator.registry import Registry

    if args.interval <= 0:
        raise UsageError(f"--interval {args.interval:g}: must be > 0")
    return run(Registry(args.state_dir), interval=args.interval, iterations=args.iterations,
               once=args.once, sort=args.sort, console=_console())


def _cmd_metrics(args: argparse.Namespace) -> int:
    from xdpnet.operator.metrics import serve
    from xdpnet.operator.registry import Registry

    return serve(Registry(args.state_dir), args.listen)


def _record(args: argparse.Namespace):
    from xdpnet.operator.registry import Registry

    return Registry(args.state_dir).get(args.name)


def _cmd_qemu_args(args: argparse.Namespace) -> int:
    from xdpnet.operator import snippets

    rec = _record(args)
    argv = snippets.qemu_args(rec.socket, rec.mac, rec.pairs, args.mem, name=args.id,
                              msix=not args.no_msix)
    print(json.dumps({"args": argv}) if args.json else snippets.qemu_text(argv))
    return 0


def _cmd_libvirt_xml(args: argparse.Namespace) -> int:
    from xdpnet.operator import snippets

    rec = _record(args)
    print(snippets.libvirt_xml(rec.socket, rec.mac, rec.pairs, vm=rec.name), end="")
    return 0


def _console():
    """A rich console; tables keep their natural width when piped."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=1000)


def _setup_logging(verbose: int, vhost_info: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="xdpnet: %(levelname)s: %(message)s",
                        stream=sys.stderr)
    if not verbose and not vhost_info:
        logging.getLogger("xdpnet.vhost").setLevel(logging.WARNING)
    # Our -v is about xdpnet, not pyroute2's netlink dumps.
    logging.getLogger("pyroute2").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    # A named serve runs in the background: its log shows frontends come and go.
    _setup_logging(args.verbose, vhost_info=args.command == "serve" and bool(args.name))
    try:
        return args.func(args)
    except XdpnetError as e:
        print(f"xdpnet: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:         # e.g. xdpnet stats | head
        return 0
