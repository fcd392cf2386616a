/* SPDX-License-Identifier: MIT */
/*
 * qp.c - one queue pair's datapath: the run loop that serves a guest rx
 * and tx virtqueue with one AF_XDP socket, and the stop protocol that
 * hands every in-flight descriptor back exactly once.
 *
 * The loop runs on its own thread (called through cffi with the GIL
 * released).  Each wake-up takes the whole available batch on both
 * directions, publishes the used rings with one release store each and
 * signals the guest once per ring; it sleeps in poll() on the socket,
 * both kick eventfds and a wake eventfd when there is nothing to do.
 */
#include <errno.h>
#include <linux/if_xdp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "dp.h"

#ifndef SOL_XDP
#define SOL_XDP 283
#endif

/* now_ns() - CLOCK_MONOTONIC in nanoseconds (vDSO: no system call). */
static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ceil_pow2() - Return: the smallest power of two >= @v (>= 1). */
static uint32_t ceil_pow2(uint32_t v)
{
	uint32_t p = 1;

	while (p < v)
		p <<= 1;
	return p;
}

/**
 * xn_qp_create() - prepare a queue pair's datapath (does not start it)
 * @out:	set to the new queue pair
 * @cfg:	memory map, socket, both rings, features, bounce slots
 * @ctr:	counter block the datapath writes (zeroed by the caller)
 *
 * Return: 0, -EINVAL for an inconsistent configuration, -ENOMEM.
 */
int xn_qp_create(struct xn_qp **out, const struct xn_qp_config *cfg,
		 struct xn_counters *ctr)
{
	const struct xn_memmap *mem = cfg->mem;
	struct xn_qp *qp;
	uint32_t i, nrx, ntx;
	int err;

	if (!mem || !cfg->xsk || !ctr || cfg->bounce_count < 2 ||
	    (uint64_t)cfg->bounce_first + cfg->bounce_count > mem->bounce_slots ||
	    mem->chunk_size < XN_XDP_HEADROOM + mem->headroom + mem->max_frame)
		return -EINVAL;
	qp = calloc(1, sizeof(*qp));
	if (!qp)
		return -ENOMEM;
	qp->cfg = *cfg;
	qp->mem = mem;
	qp->xsk = cfg->xsk;
	qp->ctr = ctr;
	qp->batch = cfg->batch ? cfg->batch : 64;
	qp->mrg_rxbuf = cfg->features & (1ULL << VIRTIO_NET_F_MRG_RXBUF);
	qp->stop_fd = -1;
	err = xn_vq_init(&qp->rx, mem, &cfg->rx, cfg->features, true);
	if (!err)
		err = xn_vq_init(&qp->tx, mem, &cfg->tx, cfg->features, false);
	if (err)
		goto fail;
	qp->rx.broken = &ctr->rx_broken;
	qp->tx.broken = &ctr->tx_broken;
	qp->rx.notify_ctr = &ctr->rx_notify;
	qp->tx.notify_ctr = &ctr->tx_notify;
	qp->rx.kick_ctr = &ctr->rx_kicks;
	qp->tx.kick_ctr = &ctr->tx_kicks;

	nrx = cfg->bounce_count / 2;
	ntx = cfg->bounce_count - nrx;
	qp->rx_slot_first = cfg->bounce_first;
	qp->rx_slot_count = nrx;
	qp->tx_slot_first = cfg->bounce_first + nrx;
	qp->tx_slot_count = ntx;
	qp->slow_cap = qp->rx.num;
	qp->txq_cap = ceil_pow2(qp->xsk->ring_size);
	qp->slow_fifo = calloc(qp->slow_cap, sizeof(*qp->slow_fifo));
	qp->slow_aidx = calloc(qp->slow_cap, sizeof(*qp->slow_aidx));
	qp->rx_free_slots = calloc(nrx, sizeof(*qp->rx_free_slots));
	qp->tx_free_slots = calloc(ntx, sizeof(*qp->tx_free_slots));
	qp->txq = calloc(qp->txq_cap, sizeof(*qp->txq));
	err = -ENOMEM;
	if (!qp->slow_fifo || !qp->slow_aidx || !qp->rx_free_slots || !qp->tx_free_slots ||
	    !qp->txq || xn_rxmap_init(&qp->rxmap, qp->rx.num))
		goto fail;
	for (i = 0; i < nrx; i++)
		qp->rx_free_slots[qp->rx_nfree++] = qp->rx_slot_first + nrx - 1 - i;
	for (i = 0; i < ntx; i++)
		qp->tx_free_slots[qp->tx_nfree++] = qp->tx_slot_first + ntx - 1 - i;
	qp->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (qp->stop_fd < 0) {
		err = -errno;
		goto fail;
	}
	*out = qp;
	return 0;
fail:
	xn_qp_destroy(qp);
	return err;
}

/* xn_qp_destroy() - free a queue pair (its thread must have returned). */
void xn_qp_destroy(struct xn_qp *qp)
{
	if (!qp)
		return;
	if (qp->stop_fd >= 0)
		close(qp->stop_fd);
	xn_rxmap_free(&qp->rxmap);
	free(qp->slow_fifo);
	free(qp->slow_aidx);
	free(qp->rx_free_slots);
	free(qp->tx_free_slots);
	free(qp->txq);
	free(qp);
}

/* wake() - interrupt the loop's poll(). */
static void wake(struct xn_qp *qp)
{
	uint64_t one = 1;

	if (write(qp->stop_fd, &one, sizeof(one)) < 0) {
		/* The counter is saturated: the loop is awake anyway. */
	}
}

/**
 * xn_qp_stop() - ask the run loop to return (thread-safe)
 *
 * Return: 0.
 */
int xn_qp_stop(struct xn_qp *qp)
{
	__atomic_store_n(&qp->stopping, 1, __ATOMIC_RELEASE);
	wake(qp);
	return 0;
}

/**
 * xn_qp_set_enabled() - SET_VRING_ENABLE for one ring (thread-safe)
 * @ring:	0 = rx, 1 = tx
 *
 * Return: 0 or -EINVAL.
 */
int xn_qp_set_enabled(struct xn_qp *qp, int ring, int enabled)
{
	if (ring != 0 && ring != 1)
		return -EINVAL;
	__atomic_store_n(ring ? &qp->tx.enabled : &qp->rx.enabled, !!enabled, __ATOMIC_RELEASE);
	wake(qp);
	return 0;
}

/**
 * xn_qp_set_call_fd() - swap a ring's call eventfd while running
 * @ring:	0 = rx, 1 = tx
 * @fd:		new eventfd, -1 for none; the caller keeps the old one open
 *		until the loop has stopped (it may be writing to it now)
 *
 * Return: 0 or -EINVAL.
 */
int xn_qp_set_call_fd(struct xn_qp *qp, int ring, int fd)
{
	if (ring != 0 && ring != 1)
		return -EINVAL;
	__atomic_store_n(ring ? &qp->tx.call_fd : &qp->rx.call_fd, fd, __ATOMIC_RELEASE);
	return 0;
}

/* refresh_stats() - copy the socket's kernel counters (XDP_STATISTICS). */
static void refresh_stats(struct xn_qp *qp)
{
	struct xdp_statistics st;
	socklen_t len = sizeof(st);
	struct xn_counters *c = qp->ctr;

	memset(&st, 0, sizeof(st));
	if (getsockopt(xsk_socket__fd(qp->xsk->xsk), SOL_XDP, XDP_STATISTICS, &st, &len))
		return;
	c->kernel_rx_dropped = st.rx_dropped;
	c->kernel_rx_invalid = st.rx_invalid_descs;
	c->kernel_tx_invalid = st.tx_invalid_descs;
	c->kernel_rx_ring_full = st.rx_ring_full;
	c->kernel_fill_empty = st.rx_fill_ring_empty_descs;
	c->kernel_tx_ring_empty = st.tx_ring_empty_descs;
	/* The kernel drops frames over max_frame (rx_dropped) and frames that
	 * found no buffer: fold them into the per-cause drops. */
	c->drop_no_rx_buffer = st.rx_fill_ring_empty_descs + st.rx_ring_full;
}

/* publish() - publish used entries of both rings and notify the guest. */
static void publish(struct xn_qp *qp)
{
	struct xn_vq *vqs[2] = { &qp->rx, &qp->tx };
	int i;

	for (i = 0; i < 2; i++) {
		struct xn_vq *vq = vqs[i];

		if (vq->used_idx == vq->signalled && vq->signalled_valid)
			continue;
		xn_vq_used_publish(vq);
		xn_vq_notify(vq);
	}
}

/* gauges() - update the occupancy gauges readers show. */
static void gauges(struct xn_qp *qp)
{
	struct xn_counters *c = qp->ctr;
	struct xn_xsk *x = qp->xsk;

	/* Ring occupancy as the kernel sees it (0 once the socket is gone). */
	c->fill_ring_used = x ? (uint32_t)(*x->fill.producer - *x->fill.consumer) : 0;
	c->rx_ring_used = x ? (uint32_t)(*x->rx.producer - *x->rx.consumer) : 0;
	c->tx_ring_used = x ? (uint32_t)(*x->tx.producer - *x->tx.consumer) : 0;
	c->rx_inflight = qp->rxmap.count + qp->slow_count;
	c->tx_inflight = qp->txq_count;
	c->rx_used_idx = qp->rx.used_idx;
	c->tx_used_idx = qp->tx.used_idx;
}

/* drain_fd() - read an eventfd to zero; Return: true if it was signalled. */
static bool drain_fd(int fd)
{
	uint64_t v;

	return fd >= 0 && read(fd, &v, sizeof(v)) == sizeof(v);
}

/* pass() - one round over both directions; Return: units of work done. */
static int pass(struct xn_qp *qp)
{
	int work = 0;

	work += xn_rx_receive(qp);
	work += xn_rx_refill(qp);
	work += xn_tx_complete(qp);
	work += xn_tx_send(qp);
	xn_tx_kick(qp);
	/* Copy mode completes inside sendto(): return those chains now. */
	work += xn_tx_complete(qp);
	publish(qp);
	return work;
}

/* fill_empty() - has the kernel taken every fill entry we posted?  Then
 * no frame can wake us up, only the guest posting buffers (a kick). */
static bool fill_empty(const struct xn_qp *qp)
{
	const struct xsk_ring_prod *f = &qp->xsk->fill;

	return __atomic_load_n(f->consumer, __ATOMIC_ACQUIRE) == *f->producer;
}

/* has_work() - after enabling kicks: is there something after all? */
static bool has_work(struct xn_qp *qp)
{
	struct xn_xsk *x = qp->xsk;

	if (xn_vq_avail(&qp->tx) > 0)
		return true;
	if (xsk_prod_nb_free(&x->fill, 1) && xn_vq_avail(&qp->rx) > 0 &&
	    (qp->rx_nfree || qp->rxmap.count < qp->rxmap.mask))
		return true;
	return xsk_cons_nb_avail(&x->rx, 1) > 0;
}

/**
 * xn_qp_run() - serve the queue pair until xn_qp_stop()
 *
 * Return: 0 when stopped, or -errno if poll() fails.
 */
int xn_qp_run(struct xn_qp *qp)
{
	uint64_t spin_ns = (uint64_t)qp->cfg.busy_poll_us * 1000, last_work = 0;
	struct pollfd pfd[4];
	int idle = 0;

	while (!__atomic_load_n(&qp->stopping, __ATOMIC_ACQUIRE)) {
		uint64_t t;
		int timeout;

		if (pass(qp)) {
			idle = 0;
			last_work = now_ns();
			gauges(qp);
			continue;
		}
		gauges(qp);
		/* Keep polling a little after the last work (NAPI-style busy
		 * poll): frames that arrive meanwhile cost no wake-up, which
		 * on veth is paid on the sender's CPU. */
		if (++idle < 4 || now_ns() - last_work < spin_ns)
			continue;
		/* rx kicks only when the fill ring is empty: otherwise the
		 * next frame wakes us and we refill then, so the guest need
		 * not pay a kick for every batch of buffers it posts. */
		xn_vq_enable_kick(&qp->rx, fill_empty(qp));
		xn_vq_enable_kick(&qp->tx, true);
		if (has_work(qp))
			continue;
		/* Idle: a good moment to copy the kernel's counters. */
		t = now_ns();
		if (t - qp->last_stats_ns > 50000000ULL) {
			refresh_stats(qp);
			qp->last_stats_ns = t;
		}
		pfd[0] = (struct pollfd){ .fd = xsk_socket__fd(qp->xsk->xsk), .events = POLLIN };
		pfd[1] = (struct pollfd){ .fd = qp->rx.kick_fd, .events = POLLIN };
		pfd[2] = (struct pollfd){ .fd = qp->tx.kick_fd, .events = POLLIN };
		pfd[3] = (struct pollfd){ .fd = qp->stop_fd, .events = POLLIN };
		/* Frames in flight on tx: completions may need another kick. */
		/* Wake at least every 250 ms so the kernel counters stay fresh. */
		timeout = qp->txq_count ? 1 : (int)(qp->cfg.poll_timeout_ms ? qp->cfg.poll_timeout_ms : 250);
		if (poll(pfd, 4, timeout) < 0 && errno != EINTR)
			return -errno;
		qp->ctr->wakeups++;
		if ((pfd[1].revents & POLLIN) && drain_fd(qp->rx.kick_fd))
			qp->ctr->rx_kicks++;
		if ((pfd[2].revents & POLLIN) && drain_fd(qp->tx.kick_fd))
			qp->ctr->tx_kicks++;
		if (pfd[3].revents & POLLIN)
			drain_fd(qp->stop_fd);
		if (qp->txq_count)
			qp->tx_kick_needed = true;
		if (!qp->rx.event_idx)
			xn_vq_enable_kick(&qp->rx, false);
		if (!qp->tx.event_idx)
			xn_vq_enable_kick(&qp->tx, false);
		idle = 0;
	}
	refresh_stats(qp);
	gauges(qp);
	return 0;
}

/**
 * xn_qp_drain() - after xn_qp_run() returned: deliver the frames already
 * in the rx ring and wait (up to @timeout_ms) for tx completions
 *
 * Takes nothing new from the guest.  Call before destroying the socket.
 *
 * Return: frames still awaiting completion (0 when fully drained).
 */
int xn_qp_drain(struct xn_qp *qp, uint32_t timeout_ms)
{
	uint64_t end = now_ns() + (uint64_t)timeout_ms * 1000000ULL;

	while (xn_rx_receive(qp) > 0)
		;
	while (qp->txq_count && now_ns() < end) {
		struct timespec ts = { 0, 200000 };

		qp->tx_kick_needed = true;
		xn_tx_kick(qp);
		if (!xn_tx_complete(qp))
			nanosleep(&ts, NULL);
	}
	publish(qp);
	refresh_stats(qp);
	gauges(qp);
	return (int)qp->txq_count;
}

/**
 * xn_qp_quiesce() - settle every descriptor still held, after the socket
 * is gone (so nothing can write into guest buffers any more), and return
 * the index each ring's next run must start from (GET_VRING_BASE)
 * @rx_last_avail:	set to the rx ring's last_avail_idx
 * @tx_last_avail:	set to the tx ring's last_avail_idx
 *
 * rx buffers posted but never filled are given back by rewinding
 * last_avail_idx when they are exactly the newest ones taken (the
 * common case: the guest sees them again after the restart); otherwise
 * each is returned used with length 0.  tx frames never completed are
 * returned used (counted as lost).  No descriptor is lost or returned
 * twice.
 *
 * Return: 0.
 */
int xn_qp_quiesce(struct xn_qp *qp, uint16_t *rx_last_avail, uint16_t *tx_last_avail)
{
	struct xn_rxmap *m = &qp->rxmap;
	uint32_t i, inflight = m->count + qp->slow_count, maxd = 0;

	qp->xsk = NULL;         /* destroyed by the caller before this call */
	xn_tx_abandon(qp);

	/* How far back does the oldest held rx buffer go? */
	for (i = 0; i <= m->mask; i++) {
		if (m->key[i]) {
			uint32_t d = (uint16_t)(qp->rx.last_avail - (m->val[i] >> 16));

			maxd = d > maxd ? d : maxd;
		}
	}
	for (i = 0; i < qp->slow_count; i++) {
		uint16_t a = qp->slow_aidx[(qp->slow_head + i) % qp->slow_cap];
		uint32_t d = (uint16_t)(qp->rx.last_avail - a);

		maxd = d > maxd ? d : maxd;
	}
	if (inflight && maxd == inflight && !*qp->rx.broken) {
		qp->rx.last_avail -= (uint16_t)inflight;
		qp->ctr->rx_rewound += inflight;
	} else if (inflight && !*qp->rx.broken) {
		for (i = 0; i <= m->mask; i++)
			if (m->key[i])
				xn_vq_used_add(&qp->rx, (uint16_t)(m->val[i] & 0xffff), 0);
		for (i = 0; i < qp->slow_count; i++)
			xn_vq_used_add(&qp->rx, qp->slow_fifo[(qp->slow_head + i) % qp->slow_cap], 0);
		qp->ctr->rx_returned_empty += inflight;
	}
	memset(m->key, 0, (m->mask + 1) * sizeof(*m->key));
	m->count = 0;
	qp->slow_count = 0;
	publish(qp);
	gauges(qp);
	*rx_last_avail = qp->rx.last_avail;
	*tx_last_avail = qp->tx.last_avail;
	return 0;
}

/**
 * xn_qp_rx_trace() - the last rx frames' placement, for tests and debug
 * @out:	filled with (frame address, posted buffer) UMEM offset pairs
 * @max_pairs:	room in @out
 *
 * Return: pairs written.
 */
int xn_qp_rx_trace(const struct xn_qp *qp, uint64_t *out, uint32_t max_pairs)
{
	uint32_t n = qp->trace_pos < XN_TRACE_LEN ? qp->trace_pos : XN_TRACE_LEN, i;

	if (n > max_pairs)
		n = max_pairs;
	for (i = 0; i < n; i++) {
		uint32_t p = (qp->trace_pos - n + i) % XN_TRACE_LEN;

		out[2 * i] = qp->trace[2 * p];
		out[2 * i + 1] = qp->trace[2 * p + 1];
	}
	return (int)n;
}
