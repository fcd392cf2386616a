/* SPDX-License-Identifier: MIT */
/*
 * xdpnet.h - the C datapath's public interface.
 *
 * This file is the single declaration of every structure shared between
 * C and Python: the cffi builder (xdpnet/_build_native.py) feeds the part
 * between the "cdef begin" and "cdef end" markers to ffi.cdef() verbatim,
 * so that part uses only fixed-width types, plain structs and integer
 * #defines.
 *
 * Layering: the control plane (Python) builds the guest-memory map and
 * the vring configuration, creates the UMEM and XSK sockets through the
 * xn_umem/xn_xsk calls, then runs one datapath loop (xn_qp_run) per
 * queue pair on its own thread with the GIL released.  The datapath never
 * calls back into Python; it publishes counters in memory Python reads.
 */
#ifndef XDPNET_H
#define XDPNET_H

#include <stdint.h>

/* ---- cdef begin ---- */

#define XN_MAX_REGIONS 8        /* memory regions in one table (vhost-user default) */
#define XN_VNET_HDR_LEN 12      /* struct virtio_net_hdr_v1: VERSION_1 or MRG_RXBUF */
#define XN_XDP_HEADROOM 256     /* XDP_PACKET_HEADROOM: the kernel adds it on rx */
#define XN_MAX_LOCAL_MACS 64    /* xn_qp_set_local_macs(): MACs of the other VMs */

/*
 * MAC addresses as u64 (xn_qp_config.vm_mac, xn_qp_set_local_macs()): the
 * six bytes in wire order at the start of a little-endian u64, the top
 * two bytes zero -- 52:54:00:12:34:56 is 0x563412005452.  The same
 * encoding as the vm_macs key of the BPF programs (bpf/), so one value
 * serves both; in Python: int.from_bytes(mac + b"\0\0", "little").
 */

/* Reasons a virtqueue was stopped (virtio NEEDS_RESET); xn_counters.broken. */
#define XN_BROKEN_NONE 0
#define XN_BROKEN_DESC_ADDR 1       /* descriptor outside guest memory */
#define XN_BROKEN_DESC_CHAIN 2      /* loop, or chain longer than the queue */
#define XN_BROKEN_DESC_INDIRECT 3   /* nested indirect, indirect with NEXT, bad table */
#define XN_BROKEN_DESC_DIRECTION 4  /* write-only on tx or read-only on rx */
#define XN_BROKEN_AVAIL_IDX 5       /* avail index more than the queue size ahead */
#define XN_BROKEN_DESC_HEAD 6       /* head index >= queue size */
#define XN_BROKEN_DESC_LEN 7        /* zero-length descriptor */
#define XN_BROKEN_MEMORY 8          /* guest memory vanished under us (file truncated: SIGBUS) */

/* Transport modes of an XSK socket. */
#define XN_XSK_MODE_AUTO 0      /* zero-copy if the driver can, else copy */
#define XN_XSK_MODE_COPY 1
#define XN_XSK_MODE_ZEROCOPY 2

/*
 * One guest memory region as placed in the UMEM range.  gpa/uva/size come
 * from VHOST_USER_SET_MEM_TABLE; umem_off is where the control plane
 * mapped the region inside the range.
 */
struct xn_region {
	uint64_t gpa;           /* guest physical address */
	uint64_t uva;           /* frontend (QEMU) user address */
	uint64_t size;          /* bytes */
	uint64_t umem_off;      /* offset of the region's first byte in the UMEM */
};

/*
 * The UMEM range: [lead pad][region 0]...[region n-1][bounce area].
 * The lead pad keeps "buffer + 12 - 256 - headroom" >= 0 for a buffer at
 * the start of guest RAM; the bounce area, owned by the backend, holds
 * frames that need one copy and keeps "fill + chunk" inside the UMEM for
 * buffers at the very end of guest RAM.
 */
struct xn_memmap {
	uint8_t *base;          /* first byte of the UMEM range in this process */
	uint64_t size;          /* bytes registered as the UMEM */
	uint32_t nregions;
	uint32_t chunk_size;    /* UMEM chunk size (unaligned mode) */
	uint32_t headroom;      /* UMEM headroom: max_frame = chunk - 256 - headroom */
	uint32_t max_frame;     /* largest frame the kernel may write (bytes) */
	uint64_t bounce_off;    /* offset of the bounce area (chunk-sized slots) */
	uint32_t bounce_slots;  /* number of slots in the bounce area */
	uint32_t pad0;
	struct xn_region regions[8];
};

/* One virtqueue as configured by the vhost-user frontend. */
struct xn_vring_config {
	uint32_t num;           /* queue size: a power of two <= 32768 */
	uint32_t enabled;       /* SET_VRING_ENABLE state */
	uint64_t desc_off;      /* UMEM offsets of the three ring parts */
	uint64_t avail_off;
	uint64_t used_off;
	uint16_t last_avail_idx;/* from SET_VRING_BASE */
	uint16_t pad0;
	int32_t kick_fd;        /* eventfd the guest signals; -1 = none */
	int32_t call_fd;        /* eventfd we signal; -1 = none */
};

/*
 * Counters of one queue pair.  Lives in memory the control plane maps
 * (possibly a shared file read by other processes); only the datapath
 * thread writes it, readers never lock.  Every field is a u64 so that a
 * reader sees each value whole.
 */
struct xn_counters {
	uint64_t rx_frames;             /* frames delivered to the guest */
	uint64_t rx_bytes;              /* their bytes, without the virtio header */
	uint64_t rx_zero_copy_frames;   /* written by the kernel/NIC into the guest buffer */
	uint64_t rx_copied_frames;      /* went through the bounce area */
	uint64_t rx_copied_bytes;
	uint64_t tx_frames;             /* frames the guest sent that left on the NIC */
	uint64_t tx_bytes;
	uint64_t tx_zero_copy_frames;   /* handed to the tx ring straight from guest memory */
	uint64_t tx_copied_frames;      /* linearised into the bounce area */
	uint64_t tx_copied_bytes;
	uint64_t drop_no_rx_buffer;     /* rx frames in a bounce slot with too few guest buffers
	                                   waiting (the kernel's own: kernel_fill_empty,
	                                   kernel_rx_ring_full; xdpnet/stats.py adds them up) */
	uint64_t drop_too_large;        /* rx frames the waiting guest buffers cannot hold (no
	                                   MRG_RXBUF), tx frames over a chunk (the kernel's own:
	                                   kernel_rx_dropped, see xdpnet/stats.py) */
	uint64_t drop_invalid_desc;     /* descriptors refused (queue then stops) */
	uint64_t drop_tx_error;         /* sendto() refused the frame (e.g. MTU) */
	uint64_t rx_notify;             /* call eventfd writes for the rx ring */
	uint64_t tx_notify;             /* call eventfd writes for the tx ring */
	uint64_t rx_kicks;              /* kick eventfd reads, rx ring */
	uint64_t tx_kicks;              /* kick eventfd reads, tx ring */
	uint64_t wakeups;               /* poll() returns */
	uint64_t tx_syscalls;           /* sendto() wake-ups of the kernel tx path */
	uint64_t fill_ring_used;        /* gauge: entries we posted the kernel has not consumed */
	uint64_t rx_ring_used;          /* gauge: rx ring entries waiting (gauges: both sockets) */
	uint64_t tx_ring_used;          /* gauge: tx ring entries the kernel has not taken */
	uint64_t rx_inflight;           /* gauge: guest rx buffers held by the backend */
	uint64_t tx_inflight;           /* gauge: guest tx chains held by the backend */
	uint64_t rx_used_idx;           /* gauge: used index of the rx ring */
	uint64_t tx_used_idx;
	uint64_t rx_broken;             /* XN_BROKEN_* reason the rx queue stopped, 0 = fine */
	uint64_t tx_broken;
	uint64_t kernel_rx_dropped;     /* XDP_STATISTICS summed over the pair's sockets, and
	                                   over earlier pairs on this block (keep counting
	                                   across a restart); rx_dropped includes the frames
	                                   counted in kernel_fill_empty (copy mode) */
	uint64_t kernel_rx_invalid;
	uint64_t kernel_tx_invalid;
	uint64_t kernel_rx_ring_full;
	uint64_t kernel_fill_empty;
	uint64_t kernel_tx_ring_empty;
	uint64_t rx_misplaced;          /* frames not at buffer + 12 (moved, counted as copied) */
	uint64_t rx_returned_empty;     /* rx buffers handed back unused (len 0) at a stop */
	uint64_t tx_lost_at_stop;       /* tx frames not completed when the queue stopped */
	uint64_t rx_rewound;            /* rx buffers given back by rewinding last_avail_idx */
	uint64_t rx_port_frames;        /* frames taken from the port socket's rx ring */
	uint64_t tx_port_frames;        /* frames sent on the port socket */
	uint64_t tx_spoofed;            /* tx frames dropped: source MAC not the VM's */
	uint64_t port_fill_ring_used;   /* gauge: fill_ring_used's share of the port socket */
	uint64_t reserved[5];           /* keeps the block at 48 u64 = 384 bytes */
};

/*
 * Everything one queue pair's datapath needs.  A pair has one or two
 * sockets over the same guest memory: the direct socket on a NIC queue
 * and the port socket on a queue of the VM's port device (see
 * docs/steering.md); at least one of them.
 */
struct xn_qp_config {
	const struct xn_memmap *mem;
	struct xn_xsk *xsk;             /* direct socket (NIC queue), NULL = none */
	struct xn_vring_config rx;      /* virtqueue 2i: device writes */
	struct xn_vring_config tx;      /* virtqueue 2i+1: device reads */
	uint64_t features;              /* negotiated virtio feature bits */
	uint32_t bounce_first;          /* first bounce slot this pair owns */
	uint32_t bounce_count;          /* slots it owns (split rx/tx inside) */
	uint32_t batch;                 /* max descriptors per ring pass, 0 = 64 */
	uint32_t poll_timeout_ms;       /* idle poll() timeout, 0 = 250 */
	uint32_t busy_poll_us;          /* keep polling this long after the last work */
	struct xn_xsk *port_xsk;        /* port socket, NULL = none */
	uint64_t vm_mac;                /* tx source MAC must be this (u64 MAC), 0 = no check */
	uint32_t port_fill_target;      /* rx buffers kept on the port fill ring when the pair
	                                   also has a direct socket; 0 = min(256, rx num / 4) */
	uint32_t napi_budget;           /* > 0: SO_PREFER_BUSY_POLL with this SO_BUSY_POLL_BUDGET
	                                   on the sockets; the thread runs the NIC queue's NAPI
	                                   itself while busy polling (busy_poll_us) */
};

struct xn_umem;                     /* a registered UMEM (libxdp) */
struct xn_xsk;                      /* one bound AF_XDP socket and its four rings */
struct xn_qp;                       /* one queue pair's datapath state */

int xn_umem_create(struct xn_umem **out, const struct xn_memmap *mem,
		   uint32_t fill_size, uint32_t comp_size);
void xn_umem_destroy(struct xn_umem *umem);
int xn_xsk_probe_zerocopy(const char *ifname, uint32_t queue);
int xn_xsk_create(struct xn_xsk **out, struct xn_umem *umem, const char *ifname,
		  uint32_t queue, uint32_t ring_size, int mode);
int xn_xsk_create_shared(struct xn_xsk **out, struct xn_umem *umem, const char *ifname,
			 uint32_t queue, uint32_t ring_size);
int xn_xsk_fd(const struct xn_xsk *xsk);
int xn_xsk_is_zerocopy(const struct xn_xsk *xsk);
void xn_xsk_destroy(struct xn_xsk *xsk);

int xn_qp_create(struct xn_qp **out, const struct xn_qp_config *cfg,
		 struct xn_counters *ctr);
int xn_qp_run(struct xn_qp *qp);
int xn_qp_stop(struct xn_qp *qp);
int xn_qp_set_enabled(struct xn_qp *qp, int ring, int enabled);
int xn_qp_set_call_fd(struct xn_qp *qp, int ring, int fd);
int xn_qp_drain(struct xn_qp *qp, uint32_t timeout_ms);
int xn_qp_quiesce(struct xn_qp *qp, uint16_t *rx_last_avail, uint16_t *tx_last_avail);
int xn_qp_set_local_macs(struct xn_qp *qp, const uint64_t *macs, uint32_t n);
int xn_qp_rx_trace(const struct xn_qp *qp, uint64_t *out, uint32_t max_pairs);
void xn_qp_destroy(struct xn_qp *qp);

/* Guest memory mapping helpers (memmap.c): Python's mmap cannot MAP_FIXED. */
int xn_mem_reserve(uint64_t size, uint64_t align, uint8_t **out);
int xn_mem_map_fd(uint8_t *addr, uint64_t size, int fd, uint64_t offset);
int xn_mem_map_anon(uint8_t *addr, uint64_t size);
int xn_mem_unmap(uint8_t *addr, uint64_t size);
int64_t xn_mem_fs_type(int fd);

/* ---- cdef end ---- */

#endif /* XDPNET_H */
