/* SPDX-License-Identifier: MIT */
/*
 * frame.c - build and verify the test frames described in frame.h.
 */
#include <errno.h>
#include <string.h>

#include "frame.h"

struct xn_frame_meta {
	uint32_t magic;
	uint32_t flow;
	uint64_t seq;
	uint32_t len;
	uint32_t sum;           /* checksum over the meta fields above */
} __attribute__((packed));

#define XN_PATTERN_MAX 9216      /* jumbo frames */

/*
 * The payload byte at offset @off of frame (@flow, @seq) is
 * key(flow, seq) ^ g(off): one table of g() and a word-wide xor make
 * building and checking a frame cost about a memcpy.
 */
static uint8_t g_table[XN_PATTERN_MAX] __attribute__((aligned(8)));
static int g_ready;

/* pattern_key() - the per-frame byte mixed into every payload byte. */
static inline uint8_t pattern_key(uint32_t flow, uint64_t seq)
{
	return (uint8_t)((seq * 131u) ^ (flow * 29u));
}

/* pattern_init() - fill the offset table once (idempotent, thread-safe). */
static void pattern_init(void)
{
	uint32_t i;

	if (__atomic_load_n(&g_ready, __ATOMIC_ACQUIRE))
		return;
	for (i = 0; i < XN_PATTERN_MAX; i++)
		g_table[i] = (uint8_t)((i * 7u) ^ (i >> 8));
	__atomic_store_n(&g_ready, 1, __ATOMIC_RELEASE);
}

/* meta_sum - a cheap checksum over the meta fields; Return: the sum. */
static uint32_t meta_sum(const struct xn_frame_meta *m)
{
	return m->magic ^ m->flow ^ (uint32_t)m->seq ^ (uint32_t)(m->seq >> 32) ^
	       (m->len * 2654435761u);
}

/**
 * xn_frame_build() - write a test frame of @len bytes into @buf
 * @buf:	destination, at least @len bytes
 * @len:	frame length, XN_FRAME_MIN_LEN or more
 * @dst:	destination MAC (6 bytes)
 * @src:	source MAC (6 bytes)
 * @flow:	flow id carried in the frame
 * @seq:	sequence number carried in the frame
 *
 * Return: @len, or -EINVAL if @len is too short.
 */
int xn_frame_build(uint8_t *buf, uint32_t len, const uint8_t *dst,
		   const uint8_t *src, uint32_t flow, uint64_t seq)
{
	struct xn_frame_meta m;
	uint32_t i;

	if (len < XN_FRAME_MIN_LEN || len > XN_PATTERN_MAX)
		return -EINVAL;
	pattern_init();
	memcpy(buf, dst, 6);
	memcpy(buf + 6, src, 6);
	buf[12] = XN_FRAME_ETHERTYPE >> 8;
	buf[13] = XN_FRAME_ETHERTYPE & 0xff;
	m.magic = XN_FRAME_MAGIC;
	m.flow = flow;
	m.seq = seq;
	m.len = len;
	m.sum = meta_sum(&m);
	memcpy(buf + 14, &m, sizeof(m));
	{
		uint64_t k = 0x0101010101010101ULL * pattern_key(flow, seq), w;

		for (i = XN_FRAME_HDR_LEN; i + 8 <= len; i += 8) {
			memcpy(&w, g_table + i, 8);
			w ^= k;
			memcpy(buf + i, &w, 8);
		}
		for (; i < len; i++)
			buf[i] = g_table[i] ^ (uint8_t)k;
	}
	return (int)len;
}

/**
 * xn_frame_check() - verify a received test frame byte for byte
 * @buf:	frame start (Ethernet header)
 * @len:	bytes received
 * @info:	filled with flow, seq and length on success (may be NULL)
 *
 * Return: 0 if the frame is intact, -EPROTO if it is not a test frame,
 * -EBADMSG if its length or any payload byte is wrong.
 */
int xn_frame_check(const uint8_t *buf, uint32_t len, struct xn_frame_info *info)
{
	struct xn_frame_meta m;
	uint32_t i;

	if (len < XN_FRAME_HDR_LEN)
		return -EPROTO;
	if (buf[12] != (XN_FRAME_ETHERTYPE >> 8) || buf[13] != (XN_FRAME_ETHERTYPE & 0xff))
		return -EPROTO;
	memcpy(&m, buf + 14, sizeof(m));
	if (m.magic != XN_FRAME_MAGIC || m.sum != meta_sum(&m))
		return -EPROTO;
	if (m.len != len)
		return -EBADMSG;
	if (len > XN_PATTERN_MAX)
		return -EBADMSG;
	pattern_init();
	{
		uint64_t k = 0x0101010101010101ULL * pattern_key(m.flow, m.seq), a, b;

		for (i = XN_FRAME_HDR_LEN; i + 8 <= len; i += 8) {
			memcpy(&a, buf + i, 8);
			memcpy(&b, g_table + i, 8);
			if ((a ^ b) != k)
				return -EBADMSG;
		}
		for (; i < len; i++)
			if ((uint8_t)(buf[i] ^ g_table[i]) != (uint8_t)k)
				return -EBADMSG;
	}
	if (info) {
		info->flow = m.flow;
		info->len = m.len;
		info->seq = m.seq;
	}
	return 0;
}

/* xn_frame_swap_mac() - exchange destination and source MAC in place. */
void xn_frame_swap_mac(uint8_t *buf)
{
	uint8_t tmp[6];

	memcpy(tmp, buf, 6);
	memcpy(buf, buf + 6, 6);
	memcpy(buf + 6, tmp, 6);
}
