/* SPDX-License-Identifier: MIT */
/*
 * guest.h - the virtio-net driver simulator ("the guest"), per-frame part.
 *
 * The control plane (xdpnet/guest/) plays QEMU: it creates guest memory
 * (a memfd), lays out split virtqueues and buffers in it, negotiates with
 * the vhost-user backend, and creates one struct xn_guest per queue pair
 * from a struct xn_guest_config that names every address.  Everything per
 * frame happens here, with the GIL released: posting rx buffers, reaping
 * and verifying received frames, building and sending test frames,
 * reclaiming tx buffers, kicking the backend only when it asked for it and
 * sleeping on the call eventfds like an interrupt-driven driver.
 *
 * All offsets in the config are byte offsets into the caller's mapping of
 * guest memory (@mem, i.e. offsets into the memfd); the regions table says
 * which guest-physical address each offset has.  An object placed in guest
 * memory (a ring, a buffer, a table) never straddles two regions.
 *
 * Split ring layout (virtio 1.x 2.7): desc table 16-byte aligned, avail
 * ring (flags, idx, ring[num], used_event), used ring 4-byte aligned
 * (flags, idx, ring[num] of {id, len}, avail_event).  Little-endian host.
 */
#ifndef XDPNET_GUEST_H
#define XDPNET_GUEST_H

#include <stdint.h>

/* ---- cdef begin ---- */

#define XN_GUEST_MAX_REGIONS 8
#define XN_GUEST_GUARD_LEN 64       /* guard bytes before and after every rx segment */
#define XN_GUEST_TRACE_LEN 64       /* rx used entries remembered for xn_guest_rx_trace() */
#define XN_GUEST_MAX_QSIZE 32768
#define XN_GUEST_UNLIMITED 0xFFFFFFFFFFFFFFFF   /* tx_count: flood until the deadline */

/* xn_guest_config.flags */
#define XN_GUEST_F_INDIRECT 1       /* rx buffers and tx frames through indirect tables */
#define XN_GUEST_F_RX_CHAIN 2       /* rx buffers are 2-segment chains */
#define XN_GUEST_F_TX_HDR_SEPARATE 4 /* tx header in its own descriptor */
#define XN_GUEST_F_EVENT_IDX 8      /* VIRTIO_RING_F_EVENT_IDX negotiated */
#define XN_GUEST_F_MRG_RXBUF 16     /* VIRTIO_NET_F_MRG_RXBUF: num_buffers is valid */

/* xn_guest_run() flags */
#define XN_GUEST_RUN_REFLECT 1      /* send every verified rx frame back, MACs swapped */
#define XN_GUEST_RUN_UNTIL_DONE 2   /* return once tx is sent+completed and rx_target met */
#define XN_GUEST_RUN_BUSY_POLL 4    /* never sleep on the call eventfds */

/* rings of a pair, for xn_guest_kick() and xn_gvq_info() */
#define XN_GUEST_RX 0
#define XN_GUEST_TX 1

/* One guest memory region: [gpa, gpa + size) is mapping[offset ...]. */
struct xn_guest_region {
	uint64_t gpa;
	uint64_t size;
	uint64_t offset;        /* offset in the mapping (and the memfd) */
};

/* One virtqueue placed in guest memory. */
struct xn_gvq_config {
	uint64_t desc_off;      /* mapping offsets of the three parts */
	uint64_t avail_off;
	uint64_t used_off;
	uint32_t num;           /* queue size, a power of two */
	uint16_t base;          /* SET_VRING_BASE: first avail/used index */
	uint16_t pad0;
	int32_t kick_fd;        /* eventfd we signal (SET_VRING_KICK) */
	int32_t call_fd;        /* eventfd the backend signals (SET_VRING_CALL) */
};

/* One piece of guest memory (a buffer segment, a header, a table). */
struct xn_guest_seg {
	uint64_t off;           /* mapping offset */
	uint32_t len;
	uint32_t pad0;
};

/*
 * Everything one queue pair needs.  The arrays are copied by
 * xn_guest_create(); the memory they describe must stay mapped until
 * xn_guest_destroy().
 */
struct xn_guest_config {
	uint8_t *mem;           /* guest memory mapped in this process */
	uint64_t mem_size;
	uint32_t nregions;
	uint32_t flags;         /* XN_GUEST_F_* */
	struct xn_guest_region regions[8];
	struct xn_gvq_config rx;        /* virtqueue 2i */
	struct xn_gvq_config tx;        /* virtqueue 2i+1 */
	uint32_t hdr_len;       /* virtio-net header: 12 (VERSION_1 or MRG_RXBUF), else 10 */
	uint32_t nrx;           /* rx buffers */
	uint32_t rx_nseg;       /* segments per rx buffer: 1, or 2 with XN_GUEST_F_RX_CHAIN */
	uint32_t ntx;           /* tx slots */
	const struct xn_guest_seg *rx_segs;     /* nrx * rx_nseg, each with guards around */
	const struct xn_guest_seg *rx_ind;      /* nrx indirect tables (XN_GUEST_F_INDIRECT) */
	const struct xn_guest_seg *tx_hdr;      /* ntx headers (hdr_len bytes) */
	const struct xn_guest_seg *tx_frame;    /* ntx frame areas; with the header in the
						 * same descriptor tx_hdr[i].off + hdr_len
						 * must equal tx_frame[i].off */
	const struct xn_guest_seg *tx_ind;      /* ntx indirect tables (XN_GUEST_F_INDIRECT) */
	uint8_t mac[6];         /* our MAC: source of the frames we send */
	uint8_t pad0[2];
};

/*
 * Counters of one queue pair.  Only the thread running the pair writes
 * them; xn_guest_get_stats() copies them whole u64 by whole u64.
 */
struct xn_guest_stats {
	uint64_t rx_frames;             /* complete frames reaped (all used buffers of it) */
	uint64_t rx_verified;           /* ... that passed xn_frame_check() */
	uint64_t rx_bad;                /* ... that did not, had a bad header, or a bogus used id */
	uint64_t rx_bytes;              /* frame bytes, without the virtio-net header */
	uint64_t rx_short;              /* used entries shorter than the header */
	uint64_t rx_len_invalid;        /* used len larger than the buffer posted */
	uint64_t rx_merged;             /* frames spread over num_buffers > 1 */
	uint64_t rx_foreign;            /* verified frames whose destination is not our MAC */
	uint64_t rx_used;               /* used rx entries reaped */
	uint64_t rx_buffers_posted;     /* rx buffers made available (initial + reposts) */
	uint64_t tx_sent;               /* frames made available on the tx ring */
	uint64_t tx_bytes;              /* their frame bytes */
	uint64_t tx_completed;          /* tx used entries reaped */
	uint64_t tx_reflected;          /* of tx_sent: rx frames sent back (reflect mode) */
	uint64_t tx_reflect_drops;      /* rx frames not reflected: no free tx slot */
	uint64_t tx_no_slot;            /* send attempts that found the tx ring full */
	uint64_t tx_bad_used;           /* tx used entries naming no slot in flight */
	uint64_t tx_hdr_modified;       /* completed tx slots whose (device-readable)
					 * header the backend changed */
	uint64_t guard_violations;      /* changed guard bytes seen while reaping */
	uint64_t kicks;                 /* kick eventfd writes, both rings */
	uint64_t rx_kicks;
	uint64_t tx_kicks;
	uint64_t interrupts;            /* call eventfd reads that returned a count */
	uint64_t rx_interrupts;
	uint64_t tx_interrupts;
	uint64_t sleeps;                /* poll() calls that waited */
	uint64_t passes;                /* loop passes */
	uint64_t first_violation_gpa;   /* guest address of the first changed guard byte */
	uint64_t reserved[4];            /* keeps the block at 32 u64 */
};

/* One reaped rx used entry. */
struct xn_guest_trace {
	uint64_t gpa;           /* guest address of the buffer (its first segment) */
	uint32_t len;           /* used len written by the backend */
	uint16_t id;            /* descriptor head id */
	uint16_t buf;           /* rx buffer index */
};

/* Driver-side view of one virtqueue. */
struct xn_gvq_info {
	uint32_t num;
	uint16_t avail_idx;     /* our avail index (published) */
	uint16_t last_used;     /* used entries we have reaped */
	uint16_t used_idx;      /* used->idx in memory */
	uint16_t used_flags;    /* used->flags */
	uint16_t avail_event;   /* used ring's avail_event */
	uint16_t used_event;    /* avail ring's used_event */
	uint16_t avail_flags;
	uint16_t pad0;
	uint32_t inflight;      /* buffers made available and not yet reaped */
};

struct xn_guest;            /* one queue pair of the simulated driver */

int xn_guest_create(struct xn_guest **out, const struct xn_guest_config *cfg);
void xn_guest_destroy(struct xn_guest *g);
int xn_guest_kick(struct xn_guest *g, int ring);
int xn_guest_send(struct xn_guest *g, uint32_t count, uint32_t len,
		  const uint8_t *dst, uint32_t flow);
int xn_guest_poll(struct xn_guest *g, int timeout_ms, uint32_t flags);
int xn_guest_run(struct xn_guest *g, uint64_t duration_ms, uint64_t tx_count,
		 uint32_t tx_len, const uint8_t *dst, uint32_t flow,
		 uint64_t rx_target, uint32_t flags);
void xn_guest_stop(struct xn_guest *g);
void xn_guest_get_stats(const struct xn_guest *g, struct xn_guest_stats *out);
int xn_guest_rx_trace(const struct xn_guest *g, struct xn_guest_trace *out, uint32_t max);
int xn_guest_check_guards(const struct xn_guest *g, uint64_t *first_gpa);
uint64_t xn_guest_tx_seq(const struct xn_guest *g);
int xn_gvq_info(const struct xn_guest *g, int ring, struct xn_gvq_info *out);

/* ---- cdef end ---- */

#endif /* XDPNET_GUEST_H */
