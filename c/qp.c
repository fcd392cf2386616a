/* SPDX-License-Identifier: MIT */
/*
 * qp.c - one queue pair's datapath: the run loop that serves a guest rx
 * and tx virtqueue with one or two AF_XDP sockets (direct and port, over
 * the same guest memory), the table of local MACs the tx path consults,
 * and the stop protocol that hands every in-flight descriptor back
 * exactly once.
 *
 * The loop runs on its own thread (called through cffi with the GIL
 * released).  Each wake-up takes the whole available batch on both
 * directions, publishes the used rings with one release store each and
 * signals the guest once per ring; it sleeps in poll() on the sockets,
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

/* now_ns() - CLOCK_MONOTONIC in nanoseconds (vDSO: no system call). */
static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/**
 * sock_init() - set up one of the pair's sockets
 * @s:		the socket slot
 * @xsk:	the bound socket, NULL if the pair has none in this role
 * @fill_target: fill entries to keep posted, 0 = no cap
 *
 * Return: 0 or -ENOMEM.
 */
static int sock_init(struct xn_sock *s, struct xn_xsk *xsk, uint32_t fill_target)
{
	s->xsk = xsk;
	if (!xsk)
		return 0;
	s->txq_cap = xn_ceil_pow2(xsk->ring_size);
	s->txq = calloc(s->txq_cap, sizeof(*s->txq));
	if (fill_target > xsk->fill.size)
		fill_target = xsk->fill.size;
	s->fill_target = fill_target;
	return s->txq ? 0 : -ENOMEM;
}

/**
 * port_fill_target() - fill entries the port socket keeps posted when the
 * pair also has a direct socket
 *
 * Return: the configured target, or min(256, rx ring / 4); at least 1.
 */
static uint32_t port_fill_target(const struct xn_qp_config *cfg)
{
	uint32_t t = cfg->port_fill_target;

	if (!t)
		t = cfg->rx.num / 4 < 256 ? cfg->rx.num / 4 : 256;
	return t ? t : 1;
}

/**
 * napi_setup() - ask the kernel to let this thread run the queue's NAPI
 * @qp:		queue pair with cfg.napi_budget > 0
 *
 * SO_BUSY_POLL (needed for any socket busy poll), SO_PREFER_BUSY_POLL and
 * SO_BUSY_POLL_BUDGET on every socket: while the thread busy-polls
 * (napi_poll()), the kernel's XDP run and copy into the UMEM happen here
 * instead of in the softirq of whoever sent the frame (on veth: the
 * sender's CPU).  Our calls are non-blocking, so the kernel polls the
 * NAPI once per call and never spins on its own; a sleeping poll() does
 * not spin either while net.core.busy_poll is 0.
 *
 * Return: 0, or -errno from setsockopt() (-EPERM: budget needs CAP_NET_ADMIN).
 */
static int napi_setup(struct xn_qp *qp)
{
	int one = 1, budget = (int)qp->cfg.napi_budget, usec = 20, i, fd;

	for (i = 0; i < XN_NSOCK; i++) {
		if (!qp->sock[i].xsk)
			continue;
		fd = xsk_socket__fd(qp->sock[i].xsk->xsk);
		if (setsockopt(fd, SOL_SOCKET, SO_BUSY_POLL, &usec, sizeof(usec)) ||
		    setsockopt(fd, SOL_SOCKET, SO_PREFER_BUSY_POLL, &one, sizeof(one)) ||
		    setsockopt(fd, SOL_SOCKET, SO_BUSY_POLL_BUDGET, &budget, sizeof(budget)))
			return -errno;
	}
	return 0;
}

/**
 * napi_poll() - run the NIC queue's NAPI once on this thread
 * @qp:		queue pair in NAPI busy-poll mode
 *
 * A non-blocking recvfrom() on an AF_XDP socket busy-polls the NAPI
 * instance its frames came from (sk_busy_loop), up to the budget.
 */
static void napi_poll(struct xn_qp *qp)
{
	int i;

	for (i = 0; i < XN_NSOCK; i++)
		if (qp->sock[i].xsk)
			recvfrom(xsk_socket__fd(qp->sock[i].xsk->xsk), NULL, 0, MSG_DONTWAIT,
				 NULL, NULL);
}

/* kbase_init() - remember the counter block's kernel statistics so far:
 * the new pair's sockets count from 0, so the block shows base + theirs. */
static void kbase_init(struct xn_qp *qp)
{
	const struct xn_counters *c = qp->ctr;

	qp->kbase.rx_dropped = c->kernel_rx_dropped;
	qp->kbase.rx_invalid_descs = c->kernel_rx_invalid;
	qp->kbase.tx_invalid_descs = c->kernel_tx_invalid;
	qp->kbase.rx_ring_full = c->kernel_rx_ring_full;
	qp->kbase.rx_fill_ring_empty_descs = c->kernel_fill_empty;
	qp->kbase.tx_ring_empty_descs = c->kernel_tx_ring_empty;
}

/**
 * xn_qp_create() - prepare a queue pair's datapath (does not start it)
 * @out:	set to the new queue pair
 * @cfg:	memory map, sockets (direct, port or both), both rings,
 *		features, bounce slots, VM MAC
 * @ctr:	counter block the datapath writes: zeroed by the caller for a
 *		new device, or the block of an earlier pair on the same
 *		queues, whose counters then keep counting (the broken
 *		reasons are reset: the rings start afresh)
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

	if (!mem || !(cfg->xsk || cfg->port_xsk) || !ctr || cfg->bounce_count < 2 ||
	    (uint64_t)cfg->bounce_first + cfg->bounce_count > mem->bounce_slots ||
	    mem->chunk_size < XN_XDP_HEADROOM + mem->headroom + mem->max_frame ||
	    (cfg->xsk && cfg->xsk->umem->mem != mem) ||
	    (cfg->port_xsk && cfg->port_xsk->umem->mem != mem))
		return -EINVAL;
	qp = calloc(1, sizeof(*qp));
	if (!qp)
		return -ENOMEM;
	qp->cfg = *cfg;
	qp->mem = mem;
	qp->ctr = ctr;
	kbase_init(qp);
	qp->batch = cfg->batch ? cfg->batch : 64;
	qp->mrg_rxbuf = cfg->features & (1ULL << VIRTIO_NET_F_MRG_RXBUF);
	qp->vm_mac = cfg->vm_mac;
	qp->stop_fd = -1;
	err = xn_vq_init_pair(&qp->rx, &qp->tx, mem, &cfg->rx, &cfg->tx, cfg->features, ctr);
	if (err)
		goto fail;

	err = -ENOMEM;
	/* The port socket is capped only when the direct one takes the rest. */
	if (sock_init(&qp->sock[XN_SOCK_DIRECT], cfg->xsk, 0) ||
	    sock_init(&qp->sock[XN_SOCK_PORT], cfg->port_xsk,
		      cfg->xsk ? port_fill_target(cfg) : 0))
		goto fail;
	nrx = cfg->bounce_count / 2;
	ntx = cfg->bounce_count - nrx;
	qp->rx_slot_first = cfg->bounce_first;
	qp->rx_slot_count = nrx;
	qp->tx_slot_first = cfg->bounce_first + nrx;
	qp->tx_slot_count = ntx;
	qp->slow_cap = qp->rx.num;
	qp->slow_fifo = calloc(qp->slow_cap, sizeof(*qp->slow_fifo));
	qp->slow_seq = calloc(qp->slow_cap, sizeof(*qp->slow_seq));
	qp->rx_free_slots = calloc(nrx, sizeof(*qp->rx_free_slots));
	qp->tx_free_slots = calloc(ntx, sizeof(*qp->tx_free_slots));
	if (!qp->slow_fifo || !qp->slow_seq || !qp->rx_free_slots || !qp->tx_free_slots ||
	    xn_rxmap_init(&qp->rxmap, qp->rx.num))
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
	if (cfg->napi_budget && (err = napi_setup(qp)))
		goto fail;
	*out = qp;
	return 0;
fail:
	xn_qp_destroy(qp);
	return err;
}

/* xn_qp_destroy() - free a queue pair (its thread must have returned). */
void xn_qp_destroy(struct xn_qp *qp)
{
	int i;

	if (!qp)
		return;
	if (qp->stop_fd >= 0)
		close(qp->stop_fd);
	xn_rxmap_free(&qp->rxmap);
	free(qp->slow_fifo);
	free(qp->slow_seq);
	free(qp->rx_free_slots);
	free(qp->tx_free_slots);
	for (i = 0; i < XN_NSOCK; i++)
		free(qp->sock[i].txq);
	free(qp);
}

/* --- local MACs ------------------------------------------------------------ */

/*
 * The table of local MACs (the other VMs on the NIC) is written by the
 * control plane while the datapath runs, and must never be seen torn.
 * Double buffer with a generation counter:
 *
 *   writer (xn_qp_set_local_macs(), serialised by macs_lock): fills
 *   macs[(gen + 1) & 1] -- the buffer readers are not told about -- then
 *   publishes gen + 1 with a release store;
 *
 *   reader (the datapath, once per tx batch, xn_qp_local_macs_sync()):
 *   acquire-loads gen, copies macs[gen & 1] into its private table, and
 *   checks after an acquire fence that gen has not moved.  If it moved, a
 *   writer may have started on the buffer being copied (two updates in
 *   one copy): copy again.  The writer issues a release fence before it
 *   writes a buffer, so a copy that read any of those writes sees the
 *   moved gen.
 *
 * Per frame the datapath reads only its private copy: no atomics there.
 */

/**
 * xn_qp_set_local_macs() - replace the table of local MACs (thread-safe,
 * also while the pair runs)
 * @qp:		queue pair
 * @macs:	u64 MACs (xdpnet.h); frames to them go on the port socket
 * @n:		how many, at most XN_MAX_LOCAL_MACS
 *
 * Return: 0, or -EINVAL if @n is too large.
 */
int xn_qp_set_local_macs(struct xn_qp *qp, const uint64_t *macs, uint32_t n)
{
	struct xn_mactab *t;
	uint32_t gen, i;

	if (n > XN_MAX_LOCAL_MACS || (n && !macs))
		return -EINVAL;
	while (__atomic_exchange_n(&qp->macs_lock, 1, __ATOMIC_ACQUIRE))
		;
	gen = __atomic_load_n(&qp->macs_gen, __ATOMIC_RELAXED);
	t = &qp->macs[(gen + 1) & 1];
	__atomic_thread_fence(__ATOMIC_RELEASE);
	for (i = 0; i < n; i++)
		__atomic_store_n(&t->mac[i], macs[i], __ATOMIC_RELAXED);
	__atomic_store_n(&t->n, n, __ATOMIC_RELAXED);
	__atomic_store_n(&qp->macs_gen, gen + 1, __ATOMIC_RELEASE);
	__atomic_store_n(&qp->macs_lock, 0, __ATOMIC_RELEASE);
	return 0;
}

/* xn_qp_local_macs_sync() - refresh the datapath's copy of the table if a
 * writer published a new one (see above). */
void xn_qp_local_macs_sync(struct xn_qp *qp)
{
	uint32_t gen = __atomic_load_n(&qp->macs_gen, __ATOMIC_ACQUIRE), i, n;

	while (gen != qp->local_gen) {
		const struct xn_mactab *t = &qp->macs[gen & 1];

		n = __atomic_load_n(&t->n, __ATOMIC_RELAXED);
		n = n < XN_MAX_LOCAL_MACS ? n : XN_MAX_LOCAL_MACS;
		for (i = 0; i < n; i++)
			qp->local.mac[i] = __atomic_load_n(&t->mac[i], __ATOMIC_RELAXED);
		qp->local.n = n;
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
		qp->local_gen = gen;
		gen = __atomic_load_n(&qp->macs_gen, __ATOMIC_ACQUIRE);
	}
}

/* xn_qp_local_mac() - Return: true if @mac is in the datapath's copy of
 * the local MAC table. */
bool xn_qp_local_mac(struct xn_qp *qp, uint64_t mac)
{
	uint32_t i;

	for (i = 0; i < qp->local.n; i++)
		if (qp->local.mac[i] == mac)
			return true;
	return false;
}

/**
 * xn_qp_stop() - ask the run loop to return (thread-safe)
 *
 * Return: 0.
 */
int xn_qp_stop(struct xn_qp *qp)
{
	__atomic_store_n(&qp->stopping, 1, __ATOMIC_RELEASE);
	xn_efd_signal(qp->stop_fd);
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
	xn_vq_set_enabled(ring ? &qp->tx : &qp->rx, enabled);
	xn_efd_signal(qp->stop_fd);
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
	xn_vq_set_call_fd(ring ? &qp->tx : &qp->rx, fd);
	return 0;
}

/* refresh_stats() - copy the sockets' kernel counters (XDP_STATISTICS),
 * summed over the pair's sockets, on top of the earlier pairs' (kbase). */
static void refresh_stats(struct xn_qp *qp)
{
	struct xdp_statistics sum = qp->kbase, st;
	struct xn_counters *c = qp->ctr;
	int i, got = 0;

	for (i = 0; i < XN_NSOCK; i++) {
		socklen_t len = sizeof(st);

		if (!qp->sock[i].xsk)
			continue;
		memset(&st, 0, sizeof(st));
		if (getsockopt(xsk_socket__fd(qp->sock[i].xsk->xsk), SOL_XDP, XDP_STATISTICS,
			       &st, &len))
			return;         /* keep the last whole values */
		sum.rx_dropped += st.rx_dropped;
		sum.rx_invalid_descs += st.rx_invalid_descs;
		sum.tx_invalid_descs += st.tx_invalid_descs;
		sum.rx_ring_full += st.rx_ring_full;
		sum.rx_fill_ring_empty_descs += st.rx_fill_ring_empty_descs;
		sum.tx_ring_empty_descs += st.tx_ring_empty_descs;
		got++;
	}
	if (!got)
		return;
	c->kernel_rx_dropped = sum.rx_dropped;
	c->kernel_rx_invalid = sum.rx_invalid_descs;
	c->kernel_tx_invalid = sum.tx_invalid_descs;
	c->kernel_rx_ring_full = sum.rx_ring_full;
	c->kernel_fill_empty = sum.rx_fill_ring_empty_descs;
	c->kernel_tx_ring_empty = sum.tx_ring_empty_descs;
}

/* ring_used() - entries between a ring's consumer and producer. */
static inline uint32_t ring_used(const uint32_t *producer, const uint32_t *consumer)
{
	return __atomic_load_n(producer, __ATOMIC_RELAXED) -
	       __atomic_load_n(consumer, __ATOMIC_RELAXED);
}

/* gauges() - update the occupancy gauges readers show (summed over the
 * sockets; 0 once the sockets are gone). */
static void gauges(struct xn_qp *qp)
{
	struct xn_counters *c = qp->ctr;
	uint32_t fill = 0, rx = 0, tx = 0, port_fill = 0;
	int i;

	for (i = 0; i < XN_NSOCK; i++) {
		struct xn_xsk *x = qp->sock[i].xsk;
		uint32_t f;

		if (!x)
			continue;
		f = ring_used(x->fill.producer, x->fill.consumer);
		fill += f;
		if (i == XN_SOCK_PORT)
			port_fill = f;
		rx += ring_used(x->rx.producer, x->rx.consumer);
		tx += ring_used(x->tx.producer, x->tx.consumer);
	}
	c->fill_ring_used = fill;
	c->port_fill_ring_used = port_fill;
	c->rx_ring_used = rx;
	c->tx_ring_used = tx;
	c->rx_inflight = qp->rxmap.count + qp->slow_count;
	c->tx_inflight = xn_tx_inflight(qp);
	c->rx_used_idx = qp->rx.used_idx;
	c->tx_used_idx = qp->tx.used_idx;
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
	xn_vq_flush(&qp->rx);
	xn_vq_flush(&qp->tx);
	return work;
}

/* rx_kick_wanted() - should the guest kick when it posts rx buffers?
 * Yes if a fill ring is empty: frames for that socket find no buffer and
 * cannot wake us.  Yes too if a capped (port) fill ring is below its
 * target: it holds few buffers, so it is topped up as soon as the guest
 * has some rather than at the next frame, when a burst would find too
 * few.  Otherwise the next frame wakes us and we refill then. */
static bool rx_kick_wanted(struct xn_qp *qp)
{
	int i;

	for (i = 0; i < XN_NSOCK; i++) {
		struct xn_sock *s = &qp->sock[i];
		const struct xsk_ring_prod *f;

		if (!s->xsk)
			continue;
		f = &s->xsk->fill;
		if (__atomic_load_n(f->consumer, __ATOMIC_ACQUIRE) == *f->producer)
			return true;
		if (s->fill_target && xn_rx_fill_room(qp, s))
			return true;
	}
	return false;
}

/* has_work() - after enabling kicks: is there something after all?
 * (Mirrors what pass() would do, so that it never spins on nothing: rx
 * buffers waiting for a bounce slot are no work until a frame frees one.)
 * Return: true if pass() may find work now. */
static bool has_work(struct xn_qp *qp)
{
	bool can_post = !qp->rx_stalled && xn_vq_avail(&qp->rx) > 0;
	int i;

	if (xn_vq_avail(&qp->tx) > 0)
		return true;
	for (i = 0; i < XN_NSOCK; i++) {
		struct xn_sock *s = &qp->sock[i];

		if (!s->xsk)
			continue;
		if (can_post && xn_rx_fill_room(qp, s))
			return true;
		if (xsk_cons_nb_avail(&s->xsk->rx, 1) > 0)
			return true;
	}
	return false;
}

/**
 * idle_timeout() - how long an idle loop may sleep in poll()
 *
 * 1 ms while tx frames are in flight (completions may need another kick)
 * or while a ring has no kick eventfd (vhost-user: the frontend set bit 8
 * of SET_VRING_KICK, the ring is polled); else the configured idle
 * timeout, 250 ms by default, so that the kernel counters stay fresh.
 *
 * Return: the timeout in milliseconds.
 */
static int idle_timeout(const struct xn_qp *qp)
{
	if (xn_tx_inflight(qp) || qp->rx.kick_fd < 0 || qp->tx.kick_fd < 0)
		return 1;
	return (int)(qp->cfg.poll_timeout_ms ? qp->cfg.poll_timeout_ms : 250);
}

/**
 * run_loop() - serve the queue pair until xn_qp_stop()
 *
 * Return: 0 when stopped, or -errno if poll() fails.
 */
static int run_loop(struct xn_qp *qp)
{
	uint64_t spin_ns = (uint64_t)qp->cfg.busy_poll_us * 1000, last_work = 0;
	struct pollfd pfd[5];
	int idle = 0;

	while (!__atomic_load_n(&qp->stopping, __ATOMIC_ACQUIRE)) {
		uint64_t t;
		int npfd = 3, i;

		if (qp->cfg.napi_budget)
			napi_poll(qp);
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
		/* rx kicks only when a fill ring runs dry (or a port ring is
		 * below its target): otherwise the next frame wakes us and we
		 * refill then, so the guest need not pay a kick for every
		 * batch of buffers it posts. */
		xn_vq_enable_kick(&qp->rx, rx_kick_wanted(qp));
		xn_vq_enable_kick(&qp->tx, true);
		if (has_work(qp))
			continue;
		/* Idle: a good moment to copy the kernel's counters. */
		t = now_ns();
		if (t - qp->last_stats_ns > 50000000ULL) {
			refresh_stats(qp);
			qp->last_stats_ns = t;
		}
		pfd[0] = (struct pollfd){ .fd = qp->rx.kick_fd, .events = POLLIN };
		pfd[1] = (struct pollfd){ .fd = qp->tx.kick_fd, .events = POLLIN };
		pfd[2] = (struct pollfd){ .fd = qp->stop_fd, .events = POLLIN };
		for (i = 0; i < XN_NSOCK; i++)
			if (qp->sock[i].xsk)
				pfd[npfd++] = (struct pollfd){ .fd = xsk_socket__fd(qp->sock[i].xsk->xsk),
							       .events = POLLIN };
		if (poll(pfd, npfd, idle_timeout(qp)) < 0 && errno != EINTR)
			return -errno;
		qp->ctr->wakeups++;
		if ((pfd[0].revents & POLLIN) && xn_efd_drain(qp->rx.kick_fd))
			qp->ctr->rx_kicks++;
		if ((pfd[1].revents & POLLIN) && xn_efd_drain(qp->tx.kick_fd))
			qp->ctr->tx_kicks++;
		if (pfd[2].revents & POLLIN)
			xn_efd_drain(qp->stop_fd);
		for (i = 0; i < XN_NSOCK; i++)
			if (qp->sock[i].txq_count)
				qp->sock[i].tx_kick_needed = true;
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
 * xn_qp_run() - serve the queue pair until xn_qp_stop(), surviving a
 * frontend that truncates guest memory (fault.c)
 *
 * Return: 0 when stopped, -EFAULT if guest memory vanished (the pair is
 * then broken for good), or -errno if poll() fails.
 */
int xn_qp_run(struct xn_qp *qp)
{
	struct xn_fault_guard g;
	int ret;

	if (qp->mem_fault)
		return -EFAULT;
	if (sigsetjmp(g.jb, 1))
		return xn_fault_caught(qp);
	xn_fault_arm(&g, qp->mem);
	ret = run_loop(qp);
	xn_fault_disarm();
	return ret;
}

/**
 * xn_qp_drain() - after xn_qp_run() returned: deliver the frames already
 * in the rx rings and wait (up to @timeout_ms) for tx completions, on
 * every socket of the pair
 *
 * Takes nothing new from the guest.  Call before destroying the sockets.
 *
 * Return: frames still awaiting completion (0 when fully drained).
 */
int xn_qp_drain(struct xn_qp *qp, uint32_t timeout_ms)
{
	uint64_t end = now_ns() + (uint64_t)timeout_ms * 1000000ULL;
	struct xn_fault_guard g;
	int i;

	if (qp->mem_fault)
		return 0;
	if (sigsetjmp(g.jb, 1))
		return xn_fault_caught(qp), 0;
	xn_fault_arm(&g, qp->mem);
	while (xn_rx_receive(qp) > 0)
		;
	while (xn_tx_inflight(qp) && now_ns() < end) {
		struct timespec ts = { 0, 200000 };

		for (i = 0; i < XN_NSOCK; i++)
			qp->sock[i].tx_kick_needed = qp->sock[i].txq_count > 0;
		xn_tx_kick(qp);
		if (!xn_tx_complete(qp))
			nanosleep(&ts, NULL);
	}
	xn_vq_flush(&qp->rx);
	xn_vq_flush(&qp->tx);
	xn_fault_disarm();
	refresh_stats(qp);
	gauges(qp);
	return (int)xn_tx_inflight(qp);
}

/**
 * held_run() - how many of the newest rx buffers taken are all still held
 * @qp:		queue pair
 *
 * Marks the take distance (1 = the newest) of every held buffer, direct
 * (rxmap) or waiting for a bounce frame, and counts the unbroken run from
 * 1 up.  Those can be given back by rewinding last_avail_idx: the guest's
 * avail ring still names them in those slots.
 *
 * Return: the run's length (0 if the marks cannot be allocated: the
 * caller then returns every held buffer used).
 */
static uint32_t held_run(struct xn_qp *qp)
{
	const struct xn_rxmap *m = &qp->rxmap;
	uint32_t num = qp->rx.num, i, k = 0;
	uint8_t *mark = calloc(num + 1, 1);
	uint64_t d;

	if (!mark)
		return 0;
	for (i = 0; i <= m->mask; i++) {
		if (!m->key[i])
			continue;
		d = qp->rx_seq - (m->val[i] >> 16);
		if (d <= num)
			mark[d] = 1;
	}
	for (i = 0; i < qp->slow_count; i++) {
		d = qp->rx_seq - qp->slow_seq[(qp->slow_head + i) % qp->slow_cap];
		if (d <= num)
			mark[d] = 1;
	}
	while (k < num && mark[k + 1])
		k++;
	free(mark);
	return k;
}

/**
 * xn_qp_quiesce() - settle every descriptor still held, after the sockets
 * are gone (so nothing can write into guest buffers any more), and return
 * the index each ring's next run must start from (GET_VRING_BASE)
 * @rx_last_avail:	set to the rx ring's last_avail_idx
 * @tx_last_avail:	set to the tx ring's last_avail_idx
 *
 * rx buffers posted (to either fill ring) but never filled: the newest
 * ones, as far back as all are held, are given back by rewinding
 * last_avail_idx (the guest sees them again after the restart); older
 * held ones -- e.g. a port fill ring's buffers, waiting while newer ones
 * were used on the direct socket -- are returned used with length 0.  tx
 * frames never completed, on either socket, are returned used (counted
 * as lost).  No descriptor is lost or returned twice.
 *
 * Return: 0.
 */
int xn_qp_quiesce(struct xn_qp *qp, uint16_t *rx_last_avail, uint16_t *tx_last_avail)
{
	struct xn_rxmap *m = &qp->rxmap;
	uint32_t i, inflight = m->count + qp->slow_count, run = 0;
	struct xn_fault_guard g;
	uint64_t d;

	/* Destroyed by the caller before this call. */
	qp->sock[XN_SOCK_DIRECT].xsk = NULL;
	qp->sock[XN_SOCK_PORT].xsk = NULL;
	if (sigsetjmp(g.jb, 1)) {
		xn_fault_caught(qp);
		goto out;
	}
	if (!qp->mem_fault)
		xn_fault_arm(&g, qp->mem);
	else
		goto out;
	xn_tx_abandon(qp);

	if (inflight && !*qp->rx.broken) {
		run = held_run(qp);
		for (i = 0; i <= m->mask; i++) {
			if (!m->key[i])
				continue;
			d = qp->rx_seq - (m->val[i] >> 16);
			if (d > run)
				xn_vq_used_add(&qp->rx, (uint16_t)(m->val[i] & 0xffff), 0);
		}
		for (i = 0; i < qp->slow_count; i++) {
			uint32_t at = (qp->slow_head + i) % qp->slow_cap;

			if (qp->rx_seq - qp->slow_seq[at] > run)
				xn_vq_used_add(&qp->rx, qp->slow_fifo[at], 0);
		}
		qp->rx.last_avail -= (uint16_t)run;
		qp->ctr->rx_rewound += run;
		qp->ctr->rx_returned_empty += inflight - run;
	}
	xn_vq_flush(&qp->rx);
	xn_vq_flush(&qp->tx);
	xn_fault_disarm();
out:
	memset(m->key, 0, (m->mask + 1) * sizeof(*m->key));
	m->count = 0;
	qp->slow_count = 0;
	qp->rx_stalled = false;
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
