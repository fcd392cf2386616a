/* SPDX-License-Identifier: GPL-2.0 */
/*
 * xdpnet_maps.h - the maps, verdicts and counters shared by the four
 * steering programs of one NIC (docs/steering.md):
 *
 *   xdpnet_nic.c      XDP on the NIC
 *   xdpnet_flood.c    TC clsact ingress on the NIC
 *   xdpnet_port_rx.c  XDP on every port end  (xn<I>v<N>p)
 *   xdpnet_port_tx.c  XDP on every host end  (xn<I>v<N>h)
 *
 * xdpnet/steering/nic.py compiles the four files as one bcc module (so
 * they share one copy of each map), pins every map and program under
 * /sys/fs/bpf/xdpnet/<ifname>/ and from then on every xdpnet process
 * uses the pins.  The names, key and value layouts below are an
 * interface: xdpnet/steering/maps.py mirrors them (ctypes) and checks the
 * key and value sizes of the pinned maps against its own.  Change them
 * only together, and bump XN_LAYOUT_VERSION.
 *
 * A MAC address as a map key or value: the 6 bytes in wire order at the
 * start of a u64, the last two bytes zero (mac_key()).
 */
#ifndef XDPNET_MAPS_H
#define XDPNET_MAPS_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>    /* not <linux/if_ether.h>: that one pulls
                                       in skbuff.h and costs bcc ~2.5 s */

#define XN_LAYOUT_VERSION 1
#define XN_MAX_QUEUES 64        /* NIC queues: queue_mask is a u64 */
#define XN_MAX_VMS 64           /* vm_id < XN_MAX_VMS */
#define XN_PORT_QUEUES 8        /* queues of a VM's port */
#define XN_EGRESS_NIC 0         /* egress slot of the NIC; VM N: 1 + N */

/*
 * Slots of `verdicts` (per CPU); the names (lower case) are maps.py's
 * VERDICTS.  Each program counts every frame it sees in exactly one of
 * its own slots, so the sum of a program's slots is the number of frames
 * it handled (the flood program counts copies).
 */
enum xn_verdict {
	/* xdpnet_nic.c */
	XN_V_TO_VM = 0,         /* unicast on a queue the VM owns -> its XSK */
	XN_V_TO_PORT,           /* unicast for a VM, other queue -> its port */
	XN_V_TO_HOST,           /* not for a VM: XDP_PASS */
	XN_V_BROADCAST,         /* XDP_PASS: host, and flooded by TC */
	XN_V_MULTICAST,         /* XDP_PASS: host, and flooded by TC */
	XN_V_TOO_LARGE,         /* longer than the VM's max_frame: XDP_DROP */
	XN_V_NO_SOCKET,         /* for a VM with no socket yet: XDP_PASS */
	XN_V_SHORT,             /* runt (< 14 bytes): XDP_PASS */
	/* xdpnet_flood.c (per copy) */
	XN_V_FLOODED,           /* a group frame cloned into a VM's port */
	XN_V_FLOOD_TOO_LARGE,   /* not cloned: longer than that VM's max_frame */
	/* xdpnet_port_rx.c */
	XN_V_PORT_RX,           /* -> the XSK of (VM, port queue) */
	XN_V_PORT_NO_SOCKET,    /* that port queue has no XSK: XDP_DROP */
	/* xdpnet_port_tx.c */
	XN_V_SPOOFED,           /* source MAC not the VM's: XDP_DROP */
	XN_V_INTERGUEST,        /* to another VM's port */
	XN_V_TX_WIRE,           /* to the NIC (the wire) */
	XN_V_TX_GROUP,          /* broadcast/multicast: NIC + every other port */
	XN_V_TX_TOO_LARGE,      /* interguest, longer than the peer's max_frame */
	XN_V_TX_SHORT,          /* runt sent by a VM: XDP_DROP */
	XN_V_MAX
};

/* vm_macs: MAC -> the VM (what the NIC program needs, in one lookup). */
struct xn_vm_entry {
	u32 vm_id;
	u32 max_frame;          /* longest frame (bytes, from the dst MAC on) */
	u64 queue_mask;         /* bit q: the VM owns NIC queue q */
};

/* vms: vm_id -> the VM (array; mac == 0: the slot is free). */
struct xn_vm_info {
	u64 mac;                /* mac_key() */
	u64 queue_mask;         /* NIC queues owned */
	u32 max_frame;
	u32 port_h;             /* ifindex of the port's host end (xn..h) */
	u32 port_p;             /* ifindex of the port end (xn..p) */
	u32 port_queues;        /* queues of the port end */
	/* user space only: the process that added the VM */
	u32 owner_pid;
	u32 ntuple_loc;         /* ethtool ntuple rule + 1, 0: none */
	u64 owner_start;        /* its start time (/proc/<pid>/stat field 22) */
};

/* vm_stats: vm_id -> counters (per CPU). */
struct xn_vm_stat {
	u64 direct_frames;      /* NIC -> XSK on a queue the VM owns */
	u64 direct_bytes;
	u64 port_frames;        /* NIC -> the VM's port (unicast) */
	u64 port_bytes;
	u64 flood_frames;       /* wire broadcast/multicast cloned into the port */
	u64 flood_bytes;
	u64 interguest_frames;  /* from another VM into the port */
	u64 interguest_bytes;
	u64 too_large;          /* dropped for this VM: longer than max_frame */
	u64 port_no_socket;     /* dropped on a port queue without XSK */
	u64 spoofed;            /* sent by the VM with a foreign source MAC */
	u64 tx_wire_frames;     /* sent on the port to the wire */
	u64 tx_wire_bytes;
	u64 tx_vm_frames;       /* sent on the port to another VM */
	u64 tx_group_frames;    /* broadcast/multicast sent on the port */
};

/* config[0] (user space only). */
struct xn_config {
	u32 version;            /* XN_LAYOUT_VERSION of the loaded programs */
	u32 nic_ifindex;
	u32 xdp_flags;          /* XDP_FLAGS_DRV_MODE or _SKB_MODE */
	u32 tc_flags;           /* bit 0: xdpnet created the clsact qdisc */
	u32 tc_handle;          /* the flood filter's handle and priority */
	u32 tc_prio;
};

/* bcc 0.26's BPF_DEVMAP has no lookup(): the same table with one, as its
 * BPF_XSKMAP has (the kernel allows lookups in a DEVMAP from XDP and TC). */
#define XN_DEVMAP(_name, _max_entries) \
struct _name##_table_t { \
	u32 key; \
	int leaf; \
	int * (*lookup) (u32 *); \
	u64 (*redirect_map) (int, int); \
	u32 max_entries; \
}; \
__attribute__((section("maps/devmap"))) \
struct _name##_table_t _name = { .max_entries = (_max_entries) }

BPF_HASH(vm_macs, u64, struct xn_vm_entry, XN_MAX_VMS);
BPF_ARRAY(vms, struct xn_vm_info, XN_MAX_VMS);
BPF_XSKMAP(nic_xsks, XN_MAX_QUEUES);
BPF_XSKMAP(port_xsks, XN_MAX_VMS * XN_PORT_QUEUES);  /* vm_id * 8 + queue */
XN_DEVMAP(egress, 1 + XN_MAX_VMS);     /* 0: the NIC, 1 + N: VM N's port */
BPF_HASH(port_vm, u32, u32, 2 * XN_MAX_VMS);  /* ifindex of either end -> vm */
BPF_ARRAY(config, struct xn_config, 1);
BPF_PERCPU_ARRAY(verdicts, u64, XN_V_MAX);
BPF_PERCPU_ARRAY(vm_stats, struct xn_vm_stat, XN_MAX_VMS);

static __always_inline int xn_count(u32 verdict, int action)
{
	u64 *n = verdicts.lookup(&verdict);

	if (n)
		*n += 1;
	return action;
}

static __always_inline u64 xn_mac_key(const unsigned char *m)
{
	u64 key = 0;

	__builtin_memcpy(&key, m, ETH_ALEN);
	return key;
}

static __always_inline int xn_is_broadcast(const unsigned char *m)
{
	return (m[0] & m[1] & m[2] & m[3] & m[4] & m[5]) == 0xff;
}

#endif /* XDPNET_MAPS_H */
