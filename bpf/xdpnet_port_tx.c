/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdpnet_port_tx.c - XDP on every port's host end (xn<I>v<N>h): route
 * the frames a VM sent on its port sockets.
 *
 * The host end's ifindex gives the VM (port_vm).  For every frame:
 *
 *   1. runt                                          -> TX_SHORT,    XDP_DROP
 *   2. source MAC not the VM's own (vms[vm].mac)     -> SPOOFED,     XDP_DROP
 *   3. destination a group address                  -> TX_GROUP: the NIC and
 *      every other VM's port (egress, BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS;
 *      each port's MTU caps what it takes)
 *   4. destination another VM's MAC (vm_macs):
 *        longer than that VM's max_frame            -> TX_TOO_LARGE, XDP_DROP
 *        else                                       -> INTERGUEST: egress[1 + vm]
 *      (never on the wire)
 *   5. otherwise                                    -> TX_WIRE: egress[0], the NIC
 *
 * Every key is looked up before bpf_redirect_map().
 */
#include "xdpnet_maps.h"

int xdpnet_port_tx(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	u32 len = data_end - data;
	u32 ifindex = ctx->ingress_ifindex;
	struct xn_vm_entry *dst;
	struct xn_vm_info *vm;
	struct xn_vm_stat *vs, *ds;
	u32 vm_id, dst_id, key;
	u64 mac;
	u32 *id;

	/* 1. runt */
	if (data + sizeof(*eth) > data_end)
		return xn_count(XN_V_TX_SHORT, XDP_DROP);

	/* 2. the sender must use its own MAC */
	id = port_vm.lookup(&ifindex);
	if (!id)
		return xn_count(XN_V_SPOOFED, XDP_DROP);
	vm_id = *id;
	vm = vms.lookup(&vm_id);
	vs = vm_stats.lookup(&vm_id);
	mac = xn_mac_key(eth->h_source);
	if (!vm || !vm->mac || vm->mac != mac) {
		if (vs)
			vs->spoofed += 1;
		return xn_count(XN_V_SPOOFED, XDP_DROP);
	}

	/* 3. group: the wire and every other VM */
	if (eth->h_dest[0] & 1) {
		if (vs)
			vs->tx_group_frames += 1;
		xn_count(XN_V_TX_GROUP, 0);
		return egress.redirect_map(XN_EGRESS_NIC,
					   BPF_F_BROADCAST | BPF_F_EXCLUDE_INGRESS);
	}

	/* 4. another VM on this NIC */
	mac = xn_mac_key(eth->h_dest);
	dst = vm_macs.lookup(&mac);
	if (dst && dst->vm_id != vm_id) {
		dst_id = dst->vm_id;
		ds = vm_stats.lookup(&dst_id);
		if (len > dst->max_frame) {
			if (ds)
				ds->too_large += 1;
			return xn_count(XN_V_TX_TOO_LARGE, XDP_DROP);
		}
		key = 1 + dst_id;
		if (egress.lookup(&key)) {
			if (vs)
				vs->tx_vm_frames += 1;
			if (ds) {
				ds->interguest_frames += 1;
				ds->interguest_bytes += len;
			}
			xn_count(XN_V_INTERGUEST, 0);
			return egress.redirect_map(key, XDP_DROP);
		}
	}

	/* 5. the wire */
	if (vs) {
		vs->tx_wire_frames += 1;
		vs->tx_wire_bytes += len;
	}
	key = XN_EGRESS_NIC;
	if (!egress.lookup(&key))           /* only while the NIC is torn down */
		return xn_count(XN_V_TX_WIRE, XDP_DROP);
	xn_count(XN_V_TX_WIRE, 0);
	return egress.redirect_map(key, XDP_DROP);
}
