"""xdpnet command line: ``xdpnet COMMAND [options]``.

Every command prints one line ``xdpnet: error: ...`` and exits non-zero
on failure (codes in :mod:`xdpnet.errors`); ``--json`` outputs are
documented in docs/cli.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from xdpnet import __version__
from xdpnet.errors import EXIT_USAGE, XdpnetError

EXIT_CODES = """\
exit status:
  0  success
  1  runtime failure (the datapath or a peer failed)
  2  bad arguments or input (unknown interface, malformed MAC, bad queue)
  3  missing privilege (needs root / CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF, CAP_IPC_LOCK)
  4  a resource is busy (queue or interface already in use, socket path taken)
  5  a missing system dependency (bcc, kernel headers, libxdp)
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

Serves one VM: frames for MAC (and broadcast/multicast) arriving on the
given NIC queue(s) are written by the kernel (or the NIC) straight into
the VM's rx buffers; the VM's tx frames leave from its own memory.
Prints the QEMU options the VM needs, then serves until SIGINT/SIGTERM.
With N queues the VM gets N queue pairs (queues=N, mq=on in QEMU).

""" + EXIT_CODES


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging (-v: debug, including every vhost-user message)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xdpnet",
        description="Copy-free virtio-net for VMs: a vhost-user backend served by AF_XDP "
                    "sockets whose UMEM is the guest's own memory.",
        epilog="examples:\n"
               "  xdpnet demo                       # the end-to-end demo on a veth NIC\n"
               "  xdpnet serve --iface eth1 --queue 0 --mac 52:54:00:12:34:56 --socket /run/vm1.sock\n\n"
               "Run 'xdpnet COMMAND --help' for a command's options.\n\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"xdpnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="attach a simulated VM to a veth NIC and show live stats",
                       description="Run the end-to-end demo on a veth NIC in a namespace.",
                       epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, metavar="N",
                   help="how long the demo runs (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end, no table")
    _add_common(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("serve", help="serve a VM's virtio-net on a NIC queue (vhost-user backend)",
                       description="Serve one VM's virtio-net over AF_XDP (vhost-user server).",
                       epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iface", required=True, metavar="IF", help="the NIC")
    p.add_argument("--queue", "--queues", dest="queues", required=True, metavar="Q",
                   help="NIC queue(s) for the VM's queue pairs: 0, 2,5 or 0-3")
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
    _add_common(p)
    p.set_defaults(func=_cmd_serve)
    return parser


def _cmd_demo(args: argparse.Namespace) -> int:
    from xdpnet.demo import DemoOptions, run

    return run(DemoOptions(seconds=args.seconds, json=args.json))


def _cmd_serve(args: argparse.Namespace) -> int:
    from xdpnet.serve import ServeOptions, parse_queues, run

    return run(ServeOptions(args.iface, parse_queues(args.queues), args.mac, args.socket,
                            args.xdp_mode, args.max_frame, args.guest_mem, args.socket_group))


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="xdpnet: %(levelname)s: %(message)s",
                        stream=sys.stderr)
    if not verbose:
        logging.getLogger("xdpnet.vhost").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except XdpnetError as e:
        print(f"xdpnet: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
