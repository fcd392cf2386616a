/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdpnet_nic.c - XDP on the NIC: steer every frame that arrives on the
 * NIC to the VM it is addressed to (docs/steering.md).
 *
 * For every frame, in this order (one verdict each, see xdpnet_maps.h):
 *
 *   1. runt (shorter than an Ethernet header)        -> SHORT,     XDP_PASS
 *   2. destination is a group address                -> BROADCAST /
 *                                                       MULTICAST, XDP_PASS
 *      (the host gets it; xdpnet_flood.c, at TC ingress, clones it into
 *      every VM's port: XDP cannot both pass and redirect a frame)
 *   3. destination MAC not in vm_macs                -> TO_HOST,   XDP_PASS
 *   4. longer than the VM's max_frame                -> TOO_LARGE, XDP_DROP
 *   5. the arrival queue is one the VM owns and has
 *      an XSK                                        -> TO_VM: nic_xsks[queue]
 *      (an XSK only receives the frames of its own device and queue)
 *   6. the VM's port has a socket on port queue 0    -> TO_PORT: egress[1 + vm]
 *      (the frame is sent into the port's host end and arrives on the port
 *      end, where xdpnet_port_rx.c hands it to the VM's port XSK)
 *   7. otherwise (the VM runs no socket yet)         -> NO_SOCKET, XDP_PASS
 *
 * Frames for a VM are also counted in vm_stats[vm_id].  Every key is
 * looked up before bpf_redirect_map(), so a redirect never fails on a
 * missing entry.
 */
#include "xdpnet_maps.h"

int xdpnet_nic(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	u32 len = data_end - data;
	struct xn_vm_entry *vm;
	struct xn_vm_stat *vs;
	u32 vm_id, queue, key;
	u64 mac;

	/* 1. runt */
	if (data + sizeof(*eth) > data_end)
		return xn_count(XN_V_SHORT, XDP_PASS);

	/* 2. group: the host, and TC floods it to the VMs */
	if (eth->h_dest[0] & 1)
		return xn_count(xn_is_broadcast(eth->h_dest) ? XN_V_BROADCAST
							     : XN_V_MULTICAST, XDP_PASS);

	/* 3. which VM */
	mac = xn_mac_key(eth->h_dest);
	vm = vm_macs.lookup(&mac);
	if (!vm)
		return xn_count(XN_V_TO_HOST, XDP_PASS);
	vm_id = vm->vm_id;
	vs = vm_stats.lookup(&vm_id);

	/* 4. length (the kernel's own check against the UMEM headroom comes
	 * later and is only visible in the socket's rx_dropped) */
	if (len > vm->max_frame) {
		if (vs)
			vs->too_large += 1;
		return xn_count(XN_V_TOO_LARGE, XDP_DROP);
	}

	/* 5. direct: a queue the VM owns, with its socket */
	queue = ctx->rx_queue_index;
	if (queue < XN_MAX_QUEUES && (vm->queue_mask >> queue) & 1 &&
	    nic_xsks.lookup(&queue)) {
		if (vs) {
			vs->direct_frames += 1;
			vs->direct_bytes += len;
		}
		xn_count(XN_V_TO_VM, 0);
		return nic_xsks.redirect_map(queue, XDP_PASS);
	}

	/* 6. through the VM's port */
	key = vm_id * XN_PORT_QUEUES;
	if (vm_id < XN_MAX_VMS && port_xsks.lookup(&key)) {
		key = 1 + vm_id;
		if (egress.lookup(&key)) {
			if (vs) {
				vs->port_frames += 1;
				vs->port_bytes += len;
			}
			xn_count(XN_V_TO_PORT, 0);
			return egress.redirect_map(key, XDP_PASS);
		}
	}

	/* 7. the VM has no socket yet */
	return xn_count(XN_V_NO_SOCKET, XDP_PASS);
}
