/* SPDX-License-Identifier: MIT */
/*
 * tap.c - the tap baseline datapath: one rx and one tx virtqueue served
 * with a tap device, one read() or write() system call per frame, as
 * QEMU's virtio-net does with a tap netdev and no vhost-net.
 *
 * The virtqueue side is the AF_XDP datapath's own (virtq.c): the same
 * validated chain walks (a hostile chain stops its queue), the same used
 * ring and event-index notifications.  Only the frame transport differs:
 *
 *   rx (tap -> guest): take an rx chain, readv() the next frame straight
 *   into it after the 12-byte virtio-net header (plus a small overflow
 *   buffer that tells a frame too large for the chain), write the header,
 *   return the chain.  With no guest buffer the tap is not read: frames
 *   wait in the tap's queue, which drops when full (as with QEMU).
 *
 *   tx (guest -> tap): take a tx chain, writev() its segments after the
 *   header, return the chain.  EAGAIN from the tap leaves the chain in the
 *   avail ring until the tap polls writable.
 *
 * Each pass moves up to a batch of frames each way, then publishes both
 * used rings with one release store each and signals the guest once per
 * ring.  Idle, the loop sleeps in poll() on both kick eventfds, the stop
 * eventfd and the tap (POLLIN only while the guest has rx buffers, POLLOUT
 * only after EAGAIN), having asked the guest for kicks and re-checked the
 * rings so that no kick is lost.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "dp.h"
#include "tap.h"

#define TAP_OVERFLOW 256        /* read past the chain: a frame reaching it did not fit */

struct xn_tap {
	const struct xn_memmap *mem;
	struct xn_counters *ctr;
	struct xn_vq rx;
	struct xn_vq tx;
	uint32_t batch;
	uint32_t poll_timeout_ms;
	int fd;                 /* the tap (caller's) */
	int stop_fd;            /* eventfd: xn_tap_stop(), set_enabled() */
	int stopping;           /* atomic */
	bool mem_fault;         /* guest memory vanished: never touch it again */
	bool rx_wait;           /* the tap had no frame at the last read: wait for POLLIN */
	bool tx_wait;           /* the tap refused a write (EAGAIN): wait for POLLOUT */
	struct xn_chain ch;     /* the chain being handled */
	struct iovec iov[XN_MAX_SEGS + 1];
	uint8_t overflow[TAP_OVERFLOW];
};

/**
 * xn_tap_create() - prepare a tap queue pair (does not start it)
 * @out:	set to the new pair
 * @cfg:	memory map, rings, features, counters, tap fd (made non-blocking)
 *
 * The counters keep counting from their current values (the broken
 * reasons are reset: the rings start afresh), as with xn_qp_create().
 *
 * Return: 0, -EINVAL for a bad configuration, -EBADF for a bad fd, -ENOMEM.
 */
int xn_tap_create(struct xn_tap **out, const struct xn_tap_config *cfg)
{
	struct xn_counters *ctr = cfg ? cfg->counters : NULL;
	struct xn_tap *t;
	int flags, err;

	if (!cfg || !cfg->mem || !ctr || cfg->tap_fd < 0)
		return -EINVAL;
	flags = fcntl(cfg->tap_fd, F_GETFL);
	if (flags < 0 || (!(flags & O_NONBLOCK) &&
			  fcntl(cfg->tap_fd, F_SETFL, flags | O_NONBLOCK) < 0))
		return -errno;
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->mem = cfg->mem;
	t->ctr = ctr;
	t->fd = cfg->tap_fd;
	t->stop_fd = -1;
	t->batch = cfg->batch ? cfg->batch : 64;
	t->poll_timeout_ms = cfg->poll_timeout_ms ? cfg->poll_timeout_ms : 250;
	err = xn_vq_init_pair(&t->rx, &t->tx, t->mem, &cfg->rx, &cfg->tx, cfg->features, ctr);
	if (err)
		goto fail;
	t->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (t->stop_fd < 0) {
		err = -errno;
		goto fail;
	}
	*out = t;
	return 0;
fail:
	xn_tap_destroy(t);
	return err;
}

/* xn_tap_destroy() - free a tap pair (its thread must have returned; the
 * tap fd stays open: it is the caller's). */
void xn_tap_destroy(struct xn_tap *t)
{
	if (!t)
		return;
	if (t->stop_fd >= 0)
		close(t->stop_fd);
	free(t);
}

/**
 * xn_tap_stop() - ask the run loop to return (thread-safe)
 *
 * Return: 0.
 */
int xn_tap_stop(struct xn_tap *t)
{
	__atomic_store_n(&t->stopping, 1, __ATOMIC_RELEASE);
	xn_efd_signal(t->stop_fd);
	return 0;
}

/**
 * xn_tap_set_enabled() - SET_VRING_ENABLE for one ring (thread-safe)
 * @ring:	0 = rx, 1 = tx
 *
 * Return: 0 or -EINVAL.
 */
int xn_tap_set_enabled(struct xn_tap *t, int ring, int enabled)
{
	if (ring != 0 && ring != 1)
		return -EINVAL;
	xn_vq_set_enabled(ring ? &t->tx : &t->rx, enabled);
	xn_efd_signal(t->stop_fd);
	return 0;
}

/**
 * xn_tap_set_call_fd() - swap a ring's call eventfd while running
 * @ring:	0 = rx, 1 = tx
 * @fd:		new eventfd, -1 for none; the caller keeps the old one open
 *		until the loop has stopped
 *
 * Return: 0 or -EINVAL.
 */
int xn_tap_set_call_fd(struct xn_tap *t, int ring, int fd)
{
	if (ring != 0 && ring != 1)
		return -EINVAL;
	xn_vq_set_call_fd(ring ? &t->tx : &t->rx, fd);
	return 0;
}

/* mem_gone() - guest memory vanished (SIGBUS, or EFAULT from the kernel's
 * copy): stop both queues for good.  Return: -EFAULT. */
static int mem_gone(struct xn_tap *t)
{
	t->mem_fault = true;
	xn_vq_break(&t->rx, XN_BROKEN_MEMORY);
	xn_vq_break(&t->tx, XN_BROKEN_MEMORY);
	return -EFAULT;
}

/**
 * chain_iov() - describe a walked chain from byte @skip on as an iovec
 * @mem:	the UMEM map
 * @ch:		the chain
 * @skip:	bytes to leave out at the start (the virtio-net header)
 * @iov:	filled, room for XN_MAX_SEGS entries
 *
 * Return: entries written (0 if the chain is not longer than @skip).
 */
static int chain_iov(const struct xn_memmap *mem, const struct xn_chain *ch, uint32_t skip,
		     struct iovec *iov)
{
	int n = 0;
	uint32_t i;

	for (i = 0; i < ch->nseg; i++) {
		uint32_t len = ch->seg[i].len;

		if (skip >= len) {
			skip -= len;
			continue;
		}
		iov[n].iov_base = xn_umem_ptr(mem, ch->seg[i].off + skip);
		iov[n].iov_len = len - skip;
		skip = 0;
		n++;
	}
	return n;
}

/**
 * rx_one() - move one frame from the tap into the next guest rx chain
 * @t:		tap pair
 *
 * A frame longer than the chain (it reached the overflow buffer) is
 * dropped, counted in drop_too_large; the chain stays available.
 *
 * Return: 1 if a frame was taken from the tap (delivered or dropped), 0 if
 * there is no guest buffer, no frame (rx_wait set) or the queue broke,
 * -EFAULT if guest memory vanished, other -errno from readv().
 */
static int rx_one(struct xn_tap *t)
{
	static const struct virtio_net_hdr_v1 hdr = { .num_buffers = 1 };
	struct xn_chain *ch = &t->ch;
	struct xn_vq *vq = &t->rx;
	uint32_t cap;
	ssize_t r;
	int n;

	if (xn_vq_avail(vq) <= 0)
		return 0;
	if (xn_vq_walk(t->mem, vq, xn_vq_head(vq), ch))
		return 0;
	cap = ch->total > XN_VNET_HDR_LEN ? ch->total - XN_VNET_HDR_LEN : 0;
	n = chain_iov(t->mem, ch, XN_VNET_HDR_LEN, t->iov);
	t->iov[n].iov_base = t->overflow;
	t->iov[n].iov_len = sizeof(t->overflow);
	r = readv(t->fd, t->iov, n + 1);
	if (r <= 0) {
		if (r == 0 || errno == EAGAIN || errno == EWOULDBLOCK) {
			t->rx_wait = true;
			return 0;
		}
		if (errno == EINTR)
			return 1;
		return errno == EFAULT ? mem_gone(t) : -errno;
	}
	if ((uint64_t)r > cap) {
		t->ctr->drop_too_large++;
		return 1;
	}
	xn_chain_write(t->mem, ch, 0, (const uint8_t *)&hdr, sizeof(hdr));
	xn_vq_used_add(vq, ch->head, (uint32_t)r + XN_VNET_HDR_LEN);
	vq->last_avail++;
	t->ctr->rx_frames++;
	t->ctr->rx_bytes += (uint64_t)r;
	t->ctr->rx_copied_frames++;
	t->ctr->rx_copied_bytes += (uint64_t)r;
	return 1;
}

/**
 * tx_one() - write the next guest tx chain's frame to the tap
 * @t:		tap pair
 *
 * A chain too short for a header and an Ethernet header is returned at
 * once (drop_invalid_desc); a frame the tap refuses with an error other
 * than EAGAIN is returned too (drop_tx_error).
 *
 * Return: 1 if a chain was handled, 0 if none is available, the tap is
 * full (tx_wait set, the chain stays in the avail ring) or the queue
 * broke, -EFAULT if guest memory vanished.
 */
static int tx_one(struct xn_tap *t)
{
	struct xn_chain *ch = &t->ch;
	struct xn_vq *vq = &t->tx;
	uint32_t len;
	ssize_t r;
	int n;

	if (xn_vq_avail(vq) <= 0)
		return 0;
	if (xn_vq_walk(t->mem, vq, xn_vq_head(vq), ch))
		return 0;
	len = ch->total > XN_VNET_HDR_LEN ? ch->total - XN_VNET_HDR_LEN : 0;
	if (len < 14) {
		t->ctr->drop_invalid_desc++;
	} else {
		n = chain_iov(t->mem, ch, XN_VNET_HDR_LEN, t->iov);
		t->ctr->tx_syscalls++;
		r = writev(t->fd, t->iov, n);
		if (r < 0) {
			switch (errno) {
			case EAGAIN:
				t->tx_wait = true;
				return 0;
			case EINTR:
				return 1;       /* the chain stays: retried next */
			case EFAULT:
				return mem_gone(t);
			default:                /* refused (e.g. EINVAL, EIO): dropped */
				t->ctr->drop_tx_error++;
				break;
			}
		} else {
			t->ctr->tx_frames++;
			t->ctr->tx_bytes += len;
			t->ctr->tx_copied_frames++;
			t->ctr->tx_copied_bytes += len;
		}
	}
	xn_vq_used_add(vq, ch->head, 0);
	vq->last_avail++;
	return 1;
}

/* gauges() - update the gauges readers show (nothing is ever held in
 * flight: every chain taken is returned in the same pass). */
static void gauges(struct xn_tap *t)
{
	t->ctr->rx_used_idx = t->rx.used_idx;
	t->ctr->tx_used_idx = t->tx.used_idx;
	t->ctr->rx_inflight = 0;
	t->ctr->tx_inflight = 0;
}

/**
 * pass() - one round: up to a batch of frames each way, then publish
 *
 * Return: units of work done (frames or chains), or a negative error
 * from rx_one()/tx_one().
 */
static int pass(struct xn_tap *t)
{
	int work = 0, err = 0, r = 0;
	uint32_t i;

	for (i = 0; i < t->batch && !t->rx_wait; i++) {
		r = rx_one(t);
		if (r <= 0)
			break;
		work++;
	}
	if (r < 0)
		err = r;
	r = 0;
	for (i = 0; !err && i < t->batch && !t->tx_wait; i++) {
		r = tx_one(t);
		if (r <= 0)
			break;
		work++;
	}
	if (r < 0)
		err = r;
	if (!t->mem_fault) {
		xn_vq_flush(&t->rx);
		xn_vq_flush(&t->tx);
	}
	return err ? err : work;
}

/* has_work() - after enabling kicks: may a pass find work now?
 * (tx chains and a writable tap, or rx buffers and a tap not known empty) */
static bool has_work(struct xn_tap *t)
{
	if (!t->tx_wait && xn_vq_avail(&t->tx) > 0)
		return true;
	return !t->rx_wait && xn_vq_avail(&t->rx) > 0;
}

/* idle_timeout() - Return: ms an idle loop sleeps: 1 if a ring has no
 * kick eventfd (the frontend polls it, so must we), else the configured
 * timeout. */
static int idle_timeout(const struct xn_tap *t)
{
	if (t->rx.kick_fd < 0 || t->tx.kick_fd < 0)
		return 1;
	return (int)t->poll_timeout_ms;
}

/**
 * sleep_once() - sleep in poll() until a kick, the tap, a stop or the
 * timeout, and note what woke us
 *
 * Return: 0, or -errno if poll() fails.
 */
static int sleep_once(struct xn_tap *t)
{
	struct pollfd pfd[4];
	short ev = 0;

	/* Frames wake us only while there is a guest buffer to put them in;
	 * writability only matters after EAGAIN. */
	if (xn_vq_avail(&t->rx) > 0)
		ev |= POLLIN;
	if (t->tx_wait)
		ev |= POLLOUT;
	pfd[0] = (struct pollfd){ .fd = t->rx.kick_fd, .events = POLLIN };
	pfd[1] = (struct pollfd){ .fd = t->tx.kick_fd, .events = POLLIN };
	pfd[2] = (struct pollfd){ .fd = t->stop_fd, .events = POLLIN };
	pfd[3] = (struct pollfd){ .fd = ev ? t->fd : -1, .events = ev };
	if (poll(pfd, 4, idle_timeout(t)) < 0 && errno != EINTR)
		return -errno;
	t->ctr->wakeups++;
	if ((pfd[0].revents & POLLIN) && xn_efd_drain(t->rx.kick_fd)) {
		t->ctr->rx_kicks++;
		t->rx_wait = false;     /* new buffers: try the tap again */
	}
	if ((pfd[1].revents & POLLIN) && xn_efd_drain(t->tx.kick_fd))
		t->ctr->tx_kicks++;
	if (pfd[2].revents & POLLIN)
		xn_efd_drain(t->stop_fd);
	if (pfd[3].revents & (POLLIN | POLLERR | POLLHUP))
		t->rx_wait = false;
	if (pfd[3].revents & (POLLOUT | POLLERR | POLLHUP))
		t->tx_wait = false;
	return 0;
}

/**
 * run_loop() - serve the pair until xn_tap_stop()
 *
 * Return: 0 when stopped, or a negative error from a pass or poll().
 */
static int run_loop(struct xn_tap *t)
{
	int r;

	while (!__atomic_load_n(&t->stopping, __ATOMIC_ACQUIRE)) {
		r = pass(t);
		gauges(t);
		if (r < 0)
			return r;
		if (r > 0)
			continue;
		/* Idle.  rx kicks only when the guest has no rx buffer left
		 * (otherwise the tap wakes us); tx kicks always.  Then look
		 * again: the guest may have added entries just before. */
		xn_vq_enable_kick(&t->rx, xn_vq_avail(&t->rx) <= 0);
		xn_vq_enable_kick(&t->tx, true);
		if (has_work(t))
			continue;
		r = sleep_once(t);
		if (r < 0)
			return r;
		if (!t->rx.event_idx)
			xn_vq_enable_kick(&t->rx, false);
		if (!t->tx.event_idx)
			xn_vq_enable_kick(&t->tx, false);
	}
	return 0;
}

/**
 * xn_tap_run() - serve the pair until xn_tap_stop() (call with the GIL
 * released), surviving a frontend that truncates guest memory (fault.c)
 *
 * Return: 0 when stopped, -EFAULT if guest memory vanished (the pair is
 * then broken for good), or -errno from poll() or the tap.
 */
int xn_tap_run(struct xn_tap *t)
{
	struct xn_fault_guard g;
	int ret;

	if (t->mem_fault)
		return -EFAULT;
	if (sigsetjmp(g.jb, 1))
		return mem_gone(t);     /* the handler disarmed the guard */
	xn_fault_arm(&g, t->mem);
	ret = run_loop(t);
	xn_fault_disarm();
	return ret;
}

/**
 * xn_tap_quiesce() - after xn_tap_run() returned: publish what is left and
 * return the index each ring's next run starts from (GET_VRING_BASE)
 * @rx_last_avail:	set to the rx ring's last_avail_idx
 * @tx_last_avail:	set to the tx ring's last_avail_idx
 *
 * The loop holds no descriptor between passes (each chain is returned in
 * the pass that took it), so nothing needs handing back.
 *
 * Return: 0.
 */
int xn_tap_quiesce(struct xn_tap *t, uint16_t *rx_last_avail, uint16_t *tx_last_avail)
{
	struct xn_fault_guard g;

	if (!t->mem_fault) {
		if (sigsetjmp(g.jb, 1)) {
			mem_gone(t);
		} else {
			xn_fault_arm(&g, t->mem);
			xn_vq_flush(&t->rx);
			xn_vq_flush(&t->tx);
			xn_fault_disarm();
		}
	}
	gauges(t);
	*rx_last_avail = t->rx.last_avail;
	*tx_last_avail = t->tx.last_avail;
	return 0;
}
