/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdpnet_steer.c - steer frames arriving on a NIC to the AF_XDP socket
 * (XSK) of the VM they are addressed to, by destination MAC.
 *
 * Loaded and attached by xdpnet/steering/xdp.py (MacSteering, bcc).  For
 * every frame on the NIC, in this order:
 *
 *   1. runt (shorter than an Ethernet header)          -> SHORT,     XDP_PASS
 *   2. pick the target VM:
 *        destination MAC in vm_macs                    -> that VM (unicast)
 *        broadcast / multicast, a VM is registered     -> the flood VM
 *                                                         (config[0])
 *        anything else                                 -> TO_HOST,   XDP_PASS
 *   3. frame longer than the VM's max_frame            -> TOO_LARGE, XDP_DROP
 *   4. the queue the VM is served on has no XSK        -> NO_SOCKET, XDP_PASS
 *   5. bpf_redirect_map(xsks, queue)                   -> TO_VM / BROADCAST /
 *                                                         MULTICAST
 *
 * Every frame is counted in exactly one slot of `verdicts`, so the sum of
 * all slots is the number of frames the program saw.  Frames redirected to
 * or dropped for a VM are also counted in vm_stats[vm_id].
 *
 * This version serves one VM per NIC: the VM is served on whatever queue
 * the frame arrived on (target_queue()).  The multi-VM version keeps the
 * stages above and changes only how the target is picked (a VM's own
 * queue set instead of the arrival queue, a flood policy per VM).
 *
 * The map names, key and value layouts are an interface: Python reads and
 * writes them (xdpnet/steering/xdp.py) and later other processes will read
 * them pinned.  Change them only together.
 *
 * Style after xdp-project/xdp-tutorial advanced03-AF_XDP: look the XSKMAP
 * key up before bpf_redirect_map(); per-CPU counters, summed in user space.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>    /* not <linux/if_ether.h>: that one pulls
                                       in skbuff.h and costs bcc ~2.5 s */

#define XN_MAX_QUEUES 64        /* xsks: NIC rx queues */
#define XN_MAX_VMS 64           /* vm_stats: vm_id < XN_MAX_VMS */
#define XN_MAX_MACS 256         /* vm_macs: MAC addresses of all VMs */

/* Slots of `verdicts`; the names (lower case) are xdp.py's VERDICTS. */
enum xn_verdict {
	XN_V_TO_VM = 0,         /* unicast to a VM's MAC, redirected to its XSK */
	XN_V_TO_HOST,           /* not for a VM: XDP_PASS */
	XN_V_BROADCAST,         /* broadcast, redirected to the VM's XSK */
	XN_V_MULTICAST,         /* multicast, redirected to the VM's XSK */
	XN_V_TOO_LARGE,         /* longer than the VM's max_frame: XDP_DROP */
	XN_V_NO_SOCKET,         /* for a VM, but its queue has no XSK: XDP_PASS */
	XN_V_SHORT,             /* runt, shorter than 14 bytes: XDP_PASS */
	XN_V_SPOOFED,           /* reserved for the tx side */
	XN_V_MAX
};

/* vm_macs value.  Key: the 6 MAC bytes in wire order at the start of a
 * u64, the last two bytes zero. */
struct vm_entry {
	u32 vm_id;              /* < XN_MAX_VMS, index into vm_stats */
	u32 max_frame;          /* longest frame (bytes, from the dst MAC on) */
};

/* vm_stats value (per CPU). */
struct vm_stat {
	u64 frames;             /* redirected to the VM's XSK */
	u64 bytes;              /* their length */
	u64 too_large;          /* dropped: longer than max_frame */
};

/* config[0]: where broadcast and multicast frames go. */
struct steer_config {
	u32 flood_vm_id;        /* VM that receives broadcast/multicast */
	u32 flood_max_frame;    /* smallest max_frame registered; 0 = no VM:
	                           broadcast/multicast go to the host */
};

BPF_XSKMAP(xsks, XN_MAX_QUEUES);
BPF_HASH(vm_macs, u64, struct vm_entry, XN_MAX_MACS);
BPF_PERCPU_ARRAY(verdicts, u64, XN_V_MAX);
BPF_PERCPU_ARRAY(vm_stats, struct vm_stat, XN_MAX_VMS);
BPF_ARRAY(config, struct steer_config, 1);

static __always_inline int count(u32 verdict, int action)
{
	u64 *n = verdicts.lookup(&verdict);

	if (n)
		*n += 1;
	return action;
}

static __always_inline int is_broadcast(const unsigned char *m)
{
	return (m[0] & m[1] & m[2] & m[3] & m[4] & m[5]) == 0xff;
}

/* The XSK queue that serves this VM.  One VM per NIC: the arrival queue
 * (an XSK only receives frames of the queue it is bound to). */
static __always_inline u32 target_queue(struct xdp_md *ctx, u32 vm_id)
{
	return ctx->rx_queue_index;
}

int xdpnet_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	u32 len = data_end - data;
	u32 vm_id, max_frame, queue, verdict;
	struct vm_stat *vs;
	u64 mac = 0;

	/* 1. runt */
	if (data + sizeof(*eth) > data_end)
		return count(XN_V_SHORT, XDP_PASS);

	/* 2. target VM */
	__builtin_memcpy(&mac, eth->h_dest, ETH_ALEN);
	struct vm_entry *vm = vm_macs.lookup(&mac);
	if (vm) {
		vm_id = vm->vm_id;
		max_frame = vm->max_frame;
		verdict = XN_V_TO_VM;
	} else if (eth->h_dest[0] & 1) {        /* group bit: bcast or mcast */
		u32 zero = 0;
		struct steer_config *cfg = config.lookup(&zero);

		if (!cfg || cfg->flood_max_frame == 0)
			return count(XN_V_TO_HOST, XDP_PASS);
		vm_id = cfg->flood_vm_id;
		max_frame = cfg->flood_max_frame;
		verdict = is_broadcast(eth->h_dest) ? XN_V_BROADCAST
						    : XN_V_MULTICAST;
	} else {
		return count(XN_V_TO_HOST, XDP_PASS);
	}
	vs = vm_stats.lookup(&vm_id);

	/* 3. length (the kernel's own check against the UMEM headroom comes
	 * later and is only visible in the socket's rx_dropped) */
	if (len > max_frame) {
		if (vs)
			vs->too_large += 1;
		return count(XN_V_TOO_LARGE, XDP_DROP);
	}

	/* 4.+5. the VM's XSK on this queue; an entry exists only while a
	 * socket is bound to it */
	queue = target_queue(ctx, vm_id);
	if (!xsks.lookup(&queue))
		return count(XN_V_NO_SOCKET, XDP_PASS);
	if (vs) {
		vs->frames += 1;
		vs->bytes += len;
	}
	count(verdict, 0);
	return xsks.redirect_map(queue, XDP_PASS);
}
