/* SPDX-License-Identifier: MIT */
/*
 * wire.c - the peer on the wire side of a test bed (AF_PACKET) and the
 * AF_XDP throughput ceilings (rx-drop, tx-push), see wire.h.
 *
 * The AF_PACKET peer batches with sendmmsg()/recvmmsg(), bypasses the
 * qdisc and retries frames the device refused for lack of room (veth
 * reports a full peer ring as ENOBUFS), so that "sent" means "handed to
 * the peer".  Received frames are checked byte for byte with
 * xn_frame_check(); frames the socket itself sent are ignored
 * (PACKET_IGNORE_OUTGOING, and the packet type as a second guard).
 *
 * The ceilings use libxdp's xsk API over an anonymous UMEM and never load
 * an XDP program: the caller redirects frames to them through an XSKMAP.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/if_xdp.h>

#include <xdp/xsk.h>

#include "frame.h"
#include "wire.h"

#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif
#ifndef XDP_MAX_TX_SKB_BUDGET
#define XDP_MAX_TX_SKB_BUDGET 9         /* Linux 6.15+: frames per copy-mode sendto */
#endif

#define NSEC_PER_MSEC 1000000ULL
#define WIRE_SOCKBUF (16 << 20)         /* socket buffers: a whole burst fits */
#define WIRE_POLL_MS 20                 /* poll() slice: how soon "stop" is seen */
#define WIRE_STUCK_NS (2000 * NSEC_PER_MSEC)    /* no tx progress: give up */

#define AFXDP_RING 2048                 /* rx, tx and completion ring entries */
#define AFXDP_BATCH 256                 /* descriptors per ring pass */
#define AFXDP_SPIN_NS 20000             /* busy-poll this long before sleeping */
#define AFXDP_BUSY_NS (500 * NSEC_PER_MSEC)     /* retry EBUSY binds this long */
#define AFXDP_DRAIN_NS (200 * NSEC_PER_MSEC)    /* wait for tx completions at the end */
#define AFXDP_FILL_WAIT_NS (1000 * NSEC_PER_MSEC) /* wait for fill-ring room this long */

/* ---- time and stop requests ---------------------------------------- */

/**
 * now_ns() - read the monotonic clock
 *
 * Return: nanoseconds of CLOCK_MONOTONIC
 */
static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/**
 * deadline_of() - the end of a run that starts now
 * @start:		start of the run, from now_ns()
 * @duration_ms:	length of the run, 0 for "until stopped"
 *
 * Return: the deadline in now_ns() time, UINT64_MAX for no deadline
 */
static uint64_t deadline_of(uint64_t start, uint32_t duration_ms)
{
	return duration_ms ? start + duration_ms * NSEC_PER_MSEC : UINT64_MAX;
}

/**
 * poll_ms() - how long one poll() may sleep before a deadline
 * @deadline:	from deadline_of(), or UINT64_MAX
 * @slice_ms:	the longest sleep wanted (so that stop requests are seen)
 *
 * Return: milliseconds to sleep, 0 when the deadline has passed
 */
static int poll_ms(uint64_t deadline, int slice_ms)
{
	uint64_t t = now_ns(), left;

	if (t >= deadline)
		return 0;
	left = (deadline - t + NSEC_PER_MSEC - 1) / NSEC_PER_MSEC;
	return left < (uint64_t)slice_ms ? (int)left : slice_ms;
}

/**
 * stop_requested() - has another thread asked the running call to end?
 * @stop:	the "stop" field of a stats structure
 *
 * Return: non-zero if so
 */
static int stop_requested(const uint32_t *stop)
{
	return __atomic_load_n(stop, __ATOMIC_RELAXED) != 0;
}

/**
 * wait_fd() - sleep in poll() until @fd has @events or @ms pass
 * @fd:		socket
 * @events:	POLLIN or POLLOUT
 * @ms:		timeout
 *
 * Return: poll()'s result (EINTR counts as a timeout)
 */
static int wait_fd(int fd, short events, int ms)
{
	struct pollfd pfd = { .fd = fd, .events = events };
	int rc = poll(&pfd, 1, ms);

	return rc < 0 && errno == EINTR ? 0 : rc;
}

/* ---- per-flow duplicate and reordering tracking -------------------- */

/**
 * flow_slot() - find or claim the tracking slot of @flow
 * @st:		stats whose flow table is searched
 * @flow:	flow id
 *
 * Return: the slot, or NULL when all XN_WIRE_MAX_FLOWS slots belong to
 * other flows
 */
static struct xn_wire_flow *flow_slot(struct xn_wire_stats *st, uint32_t flow)
{
	struct xn_wire_flow *f;
	uint32_t i;

	for (i = 0; i < st->nflows && i < XN_WIRE_MAX_FLOWS; i++)
		if (st->flows[i].flow == flow)
			return &st->flows[i];
	if (st->nflows >= XN_WIRE_MAX_FLOWS)
		return NULL;
	f = &st->flows[st->nflows++];
	memset(f, 0, sizeof(*f));
	f->flow = flow;
	f->used = 1;
	return f;
}

/**
 * window_test_set() - mark @seq as seen in the window of @f
 * @f:		flow
 * @seq:	sequence number within XN_WIRE_WINDOW of the highest one
 *
 * Return: non-zero if @seq was already marked
 */
static int window_test_set(struct xn_wire_flow *f, uint64_t seq)
{
	uint32_t bit = (uint32_t)(seq % XN_WIRE_WINDOW);
	uint64_t mask = 1ULL << (bit % 64);
	int was = !!(f->window[bit / 64] & mask);

	f->window[bit / 64] |= mask;
	return was;
}

/**
 * window_advance() - move the window of @f up to a new highest @seq
 * @f:		flow
 * @seq:	new highest sequence number, > f->highest_seq
 *
 * Forgets the marks of the sequence numbers the window slides over.
 */
static void window_advance(struct xn_wire_flow *f, uint64_t seq)
{
	uint64_t s;
	uint32_t bit;

	if (seq - f->highest_seq >= XN_WIRE_WINDOW) {
		memset(f->window, 0, sizeof(f->window));
	} else {
		for (s = f->highest_seq + 1; s <= seq; s++) {
			bit = (uint32_t)(s % XN_WIRE_WINDOW);
			f->window[bit / 64] &= ~(1ULL << (bit % 64));
		}
	}
	f->highest_seq = seq;
}

/**
 * flow_account() - record a verified frame in its flow's state
 * @st:		stats to update (flow table and totals)
 * @fi:		flow and seq of the frame
 *
 * A seq above the highest so far is new; one within the window below it
 * is a duplicate if already marked, else out of order; one older than
 * the window is counted out of order (a duplicate cannot be told).
 */
static void flow_account(struct xn_wire_stats *st, const struct xn_frame_info *fi)
{
	struct xn_wire_flow *f = flow_slot(st, fi->flow);
	uint64_t seq = fi->seq;

	if (!f) {
		st->untracked++;
		return;
	}
	if (!f->unique) {
		f->lowest_seq = f->highest_seq = seq;
		window_test_set(f, seq);
		f->unique = 1;
		return;
	}
	if (seq > f->highest_seq) {
		window_advance(f, seq);
		window_test_set(f, seq);
		f->unique++;
		return;
	}
	if (f->highest_seq - seq < XN_WIRE_WINDOW && window_test_set(f, seq)) {
		f->duplicates++;
		st->duplicates++;
		return;
	}
	if (seq < f->lowest_seq)
		f->lowest_seq = seq;
	f->out_of_order++;
	st->out_of_order++;
	f->unique++;
}

/**
 * account_rx() - classify one received frame and count it
 * @st:		stats to update
 * @buf:	frame
 * @len:	bytes received
 * @truncated:	the frame was longer than the buffer
 *
 * Return: 1 for a test frame (verified or bad), 0 for a foreign frame
 */
static int account_rx(struct xn_wire_stats *st, const uint8_t *buf, uint32_t len,
		      int truncated)
{
	struct xn_frame_info fi;
	int rc = xn_frame_check(buf, len, &fi);

	st->rx_frames++;
	st->rx_bytes += len;
	if (rc == -EPROTO) {
		st->foreign++;
		return 0;
	}
	if (rc || truncated) {
		st->bad++;
		return 1;
	}
	st->verified++;
	flow_account(st, &fi);
	return 1;
}

/* ---- AF_PACKET batches ---------------------------------------------- */

/* XN_WIRE_BATCH receive buffers with their message headers. */
struct wire_batch {
	struct mmsghdr msg[XN_WIRE_BATCH];
	struct iovec iov[XN_WIRE_BATCH];
	struct sockaddr_ll addr[XN_WIRE_BATCH];
	uint8_t buf[XN_WIRE_BATCH][XN_WIRE_MAX_LEN];
};

/**
 * batch_new() - allocate receive buffers and point their headers at them
 *
 * Return: the batch, or NULL without memory
 */
static struct wire_batch *batch_new(void)
{
	struct wire_batch *b = malloc(sizeof(*b));
	int i;

	if (!b)
		return NULL;
	for (i = 0; i < XN_WIRE_BATCH; i++) {
		b->iov[i].iov_base = b->buf[i];
		b->iov[i].iov_len = XN_WIRE_MAX_LEN;
		memset(&b->msg[i], 0, sizeof(b->msg[i]));
		b->msg[i].msg_hdr.msg_iov = &b->iov[i];
		b->msg[i].msg_hdr.msg_iovlen = 1;
		b->msg[i].msg_hdr.msg_name = &b->addr[i];
	}
	return b;
}

/**
 * batch_recv() - read up to @want frames without blocking
 * @fd:		bound AF_PACKET socket
 * @b:		buffers
 * @want:	at most this many (1..XN_WIRE_BATCH)
 * @st:		stats (syscalls)
 *
 * Return: frames read, 0 if none is waiting, or -errno
 */
static int batch_recv(int fd, struct wire_batch *b, unsigned int want,
		      struct xn_wire_stats *st)
{
	unsigned int i;
	int n;

	for (i = 0; i < want; i++) {
		b->msg[i].msg_hdr.msg_namelen = sizeof(b->addr[i]);
		b->msg[i].msg_hdr.msg_flags = 0;
	}
	n = recvmmsg(fd, b->msg, want, MSG_DONTWAIT, NULL);
	st->syscalls++;
	if (n >= 0)
		return n;
	return errno == EAGAIN || errno == EINTR ? 0 : -errno;
}

/**
 * batch_outgoing() - is frame @i of @b one this host sent (a tap copy)?
 * @b:		buffers after batch_recv()
 * @i:		index
 *
 * Return: non-zero for frames to ignore
 */
static int batch_outgoing(const struct wire_batch *b, int i)
{
	return b->addr[i].sll_pkttype == PACKET_OUTGOING;
}

/**
 * send_all() - hand @n prepared messages to the kernel
 * @fd:		bound AF_PACKET socket
 * @msg:	messages (one frame each)
 * @n:		how many
 * @st:		stats (tx counters, stop flag)
 * @may_stop:	give up early when a stop is requested
 *
 * Frames refused with ENOBUFS/EAGAIN (device or peer ring full) are
 * retried; after WIRE_STUCK_NS without progress the call gives up.
 *
 * Return: frames sent (@n unless stopped), -ETIMEDOUT when stuck, or
 * -errno of a refused frame (counted in tx_errors)
 */
static int send_all(int fd, struct mmsghdr *msg, unsigned int n,
		    struct xn_wire_stats *st, int may_stop)
{
	uint64_t stuck_since = 0;
	unsigned int done = 0;
	int r, i;

	while (done < n) {
		r = sendmmsg(fd, msg + done, n - done, 0);
		st->syscalls++;
		if (r > 0) {
			for (i = 0; i < r; i++)
				st->tx_bytes += msg[done + i].msg_len;
			st->tx_frames += r;
			done += r;
			stuck_since = 0;
			continue;
		}
		if (r < 0 && errno != ENOBUFS && errno != EAGAIN && errno != EINTR) {
			st->tx_errors++;
			return -errno;
		}
		st->tx_retries++;
		if (may_stop && stop_requested(&st->stop))
			break;
		if (!stuck_since)
			stuck_since = now_ns();
		else if (now_ns() - stuck_since > WIRE_STUCK_NS)
			return -ETIMEDOUT;
		sched_yield();
	}
	return (int)done;
}

/**
 * frame_len_ok() - is @len a frame length the peer can build?
 * @len:	bytes
 *
 * Return: non-zero if XN_FRAME_MIN_LEN <= @len <= XN_WIRE_MAX_LEN
 */
static int frame_len_ok(uint32_t len)
{
	return len >= XN_FRAME_MIN_LEN && len <= XN_WIRE_MAX_LEN;
}

/* ---- the AF_PACKET peer --------------------------------------------- */

/**
 * set_buffer() - size a socket buffer, beyond rmem_max/wmem_max if allowed
 * @fd:		socket
 * @force:	SO_RCVBUFFORCE or SO_SNDBUFFORCE (needs CAP_NET_ADMIN)
 * @plain:	SO_RCVBUF or SO_SNDBUF (capped by the sysctl)
 * @size:	bytes
 */
static void set_buffer(int fd, int force, int plain, int size)
{
	if (setsockopt(fd, SOL_SOCKET, force, &size, sizeof(size)) < 0)
		setsockopt(fd, SOL_SOCKET, plain, &size, sizeof(size));
}

/**
 * drain() - discard whatever the socket queued before it was bound
 * @fd:		AF_PACKET socket
 */
static void drain(int fd)
{
	uint8_t byte;

	while (recv(fd, &byte, sizeof(byte), MSG_DONTWAIT | MSG_TRUNC) >= 0)
		;
}

/**
 * xn_wire_setup() - bind an AF_PACKET socket to the wire interface
 * @fd:		SOCK_RAW AF_PACKET socket, created in the interface's netns
 * @ifindex:	interface index (in that netns)
 *
 * Binds for every protocol, bypasses the qdisc (frames go straight to
 * the driver, which makes a full peer ring visible as ENOBUFS), ignores
 * the socket's own outgoing frames and enlarges both socket buffers.
 *
 * Return: 0, or -errno of bind()/setsockopt()
 */
int xn_wire_setup(int fd, int ifindex)
{
	struct sockaddr_ll sll = {
		.sll_family = AF_PACKET,
		.sll_protocol = htons(ETH_P_ALL),
		.sll_ifindex = ifindex,
	};
	int one = 1;

	if (bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0)
		return -errno;
	if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)) < 0)
		return -errno;
	/* best effort: Linux 4.20+, and batch_outgoing() guards anyway */
	setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof(one));
	set_buffer(fd, SO_SNDBUFFORCE, SO_SNDBUF, WIRE_SOCKBUF);
	set_buffer(fd, SO_RCVBUFFORCE, SO_RCVBUF, WIRE_SOCKBUF);
	drain(fd);
	return 0;
}

/**
 * xn_wire_send() - send @count test frames of one flow
 * @fd:		socket set up with xn_wire_setup()
 * @dst:	destination MAC (6 bytes)
 * @src:	source MAC (6 bytes)
 * @flow:	flow id
 * @seq0:	sequence number of the first frame (then +1 each)
 * @count:	frames to send
 * @len:	frame length, XN_FRAME_MIN_LEN..XN_WIRE_MAX_LEN
 * @stats:	tx counters are added here
 *
 * Every frame is built with xn_frame_build() for its own seq, so a
 * receiver can verify each one and detect loss, reordering and
 * duplication.
 *
 * Return: 0 when all frames went out, -EINVAL for a bad length, -ENOMEM,
 * -ETIMEDOUT if the device refused frames for too long, or -errno of a
 * refused frame
 */
int xn_wire_send(int fd, const uint8_t *dst, const uint8_t *src, uint32_t flow,
		 uint64_t seq0, uint64_t count, uint32_t len,
		 struct xn_wire_stats *stats)
{
	uint64_t start = now_ns(), sent = 0;
	struct wire_batch *b;
	unsigned int i, n;
	int rc = 0;

	if (!frame_len_ok(len))
		return -EINVAL;
	b = batch_new();
	if (!b)
		return -ENOMEM;
	while (sent < count) {
		n = count - sent < XN_WIRE_BATCH ? (unsigned int)(count - sent) : XN_WIRE_BATCH;
		for (i = 0; i < n; i++) {
			xn_frame_build(b->buf[i], len, dst, src, flow, seq0 + sent + i);
			b->iov[i].iov_len = len;
			b->msg[i].msg_hdr.msg_name = NULL;
			b->msg[i].msg_hdr.msg_namelen = 0;
		}
		rc = send_all(fd, b->msg, n, stats, 0);
		if (rc < 0)
			break;
		sent += n;
		rc = 0;
	}
	free(b);
	stats->elapsed_ns += now_ns() - start;
	return rc;
}

/**
 * xn_wire_recv() - receive and verify test frames
 * @fd:		socket set up with xn_wire_setup()
 * @timeout_ms:	return after this long without a test frame (< 0: never)
 * @max_frames:	return after this many test frames (0: no limit); never
 *		reads beyond it, so later calls see the frames that follow
 * @stats:	rx counters and the per-flow table are added to
 *
 * Return: 0 (timeout, limit or stop request), -ENOMEM or -errno of
 * recvmmsg()
 */
int xn_wire_recv(int fd, int timeout_ms, uint64_t max_frames,
		 struct xn_wire_stats *stats)
{
	uint64_t start = now_ns(), last = start, got = 0, idle_end;
	struct wire_batch *b;
	unsigned int want;
	int n, i, rc = 0;

	b = batch_new();
	if (!b)
		return -ENOMEM;
	while (!stop_requested(&stats->stop) && (!max_frames || got < max_frames)) {
		want = XN_WIRE_BATCH;
		if (max_frames && max_frames - got < want)
			want = (unsigned int)(max_frames - got);
		n = batch_recv(fd, b, want, stats);
		if (n < 0) {
			rc = n;
			break;
		}
		if (!n) {
			idle_end = timeout_ms < 0 ? UINT64_MAX :
				   last + (uint64_t)timeout_ms * NSEC_PER_MSEC;
			if (now_ns() >= idle_end)
				break;
			wait_fd(fd, POLLIN, poll_ms(idle_end, WIRE_POLL_MS));
			stats->syscalls++;
			continue;
		}
		for (i = 0; i < n; i++) {
			if (batch_outgoing(b, i))
				continue;
			if (account_rx(stats, b->buf[i], b->msg[i].msg_len,
				       !!(b->msg[i].msg_hdr.msg_flags & MSG_TRUNC))) {
				got++;
				last = now_ns();
			}
		}
	}
	free(b);
	stats->elapsed_ns += now_ns() - start;
	return rc;
}

/**
 * xn_wire_echo() - reflect every test frame back to its sender
 * @fd:		socket set up with xn_wire_setup()
 * @duration_ms: how long to run, 0 until a stop request
 * @stats:	rx counters (every frame is verified first) and tx counters
 *
 * Test frames (verified or bad, but not truncated ones) go back with
 * source and destination MAC swapped, byte for byte otherwise; foreign
 * frames are counted and dropped.
 *
 * Return: 0, -ENOMEM, or -errno of recvmmsg()/sendmmsg()
 */
int xn_wire_echo(int fd, uint32_t duration_ms, struct xn_wire_stats *stats)
{
	uint64_t start = now_ns(), deadline = deadline_of(start, duration_ms);
	struct mmsghdr out[XN_WIRE_BATCH];
	struct iovec iov[XN_WIRE_BATCH];
	struct wire_batch *b;
	int n, i, k, rc = 0;

	b = batch_new();
	if (!b)
		return -ENOMEM;
	memset(out, 0, sizeof(out));
	while (!stop_requested(&stats->stop) && now_ns() < deadline) {
		n = batch_recv(fd, b, XN_WIRE_BATCH, stats);
		if (n < 0) {
			rc = n;
			break;
		}
		if (!n) {
			wait_fd(fd, POLLIN, poll_ms(deadline, WIRE_POLL_MS));
			stats->syscalls++;
			continue;
		}
		for (i = 0, k = 0; i < n; i++) {
			int trunc = !!(b->msg[i].msg_hdr.msg_flags & MSG_TRUNC);

			if (batch_outgoing(b, i))
				continue;
			if (!account_rx(stats, b->buf[i], b->msg[i].msg_len, trunc) || trunc)
				continue;
			xn_frame_swap_mac(b->buf[i]);
			iov[k].iov_base = b->buf[i];
			iov[k].iov_len = b->msg[i].msg_len;
			out[k].msg_hdr.msg_iov = &iov[k];
			out[k].msg_hdr.msg_iovlen = 1;
			k++;
		}
		if (k) {
			rc = send_all(fd, out, k, stats, 1);
			if (rc < 0)
				break;
			rc = 0;
		}
	}
	free(b);
	stats->elapsed_ns += now_ns() - start;
	return rc;
}

/**
 * xn_wire_flood() - send test frames as fast as the device takes them
 * @fd:		socket set up with xn_wire_setup()
 * @dst:	destination MAC
 * @src:	source MAC
 * @flow:	flow id
 * @len:	frame length, XN_FRAME_MIN_LEN..XN_WIRE_MAX_LEN
 * @duration_ms: how long to run, 0 until a stop request
 * @stats:	tx counters
 *
 * The benchmark generator: XN_WIRE_FLOOD_RING frames (seq 0..ring-1) are
 * built once and sent round and round, so every frame verifies but seqs
 * repeat (a receiver tracking the flow counts duplicates).
 *
 * Return: 0, -EINVAL for a bad length, -ENOMEM, -ETIMEDOUT, or -errno of
 * a refused frame
 */
int xn_wire_flood(int fd, const uint8_t *dst, const uint8_t *src, uint32_t flow,
		  uint32_t len, uint32_t duration_ms, struct xn_wire_stats *stats)
{
	uint64_t start = now_ns(), deadline = deadline_of(start, duration_ms);
	struct mmsghdr *msg;
	struct iovec *iov;
	unsigned int pos = 0, i;
	uint8_t *ring;
	int rc = 0;

	if (!frame_len_ok(len))
		return -EINVAL;
	ring = malloc((size_t)XN_WIRE_FLOOD_RING * len);
	msg = calloc(XN_WIRE_FLOOD_RING, sizeof(*msg));
	iov = calloc(XN_WIRE_FLOOD_RING, sizeof(*iov));
	if (!ring || !msg || !iov) {
		rc = -ENOMEM;
		goto out;
	}
	for (i = 0; i < XN_WIRE_FLOOD_RING; i++) {
		xn_frame_build(ring + (size_t)i * len, len, dst, src, flow, i);
		iov[i].iov_base = ring + (size_t)i * len;
		iov[i].iov_len = len;
		msg[i].msg_hdr.msg_iov = &iov[i];
		msg[i].msg_hdr.msg_iovlen = 1;
	}
	while (!stop_requested(&stats->stop) && now_ns() < deadline) {
		rc = send_all(fd, msg + pos, XN_WIRE_BATCH, stats, 1);
		if (rc < 0)
			break;
		pos = (pos + XN_WIRE_BATCH) % XN_WIRE_FLOOD_RING;
		rc = 0;
	}
out:
	free(iov);
	free(msg);
	free(ring);
	stats->elapsed_ns += now_ns() - start;
	return rc;
}

/**
 * await_reply() - wait for the reflection of ping @seq
 * @fd:		socket set up with xn_wire_setup()
 * @buf:	receive buffer of XN_WIRE_MAX_LEN bytes
 * @src:	our MAC: a reflection is addressed to it
 * @len:	length of the ping
 * @seq:	sequence number of the ping
 * @deadline:	give up at this now_ns() time
 *
 * Other frames (older pings, foreign traffic) are read and discarded.
 *
 * Return: 1 when the reply arrived, 0 at the deadline, -errno on error
 */
static int await_reply(int fd, uint8_t *buf, const uint8_t *src, uint32_t len,
		       uint64_t seq, uint64_t deadline)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	struct xn_frame_info fi;
	struct sockaddr_ll sll;
	struct timespec ts;
	socklen_t sl;
	uint64_t t;
	ssize_t n;

	for (;;) {
		sl = sizeof(sll);
		n = recvfrom(fd, buf, XN_WIRE_MAX_LEN, MSG_DONTWAIT,
			     (struct sockaddr *)&sll, &sl);
		if (n < 0) {
			if (errno != EAGAIN && errno != EINTR)
				return -errno;
			t = now_ns();
			if (t >= deadline)
				return 0;
			ts.tv_sec = (deadline - t) / 1000000000ULL;
			ts.tv_nsec = (deadline - t) % 1000000000ULL;
			ppoll(&pfd, 1, &ts, NULL);
			continue;
		}
		if (sll.sll_pkttype == PACKET_OUTGOING || (uint32_t)n != len)
			continue;
		if (xn_frame_check(buf, (uint32_t)n, &fi) == 0 &&
		    fi.flow == XN_WIRE_PING_FLOW && fi.seq == seq &&
		    memcmp(buf, src, 6) == 0)
			return 1;
	}
}

/**
 * xn_wire_pingpong() - measure round trips to a peer that reflects frames
 * @fd:		socket set up with xn_wire_setup()
 * @dst:	MAC of the reflecting peer
 * @src:	our MAC
 * @len:	frame length
 * @count:	round trips
 * @timeout_ms:	wait this long for each reflection
 * @rtt_ns_out:	@count entries: the round-trip time of ping i in ns, 0 if
 *		its reflection never came
 *
 * One frame is in flight at a time (flow XN_WIRE_PING_FLOW, sequence
 * numbers unique per call); the clock runs from just before sendmmsg()
 * to the moment the verified reflection is read.
 *
 * Return: number of reflections received, -EINVAL, -ENOMEM or -errno
 */
int xn_wire_pingpong(int fd, const uint8_t *dst, const uint8_t *src, uint32_t len,
		     uint32_t count, int timeout_ms, uint64_t *rtt_ns_out)
{
	uint64_t base = now_ns(), t0;
	struct xn_wire_stats scratch;
	struct mmsghdr msg;
	struct iovec iov;
	uint8_t *tx, *rx;
	uint32_t i;
	int rc = 0, replies = 0;

	if (!frame_len_ok(len) || timeout_ms < 0)
		return -EINVAL;
	tx = malloc(len);
	rx = malloc(XN_WIRE_MAX_LEN);
	if (!tx || !rx) {
		rc = -ENOMEM;
		goto out;
	}
	memset(&msg, 0, sizeof(msg));
	memset(&scratch, 0, sizeof(scratch));
	iov.iov_base = tx;
	iov.iov_len = len;
	msg.msg_hdr.msg_iov = &iov;
	msg.msg_hdr.msg_iovlen = 1;
	for (i = 0; i < count; i++) {
		rtt_ns_out[i] = 0;
		xn_frame_build(tx, len, dst, src, XN_WIRE_PING_FLOW, base + i);
		t0 = now_ns();
		rc = send_all(fd, &msg, 1, &scratch, 0);
		if (rc < 0)
			goto out;
		rc = await_reply(fd, rx, src, len, base + i,
				 t0 + (uint64_t)timeout_ms * NSEC_PER_MSEC);
		if (rc < 0)
			goto out;
		if (rc) {
			rtt_ns_out[i] = now_ns() - t0;
			replies++;
		}
	}
	rc = replies;
out:
	free(rx);
	free(tx);
	return rc;
}

/* ---- AF_XDP ceilings (libxdp) --------------------------------------- */

/* One AF_XDP socket with its own anonymous UMEM. */
struct xn_afxdp {
	struct xsk_ring_prod fill;
	struct xsk_ring_cons comp;
	struct xsk_ring_cons rx;
	struct xsk_ring_prod tx;
	struct xsk_umem *umem;
	struct xsk_socket *xsk;
	void *area;             /* XN_RXDROP_FRAMES * XN_RXDROP_FRAME_SIZE bytes */
	int zerocopy;
};

struct xn_rxdrop {
	struct xn_afxdp x;
};

struct xn_txpush {
	struct xn_afxdp x;
	uint32_t len;           /* bytes of every frame */
	uint32_t next;          /* next chunk to transmit */
	uint32_t outstanding;   /* submitted, not completed */
};

#define AFXDP_AREA ((size_t)XN_RXDROP_FRAMES * XN_RXDROP_FRAME_SIZE)

/**
 * afxdp_try() - register the UMEM and bind one socket with @bind_flags
 * @x:		socket state, x->area mapped
 * @ifname:	interface
 * @queue:	queue id
 * @rx:		create an rx ring
 * @tx:		create a tx ring
 * @bind_flags:	XDP_ZEROCOPY or XDP_COPY, plus XDP_USE_NEED_WAKEUP
 *
 * No XDP program is loaded (XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD).  On
 * failure everything this call created is released again.
 *
 * Return: 0 or -errno from libxdp
 */
static int afxdp_try(struct xn_afxdp *x, const char *ifname, uint32_t queue,
		     int rx, int tx, uint16_t bind_flags)
{
	const struct xsk_umem_config ucfg = {
		.fill_size = XN_RXDROP_FRAMES,
		.comp_size = AFXDP_RING,
		.frame_size = XN_RXDROP_FRAME_SIZE,
		.frame_headroom = 0,
		.flags = 0,
	};
	struct xsk_socket_config scfg = {
		.rx_size = rx ? AFXDP_RING : 0,
		.tx_size = tx ? AFXDP_RING : 0,
		.xdp_flags = 0,
		.bind_flags = bind_flags,
	};
	int rc;

	scfg.libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD;
	rc = xsk_umem__create(&x->umem, x->area, AFXDP_AREA, &x->fill, &x->comp, &ucfg);
	if (rc) {
		x->umem = NULL;
		return rc < 0 ? rc : -rc;
	}
	rc = xsk_socket__create(&x->xsk, ifname, queue, x->umem,
				rx ? &x->rx : NULL, tx ? &x->tx : NULL, &scfg);
	if (rc) {
		x->xsk = NULL;
		xsk_umem__delete(x->umem);
		x->umem = NULL;
		return rc < 0 ? rc : -rc;
	}
	return 0;
}

/**
 * afxdp_open() - map a UMEM and bind a socket to (@ifname, @queue)
 * @x:		zeroed socket state
 * @ifname:	interface
 * @queue:	queue id
 * @rx:		create an rx ring
 * @tx:		create a tx ring
 *
 * Tries zero-copy first and falls back to copy mode.  A queue that a
 * just-closed socket still holds (the kernel frees it 10-30 ms after the
 * close) is retried for up to AFXDP_BUSY_NS.
 *
 * Return: 0, or -errno (-ENODEV unknown interface, -EINVAL queue out of
 * range, -EBUSY queue taken, -ENOMEM ...)
 */
static int afxdp_open(struct xn_afxdp *x, const char *ifname, uint32_t queue,
		      int rx, int tx)
{
	uint64_t give_up = now_ns() + AFXDP_BUSY_NS;
	int rc;

	x->area = mmap(NULL, AFXDP_AREA, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (x->area == MAP_FAILED) {
		x->area = NULL;
		return -errno;
	}
	for (;;) {
		rc = afxdp_try(x, ifname, queue, rx, tx, XDP_ZEROCOPY | XDP_USE_NEED_WAKEUP);
		if (!rc) {
			x->zerocopy = 1;
			return 0;
		}
		rc = afxdp_try(x, ifname, queue, rx, tx, XDP_COPY | XDP_USE_NEED_WAKEUP);
		if (!rc)
			return 0;
		if (rc != -EBUSY || now_ns() > give_up)
			break;
		usleep(5000);
	}
	munmap(x->area, AFXDP_AREA);
	x->area = NULL;
	return rc;
}

/**
 * afxdp_close() - unbind the socket, unregister the UMEM, unmap it
 * @x:		socket state from afxdp_open() (or a failed one)
 *
 * The rings are unmapped before the socket is closed, so the kernel
 * frees the queue (10-30 ms later).
 */
static void afxdp_close(struct xn_afxdp *x)
{
	if (x->xsk)
		xsk_socket__delete(x->xsk);
	if (x->umem)
		xsk_umem__delete(x->umem);
	if (x->area)
		munmap(x->area, AFXDP_AREA);
	memset(x, 0, sizeof(*x));
}

/**
 * afxdp_kernel_stats() - read the socket's XDP_STATISTICS
 * @x:		bound socket
 * @ks:		filled (zeroed if the kernel does not answer)
 */
static void afxdp_kernel_stats(struct xn_afxdp *x, struct xdp_statistics *ks)
{
	socklen_t len = sizeof(*ks);

	memset(ks, 0, sizeof(*ks));
	if (getsockopt(xsk_socket__fd(x->xsk), SOL_XDP, XDP_STATISTICS, ks, &len) < 0)
		memset(ks, 0, sizeof(*ks));
}

/**
 * afxdp_stats_delta() - add the kernel's counters over a run to @st
 * @st:		run stats
 * @a:		XDP_STATISTICS at the start
 * @b:		XDP_STATISTICS at the end
 */
static void afxdp_stats_delta(struct xn_rxdrop_stats *st, const struct xdp_statistics *a,
			      const struct xdp_statistics *b)
{
	st->kernel_rx_dropped += b->rx_dropped - a->rx_dropped;
	st->kernel_rx_invalid += b->rx_invalid_descs - a->rx_invalid_descs;
	st->kernel_rx_ring_full += b->rx_ring_full - a->rx_ring_full;
	st->kernel_fill_empty += b->rx_fill_ring_empty_descs - a->rx_fill_ring_empty_descs;
	st->kernel_tx_invalid += b->tx_invalid_descs - a->tx_invalid_descs;
	st->kernel_tx_ring_empty += b->tx_ring_empty_descs - a->tx_ring_empty_descs;
}

/**
 * xn_rxdrop_create() - bind an rx-drop receiver to (@ifname, @queue)
 * @out:	the receiver on success
 * @ifname:	interface (in the caller's netns)
 * @queue:	queue id
 *
 * Maps an anonymous UMEM of XN_RXDROP_FRAMES aligned chunks, binds an
 * AF_XDP socket (zero-copy if the driver can, else copy mode, with
 * need_wakeup) and puts every chunk on the fill ring.  Frames arrive only
 * once the caller inserts xn_rxdrop_fd() into the XSKMAP of an XDP
 * program on the interface.
 *
 * Return: 0, or -errno (see afxdp_open())
 */
int xn_rxdrop_create(struct xn_rxdrop **out, const char *ifname, uint32_t queue)
{
	struct xn_rxdrop *h = calloc(1, sizeof(*h));
	uint32_t i, idx;
	int rc;

	if (!h)
		return -ENOMEM;
	rc = afxdp_open(&h->x, ifname, queue, 1, 0);
	if (rc) {
		free(h);
		return rc;
	}
	if (xsk_ring_prod__reserve(&h->x.fill, XN_RXDROP_FRAMES, &idx) != XN_RXDROP_FRAMES) {
		xn_rxdrop_destroy(h);
		return -ENOSPC;
	}
	for (i = 0; i < XN_RXDROP_FRAMES; i++)
		*xsk_ring_prod__fill_addr(&h->x.fill, idx + i) = (uint64_t)i * XN_RXDROP_FRAME_SIZE;
	xsk_ring_prod__submit(&h->x.fill, XN_RXDROP_FRAMES);
	*out = h;
	return 0;
}

/**
 * xn_rxdrop_fd() - the socket to insert into an XSKMAP
 * @h:		receiver
 *
 * Return: the AF_XDP socket's file descriptor
 */
int xn_rxdrop_fd(const struct xn_rxdrop *h)
{
	return xsk_socket__fd(h->x.xsk);
}

/**
 * xn_rxdrop_is_zerocopy() - did the zero-copy bind succeed?
 * @h:		receiver
 *
 * Return: 1 for zero-copy, 0 for copy mode
 */
int xn_rxdrop_is_zerocopy(const struct xn_rxdrop *h)
{
	return h->x.zerocopy;
}

/**
 * fill_reserve() - reserve @n fill-ring entries for chunks we hold
 * @h:		receiver
 * @n:		entries
 * @idx:	first reserved index, on success
 * @st:		stats (kicks)
 *
 * The kernel publishes rx descriptors before it publishes how far it
 * consumed the fill ring (both at the end of its NAPI poll), so room for
 * chunks we just received can lag for a moment: retry, kicking the
 * kernel if it asks for it, for up to AFXDP_FILL_WAIT_NS.
 *
 * Return: 0, or -EIO if the room never appeared
 */
static int fill_reserve(struct xn_rxdrop *h, uint32_t n, uint32_t *idx,
			struct xn_rxdrop_stats *st)
{
	uint64_t give_up = 0, t;

	while (xsk_ring_prod__reserve(&h->x.fill, n, idx) != n) {
		t = now_ns();
		if (!give_up)
			give_up = t + AFXDP_FILL_WAIT_NS;
		else if (t > give_up)
			return -EIO;
		if (xsk_ring_prod__needs_wakeup(&h->x.fill)) {
			recvfrom(xsk_socket__fd(h->x.xsk), NULL, 0, MSG_DONTWAIT, NULL, NULL);
			st->kicks++;
		}
	}
	return 0;
}

/**
 * rxdrop_pass() - count and recycle one batch of received descriptors
 * @h:		receiver
 * @st:		stats
 *
 * Every rx descriptor's chunk goes straight back to the fill ring (one
 * reserve/submit and one peek/release per batch).
 *
 * Return: descriptors handled, or -EIO if the fill ring had no room
 * (see fill_reserve())
 */
static int rxdrop_pass(struct xn_rxdrop *h, struct xn_rxdrop_stats *st)
{
	const struct xdp_desc *d;
	uint32_t n, i, idx_rx, idx_fq;
	uint64_t bytes = 0;

	n = xsk_ring_cons__peek(&h->x.rx, AFXDP_BATCH, &idx_rx);
	if (!n)
		return 0;
	if (fill_reserve(h, n, &idx_fq, st))
		return -EIO;
	for (i = 0; i < n; i++) {
		d = xsk_ring_cons__rx_desc(&h->x.rx, idx_rx + i);
		bytes += d->len;
		*xsk_ring_prod__fill_addr(&h->x.fill, idx_fq + i) = xsk_umem__extract_addr(d->addr);
	}
	xsk_ring_prod__submit(&h->x.fill, n);
	xsk_ring_cons__release(&h->x.rx, n);
	st->frames += n;
	st->bytes += bytes;
	st->batches++;
	return (int)n;
}

/**
 * xn_rxdrop_run() - receive and drop frames for @duration_ms
 * @h:		receiver
 * @duration_ms: how long, 0 until a stop request
 * @stats:	counters are added here (kernel counters as deltas)
 *
 * Busy-polls the rx ring while frames flow; after AFXDP_SPIN_NS without
 * one it kicks the fill ring if the kernel asks for it and sleeps in
 * poll() (at most WIRE_POLL_MS, so deadlines and stop requests are seen).
 *
 * Return: 0, or -EIO (see rxdrop_pass())
 */
int xn_rxdrop_run(struct xn_rxdrop *h, uint32_t duration_ms,
		  struct xn_rxdrop_stats *stats)
{
	uint64_t start = now_ns(), deadline = deadline_of(start, duration_ms);
	uint64_t t, idle_since = 0;
	struct xdp_statistics k0, k1;
	int fd = xsk_socket__fd(h->x.xsk), n, rc = 0;

	stats->zerocopy = h->x.zerocopy;
	afxdp_kernel_stats(&h->x, &k0);
	while (!stop_requested(&stats->stop)) {
		n = rxdrop_pass(h, stats);
		if (n < 0) {
			rc = n;
			break;
		}
		t = now_ns();
		if (t >= deadline)
			break;
		if (n) {
			idle_since = 0;
			continue;
		}
		if (!idle_since)
			idle_since = t;
		if (t - idle_since < AFXDP_SPIN_NS)
			continue;
		if (xsk_ring_prod__needs_wakeup(&h->x.fill)) {
			recvfrom(fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
			stats->kicks++;
		}
		wait_fd(fd, POLLIN, poll_ms(deadline, WIRE_POLL_MS));
		stats->polls++;
		idle_since = 0;
	}
	afxdp_kernel_stats(&h->x, &k1);
	afxdp_stats_delta(stats, &k0, &k1);
	stats->elapsed_ns += now_ns() - start;
	return rc;
}

/**
 * xn_rxdrop_destroy() - unbind and free a receiver
 * @h:		receiver, or NULL
 */
void xn_rxdrop_destroy(struct xn_rxdrop *h)
{
	if (!h)
		return;
	afxdp_close(&h->x);
	free(h);
}

/**
 * xn_txpush_create() - bind a tx-push transmitter to (@ifname, @queue)
 * @out:	the transmitter on success
 * @ifname:	interface
 * @queue:	queue id
 * @dst:	destination MAC of the frames
 * @src:	source MAC
 * @flow:	flow id
 * @len:	frame length, XN_FRAME_MIN_LEN..XN_RXDROP_FRAME_SIZE
 *
 * Every UMEM chunk i holds test frame (@flow, seq i), built once; the run
 * sends the chunks round and round.  Asks the kernel for a tx budget of
 * a whole ring per sendto() where it has XDP_MAX_TX_SKB_BUDGET.
 *
 * Return: 0, -EINVAL for a bad length, or -errno (see afxdp_open())
 */
int xn_txpush_create(struct xn_txpush **out, const char *ifname, uint32_t queue,
		     const uint8_t *dst, const uint8_t *src, uint32_t flow, uint32_t len)
{
	struct xn_txpush *h;
	int budget = AFXDP_RING, rc;
	uint32_t i;

	if (len < XN_FRAME_MIN_LEN || len > XN_RXDROP_FRAME_SIZE)
		return -EINVAL;
	h = calloc(1, sizeof(*h));
	if (!h)
		return -ENOMEM;
	rc = afxdp_open(&h->x, ifname, queue, 0, 1);
	if (rc) {
		free(h);
		return rc;
	}
	for (i = 0; i < XN_RXDROP_FRAMES; i++)
		xn_frame_build((uint8_t *)h->x.area + (size_t)i * XN_RXDROP_FRAME_SIZE,
			       len, dst, src, flow, i);
	setsockopt(xsk_socket__fd(h->x.xsk), SOL_XDP, XDP_MAX_TX_SKB_BUDGET,
		   &budget, sizeof(budget));
	h->len = len;
	*out = h;
	return 0;
}

/**
 * xn_txpush_fd() - the transmitter's AF_XDP socket
 * @h:		transmitter
 *
 * Return: its file descriptor
 */
int xn_txpush_fd(const struct xn_txpush *h)
{
	return xsk_socket__fd(h->x.xsk);
}

/**
 * xn_txpush_is_zerocopy() - did the zero-copy bind succeed?
 * @h:		transmitter
 *
 * Return: 1 for zero-copy, 0 for copy mode
 */
int xn_txpush_is_zerocopy(const struct xn_txpush *h)
{
	return h->x.zerocopy;
}

/**
 * txpush_complete() - reap the completion ring
 * @h:		transmitter
 * @st:		stats: completed frames count as sent
 *
 * Return: completions reaped
 */
static uint32_t txpush_complete(struct xn_txpush *h, struct xn_rxdrop_stats *st)
{
	uint32_t n, idx;

	n = xsk_ring_cons__peek(&h->x.comp, AFXDP_BATCH, &idx);
	if (!n)
		return 0;
	xsk_ring_cons__release(&h->x.comp, n);
	h->outstanding -= n;
	st->frames += n;
	st->bytes += (uint64_t)n * h->len;
	return n;
}

/**
 * txpush_submit() - put the next chunks on the tx ring
 * @h:		transmitter
 * @st:		stats
 *
 * Completions come back in submission order, so the chunks after the
 * last submitted one are free whenever fewer than XN_RXDROP_FRAMES are
 * outstanding.
 *
 * Return: descriptors submitted
 */
static uint32_t txpush_submit(struct xn_txpush *h, struct xn_rxdrop_stats *st)
{
	uint32_t want = XN_RXDROP_FRAMES - h->outstanding, n, i, idx;
	struct xdp_desc *d;

	if (want > AFXDP_BATCH)
		want = AFXDP_BATCH;
	n = want ? xsk_ring_prod__reserve(&h->x.tx, want, &idx) : 0;
	for (i = 0; i < n; i++) {
		d = xsk_ring_prod__tx_desc(&h->x.tx, idx + i);
		d->addr = (uint64_t)h->next * XN_RXDROP_FRAME_SIZE;
		d->len = h->len;
		d->options = 0;
		h->next = (h->next + 1) % XN_RXDROP_FRAMES;
	}
	if (n) {
		xsk_ring_prod__submit(&h->x.tx, n);
		h->outstanding += n;
		st->batches++;
	}
	return n;
}

/**
 * txpush_kick() - make the kernel transmit what the tx ring holds
 * @h:		transmitter
 * @st:		stats
 *
 * Return: 0, or -errno of sendto() other than "try again"/"ring or
 * device busy" (those frames stay queued or were dropped by the kernel)
 */
static int txpush_kick(struct xn_txpush *h, struct xn_rxdrop_stats *st)
{
	if (!xsk_ring_prod__needs_wakeup(&h->x.tx))
		return 0;
	st->kicks++;
	if (sendto(xsk_socket__fd(h->x.xsk), NULL, 0, MSG_DONTWAIT, NULL, 0) >= 0)
		return 0;
	if (errno == EAGAIN || errno == EBUSY || errno == ENOBUFS || errno == EINTR ||
	    errno == ENETDOWN)
		return 0;
	return -errno;
}

/**
 * xn_txpush_run() - transmit pre-built test frames for @duration_ms
 * @h:		transmitter
 * @duration_ms: how long, 0 until a stop request
 * @stats:	frames/bytes count completions; kernel counters as deltas
 *
 * After the deadline the run waits up to AFXDP_DRAIN_NS for the
 * completions of what it submitted, so the counts are final.
 *
 * Return: 0, or -errno of a kick
 */
int xn_txpush_run(struct xn_txpush *h, uint32_t duration_ms,
		  struct xn_rxdrop_stats *stats)
{
	uint64_t start = now_ns(), deadline = deadline_of(start, duration_ms), end;
	struct xdp_statistics k0, k1;
	int fd = xsk_socket__fd(h->x.xsk), rc = 0;
	uint32_t done, put;

	stats->zerocopy = h->x.zerocopy;
	afxdp_kernel_stats(&h->x, &k0);
	while (!stop_requested(&stats->stop) && now_ns() < deadline) {
		done = txpush_complete(h, stats);
		put = txpush_submit(h, stats);
		rc = txpush_kick(h, stats);
		if (rc)
			break;
		if (!done && !put) {
			wait_fd(fd, POLLOUT, 1);
			stats->polls++;
		}
	}
	end = now_ns() + AFXDP_DRAIN_NS;
	while (h->outstanding && now_ns() < end) {
		if (txpush_kick(h, stats))
			break;
		if (!txpush_complete(h, stats))
			wait_fd(fd, POLLOUT, 1);
	}
	afxdp_kernel_stats(&h->x, &k1);
	afxdp_stats_delta(stats, &k0, &k1);
	stats->elapsed_ns += now_ns() - start;
	return rc;
}

/**
 * xn_txpush_destroy() - unbind and free a transmitter
 * @h:		transmitter, or NULL
 */
void xn_txpush_destroy(struct xn_txpush *h)
{
	if (!h)
		return;
	afxdp_close(&h->x);
	free(h);
}
