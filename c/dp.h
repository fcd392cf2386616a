/* SPDX-License-Identifier: MIT */
/*
 * dp.h - internal state of the backend datapath, shared by virtq.c
 * (split-ring helpers), rx.c, tx.c, qp.c (the run loop) and xsk.c.
 *
 * Not part of the Python-visible API: nothing here is in a cdef section.
 */
#ifndef XDPNET_DP_H
#define XDPNET_DP_H

#include <setjmp.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <xdp/xsk.h>

#include "xdpnet.h"

/* The split ring layout, flags and event-index test come from the kernel's
 * uapi headers (virtio 1.x is little-endian, like the hosts we run on). */
#include <linux/virtio_net.h>
#include <linux/virtio_ring.h>

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "virtio 1.x is little-endian");
_Static_assert(sizeof(struct virtio_net_hdr_v1) == XN_VNET_HDR_LEN, "virtio_net_hdr_v1 layout");

#ifndef SOL_XDP
#define SOL_XDP 283             /* older libc headers lack it */
#endif

/* --- UMEM and XSK -------------------------------------------------------- */

struct xn_umem {
	struct xsk_umem *umem;
	struct xsk_ring_prod fill;      /* rings made at registration, handed */
	struct xsk_ring_cons comp;      /* to the first socket bound on it */
	const struct xn_memmap *mem;
	int nsockets;                   /* sockets bound on it now */
	bool bound_once;                /* its first socket took fill/comp: never again */
	int zerocopy;                   /* mode of the first socket: shared ones inherit it */
};

struct xn_xsk {
	struct xsk_socket *xsk;
	struct xn_umem *umem;
	struct xsk_ring_cons rx;
	struct xsk_ring_prod tx;
	struct xsk_ring_prod fill;
	struct xsk_ring_cons comp;
	uint32_t ring_size;
	int zerocopy;
};

/* --- descriptor chains --------------------------------------------------- */

#define XN_MAX_SEGS 64          /* segments kept per chain (Linux guests use <= 19) */

/* One piece of a descriptor chain, translated into the UMEM. */
struct xn_seg {
	uint64_t off;           /* UMEM offset */
	uint32_t len;
};

/* A walked descriptor chain: adjacent contiguous pieces are merged. */
struct xn_chain {
	uint16_t head;
	uint16_t nseg;
	uint32_t total;
	struct xn_seg seg[XN_MAX_SEGS];
};

/* One virtqueue as the device sees it. */
struct xn_vq {
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t *used_event;   /* &avail->ring[num] */
	uint16_t *avail_event;  /* (uint16_t *)&used->ring[num] */
	uint32_t num;
	uint16_t last_avail;    /* next avail entry to take */
	uint16_t avail_idx;     /* cached avail->idx */
	uint16_t used_idx;      /* shadow used->idx (published with release) */
	uint16_t signalled;     /* used idx at the last notification */
	bool signalled_valid;
	bool event_idx;
	bool indirect;
	bool device_writes;     /* rx: descriptors must be device-writable */
	int enabled;            /* atomic: SET_VRING_ENABLE */
	int kick_fd;
	int call_fd;            /* atomic: SET_VRING_CALL may swap it */
	uint64_t *broken;       /* &counters->rx_broken / tx_broken */
	uint64_t *notify_ctr;
	uint64_t *kick_ctr;
};

/* Open-addressing map from fill address to the rx head posted with it. */
struct xn_rxmap {
	uint64_t *key;          /* fill address + 1 (0 = empty) */
	uint64_t *val;          /* head | (take sequence << 16) */
	uint32_t mask;
	uint32_t count;
};

/* A tx frame handed to the kernel, matched with its completion by order. */
struct xn_txent {
	uint64_t addr;          /* UMEM offset handed to the tx ring */
	uint16_t head;
	uint16_t pad;
	int32_t slot;           /* bounce slot, -1 for zero-copy */
};

#define XN_TRACE_LEN 64

/* The sockets of a queue pair, by role. */
enum { XN_SOCK_DIRECT = 0, XN_SOCK_PORT = 1, XN_NSOCK = 2 };

/*
 * One socket of a queue pair and its tx frames in flight.  Completions of
 * a socket come back in its submission order, so each socket keeps its own
 * FIFO; the rx side needs nothing per socket (the rxmap is keyed by fill
 * address, unique across both fill rings).
 */
struct xn_sock {
	struct xn_xsk *xsk;     /* NULL: the pair has no such socket */
	struct xn_txent *txq;   /* submitted, not yet completed (FIFO) */
	uint32_t txq_head, txq_count, txq_cap;
	uint32_t tx_pending;    /* descriptors written this batch, not yet submitted */
	uint32_t fill_target;   /* most fill entries kept posted, 0 = as many as fit */
	bool tx_kick_needed;
};

/* A table of u64 MACs (xdpnet.h), as set by xn_qp_set_local_macs(). */
struct xn_mactab {
	uint32_t n;
	uint64_t mac[XN_MAX_LOCAL_MACS];
};

/* A recovery point for SIGBUS in guest memory (fault.c). */
struct xn_fault_guard {
	sigjmp_buf jb;
	uintptr_t lo, hi;       /* the UMEM range it covers */
};

void xn_fault_arm(struct xn_fault_guard *g, const struct xn_memmap *mem);
void xn_fault_disarm(void);
int xn_fault_caught(struct xn_qp *qp);

struct xn_qp {
	struct xn_qp_config cfg;
	const struct xn_memmap *mem;
	struct xn_sock sock[XN_NSOCK];
	struct xn_counters *ctr;
	struct xn_vq rx;
	struct xn_vq tx;
	uint32_t batch;
	int stop_fd;            /* eventfd: xn_qp_stop() */
	int stopping;           /* atomic */
	bool mrg_rxbuf;
	bool mem_fault;         /* guest memory vanished (SIGBUS): never touch it again */

	/* rx avail entries taken so far: numbers each taken buffer, so that a
	 * stop knows exactly how long ago each held one was taken (16-bit
	 * avail indexes wrap while a port buffer waits for a frame) */
	uint64_t rx_seq;

	/* rx */
	struct xn_rxmap rxmap;
	uint16_t *slow_fifo;    /* heads waiting for a bounce frame (FIFO) */
	uint64_t *slow_seq;     /* their take sequences (xn_qp.rx_seq) */
	uint32_t slow_head, slow_count, slow_cap;
	uint32_t *rx_free_slots;/* free rx bounce slots (stack) */
	uint32_t rx_nfree;
	uint32_t rx_slot_first, rx_slot_count;
	bool rx_stalled;        /* refill waits for a bounce slot or map room: set by
				 * rx refill, cleared when rx receive frees one */

	/* tx */
	uint32_t *tx_free_slots;
	uint32_t tx_nfree;
	uint32_t tx_slot_first, tx_slot_count;
	uint64_t vm_mac;        /* tx source MAC must be this, 0 = no check */

	/* local MACs: written by xn_qp_set_local_macs() (double buffer,
	 * qp.c), copied into `local` by the datapath once per tx batch */
	struct xn_mactab macs[2];
	uint32_t macs_gen;      /* atomic: macs[macs_gen & 1] is current */
	int macs_lock;          /* atomic: serialises writers */
	struct xn_mactab local; /* the datapath's copy */
	uint32_t local_gen;

	/* scratch for walked chains (rx bounce may gather up to 8) */
	struct xn_chain scratch[8];

	/* XDP_STATISTICS of earlier pairs on the same counter block: the
	 * kernel_* counters are this plus the current sockets' sums */
	struct xdp_statistics kbase;

	/* diagnostics */
	uint64_t trace[XN_TRACE_LEN * 2];  /* (rx desc data addr, posted buffer) */
	uint32_t trace_pos;
	uint64_t last_stats_ns;
};

/* virtq.c */
int xn_vq_init(struct xn_vq *vq, const struct xn_memmap *mem,
	       const struct xn_vring_config *c, uint64_t features, bool device_writes);
int xn_vq_avail(struct xn_vq *vq);
int xn_vq_walk(const struct xn_memmap *mem, struct xn_vq *vq, uint16_t head,
	       struct xn_chain *ch);
void xn_vq_used_add(struct xn_vq *vq, uint16_t head, uint32_t len);
void xn_vq_used_publish(struct xn_vq *vq);
void xn_vq_notify(struct xn_vq *vq);
void xn_vq_enable_kick(struct xn_vq *vq, bool enable);
void xn_vq_break(struct xn_vq *vq, int reason);
int xn_vq_init_pair(struct xn_vq *rx, struct xn_vq *tx, const struct xn_memmap *mem,
		    const struct xn_vring_config *rxc, const struct xn_vring_config *txc,
		    uint64_t features, struct xn_counters *ctr);
void xn_vq_flush(struct xn_vq *vq);
void xn_vq_set_enabled(struct xn_vq *vq, int enabled);
void xn_vq_set_call_fd(struct xn_vq *vq, int fd);
void xn_efd_signal(int fd);
bool xn_efd_drain(int fd);
int xn_translate(const struct xn_memmap *mem, uint64_t gpa, uint64_t len, uint64_t *off);
uint32_t xn_chain_read(const struct xn_memmap *mem, const struct xn_chain *ch, uint32_t skip,
		       uint8_t *dst, uint32_t len);
uint32_t xn_chain_write(const struct xn_memmap *mem, const struct xn_chain *ch, uint32_t skip,
			const uint8_t *src, uint32_t len);

/* qp.c */
bool xn_qp_local_mac(struct xn_qp *qp, uint64_t mac);
void xn_qp_local_macs_sync(struct xn_qp *qp);

/* rx.c */
int xn_rx_receive(struct xn_qp *qp);
int xn_rx_refill(struct xn_qp *qp);
uint32_t xn_rx_fill_room(struct xn_qp *qp, struct xn_sock *s);
int xn_rxmap_init(struct xn_rxmap *m, uint32_t entries);
void xn_rxmap_free(struct xn_rxmap *m);

/* tx.c */
int xn_tx_complete(struct xn_qp *qp);
int xn_tx_send(struct xn_qp *qp);
int xn_tx_kick(struct xn_qp *qp);
void xn_tx_abandon(struct xn_qp *qp);
uint32_t xn_tx_inflight(const struct xn_qp *qp);

/* xn_mac_u64() - the u64 form (xdpnet.h) of the MAC at @p. */
static inline uint64_t xn_mac_u64(const uint8_t *p)
{
	uint64_t v = 0;

	memcpy(&v, p, 6);
	return v;
}

#define XN_ACCESS_ONCE(x) (*(volatile __typeof__(x) *)&(x))

/* xn_umem_ptr() - Return: the address in this process of UMEM offset
 * @off (the caller checked it is inside the range). */
static inline uint8_t *xn_umem_ptr(const struct xn_memmap *mem, uint64_t off)
{
	return mem->base + off;
}

/* xn_slot_off() - Return: the UMEM offset of bounce slot @slot. */
static inline uint64_t xn_slot_off(const struct xn_memmap *mem, uint32_t slot)
{
	return mem->bounce_off + (uint64_t)slot * mem->chunk_size;
}

/* xn_vq_head() - Return: the head index in the avail entry at
 * last_avail (read once: the guest may rewrite it; the caller checked
 * with xn_vq_avail() that the entry is available). */
static inline uint16_t xn_vq_head(struct xn_vq *vq)
{
	return XN_ACCESS_ONCE(vq->avail->ring[vq->last_avail & (vq->num - 1)]);
}

/* xn_ceil_pow2() - Return: the smallest power of two >= @v (at least 1). */
static inline uint32_t xn_ceil_pow2(uint32_t v)
{
	uint32_t p = 1;

	while (p < v)
		p <<= 1;
	return p;
}

#endif /* XDPNET_DP_H */
