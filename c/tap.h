/* SPDX-License-Identifier: MIT */
/*
 * tap.h - the tap baseline: the same virtqueue code as the AF_XDP
 * datapath (virtq.c), with a tap device read() and written one frame per
 * system call instead of AF_XDP rings -- what QEMU's own virtio-net does
 * with a tap netdev and no vhost-net.  Used by tools/bench as the
 * baseline xdpnet's AF_XDP datapath is compared against.
 *
 * The tap fd is opened by the caller (IFF_TAP | IFF_NO_PI, without
 * IFF_VNET_HDR: frames are plain Ethernet); xn_tap_create() puts it in
 * non-blocking mode.  One loop (xn_tap_run) serves one rx and one tx
 * virtqueue on it, on its own thread, and sleeps in poll() when idle.
 *
 * Counters are the queue pair's struct xn_counters (xdpnet.h), so the
 * same readers work: every frame goes through a kernel copy (readv() into
 * the guest buffer, writev() out of it), and is counted in
 * rx_copied_* / tx_copied_* -- exactly the copies the tap path pays;
 * rx_zero_copy_frames and tx_zero_copy_frames stay 0.  tx_syscalls counts
 * writev() calls.  Frames the tap queue drops while the guest has no rx
 * buffer are the kernel's (tx_dropped of the tap device), not counted here.
 *
 * Each received frame goes into one guest rx chain (num_buffers is always
 * 1, also with MRG_RXBUF); a frame longer than the chain is dropped and
 * counted in drop_too_large.  Nothing is held between passes, so stopping
 * hands nothing back: xn_tap_quiesce() only reports the ring indexes.
 */
#ifndef XDPNET_TAP_H
#define XDPNET_TAP_H

#include <stdint.h>

#include "xdpnet.h"

/* ---- cdef begin ---- */

/* Everything one tap queue pair needs. */
struct xn_tap_config {
	const struct xn_memmap *mem;    /* guest memory (the UMEM map; no UMEM is registered) */
	struct xn_vring_config rx;      /* virtqueue 0: device writes */
	struct xn_vring_config tx;      /* virtqueue 1: device reads */
	uint64_t features;              /* negotiated virtio feature bits */
	struct xn_counters *counters;   /* the block the loop writes (as xn_qp_create's) */
	int32_t tap_fd;                 /* IFF_TAP | IFF_NO_PI, no IFF_VNET_HDR; caller owns it */
	uint32_t batch;                 /* max frames per direction per pass, 0 = 64 */
	uint32_t poll_timeout_ms;       /* idle poll() timeout, 0 = 250 */
	uint32_t pad0;
};

struct xn_tap;                      /* one tap queue pair's state */

int xn_tap_create(struct xn_tap **out, const struct xn_tap_config *cfg);
int xn_tap_run(struct xn_tap *t);
int xn_tap_stop(struct xn_tap *t);
int xn_tap_set_enabled(struct xn_tap *t, int ring, int enabled);
int xn_tap_set_call_fd(struct xn_tap *t, int ring, int fd);
int xn_tap_quiesce(struct xn_tap *t, uint16_t *rx_last_avail, uint16_t *tx_last_avail);
void xn_tap_destroy(struct xn_tap *t);

/* ---- cdef end ---- */

#endif /* XDPNET_TAP_H */
