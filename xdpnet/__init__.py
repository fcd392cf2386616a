"""xdpnet: copy-free virtio-net for VMs over AF_XDP and vhost-user."""

__version__ = "0.1.0"
