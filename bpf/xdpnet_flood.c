/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdpnet_flood.c - TC (clsact ingress, direct action) on the NIC: give
 * every VM a copy of the broadcast and multicast frames from the wire.
 *
 * xdpnet_nic.c passes group frames to the host (XDP can pass or redirect
 * a frame, not both); they reach this program as skbs.  For each VM with
 * a port (vms[vm_id].port_h != 0) whose first port queue has a socket (as
 * for unicast in xdpnet_nic.c) the frame is cloned with
 * bpf_clone_redirect() into the egress of the port's host end, from where
 * it arrives on the port end and xdpnet_port_rx.c hands it to the VM's
 * port XSK.  The original goes on to the host stack (TC_ACT_OK), so the
 * host keeps its broadcast.
 *
 * Verdicts (per copy): FLOODED, or FLOOD_TOO_LARGE when the frame is
 * longer than that VM's max_frame (no copy; vm_stats too_large).  Unicast
 * frames and runts are left alone and not counted (xdpnet_nic.c counted
 * them).
 */
#include "xdpnet_maps.h"
#include <uapi/linux/pkt_cls.h>

int xdpnet_flood(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	u32 len = skb->len;
	u32 i, key;

	if (data + sizeof(*eth) > data_end)
		return TC_ACT_OK;
	if (!(eth->h_dest[0] & 1))
		return TC_ACT_OK;

	/* bpf_clone_redirect() invalidates packet pointers: from here on
	 * only skb->len (read above) and the maps are used. */
	for (i = 0; i < XN_MAX_VMS; i++) {
		u32 id = i;
		struct xn_vm_info *vm = vms.lookup(&id);
		struct xn_vm_stat *vs;

		if (!vm || !vm->port_h)
			continue;
		key = id * XN_PORT_QUEUES;      /* no socket yet: no copy */
		if (!port_xsks.lookup(&key))
			continue;
		vs = vm_stats.lookup(&id);
		if (len > vm->max_frame) {
			if (vs)
				vs->too_large += 1;
			xn_count(XN_V_FLOOD_TOO_LARGE, 0);
			continue;
		}
		if (bpf_clone_redirect(skb, vm->port_h, 0) == 0) {
			if (vs) {
				vs->flood_frames += 1;
				vs->flood_bytes += len;
			}
			xn_count(XN_V_FLOODED, 0);
		}
	}
	return TC_ACT_OK;
}
