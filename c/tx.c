/* SPDX-License-Identifier: MIT */
/*
 * tx.c - guest to wire: guest tx chains go to the AF_XDP tx ring as
 * addresses into guest memory, and completions go to the used ring.
 *
 * Direct path (zero copy): when the frame after the 12-byte virtio-net
 * header is one contiguous piece of guest memory, its UMEM offset goes to
 * the tx ring as it is.  Otherwise the frame is linearised into a bounce
 * slot (one counted copy).  Completions come back in submission order
 * (the kernel may clear bit 0 of the address), so they are matched by
 * order, with the address as a cross-check.
 */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#include "dp.h"

/* slot_off() - UMEM offset of bounce slot @slot. */
static inline uint64_t slot_off(const struct xn_memmap *mem, uint32_t slot)
{
	return mem->bounce_off + (uint64_t)slot * mem->chunk_size;
}

/**
 * txq_pop() - take the oldest submitted frame and return its chain to the
 * guest (used length 0: the device wrote nothing)
 * @qp:		queue pair
 * @sent:	true if the kernel completed it (counts it as sent)
 */
static void txq_pop(struct xn_qp *qp, bool sent)
{
	struct xn_txent *e = &qp->txq[qp->txq_head];

	if (e->slot >= 0)
		qp->tx_free_slots[qp->tx_nfree++] = (uint32_t)e->slot;
	if (!*qp->tx.broken)
		xn_vq_used_add(&qp->tx, e->head, 0);
	qp->txq_head = (qp->txq_head + 1) % qp->txq_cap;
	qp->txq_count--;
	if (!sent)
		qp->ctr->tx_lost_at_stop++;
}

/**
 * xn_tx_abandon() - return every frame still awaiting completion (the
 * socket is gone); they are counted in tx_lost_at_stop
 */
void xn_tx_abandon(struct xn_qp *qp)
{
	while (qp->txq_count)
		txq_pop(qp, false);
}

/**
 * xn_tx_complete() - return the chains of completed frames to the guest
 * @qp:		queue pair
 *
 * Return: completions consumed.
 */
int xn_tx_complete(struct xn_qp *qp)
{
	struct xn_xsk *x = qp->xsk;
	uint32_t idx, n, i;

	n = xsk_ring_cons__peek(&x->comp, qp->txq_cap, &idx);
	for (i = 0; i < n && qp->txq_count; i++) {
		uint64_t addr = *xsk_ring_cons__comp_addr(&x->comp, idx + i) & ~1ULL;

		/* Frames the kernel dropped without a completion would show
		 * up as a mismatch here: hand them back too, counted. */
		while (qp->txq_count > 1 &&
		       (qp->txq[qp->txq_head].addr & ~1ULL) != addr) {
			qp->ctr->drop_tx_error++;
			txq_pop(qp, true);
		}
		txq_pop(qp, true);
	}
	if (n)
		xsk_ring_cons__release(&x->comp, n);
	return (int)n;
}

/**
 * frame_piece() - find the frame (the chain minus the 12-byte header)
 * @ch:		walked chain
 * @off:	set to the UMEM offset of the frame when it is one piece
 *
 * Return: true if the frame is one contiguous piece.
 */
static bool frame_piece(const struct xn_chain *ch, uint64_t *off)
{
	uint32_t skip = XN_VNET_HDR_LEN, i = 0;

	while (i < ch->nseg && skip >= ch->seg[i].len)
		skip -= ch->seg[i++].len;
	if (i + 1 != ch->nseg)
		return false;
	*off = ch->seg[i].off + skip;
	return true;
}

/**
 * linearise() - copy the frame of @ch into bounce slot memory at @dst
 *
 * Return: bytes copied.
 */
static uint32_t linearise(const struct xn_memmap *mem, const struct xn_chain *ch, uint8_t *dst)
{
	uint32_t skip = XN_VNET_HDR_LEN, done = 0, i;

	for (i = 0; i < ch->nseg; i++) {
		uint32_t n = ch->seg[i].len;

		if (skip >= n) {
			skip -= n;
			continue;
		}
		memcpy(dst + done, xn_umem_ptr(mem, ch->seg[i].off + skip), n - skip);
		done += n - skip;
		skip = 0;
	}
	return done;
}

/**
 * tx_one() - turn one guest chain into a tx descriptor
 * @qp:		queue pair
 * @head:	chain head from the avail ring
 * @desc:	the reserved tx descriptor to fill
 *
 * Return: 1 if @desc was filled and queued, 0 if the chain was returned
 * to the guest at once (frame dropped, counted), -EAGAIN if it needs a
 * bounce slot and none is free (left in the avail ring), -EIO if it broke
 * the queue.
 */
static int tx_one(struct xn_qp *qp, uint16_t head, struct xdp_desc *desc)
{
	struct xn_chain *ch = &qp->scratch[0];
	const struct xn_memmap *mem = qp->mem;
	struct xn_txent *e;
	uint32_t len;
	uint64_t off;
	int32_t slot = -1;

	if (xn_vq_walk(mem, &qp->tx, head, ch))
		return -EIO;
	len = ch->total > XN_VNET_HDR_LEN ? ch->total - XN_VNET_HDR_LEN : 0;
	if (len < 14) {
		qp->ctr->drop_invalid_desc++;
		xn_vq_used_add(&qp->tx, head, 0);
		return 0;
	}
	if (len > mem->chunk_size) {
		qp->ctr->drop_too_large++;
		xn_vq_used_add(&qp->tx, head, 0);
		return 0;
	}
	if (!frame_piece(ch, &off)) {
		if (!qp->tx_nfree)
			return -EAGAIN;
		slot = (int32_t)qp->tx_free_slots[--qp->tx_nfree];
		off = slot_off(mem, (uint32_t)slot);
		linearise(mem, ch, xn_umem_ptr(mem, off));
		qp->ctr->tx_copied_frames++;
		qp->ctr->tx_copied_bytes += len;
	} else {
		qp->ctr->tx_zero_copy_frames++;
	}
	desc->addr = off;
	desc->len = len;
	desc->options = 0;
	e = &qp->txq[(qp->txq_head + qp->txq_count) % qp->txq_cap];
	e->head = head;
	e->slot = slot;
	e->addr = off;
	qp->txq_count++;
	qp->ctr->tx_frames++;
	qp->ctr->tx_bytes += len;
	return 1;
}

/**
 * xn_tx_send() - move a batch of guest tx chains to the tx ring
 * @qp:		queue pair
 *
 * Return: chains taken from the avail ring.
 */
int xn_tx_send(struct xn_qp *qp)
{
	struct xn_xsk *x = qp->xsk;
	struct xn_vq *vq = &qp->tx;
	uint32_t n, idx, queued = 0, taken = 0, room;
	int avail = xn_vq_avail(vq);

	if (avail <= 0)
		return 0;
	n = (uint32_t)avail < qp->batch ? (uint32_t)avail : qp->batch;
	room = qp->txq_cap - qp->txq_count;
	if (n > room)
		n = room;
	if (n > xsk_prod_nb_free(&x->tx, n))
		n = xsk_prod_nb_free(&x->tx, n);
	if (!n || xsk_ring_prod__reserve(&x->tx, n, &idx) != n)
		return 0;
	while (taken < n) {
		uint16_t head = XN_ACCESS_ONCE(vq->avail->ring[vq->last_avail & (vq->num - 1)]);
		int r = tx_one(qp, head, xsk_ring_prod__tx_desc(&x->tx, idx + queued));

		if (r < 0)
			break;
		vq->last_avail++;
		taken++;
		queued += (uint32_t)r;
	}
	x->tx.cached_prod -= n - queued;
	if (queued) {
		xsk_ring_prod__submit(&x->tx, queued);
		qp->tx_kick_needed = true;
	}
	return (int)taken;
}

/**
 * xn_tx_kick() - make the kernel send what the tx ring holds, if it wants
 * a wake-up (need_wakeup; always in copy mode)
 * @qp:		queue pair
 *
 * Return: 0, or -errno from sendto() other than EAGAIN/EBUSY/ENOBUFS,
 * which only mean "some frames left for later" or "one frame dropped".
 */
int xn_tx_kick(struct xn_qp *qp)
{
	struct xn_xsk *x = qp->xsk;
	ssize_t r;

	if (!qp->tx_kick_needed)
		return 0;
	if (!xsk_ring_prod__needs_wakeup(&x->tx)) {
		qp->tx_kick_needed = false;
		return 0;
	}
	qp->ctr->tx_syscalls++;
	r = sendto(xsk_socket__fd(x->xsk), NULL, 0, MSG_DONTWAIT, NULL, 0);
	if (r >= 0) {
		qp->tx_kick_needed = false;
		return 0;
	}
	switch (errno) {
	case EAGAIN:            /* budget used up: more to send next pass */
	case ENOBUFS:
		return 0;
	case EBUSY:             /* a frame was refused (e.g. over the MTU) */
		qp->ctr->drop_tx_error++;
		return 0;
	default:
		qp->tx_kick_needed = false;
		return -errno;
	}
}
