/* SPDX-License-Identifier: MIT */
/*
 * frame.h - the test frame exchanged by the driver simulator and the wire
 * peer, so that every byte of a frame can be checked end to end.
 *
 * Layout: Ethernet header (dst, src, ethertype XN_FRAME_ETHERTYPE), then
 * struct xn_frame_meta, then payload bytes that are a function of
 * (flow, seq, offset).  Frames are at least XN_FRAME_MIN_LEN bytes.
 */
#ifndef XDPNET_FRAME_H
#define XDPNET_FRAME_H

#include <stdint.h>

/* ---- cdef begin ---- */

#define XN_FRAME_ETHERTYPE 0x88B5   /* IEEE 802 local experimental */
#define XN_FRAME_MAGIC 0x786E6574   /* "xnet" */
#define XN_FRAME_MIN_LEN 60         /* Ethernet minimum without FCS */
#define XN_FRAME_HDR_LEN 38         /* 14 Ethernet + 24 meta */

/* Result of checking one frame. */
struct xn_frame_info {
	uint32_t flow;          /* sender's flow id */
	uint32_t len;           /* frame length claimed by the sender */
	uint64_t seq;           /* sender's sequence number */
};

int xn_frame_build(uint8_t *buf, uint32_t len, const uint8_t *dst,
		   const uint8_t *src, uint32_t flow, uint64_t seq);
int xn_frame_check(const uint8_t *buf, uint32_t len, struct xn_frame_info *info);
void xn_frame_swap_mac(uint8_t *buf);

/* ---- cdef end ---- */

#endif /* XDPNET_FRAME_H */
