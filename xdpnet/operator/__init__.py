"""The operator's side: VMs that outlive one command, and what shows them.

One ``xdpnet serve`` process per VM; they find each other through files
(docs/cli.md, "One process per VM"):

* :mod:`~xdpnet.operator.registry` - the VM records under ``/run/xdpnet/vms``;
* :mod:`~xdpnet.operator.spawn` - ``attach`` (validate, start serve detached,
  wait until ready) and ``detach``;
* :mod:`~xdpnet.operator.snapshot` - one reading of every VM's counter files,
  and the ``--json`` shapes;
* :mod:`~xdpnet.operator.dashboard` - ``xdpnet top`` and the tables of
  ``list`` and ``stats``;
* :mod:`~xdpnet.operator.metrics` - the Prometheus endpoint;
* :mod:`~xdpnet.operator.snippets` - QEMU options and libvirt XML.

Readers map counter files read-only and never lock: nothing here can
disturb a datapath.
"""
