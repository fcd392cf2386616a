/* SPDX-License-Identifier: MIT */
/*
 * rx.c - wire to guest: guest rx buffers go to the AF_XDP fill ring, and
 * frames from the rx ring go to the guest's used ring.
 *
 * Direct path (zero copy): a guest buffer that is one device-writable
 * piece of at least 12 + max_frame bytes is posted to the fill ring at
 * "buffer + 12 - 256 - headroom"; the kernel (copy mode) or the NIC
 * (zero-copy mode) writes the frame at buffer + 12 and never more than
 * max_frame bytes (the UMEM headroom makes that a kernel-enforced cap),
 * so the frame cannot overrun the buffer.  Only the 12-byte virtio-net
 * header is written by us.
 *
 * Bounce path (one counted copy): buffers that are too small or made of
 * several pieces are never posted; a backend-owned bounce slot is posted
 * instead, and the received frame is copied into the oldest such buffer
 * (spread over several with MRG_RXBUF).
 *
 * rx descriptors are matched to guest buffers by address, never by order:
 * the kernel consumes fill entries in its own order and silently skips
 * invalid ones.
 *
 * With a port socket besides the direct one, guest buffers are split
 * between the two fill rings: the port's is kept topped up to a modest
 * target (broadcast, VM-to-VM and misdirected unicast arrive there), the
 * rest goes to the direct socket.  Both rx rings are drained the same way;
 * the address map covers both fill rings, so a buffer is completed by
 * whichever socket received into it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "dp.h"

/* --- fill address -> posted head map ------------------------------------- */

/* hash64() - spread a fill address over the table. */
static inline uint32_t hash64(uint64_t k)
{
	k ^= k >> 33;
	k *= 0xff51afd7ed558ccdULL;
	k ^= k >> 33;
	return (uint32_t)k;
}

/**
 * xn_rxmap_init() - allocate a map for at least @entries live entries
 *
 * Return: 0 or -ENOMEM.
 */
int xn_rxmap_init(struct xn_rxmap *m, uint32_t entries)
{
	uint32_t size = xn_ceil_pow2(entries * 2);

	if (size < 16)
		size = 16;
	m->key = calloc(size, sizeof(*m->key));
	m->val = calloc(size, sizeof(*m->val));
	m->mask = size - 1;
	m->count = 0;
	if (!m->key || !m->val) {
		xn_rxmap_free(m);
		return -ENOMEM;
	}
	return 0;
}

/* xn_rxmap_free() - release the map's tables. */
void xn_rxmap_free(struct xn_rxmap *m)
{
	free(m->key);
	free(m->val);
	m->key = NULL;
	m->val = NULL;
}

/**
 * rxmap_insert() - remember that @addr was posted for @val
 *
 * Return: 0, -EEXIST if @addr is already posted (the guest offered one
 * buffer twice), -ENOSPC if the map is full.
 */
static int rxmap_insert(struct xn_rxmap *m, uint64_t addr, uint64_t val)
{
	uint32_t i = hash64(addr) & m->mask;

	if (m->count >= m->mask)
		return -ENOSPC;
	while (m->key[i]) {
		if (m->key[i] == addr + 1)
			return -EEXIST;
		i = (i + 1) & m->mask;
	}
	m->key[i] = addr + 1;
	m->val[i] = val;
	m->count++;
	return 0;
}

/**
 * rxmap_take() - look up and remove @addr (backward-shift deletion)
 *
 * Return: true and *@val if found.
 */
static bool rxmap_take(struct xn_rxmap *m, uint64_t addr, uint64_t *val)
{
	uint32_t i = hash64(addr) & m->mask, j;

	while (m->key[i] != addr + 1) {
		if (!m->key[i])
			return false;
		i = (i + 1) & m->mask;
	}
	*val = m->val[i];
	m->count--;
	/* Shift later members of the probe run back into the hole. */
	for (j = (i + 1) & m->mask; m->key[j]; j = (j + 1) & m->mask) {
		uint32_t home = hash64(m->key[j] - 1) & m->mask;

		if (((j - home) & m->mask) >= ((j - i) & m->mask)) {
			m->key[i] = m->key[j];
			m->val[i] = m->val[j];
			i = j;
		}
	}
	m->key[i] = 0;
	return true;
}

/* --- helpers ------------------------------------------------------------- */

/**
 * rx_slot_of() - which rx bounce slot a fill address belongs to
 *
 * Return: the slot, or -1 if @base is not the start of one of this queue
 * pair's rx bounce slots.
 */
static int64_t rx_slot_of(const struct xn_qp *qp, uint64_t base)
{
	uint64_t first = xn_slot_off(qp->mem, qp->rx_slot_first);
	uint64_t end = first + (uint64_t)qp->rx_slot_count * qp->mem->chunk_size;

	if (base < first || base >= end || (base - first) % qp->mem->chunk_size)
		return -1;
	return (int64_t)((base - first) / qp->mem->chunk_size) + qp->rx_slot_first;
}

/* write_hdr() - a virtio_net_hdr_v1 for a complete frame in @nbuf buffers. */
static inline void write_hdr(uint8_t *p, uint16_t nbuf)
{
	struct virtio_net_hdr_v1 h = { .num_buffers = nbuf };

	memcpy(p, &h, sizeof(h));
}

/* trace() - remember where a frame landed and where its buffer was. */
static inline void trace(struct xn_qp *qp, uint64_t data, uint64_t buf)
{
	uint32_t p = qp->trace_pos++ % XN_TRACE_LEN;

	qp->trace[2 * p] = data;
	qp->trace[2 * p + 1] = buf;
}

/* --- receive ------------------------------------------------------------- */

/**
 * rx_bounce() - deliver a frame that landed in a bounce slot, by copying
 * it into the oldest waiting guest buffer(s)
 * @qp:		queue pair
 * @slot:	the bounce slot (returned to the free list here)
 * @data:	UMEM offset of the frame
 * @len:	frame length
 *
 * A frame is dropped, and the waiting buffers kept, when they are too
 * few (drop_no_rx_buffer: with MRG_RXBUF a frame may take several, so a
 * slot can outlive the buffer it was posted for) or cannot hold it even
 * all together (drop_too_large).
 */
static void rx_bounce(struct xn_qp *qp, uint32_t slot, uint64_t data, uint32_t len)
{
	struct xn_chain *ch = qp->scratch;
	const uint8_t *src = xn_umem_ptr(qp->mem, data);
	uint32_t need = XN_VNET_HDR_LEN + len, have = 0, k = 0, i, off = 0;
	uint32_t maxk = qp->mrg_rxbuf ? 8 : 1;

	qp->rx_free_slots[qp->rx_nfree++] = slot;
	qp->rx_stalled = false;
	if (*qp->rx.broken)
		return;
	while (have < need && k < maxk && k < qp->slow_count) {
		uint16_t head = qp->slow_fifo[(qp->slow_head + k) % qp->slow_cap];

		if (xn_vq_walk(qp->mem, &qp->rx, head, &ch[k]))
			return;
		if (k == 0 && ch[0].total < XN_VNET_HDR_LEN) {
			/* virtio: the header must fit in the first buffer. */
			xn_vq_break(&qp->rx, XN_BROKEN_DESC_LEN);
			return;
		}
		have += ch[k].total;
		k++;
	}
	if (have < need) {
		/* Drop the frame, keep the buffers: more may come, but this
		 * frame cannot wait for them. */
		if (k < maxk)
			qp->ctr->drop_no_rx_buffer++;
		else
			qp->ctr->drop_too_large++;
		return;
	}
	for (i = 0; i < k; i++) {
		uint8_t hdr[XN_VNET_HDR_LEN];
		uint32_t skip = 0, n, w;

		if (i == 0) {
			write_hdr(hdr, (uint16_t)k);
			xn_chain_write(qp->mem, &ch[0], 0, hdr, sizeof(hdr));
			skip = XN_VNET_HDR_LEN;
		}
		n = ch[i].total - skip;
		if (n > len - off)
			n = len - off;
		w = xn_chain_write(qp->mem, &ch[i], skip, src + off, n);
		off += w;
		xn_vq_used_add(&qp->rx, ch[i].head, skip + w);
	}
	qp->slow_head = (qp->slow_head + k) % qp->slow_cap;
	qp->slow_count -= k;
	qp->ctr->rx_frames++;
	qp->ctr->rx_bytes += len;
	qp->ctr->rx_copied_frames++;
	qp->ctr->rx_copied_bytes += len;
}

/**
 * rx_direct() - complete a frame the kernel wrote into a guest buffer
 * @qp:		queue pair
 * @base:	fill address it was posted with
 * @data:	UMEM offset where the frame starts
 * @len:	frame length
 */
static void rx_direct(struct xn_qp *qp, uint64_t base, uint64_t data, uint32_t len)
{
	const struct xn_memmap *mem = qp->mem;
	uint64_t buf = base + XN_XDP_HEADROOM + mem->headroom - XN_VNET_HDR_LEN;
	uint64_t val;

	if (!rxmap_take(&qp->rxmap, base, &val)) {
		/* Not an address we posted: nothing to complete. */
		qp->ctr->drop_invalid_desc++;
		return;
	}
	qp->rx_stalled = false;
	if (*qp->rx.broken)
		return;
	trace(qp, data, buf);
	if (data != buf + XN_VNET_HDR_LEN) {
		/* Cannot happen with a correct headroom; never lose the frame. */
		memmove(xn_umem_ptr(mem, buf + XN_VNET_HDR_LEN), xn_umem_ptr(mem, data), len);
		qp->ctr->rx_misplaced++;
		qp->ctr->rx_copied_frames++;
		qp->ctr->rx_copied_bytes += len;
	} else {
		qp->ctr->rx_zero_copy_frames++;
	}
	write_hdr(xn_umem_ptr(mem, buf), 1);
	xn_vq_used_add(&qp->rx, (uint16_t)(val & 0xffff), XN_VNET_HDR_LEN + len);
	qp->ctr->rx_frames++;
	qp->ctr->rx_bytes += len;
}

/**
 * rx_receive_sock() - move a batch of frames from one socket's rx ring to
 * the guest
 * @qp:		queue pair
 * @s:		the socket
 *
 * Return: frames taken from its rx ring.
 */
static uint32_t rx_receive_sock(struct xn_qp *qp, struct xn_sock *s)
{
	struct xn_xsk *x = s->xsk;
	uint32_t idx, n, i;

	n = xsk_ring_cons__peek(&x->rx, qp->batch, &idx);
	for (i = 0; i < n; i++) {
		const struct xdp_desc *d = xsk_ring_cons__rx_desc(&x->rx, idx + i);
		uint64_t base = xsk_umem__extract_addr(d->addr);
		uint64_t data = xsk_umem__add_offset_to_addr(d->addr);
		int64_t slot = rx_slot_of(qp, base);

		if (slot >= 0)
			rx_bounce(qp, (uint32_t)slot, data, d->len);
		else
			rx_direct(qp, base, data, d->len);
	}
	if (n)
		xsk_ring_cons__release(&x->rx, n);
	return n;
}

/**
 * xn_rx_receive() - move a batch of frames from each socket's rx ring to
 * the guest
 * @qp:		queue pair
 *
 * Used entries are added, not published: the run loop publishes once.
 *
 * Return: frames taken from the rx rings.
 */
int xn_rx_receive(struct xn_qp *qp)
{
	uint32_t total = 0, n;
	int i;

	for (i = 0; i < XN_NSOCK; i++) {
		if (!qp->sock[i].xsk)
			continue;
		n = rx_receive_sock(qp, &qp->sock[i]);
		if (i == XN_SOCK_PORT)
			qp->ctr->rx_port_frames += n;
		total += n;
	}
	return (int)total;
}

/* --- refill -------------------------------------------------------------- */

/**
 * post_one() - choose the fill address for the guest buffer at @head
 * @qp:		queue pair
 * @head:	head index read from the avail ring
 * @seq:	its take sequence (kept so a stop can rewind)
 * @addr:	set to the fill address
 *
 * Return: 0 and *@addr, -EAGAIN if the buffer needs a bounce slot and
 * none is free (the entry is left in the avail ring), -EIO if the chain
 * broke the queue.
 */
static int post_one(struct xn_qp *qp, uint16_t head, uint64_t seq, uint64_t *addr)
{
	const struct xn_memmap *mem = qp->mem;
	struct xn_chain *ch = &qp->scratch[0];
	uint32_t slot;

	if (xn_vq_walk(mem, &qp->rx, head, ch))
		return -EIO;
	if (ch->nseg == 1 && ch->total >= XN_VNET_HDR_LEN + mem->max_frame) {
		uint64_t fill = ch->seg[0].off + XN_VNET_HDR_LEN - XN_XDP_HEADROOM - mem->headroom;
		int err = rxmap_insert(&qp->rxmap, fill, head | (seq << 16));

		if (err == -EEXIST) {
			xn_vq_break(&qp->rx, XN_BROKEN_DESC_ADDR);
			return -EIO;
		}
		if (err)
			return -EAGAIN;
		*addr = fill;
		return 0;
	}
	if (!qp->rx_nfree || qp->slow_count == qp->slow_cap)
		return -EAGAIN;
	slot = qp->rx_free_slots[--qp->rx_nfree];
	qp->slow_fifo[(qp->slow_head + qp->slow_count) % qp->slow_cap] = head;
	qp->slow_seq[(qp->slow_head + qp->slow_count) % qp->slow_cap] = seq;
	qp->slow_count++;
	*addr = xn_slot_off(mem, slot);
	return 0;
}

/**
 * xn_rx_fill_room() - how many buffers refill may post to @s now
 * @qp:		queue pair
 * @s:		one of its sockets
 *
 * The free entries of its fill ring, capped by its fill target (the
 * number of entries it keeps posted) if it has one.
 *
 * Return: the count.
 */
uint32_t xn_rx_fill_room(struct xn_qp *qp, struct xn_sock *s)
{
	struct xsk_ring_prod *f = &s->xsk->fill;
	uint32_t nfree, posted;

	if (!s->fill_target)
		return xsk_prod_nb_free(f, qp->batch);
	/* Asking for the whole ring refreshes the kernel's consumer index. */
	nfree = xsk_prod_nb_free(f, f->size);
	posted = f->size - nfree;
	return posted < s->fill_target ? s->fill_target - posted : 0;
}

/**
 * rx_refill_sock() - post newly available guest rx buffers to the fill
 * ring of one socket
 * @qp:		queue pair
 * @s:		the socket
 *
 * Return: buffers posted.
 */
static uint32_t rx_refill_sock(struct xn_qp *qp, struct xn_sock *s)
{
	struct xn_xsk *x = s->xsk;
	struct xn_vq *vq = &qp->rx;
	uint32_t n, idx, room, posted = 0;
	int avail = xn_vq_avail(vq);

	if (avail <= 0)
		return 0;
	n = (uint32_t)avail < qp->batch ? (uint32_t)avail : qp->batch;
	room = xn_rx_fill_room(qp, s);
	n = room < n ? room : n;
	if (!n || xsk_ring_prod__reserve(&x->fill, n, &idx) != n)
		return 0;
	while (posted < n) {
		uint64_t addr;
		int err = post_one(qp, xn_vq_head(vq), qp->rx_seq, &addr);

		if (err) {
			/* Out of bounce slots (or map room): only a frame
			 * received can free one, so don't retry before. */
			qp->rx_stalled = err == -EAGAIN;
			break;
		}
		*xsk_ring_prod__fill_addr(&x->fill, idx + posted) = addr;
		vq->last_avail++;
		qp->rx_seq++;
		posted++;
	}
	/* Give back the reservations we did not use. */
	x->fill.cached_prod -= n - posted;
	if (posted)
		xsk_ring_prod__submit(&x->fill, posted);
	return posted;
}

/**
 * xn_rx_refill() - post newly available guest rx buffers to the fill rings
 * @qp:		queue pair
 *
 * The port socket's ring is topped up to its target first, so that
 * flooded and VM-to-VM frames always find a buffer; the direct socket
 * takes the rest.
 *
 * Return: buffers posted.
 */
int xn_rx_refill(struct xn_qp *qp)
{
	uint32_t posted = 0;

	if (qp->sock[XN_SOCK_PORT].xsk)
		posted += rx_refill_sock(qp, &qp->sock[XN_SOCK_PORT]);
	if (qp->sock[XN_SOCK_DIRECT].xsk)
		posted += rx_refill_sock(qp, &qp->sock[XN_SOCK_DIRECT]);
	return (int)posted;
}
