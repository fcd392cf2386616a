/* SPDX-License-Identifier: MIT */
/*
 * tx.c - guest to wire: guest tx chains go to an AF_XDP tx ring as
 * addresses into guest memory, and completions go to the used ring.
 *
 * Direct path (zero copy): when the frame after the 12-byte virtio-net
 * header is one contiguous piece of guest memory, its UMEM offset goes to
 * the tx ring as it is.  Otherwise the frame is linearised into a bounce
 * slot (one counted copy).  Completions come back in submission order
 * (the kernel may clear bit 0 of the address), so they are matched by
 * order, with the address as a cross-check -- per socket: each socket
 * has its own completion ring and its own FIFO of frames in flight.
 *
 * Path choice, per frame: a frame whose source MAC is not the VM's is
 * dropped (tx_spoofed) and its chain returned at once.  With a port
 * socket, frames to a group address or to another VM on the NIC (the
 * local MAC table) go on the port socket, the rest on the direct socket
 * (or on the port socket when the pair has no direct one).
 */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>

#include "dp.h"

/**
 * txq_pop() - take the oldest frame submitted on @s and return its chain
 * to the guest (used length 0: the device wrote nothing)
 * @qp:		queue pair
 * @s:		the socket it was submitted on
 * @sent:	true if the kernel completed it (counts it as sent)
 */
static void txq_pop(struct xn_qp *qp, struct xn_sock *s, bool sent)
{
	struct xn_txent *e = &s->txq[s->txq_head];

	if (e->slot >= 0)
		qp->tx_free_slots[qp->tx_nfree++] = (uint32_t)e->slot;
	if (!*qp->tx.broken)
		xn_vq_used_add(&qp->tx, e->head, 0);
	s->txq_head = (s->txq_head + 1) % s->txq_cap;
	s->txq_count--;
	if (!sent)
		qp->ctr->tx_lost_at_stop++;
}

/**
 * xn_tx_abandon() - return every frame still awaiting completion on any
 * socket (the sockets are gone); they are counted in tx_lost_at_stop
 */
void xn_tx_abandon(struct xn_qp *qp)
{
	int i;

	for (i = 0; i < XN_NSOCK; i++)
		while (qp->sock[i].txq_count)
			txq_pop(qp, &qp->sock[i], false);
}

/* xn_tx_inflight() - Return: frames submitted on all sockets, not completed. */
uint32_t xn_tx_inflight(const struct xn_qp *qp)
{
	return qp->sock[XN_SOCK_DIRECT].txq_count + qp->sock[XN_SOCK_PORT].txq_count;
}

/**
 * tx_complete_sock() - return the chains of frames one socket completed
 * @qp:		queue pair
 * @s:		the socket
 *
 * Return: completions consumed.
 */
static uint32_t tx_complete_sock(struct xn_qp *qp, struct xn_sock *s)
{
	struct xn_xsk *x = s->xsk;
	uint32_t idx, n, i;

	n = xsk_ring_cons__peek(&x->comp, s->txq_cap, &idx);
	for (i = 0; i < n && s->txq_count; i++) {
		uint64_t addr = *xsk_ring_cons__comp_addr(&x->comp, idx + i) & ~1ULL;

		/* Frames the kernel dropped without a completion would show
		 * up as a mismatch here: hand them back too, counted. */
		while (s->txq_count > 1 && (s->txq[s->txq_head].addr & ~1ULL) != addr) {
			qp->ctr->drop_tx_error++;
			txq_pop(qp, s, true);
		}
		txq_pop(qp, s, true);
	}
	if (n)
		xsk_ring_cons__release(&x->comp, n);
	return n;
}

/**
 * xn_tx_complete() - return the chains of completed frames to the guest
 * @qp:		queue pair
 *
 * Return: completions consumed, over both sockets.
 */
int xn_tx_complete(struct xn_qp *qp)
{
	uint32_t n = 0;
	int i;

	for (i = 0; i < XN_NSOCK; i++)
		if (qp->sock[i].xsk)
			n += tx_complete_sock(qp, &qp->sock[i]);
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
 * choose_sock() - the socket a frame to @dst leaves on
 * @qp:		queue pair
 * @dst:	destination MAC (6 bytes)
 *
 * Return: the port socket for group addresses and other VMs' MACs (or
 * when the pair has no direct socket), else the direct socket.
 */
static struct xn_sock *choose_sock(struct xn_qp *qp, const uint8_t *dst)
{
	struct xn_sock *port = &qp->sock[XN_SOCK_PORT], *direct = &qp->sock[XN_SOCK_DIRECT];

	if (!port->xsk)
		return direct;
	if (!direct->xsk || (dst[0] & 1) || xn_qp_local_mac(qp, xn_mac_u64(dst)))
		return port;
	return direct;
}

/* tx_drop() - return a chain at once (frame not sent); Return: 0. */
static int tx_drop(struct xn_qp *qp, uint16_t head, uint64_t *ctr)
{
	(*ctr)++;
	xn_vq_used_add(&qp->tx, head, 0);
	return 0;
}

/**
 * tx_one() - turn one guest chain into a tx descriptor on the socket its
 * destination calls for
 * @qp:		queue pair
 * @head:	chain head from the avail ring
 *
 * The descriptor is written to the socket's tx ring but not submitted:
 * xn_tx_send() submits each socket's batch with one release store.
 *
 * Return: 1 if a descriptor was queued, 0 if the chain was returned to
 * the guest at once (frame dropped, counted), -EAGAIN if the chosen
 * socket or the bounce area has no room now (left in the avail ring),
 * -EIO if it broke the queue.
 */
static int tx_one(struct xn_qp *qp, uint16_t head)
{
	struct xn_chain *ch = &qp->scratch[0];
	const struct xn_memmap *mem = qp->mem;
	uint8_t addrs[12];
	struct xn_sock *s;
	struct xdp_desc *desc;
	struct xn_txent *e;
	uint32_t len, idx;
	uint64_t off;
	int32_t slot = -1;
	bool piece;

	if (xn_vq_walk(mem, &qp->tx, head, ch))
		return -EIO;
	len = ch->total > XN_VNET_HDR_LEN ? ch->total - XN_VNET_HDR_LEN : 0;
	if (len < 14)
		return tx_drop(qp, head, &qp->ctr->drop_invalid_desc);
	if (len > mem->chunk_size)
		return tx_drop(qp, head, &qp->ctr->drop_too_large);
	/* Destination and source MAC: the virtio-net header may be a
	 * descriptor of its own, and the MACs may straddle pieces. */
	xn_chain_read(mem, ch, XN_VNET_HDR_LEN, addrs, sizeof(addrs));
	if (qp->vm_mac && xn_mac_u64(addrs + 6) != qp->vm_mac)
		return tx_drop(qp, head, &qp->ctr->tx_spoofed);
	s = choose_sock(qp, addrs);
	if (s->txq_count + s->tx_pending == s->txq_cap)
		return -EAGAIN;
	piece = frame_piece(ch, &off);
	if ((!piece && !qp->tx_nfree) || xsk_ring_prod__reserve(&s->xsk->tx, 1, &idx) != 1)
		return -EAGAIN;
	if (!piece) {
		slot = (int32_t)qp->tx_free_slots[--qp->tx_nfree];
		off = xn_slot_off(mem, (uint32_t)slot);
		xn_chain_read(mem, ch, XN_VNET_HDR_LEN, xn_umem_ptr(mem, off), len);
		qp->ctr->tx_copied_frames++;
		qp->ctr->tx_copied_bytes += len;
	} else {
		qp->ctr->tx_zero_copy_frames++;
	}
	desc = xsk_ring_prod__tx_desc(&s->xsk->tx, idx);
	desc->addr = off;
	desc->len = len;
	desc->options = 0;
	e = &s->txq[(s->txq_head + s->txq_count + s->tx_pending) % s->txq_cap];
	e->head = head;
	e->slot = slot;
	e->addr = off;
	s->tx_pending++;
	qp->ctr->tx_frames++;
	qp->ctr->tx_bytes += len;
	if (s == &qp->sock[XN_SOCK_PORT])
		qp->ctr->tx_port_frames++;
	return 1;
}

/**
 * xn_tx_send() - move a batch of guest tx chains to the tx rings
 * @qp:		queue pair
 *
 * Return: chains taken from the avail ring.
 */
int xn_tx_send(struct xn_qp *qp)
{
	struct xn_vq *vq = &qp->tx;
	uint32_t n, taken = 0;
	int avail = xn_vq_avail(vq), i;

	if (avail <= 0)
		return 0;
	if (qp->sock[XN_SOCK_PORT].xsk)
		xn_qp_local_macs_sync(qp);
	n = (uint32_t)avail < qp->batch ? (uint32_t)avail : qp->batch;
	while (taken < n) {
		if (tx_one(qp, xn_vq_head(vq)) < 0)
			break;
		vq->last_avail++;
		taken++;
	}
	for (i = 0; i < XN_NSOCK; i++) {
		struct xn_sock *s = &qp->sock[i];

		if (!s->tx_pending)
			continue;
		xsk_ring_prod__submit(&s->xsk->tx, s->tx_pending);
		s->txq_count += s->tx_pending;
		s->tx_pending = 0;
		s->tx_kick_needed = true;
	}
	return (int)taken;
}

/**
 * tx_kick_sock() - make the kernel send what one socket's tx ring holds,
 * if it wants a wake-up (need_wakeup; always in copy mode)
 * @qp:		queue pair
 * @s:		the socket
 *
 * Return: 0, or -errno from sendto() other than EAGAIN/EBUSY/ENOBUFS,
 * which only mean "some frames left for later" or "one frame dropped".
 */
static int tx_kick_sock(struct xn_qp *qp, struct xn_sock *s)
{
	struct xn_xsk *x = s->xsk;
	ssize_t r;

	if (!s->tx_kick_needed)
		return 0;
	if (!xsk_ring_prod__needs_wakeup(&x->tx)) {
		s->tx_kick_needed = false;
		return 0;
	}
	qp->ctr->tx_syscalls++;
	r = sendto(xsk_socket__fd(x->xsk), NULL, 0, MSG_DONTWAIT, NULL, 0);
	if (r >= 0) {
		s->tx_kick_needed = false;
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
		s->tx_kick_needed = false;
		return -errno;
	}
}

/**
 * xn_tx_kick() - wake the kernel's tx path of every socket that has new
 * frames
 * @qp:		queue pair
 *
 * Return: 0, or the first -errno of tx_kick_sock().
 */
int xn_tx_kick(struct xn_qp *qp)
{
	int err = 0, r, i;

	for (i = 0; i < XN_NSOCK; i++) {
		if (!qp->sock[i].xsk)
			continue;
		r = tx_kick_sock(qp, &qp->sock[i]);
		err = err ? err : r;
	}
	return err;
}
