/* SPDX-License-Identifier: MIT */
/*
 * wire.h - the peer on the wire side of a test bed, and the AF_XDP
 * throughput ceilings the datapath is measured against.
 *
 * The wire peer is an AF_PACKET socket on the namespace end of a veth
 * pair (Python creates the socket inside the namespace and passes its fd
 * in).  It sends, receives, reflects and floods the test frames of
 * frame.h, verifying every received byte with xn_frame_check() and
 * tracking duplicates and reordering per flow.
 *
 * The ceilings are AF_XDP sockets with their own anonymous UMEM (aligned
 * mode, XN_RXDROP_FRAMES chunks of XN_RXDROP_FRAME_SIZE bytes) built with
 * libxdp's xsk API: xn_rxdrop_* receives and drops (frames reach it
 * through an XSKMAP the caller fills with xn_rxdrop_fd()), xn_txpush_*
 * transmits pre-built test frames as fast as the kernel takes them.
 *
 * Every long-running call (recv, echo, flood, rxdrop run, txpush run)
 * ends early when another thread sets the "stop" field of the stats
 * structure it was given; a duration of 0 means "until stopped".  All
 * counters in the stats structures are added to, never reset, so one
 * structure can accumulate several calls.  Functions return 0 (or a
 * count) on success and -errno on failure.
 */
#ifndef XDPNET_WIRE_H
#define XDPNET_WIRE_H

#include <stdint.h>

/* ---- cdef begin ---- */

#define XN_WIRE_MAX_FLOWS 16        /* flows tracked for duplicates/reordering */
#define XN_WIRE_WINDOW 1024         /* sequence numbers remembered per flow */
#define XN_WIRE_BATCH 64            /* frames per sendmmsg/recvmmsg */
#define XN_WIRE_MAX_LEN 9216        /* longest frame sent or received */
#define XN_WIRE_FLOOD_RING 1024     /* flood frames carry seq 0..1023, repeating */
#define XN_WIRE_PING_FLOW 0x70696E67 /* "ping": flow id of pingpong frames */

#define XN_RXDROP_FRAMES 4096       /* UMEM chunks of the ceiling sockets */
#define XN_RXDROP_FRAME_SIZE 2048   /* chunk size (aligned mode) */

/* Duplicate/reordering state of one flow seen by a receiver. */
struct xn_wire_flow {
	uint32_t flow;          /* flow id carried by the frames */
	uint32_t used;          /* 1 once the slot belongs to @flow */
	uint64_t unique;        /* distinct sequence numbers verified */
	uint64_t lowest_seq;    /* lowest sequence number seen */
	uint64_t highest_seq;   /* highest sequence number seen */
	uint64_t duplicates;    /* frames whose seq was already seen */
	uint64_t out_of_order;  /* frames arriving after a higher seq */
	uint64_t window[16];    /* bit (seq % XN_WIRE_WINDOW): seen, for the last 1024 seqs */
};

/* Counters of one wire-peer call (or several: they are added to). */
struct xn_wire_stats {
	uint64_t tx_frames;     /* frames the kernel accepted */
	uint64_t tx_bytes;
	uint64_t tx_retries;    /* sendmmsg calls refused with ENOBUFS/EAGAIN, retried */
	uint64_t tx_errors;     /* frames refused for another reason (given up) */
	uint64_t rx_frames;     /* frames read from the socket (test and foreign) */
	uint64_t rx_bytes;
	uint64_t verified;      /* test frames that passed xn_frame_check() */
	uint64_t bad;           /* test frames that failed it (corrupt, wrong length, truncated) */
	uint64_t foreign;       /* frames that are not test frames */
	uint64_t duplicates;    /* verified frames whose (flow, seq) was seen before */
	uint64_t out_of_order;  /* verified frames that arrived after a higher seq */
	uint64_t untracked;     /* verified frames of flows beyond the 16 tracked */
	uint64_t syscalls;      /* sendmmsg/recvmmsg/poll calls */
	uint64_t elapsed_ns;    /* wall time spent in the call(s) */
	uint32_t stop;          /* set non-zero from another thread to end a call */
	uint32_t nflows;        /* slots used in @flows */
	struct xn_wire_flow flows[16];
};

/* Counters of an AF_XDP ceiling run (rx-drop or tx-push). */
struct xn_rxdrop_stats {
	uint64_t frames;        /* frames received (rx-drop) or completed (tx-push) */
	uint64_t bytes;
	uint64_t batches;       /* non-empty ring passes */
	uint64_t polls;         /* poll() calls while idle */
	uint64_t kicks;         /* wake-up syscalls (need_wakeup) */
	uint64_t elapsed_ns;
	uint64_t kernel_rx_dropped;     /* XDP_STATISTICS deltas over the run */
	uint64_t kernel_rx_invalid;
	uint64_t kernel_rx_ring_full;
	uint64_t kernel_fill_empty;
	uint64_t kernel_tx_invalid;
	uint64_t kernel_tx_ring_empty;
	uint32_t stop;          /* set non-zero from another thread to end the run */
	uint32_t zerocopy;      /* 1 if the socket is bound in zero-copy mode */
};

struct xn_rxdrop;           /* AF_XDP rx-drop receiver on one queue */
struct xn_txpush;           /* AF_XDP transmitter of pre-built test frames */

int xn_wire_setup(int fd, int ifindex);
int xn_wire_send(int fd, const uint8_t *dst, const uint8_t *src, uint32_t flow,
		 uint64_t seq0, uint64_t count, uint32_t len,
		 struct xn_wire_stats *stats);
int xn_wire_recv(int fd, int timeout_ms, uint64_t max_frames,
		 struct xn_wire_stats *stats);
int xn_wire_echo(int fd, uint32_t duration_ms, struct xn_wire_stats *stats);
int xn_wire_flood(int fd, const uint8_t *dst, const uint8_t *src, uint32_t flow,
		  uint32_t len, uint32_t duration_ms, struct xn_wire_stats *stats);
int xn_wire_pingpong(int fd, const uint8_t *dst, const uint8_t *src, uint32_t len,
		     uint32_t count, int timeout_ms, uint64_t *rtt_ns_out);

int xn_rxdrop_create(struct xn_rxdrop **out, const char *ifname, uint32_t queue);
int xn_rxdrop_fd(const struct xn_rxdrop *h);
int xn_rxdrop_is_zerocopy(const struct xn_rxdrop *h);
int xn_rxdrop_run(struct xn_rxdrop *h, uint32_t duration_ms,
		  struct xn_rxdrop_stats *stats);
void xn_rxdrop_destroy(struct xn_rxdrop *h);

int xn_txpush_create(struct xn_txpush **out, const char *ifname, uint32_t queue,
		     const uint8_t *dst, const uint8_t *src, uint32_t flow, uint32_t len);
int xn_txpush_fd(const struct xn_txpush *h);
int xn_txpush_is_zerocopy(const struct xn_txpush *h);
int xn_txpush_run(struct xn_txpush *h, uint32_t duration_ms,
		  struct xn_rxdrop_stats *stats);
void xn_txpush_destroy(struct xn_txpush *h);

/* ---- cdef end ---- */

#endif /* XDPNET_WIRE_H */
