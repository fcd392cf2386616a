/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdpnet_port_rx.c - XDP on every port end (xn<I>v<N>p): hand each frame
 * that comes through the VM's port to the VM's port XSK.
 *
 * What arrives here was sent into the port's host end by xdpnet_nic.c
 * (unicast on a NIC queue the VM does not own), xdpnet_flood.c (wire
 * broadcast/multicast) or xdpnet_port_tx.c (another VM's frames).  The
 * port end's ifindex gives the VM (port_vm); the frame goes to
 * port_xsks[vm_id * 8 + rx queue] (a veth picks the receiving queue by
 * the sending CPU; every queue of a running VM has its socket).
 *
 *   port end unknown, queue >= 8, or no XSK there   -> PORT_NO_SOCKET, XDP_DROP
 *   otherwise                                       -> PORT_RX, redirect
 *
 * Frames are dropped, not passed: the port end has no stack worth
 * feeding.  Per-VM counters were taken where the frame entered the port.
 */
#include "xdpnet_maps.h"

int xdpnet_port_rx(struct xdp_md *ctx)
{
	u32 ifindex = ctx->ingress_ifindex;
	u32 queue = ctx->rx_queue_index;
	u32 *vm = port_vm.lookup(&ifindex);
	struct xn_vm_stat *vs;
	u32 vm_id, key;

	if (!vm)
		return xn_count(XN_V_PORT_NO_SOCKET, XDP_DROP);
	vm_id = *vm;
	key = vm_id * XN_PORT_QUEUES + queue;
	if (queue >= XN_PORT_QUEUES || !port_xsks.lookup(&key)) {
		vs = vm_stats.lookup(&vm_id);
		if (vs)
			vs->port_no_socket += 1;
		return xn_count(XN_V_PORT_NO_SOCKET, XDP_DROP);
	}
	xn_count(XN_V_PORT_RX, 0);
	return port_xsks.redirect_map(key, XDP_DROP);
}
