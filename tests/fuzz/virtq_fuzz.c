// SPDX-License-Identifier: MIT
/*
 * virtq_fuzz.c - libFuzzer harness over the C virtqueue parsing (c/virtq.c)
 *
 * The input is a guest: its first bytes pick the queue (size, EVENT_IDX,
 * INDIRECT_DESC, direction, last_avail_idx), the rest is written over two
 * guest memory regions holding the descriptor table, the avail ring, the
 * indirect tables and buffers.  The harness then serves the queue as the
 * datapath does: xn_vq_avail(), xn_vq_walk() of every head, a copy into
 * (rx) or out of (tx) the chain, used ring, notify, kick suppression,
 * until the queue is empty or broken.
 *
 * Invariants checked (abort() = a finding):
 *   - every piece of a walked chain lies inside ONE region's part of the
 *     UMEM (never in the lead pad, a gap or past the end);
 *   - a chain never totals more than 64 KiB + the virtio-net header;
 *   - a broken queue reports a known XN_BROKEN_* reason and is never
 *     served again;
 *   - no more entries are taken than the queue size per round;
 *   - xn_chain_read()/xn_chain_write() of a walked chain copy exactly the
 *     bytes it holds past the offset asked for (or the length asked for).
 * ASan/UBSan (tools/fuzz builds with both) catch any out-of-bounds read
 * of the rings themselves.
 *
 * Build and run: tools/fuzz (see its --help).
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dp.h"

#define MEM_SIZE (64 * 1024)
#define R0_OFF 4096             /* region 0: gpa 0x0, 32 KiB */
#define R0_SIZE (32 * 1024)
#define R1_OFF (40 * 1024)      /* region 1: gpa 0x100000, 16 KiB, after a gap */
#define R1_SIZE (16 * 1024)
#define R1_GPA 0x100000

static uint8_t umem[MEM_SIZE] __attribute__((aligned(4096)));

/* in_region() - is [off, off+len) inside one region's UMEM range? */
static int in_region(const struct xn_memmap *m, uint64_t off, uint64_t len)
{
	for (uint32_t i = 0; i < m->nregions; i++) {
		const struct xn_region *r = &m->regions[i];

		if (off >= r->umem_off && off + len <= r->umem_off + r->size)
			return 1;
	}
	return 0;
}

/*
 * check_copy() - read (tx) or write (rx) a chain as the datapath does,
 * from byte @skip on: ASan catches any access outside the pieces' UMEM
 * range; the count must be what the chain holds past @skip.
 */
static void check_copy(const struct xn_memmap *m, const struct xn_chain *ch, bool writes,
		       uint32_t skip)
{
	static uint8_t buf[65536 + XN_VNET_HDR_LEN];
	uint32_t want = ch->total > skip ? ch->total - skip : 0, got;

	if (writes) {
		memset(buf, 0xa5, want);
		got = xn_chain_write(m, ch, skip, buf, sizeof(buf));
	} else {
		got = xn_chain_read(m, ch, skip, buf, sizeof(buf));
	}
	if (got != want)
		abort();
	/* A short copy stops at @len. */
	if (xn_chain_read(m, ch, skip, buf, want / 2) != want / 2)
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct xn_memmap m = { 0 };
	struct xn_vring_config c = { 0 };
	struct xn_counters ctr = { 0 };
	struct xn_chain ch;
	struct xn_vq vq;
	uint64_t broken = 0, features = 0;
	uint32_t num;

	if (size < 4)
		return 0;
	num = 1u << (data[0] % 9);                  /* 1 .. 256 */
	if (data[1] & 1)
		features |= 1ULL << VIRTIO_RING_F_EVENT_IDX;
	if (data[1] & 2)
		features |= 1ULL << VIRTIO_RING_F_INDIRECT_DESC;
	c.num = num;
	c.enabled = 1;
	c.last_avail_idx = (uint16_t)(data[2] | data[3] << 8);
	c.kick_fd = c.call_fd = -1;
	/* desc table, avail and used rings at the start of region 0 */
	c.desc_off = R0_OFF;
	c.avail_off = R0_OFF + 16 * num;
	c.used_off = (c.avail_off + 6 + 2 * num + 3) & ~3ULL;

	memset(umem, 0, sizeof(umem));
	memcpy(umem + R0_OFF, data + 4, size - 4 < R0_SIZE ? size - 4 : R0_SIZE);
	if (size - 4 > R0_SIZE)
		memcpy(umem + R1_OFF, data + 4 + R0_SIZE,
		       size - 4 - R0_SIZE < R1_SIZE ? size - 4 - R0_SIZE : R1_SIZE);

	m.base = umem;
	m.size = MEM_SIZE;
	m.nregions = 2;
	m.chunk_size = 2048;
	m.regions[0] = (struct xn_region){ .gpa = 0, .uva = 0x7f0000000000, .size = R0_SIZE,
					   .umem_off = R0_OFF };
	m.regions[1] = (struct xn_region){ .gpa = R1_GPA, .uva = 0x7f1000000000,
					   .size = R1_SIZE, .umem_off = R1_OFF };

	if (xn_vq_init(&vq, &m, &c, features, data[1] & 4))
		return 0;
	vq.broken = &broken;
	vq.notify_ctr = &ctr.rx_notify;
	vq.kick_ctr = &ctr.rx_kicks;

	for (int round = 0; round < 4; round++) {
		int n = xn_vq_avail(&vq);

		if (broken) {
			if (broken > XN_BROKEN_DESC_LEN || (n != 0 && n != -EIO))
				abort();
			break;
		}
		if (n < 0)
			abort();            /* -EIO only together with broken */
		if ((uint32_t)n > num)
			abort();
		if (n == 0)
			break;
		for (int k = 0; k < n; k++) {
			uint16_t head = xn_vq_head(&vq);

			if (xn_vq_walk(&m, &vq, head, &ch)) {
				if (!broken)
					abort();
				break;
			}
			if (ch.total > 65536 + XN_VNET_HDR_LEN || ch.nseg == 0 ||
			    ch.nseg > XN_MAX_SEGS)
				abort();
			for (uint16_t s = 0; s < ch.nseg; s++)
				if (!in_region(&m, ch.seg[s].off, ch.seg[s].len))
					abort();
			check_copy(&m, &ch, vq.device_writes, data[1] >> 3);
			vq.last_avail++;
			xn_vq_used_add(&vq, head, vq.device_writes ? ch.total : 0);
		}
		xn_vq_used_publish(&vq);
		xn_vq_notify(&vq);
		xn_vq_enable_kick(&vq, round & 1);
		if (broken)
			break;
	}
	return 0;
}
