/* SPDX-License-Identifier: MIT */
/*
 * guest.c - per-frame work of the virtio-net driver simulator (guest.h).
 *
 * One struct xn_guest drives one queue pair: rx = virtqueue 2i (device
 * writes), tx = virtqueue 2i+1 (device reads).  Descriptors are laid out
 * once at creation: every rx buffer and every tx slot owns a fixed head
 * descriptor (and its chain or indirect table), so a buffer goes back on
 * the avail ring by writing its head, and a used id maps straight back
 * to its buffer.  Only tx lengths change per frame.
 *
 * Memory ordering, as a virtio driver does it:
 *  - descriptors and avail ring entries are plain stores, published by one
 *    release store of avail->idx per batch;
 *  - used->idx is read with an acquire load before reading used entries;
 *  - a full fence separates publishing avail->idx from reading avail_event
 *    (or used->flags), and arming used_event (or avail->flags) from
 *    re-reading used->idx before sleeping.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <linux/virtio_net.h>
#include <linux/virtio_ring.h>

#include "frame.h"
#include "guest.h"

#define NO_BUF 0xFFFFFFFFu

static const uint8_t zero_hdr[12];
#define SCRATCH_LEN (64 * 1024 + 4096)  /* largest frame we reassemble */

_Static_assert(sizeof(struct vring_desc) == 16, "vring_desc layout");
_Static_assert(sizeof(struct vring_used_elem) == 8, "vring_used_elem layout");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "virtio 1.x is little-endian");

/* The driver side of one split virtqueue. */
struct gvq {
	struct vring_desc *desc;
	uint16_t *avail_flags;
	uint16_t *avail_idx_p;
	uint16_t *avail_ring;
	uint16_t *used_event;           /* avail->ring[num] */
	uint16_t *used_flags;
	uint16_t *used_idx_p;
	struct vring_used_elem *used_ring;
	uint16_t *avail_event;          /* used->ring[num] */
	uint32_t num;
	uint16_t mask;
	uint16_t avail_idx;             /* next avail index to publish */
	uint16_t published;             /* avail index last published */
	uint16_t last_used;             /* used entries reaped */
	uint32_t inflight;              /* buffers available or used, not reaped */
	int kick_fd;
	int call_fd;
	uint32_t *head2buf;             /* head descriptor id -> buffer/slot */
	uint8_t *posted;                /* per buffer/slot: owned by the device */
};

/* One rx buffer: one or two guarded segments. */
struct grx {
	uint8_t *ptr[2];
	uint64_t gpa[2];
	uint32_t len[2];
	uint32_t cap;                   /* len[0] + len[1] */
	uint16_t head;
};

/* One tx slot. */
struct gtx {
	uint8_t *hdr;                   /* virtio-net header: zero, read-only for the device */
	uint8_t *frame;
	uint32_t cap;                   /* frame bytes it holds */
	struct vring_desc *hdesc;       /* descriptor of the header (and frame) */
	struct vring_desc *fdesc;       /* descriptor of the frame, NULL if in hdesc */
	uint16_t head;
};

/* A frame spread over several used buffers (MRG_RXBUF). */
struct rx_asm {
	uint8_t *buf;
	uint32_t have;
	uint32_t remaining;             /* buffers still to come; 0 = idle */
	bool bad;
};

struct xn_guest {
	uint8_t *mem;
	uint64_t mem_size;
	uint32_t nregions;
	uint32_t flags;
	struct xn_guest_region regions[XN_GUEST_MAX_REGIONS];
	uint32_t hdr_len;
	struct gvq rx;
	struct gvq tx;
	struct grx *rxb;
	uint32_t nrx;
	uint32_t rx_nseg;
	struct gtx *txs;
	uint32_t ntx;
	uint32_t *tx_free;              /* stack of free tx slots */
	uint32_t ntx_free;
	struct rx_asm as;
	uint8_t guard[XN_GUEST_GUARD_LEN];      /* the guard pattern, for memcmp() */
	uint8_t mac[6];
	bool reflect;                   /* current pass reflects rx frames */
	uint64_t tx_seq;
	int stop_fd;
	int stop;
	struct xn_guest_stats st;
	struct xn_guest_trace trace[XN_GUEST_TRACE_LEN];
	uint64_t ntrace;
};

/**
 * guard_byte() - the pattern of guard areas
 * @i:		offset in the guard area (0 .. XN_GUEST_GUARD_LEN - 1)
 *
 * Return: the byte every guard area holds at @i.
 */
static inline uint8_t guard_byte(uint32_t i)
{
	return (uint8_t)(0xA5 ^ (i * 0x1F));
}

/**
 * now_ms() - the monotonic clock
 *
 * Return: CLOCK_MONOTONIC in milliseconds.
 */
static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* ---- set-up ------------------------------------------------------------ */

/**
 * mem_gpa() - guest address of an object in guest memory
 * @g:		guest
 * @off:	mapping offset of the object
 * @len:	its length (> 0)
 * @align:	required alignment of @off (power of two)
 * @gpa:	filled with the guest-physical address
 *
 * Return: 0, -EINVAL if misaligned or empty, -ERANGE if the object is not
 * inside the mapping or not inside one region.
 */
static int mem_gpa(const struct xn_guest *g, uint64_t off, uint64_t len,
		   uint64_t align, uint64_t *gpa)
{
	uint32_t i;

	if (!len || (off & (align - 1)))
		return -EINVAL;
	if (off > g->mem_size || len > g->mem_size - off)
		return -ERANGE;
	for (i = 0; i < g->nregions; i++) {
		const struct xn_guest_region *r = &g->regions[i];

		if (off >= r->offset && off - r->offset < r->size &&
		    len <= r->size - (off - r->offset)) {
			*gpa = r->gpa + (off - r->offset);
			return 0;
		}
	}
	return -ERANGE;
}

/**
 * gvq_init() - place one split virtqueue and clear it
 * @g:		guest
 * @vq:		driver state to fill
 * @c:		where the rings are
 * @nbufs:	buffers (rx) or slots (tx) that will use the queue
 *
 * Writes avail->idx and used->idx to @c->base, zeroes the rest of the
 * rings and the descriptor table.
 *
 * Return: 0, -EINVAL or -ERANGE for a bad geometry, -ENOMEM.
 */
static int gvq_init(struct xn_guest *g, struct gvq *vq, const struct xn_gvq_config *c,
		    uint32_t nbufs)
{
	uint64_t gpa, avail_len, used_len;
	uint8_t *avail, *used;
	int rc;

	if (!c->num || (c->num & (c->num - 1)) || c->num > XN_GUEST_MAX_QSIZE)
		return -EINVAL;
	avail_len = 6 + 2ull * c->num;
	used_len = 6 + 8ull * c->num;
	if ((rc = mem_gpa(g, c->desc_off, 16ull * c->num, 16, &gpa)) ||
	    (rc = mem_gpa(g, c->avail_off, avail_len, 2, &gpa)) ||
	    (rc = mem_gpa(g, c->used_off, used_len, 4, &gpa)))
		return rc;
	vq->num = c->num;
	vq->mask = (uint16_t)(c->num - 1);
	vq->desc = (struct vring_desc *)(g->mem + c->desc_off);
	avail = g->mem + c->avail_off;
	used = g->mem + c->used_off;
	memset(vq->desc, 0, 16ull * c->num);
	memset(avail, 0, avail_len);
	memset(used, 0, used_len);
	vq->avail_flags = (uint16_t *)avail;
	vq->avail_idx_p = (uint16_t *)(avail + 2);
	vq->avail_ring = (uint16_t *)(avail + 4);
	vq->used_event = (uint16_t *)(avail + 4 + 2ull * c->num);
	vq->used_flags = (uint16_t *)used;
	vq->used_idx_p = (uint16_t *)(used + 2);
	vq->used_ring = (struct vring_used_elem *)(used + 4);
	vq->avail_event = (uint16_t *)(used + 4 + 8ull * c->num);
	vq->avail_idx = vq->published = vq->last_used = c->base;
	*vq->avail_idx_p = c->base;
	*vq->used_idx_p = c->base;
	/* used_event one behind: no interrupt until we arm it. */
	*vq->used_event = (uint16_t)(c->base - 1);
	if (!(g->flags & XN_GUEST_F_EVENT_IDX))
		*vq->avail_flags = VRING_AVAIL_F_NO_INTERRUPT;
	vq->kick_fd = c->kick_fd;
	vq->call_fd = c->call_fd;
	vq->head2buf = malloc(sizeof(*vq->head2buf) * c->num);
	vq->posted = calloc(nbufs ? nbufs : 1, 1);
	if (!vq->head2buf || !vq->posted)
		return -ENOMEM;
	memset(vq->head2buf, 0xFF, sizeof(*vq->head2buf) * c->num);
	return 0;
}

/**
 * set_desc() - fill one descriptor
 * @d:		descriptor
 * @gpa:	buffer address
 * @len:	buffer length
 * @flags:	VRING_DESC_F_*
 * @next:	next descriptor index (with VRING_DESC_F_NEXT)
 */
static void set_desc(struct vring_desc *d, uint64_t gpa, uint32_t len,
		     uint16_t flags, uint16_t next)
{
	d->addr = gpa;
	d->len = len;
	d->flags = flags;
	d->next = next;
}

/**
 * fill_guards() - write the guard pattern around one rx segment
 * @p:		first byte of the segment
 * @len:	segment length
 */
static void fill_guards(uint8_t *p, uint32_t len)
{
	uint32_t i;

	for (i = 0; i < XN_GUEST_GUARD_LEN; i++) {
		p[-(int)XN_GUEST_GUARD_LEN + (int)i] = guard_byte(i);
		p[len + i] = guard_byte(i);
	}
}

/**
 * rx_setup() - lay out the rx buffers' descriptors and guards
 * @g:		guest
 * @cfg:	configuration
 *
 * Buffer b uses head b (one segment, or indirect), or heads 2b/2b+1 (a
 * two-segment chain in the ring).
 *
 * Return: 0, -EINVAL/-ERANGE for a bad geometry, -ENOMEM.
 */
static int rx_setup(struct xn_guest *g, const struct xn_guest_config *cfg)
{
	bool ind = cfg->flags & XN_GUEST_F_INDIRECT;
	uint32_t per = ind ? 1 : cfg->rx_nseg;
	uint32_t b, s;
	int rc;

	if (cfg->rx_nseg != ((cfg->flags & XN_GUEST_F_RX_CHAIN) ? 2u : 1u))
		return -EINVAL;
	if (!cfg->nrx || (uint64_t)cfg->nrx * per > g->rx.num || !cfg->rx_segs ||
	    (ind && !cfg->rx_ind))
		return -EINVAL;
	g->rxb = calloc(cfg->nrx, sizeof(*g->rxb));
	if (!g->rxb)
		return -ENOMEM;
	g->nrx = cfg->nrx;
	g->rx_nseg = cfg->rx_nseg;
	for (b = 0; b < cfg->nrx; b++) {
		struct grx *x = &g->rxb[b];
		struct vring_desc *d;
		uint64_t tgpa;

		for (s = 0; s < g->rx_nseg; s++) {
			const struct xn_guest_seg *sg = &cfg->rx_segs[b * g->rx_nseg + s];
			uint64_t dummy;

			if (sg->off < XN_GUEST_GUARD_LEN)
				return -ERANGE;
			/* the segment and both of its guards lie in one region */
			rc = mem_gpa(g, sg->off - XN_GUEST_GUARD_LEN,
				     (uint64_t)sg->len + 2 * XN_GUEST_GUARD_LEN, 1, &dummy);
			if (rc || (rc = mem_gpa(g, sg->off, sg->len, 1, &x->gpa[s])))
				return rc;
			x->ptr[s] = g->mem + sg->off;
			x->len[s] = sg->len;
			x->cap += sg->len;
			fill_guards(x->ptr[s], sg->len);
		}
		x->head = (uint16_t)(b * per);
		if (ind) {
			const struct xn_guest_seg *t = &cfg->rx_ind[b];

			if (t->len < 16 * g->rx_nseg)
				return -EINVAL;
			if ((rc = mem_gpa(g, t->off, 16ull * g->rx_nseg, 16, &tgpa)))
				return rc;
			d = (struct vring_desc *)(g->mem + t->off);
			set_desc(&g->rx.desc[x->head], tgpa, 16 * g->rx_nseg,
				 VRING_DESC_F_INDIRECT, 0);
			for (s = 0; s < g->rx_nseg; s++)
				set_desc(&d[s], x->gpa[s], x->len[s], VRING_DESC_F_WRITE |
					 (s + 1 < g->rx_nseg ? VRING_DESC_F_NEXT : 0), (uint16_t)(s + 1));
		} else {
			d = &g->rx.desc[x->head];
			for (s = 0; s < g->rx_nseg; s++)
				set_desc(&d[s], x->gpa[s], x->len[s], VRING_DESC_F_WRITE |
					 (s + 1 < g->rx_nseg ? VRING_DESC_F_NEXT : 0),
					 (uint16_t)(x->head + s + 1));
		}
		g->rx.head2buf[x->head] = b;
	}
	return 0;
}

/**
 * tx_setup() - lay out the tx slots' descriptors and zero their headers
 * @g:		guest
 * @cfg:	configuration
 *
 * Slot s uses head s (header and frame in one descriptor, or indirect),
 * or heads 2s/2s+1 (header descriptor then frame descriptor).
 *
 * Return: 0, -EINVAL/-ERANGE for a bad geometry, -ENOMEM.
 */
static int tx_setup(struct xn_guest *g, const struct xn_guest_config *cfg)
{
	bool ind = cfg->flags & XN_GUEST_F_INDIRECT;
	bool sep = cfg->flags & XN_GUEST_F_TX_HDR_SEPARATE;
	uint32_t per = (sep && !ind) ? 2 : 1;
	uint32_t s;
	int rc;

	if (!cfg->ntx || (uint64_t)cfg->ntx * per > g->tx.num || !cfg->tx_hdr ||
	    !cfg->tx_frame || (ind && !cfg->tx_ind))
		return -EINVAL;
	g->txs = calloc(cfg->ntx, sizeof(*g->txs));
	g->tx_free = calloc(cfg->ntx, sizeof(*g->tx_free));
	if (!g->txs || !g->tx_free)
		return -ENOMEM;
	g->ntx = cfg->ntx;
	for (s = 0; s < cfg->ntx; s++) {
		const struct xn_guest_seg *h = &cfg->tx_hdr[s], *f = &cfg->tx_frame[s];
		struct gtx *t = &g->txs[s];
		uint64_t hgpa, fgpa, tgpa;
		struct vring_desc *d;

		if (h->len < g->hdr_len || f->len < XN_FRAME_MIN_LEN)
			return -EINVAL;
		if ((rc = mem_gpa(g, h->off, g->hdr_len, 1, &hgpa)) ||
		    (rc = mem_gpa(g, f->off, f->len, 1, &fgpa)))
			return rc;
		if (!sep && (f->off != h->off + g->hdr_len ||
			     (rc = mem_gpa(g, h->off, g->hdr_len + f->len, 1, &hgpa))))
			return rc ? rc : -EINVAL;
		memset(g->mem + h->off, 0, g->hdr_len);
		t->hdr = g->mem + h->off;
		t->frame = g->mem + f->off;
		t->cap = f->len;
		t->head = (uint16_t)(s * per);
		if (ind) {
			const struct xn_guest_seg *tb = &cfg->tx_ind[s];
			uint32_t n = sep ? 2 : 1;

			if (tb->len < 16 * n)
				return -EINVAL;
			if ((rc = mem_gpa(g, tb->off, 16ull * n, 16, &tgpa)))
				return rc;
			set_desc(&g->tx.desc[t->head], tgpa, 16 * n, VRING_DESC_F_INDIRECT, 0);
			d = (struct vring_desc *)(g->mem + tb->off);
			memset(d, 0, 16ull * n);
		} else {
			d = &g->tx.desc[t->head];
		}
		if (sep) {
			uint16_t next = ind ? 1 : (uint16_t)(t->head + 1);

			set_desc(&d[0], hgpa, g->hdr_len, VRING_DESC_F_NEXT, next);
			set_desc(&d[1], fgpa, 0, 0, 0);
			t->fdesc = &d[1];
		} else {
			set_desc(&d[0], hgpa, g->hdr_len, 0, 0);
		}
		t->hdesc = &d[0];
		g->tx.head2buf[t->head] = s;
		g->tx_free[g->ntx_free++] = cfg->ntx - 1 - s;
	}
	return 0;
}

/* ---- ring helpers ------------------------------------------------------ */

/**
 * gvq_kick() - signal the backend that @vq has new buffers
 * @g:		guest
 * @vq:		the queue
 *
 * Return: 0 or -errno of write().
 */
static int gvq_kick(struct xn_guest *g, struct gvq *vq)
{
	uint64_t one = 1;

	if (vq->kick_fd < 0)
		return 0;
	if (write(vq->kick_fd, &one, sizeof(one)) != sizeof(one) && errno != EAGAIN)
		return -errno;
	g->st.kicks++;
	if (vq == &g->rx)
		g->st.rx_kicks++;
	else
		g->st.tx_kicks++;
	return 0;
}

/**
 * gvq_publish() - make the entries written to the avail ring visible and
 *		   kick the backend if it asked to be notified
 * @g:		guest
 * @vq:		the queue
 *
 * With EVENT_IDX, kick when the new avail index passes avail_event;
 * without, unless the device set VRING_USED_F_NO_NOTIFY.
 *
 * Return: 1 if it kicked, 0 if not, -errno if the kick failed.
 */
static int gvq_publish(struct xn_guest *g, struct gvq *vq)
{
	uint16_t old = vq->published, new = vq->avail_idx;
	bool need;
	int rc;

	if (old == new)
		return 0;
	__atomic_store_n(vq->avail_idx_p, new, __ATOMIC_RELEASE);
	vq->published = new;
	/* the device may be reading avail->idx as we read its event field */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (g->flags & XN_GUEST_F_EVENT_IDX)
		need = vring_need_event(__atomic_load_n(vq->avail_event, __ATOMIC_RELAXED),
					new, old);
	else
		need = !(__atomic_load_n(vq->used_flags, __ATOMIC_RELAXED) &
			 VRING_USED_F_NO_NOTIFY);
	if (!need)
		return 0;
	rc = gvq_kick(g, vq);
	return rc ? rc : 1;
}

/**
 * gvq_used_idx() - the device's used index
 * @vq:		the queue
 *
 * Return: used->idx, read with acquire semantics so that the used entries
 * before it may be read afterwards.
 */
static inline uint16_t gvq_used_idx(const struct gvq *vq)
{
	return __atomic_load_n(vq->used_idx_p, __ATOMIC_ACQUIRE);
}

/**
 * gvq_arm() - ask for an interrupt once the device has used more entries
 * @g:		guest
 * @vq:		the queue
 * @delay:	with EVENT_IDX, entries beyond the next one the device may
 *		use before interrupting (0 = interrupt on the next one)
 *
 * Return: true if nothing is pending (safe to sleep), false if the device
 * used entries meanwhile (reap them first).
 */
static bool gvq_arm(struct xn_guest *g, struct gvq *vq, uint16_t delay)
{
	if (g->flags & XN_GUEST_F_EVENT_IDX)
		__atomic_store_n(vq->used_event, (uint16_t)(vq->last_used + delay),
				 __ATOMIC_RELAXED);
	else
		__atomic_store_n(vq->avail_flags, 0, __ATOMIC_RELAXED);
	/* the event store must be visible before we re-read used->idx */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	return gvq_used_idx(vq) == vq->last_used;
}

/**
 * gvq_disarm() - tell the device not to interrupt while we are busy
 * @g:		guest
 * @vq:		the queue
 *
 * Without EVENT_IDX sets VRING_AVAIL_F_NO_INTERRUPT.  With EVENT_IDX there
 * is nothing to do: used_event stays where gvq_arm() put it and the device
 * interrupts at most once more until it is moved again.
 */
static void gvq_disarm(struct xn_guest *g, struct gvq *vq)
{
	if (!(g->flags & XN_GUEST_F_EVENT_IDX))
		__atomic_store_n(vq->avail_flags, VRING_AVAIL_F_NO_INTERRUPT,
				 __ATOMIC_RELAXED);
}

/* ---- rx ---------------------------------------------------------------- */

/**
 * rx_post() - put rx buffer @b on the avail ring (not yet published)
 * @g:		guest
 * @b:		buffer index
 */
static void rx_post(struct xn_guest *g, uint32_t b)
{
	struct gvq *vq = &g->rx;

	vq->avail_ring[vq->avail_idx & vq->mask] = g->rxb[b].head;
	vq->avail_idx++;
	vq->posted[b] = 1;
	vq->inflight++;
	g->st.rx_buffers_posted++;
}

/**
 * rx_check_guards() - count changed guard bytes around one rx buffer
 * @g:		guest
 * @x:		the buffer
 * @first:	set to the guest address of the first changed byte, if any
 *		and if *@first is still 0
 *
 * Return: number of guard bytes that differ from the pattern.
 */
static uint32_t rx_check_guards(const struct xn_guest *g, const struct grx *x,
				uint64_t *first)
{
	uint32_t s, i, n = 0;

	for (s = 0; s < g->rx_nseg; s++) {
		const uint8_t *pre = x->ptr[s] - XN_GUEST_GUARD_LEN;
		const uint8_t *post = x->ptr[s] + x->len[s];

		if (!memcmp(pre, g->guard, XN_GUEST_GUARD_LEN) &&
		    !memcmp(post, g->guard, XN_GUEST_GUARD_LEN))
			continue;
		for (i = 0; i < XN_GUEST_GUARD_LEN; i++) {
			if (pre[i] != guard_byte(i)) {
				if (first && !*first)
					*first = x->gpa[s] - XN_GUEST_GUARD_LEN + i;
				n++;
			}
			if (post[i] != guard_byte(i)) {
				if (first && !*first)
					*first = x->gpa[s] + x->len[s] + i;
				n++;
			}
		}
	}
	return n;
}

/**
 * rx_gather() - copy bytes of an rx buffer into the reassembly buffer
 * @g:		guest
 * @x:		the buffer
 * @from:	first byte (offset across the segments)
 * @len:	bytes to copy (from + len <= x->cap)
 *
 * Marks the reassembly bad instead of overflowing it.
 */
static void rx_gather(struct xn_guest *g, const struct grx *x, uint32_t from, uint32_t len)
{
	struct rx_asm *as = &g->as;
	uint32_t s, n;

	if (len > SCRATCH_LEN - as->have) {
		as->bad = true;
		return;
	}
	for (s = 0; s < g->rx_nseg && len; s++) {
		if (from >= x->len[s]) {
			from -= x->len[s];
			continue;
		}
		n = x->len[s] - from < len ? x->len[s] - from : len;
		memcpy(as->buf + as->have, x->ptr[s] + from, n);
		as->have += n;
		len -= n;
		from = 0;
	}
}

static int tx_take_slot(struct xn_guest *g);
static void tx_queue(struct xn_guest *g, uint32_t s, uint32_t len);
static uint32_t tx_reap(struct xn_guest *g);

/**
 * rx_reflect() - send a verified frame back with its MACs swapped
 * @g:		guest
 * @frame:	the frame
 * @len:	its length
 */
static void rx_reflect(struct xn_guest *g, const uint8_t *frame, uint32_t len)
{
	int s = tx_take_slot(g);

	if (s < 0) {
		tx_reap(g);
		s = tx_take_slot(g);
	}
	if (s < 0 || len > g->txs[s].cap) {
		if (s >= 0)
			g->tx_free[g->ntx_free++] = (uint32_t)s;
		g->st.tx_reflect_drops++;
		return;
	}
	memcpy(g->txs[s].frame, frame, len);
	xn_frame_swap_mac(g->txs[s].frame);
	tx_queue(g, (uint32_t)s, len);
	g->st.tx_reflected++;
}

/**
 * rx_frame() - account for one complete received frame
 * @g:		guest
 * @frame:	first byte of the Ethernet header
 * @len:	frame length
 * @bad:	the header or a buffer of the frame was already found bad
 */
static void rx_frame(struct xn_guest *g, const uint8_t *frame, uint32_t len, bool bad)
{
	g->st.rx_frames++;
	g->st.rx_bytes += len;
	if (bad || xn_frame_check(frame, len, NULL)) {
		g->st.rx_bad++;
		return;
	}
	g->st.rx_verified++;
	if (!(frame[0] & 1) && memcmp(frame, g->mac, 6))
		g->st.rx_foreign++;
	if (g->reflect)
		rx_reflect(g, frame, len);
}

/**
 * rx_header_ok() - check the virtio-net header of a received frame
 * @h:		the header
 *
 * We never negotiate checksum or GSO offloads, so flags and gso_type
 * must be zero.
 *
 * Return: true if acceptable.
 */
static bool rx_header_ok(const struct virtio_net_hdr_v1 *h)
{
	return h->flags == 0 && h->gso_type == VIRTIO_NET_HDR_GSO_NONE;
}

/**
 * rx_used() - process one used rx entry
 * @g:		guest
 * @x:		the buffer
 * @len:	used length written by the device
 *
 * Verifies in place when the frame is in one segment of one buffer,
 * otherwise reassembles it (chains, num_buffers > 1).
 */
static void rx_used(struct xn_guest *g, const struct grx *x, uint32_t len)
{
	struct rx_asm *as = &g->as;
	const struct virtio_net_hdr_v1 *h;
	uint32_t nb = 1;
	bool bad = false;

	if (len > x->cap) {
		g->st.rx_len_invalid++;
		len = x->cap;
		bad = true;
	}
	if (as->remaining) {            /* a further buffer of a merged frame */
		as->bad |= bad;
		rx_gather(g, x, 0, len);
		if (--as->remaining == 0)
			rx_frame(g, as->buf, as->have, as->bad);
		return;
	}
	if (len < g->hdr_len || x->len[0] < g->hdr_len) {
		g->st.rx_short++;
		return;
	}
	h = (const struct virtio_net_hdr_v1 *)x->ptr[0];
	bad |= !rx_header_ok(h);
	if (g->flags & XN_GUEST_F_MRG_RXBUF) {
		nb = h->num_buffers;
		if (nb == 0 || nb > g->nrx) {
			rx_frame(g, NULL, len - g->hdr_len, true);
			return;
		}
	}
	if (nb == 1 && len <= x->len[0]) {
		rx_frame(g, x->ptr[0] + g->hdr_len, len - g->hdr_len, bad);
		return;
	}
	g->st.rx_merged += nb > 1;
	as->have = 0;
	as->bad = bad;
	as->remaining = nb;
	rx_gather(g, x, g->hdr_len, len - g->hdr_len);
	if (--as->remaining == 0)
		rx_frame(g, as->buf, as->have, as->bad);
}

/**
 * rx_trace() - remember one used rx entry
 * @g:		guest
 * @x:		its buffer
 * @b:		buffer index
 * @len:	used length
 */
static void rx_trace(struct xn_guest *g, const struct grx *x, uint32_t b, uint32_t len)
{
	struct xn_guest_trace *t = &g->trace[g->ntrace++ % XN_GUEST_TRACE_LEN];

	t->gpa = x->gpa[0];
	t->len = len;
	t->id = x->head;
	t->buf = (uint16_t)b;
}

/**
 * rx_reap() - reap every used rx entry, repost the buffers, kick if needed
 * @g:		guest
 *
 * Return: number of used entries reaped.
 */
static uint32_t rx_reap(struct xn_guest *g)
{
	struct gvq *vq = &g->rx;
	uint16_t used = gvq_used_idx(vq);
	uint32_t n = 0;

	while (vq->last_used != used) {
		const struct vring_used_elem *e = &vq->used_ring[vq->last_used & vq->mask];
		uint32_t id = e->id, len = e->len, b;

		vq->last_used++;
		n++;
		g->st.rx_used++;
		b = id < vq->num ? vq->head2buf[id] : NO_BUF;
		if (b == NO_BUF || !vq->posted[b]) {
			/* not a head we made available: nothing to repost */
			g->st.rx_bad++;
			continue;
		}
		vq->posted[b] = 0;
		vq->inflight--;
		rx_trace(g, &g->rxb[b], b, len);
		g->st.guard_violations += rx_check_guards(g, &g->rxb[b],
							  &g->st.first_violation_gpa);
		rx_used(g, &g->rxb[b], len);
		rx_post(g, b);
	}
	if (n)
		gvq_publish(g, vq);
	return n;
}

/* ---- tx ---------------------------------------------------------------- */

/**
 * tx_take_slot() - take a free tx slot
 * @g:		guest
 *
 * Return: slot index, or -ENOBUFS if all are with the device.
 */
static int tx_take_slot(struct xn_guest *g)
{
	if (!g->ntx_free)
		return -ENOBUFS;
	return (int)g->tx_free[--g->ntx_free];
}

/**
 * tx_queue() - put tx slot @s holding a @len-byte frame on the avail ring
 * @g:		guest
 * @s:		slot
 * @len:	frame length
 *
 * Not yet published: gvq_publish() does that for a batch.
 */
static void tx_queue(struct xn_guest *g, uint32_t s, uint32_t len)
{
	struct gvq *vq = &g->tx;
	struct gtx *t = &g->txs[s];

	if (t->fdesc)
		t->fdesc->len = len;
	else
		t->hdesc->len = g->hdr_len + len;
	vq->avail_ring[vq->avail_idx & vq->mask] = t->head;
	vq->avail_idx++;
	vq->posted[s] = 1;
	vq->inflight++;
	g->st.tx_sent++;
	g->st.tx_bytes += len;
}

/**
 * tx_reap() - reclaim the tx slots the device has used
 * @g:		guest
 *
 * Also checks that the device left the (read-only) header alone.
 *
 * Return: number of used entries reaped.
 */
static uint32_t tx_reap(struct xn_guest *g)
{
	struct gvq *vq = &g->tx;
	uint16_t used = gvq_used_idx(vq);
	uint32_t n = 0;

	while (vq->last_used != used) {
		uint32_t id = vq->used_ring[vq->last_used & vq->mask].id, s;

		vq->last_used++;
		n++;
		s = id < vq->num ? vq->head2buf[id] : NO_BUF;
		if (s == NO_BUF || !vq->posted[s]) {
			g->st.tx_bad_used++;
			continue;
		}
		vq->posted[s] = 0;
		vq->inflight--;
		if (memcmp(g->txs[s].hdr, zero_hdr, g->hdr_len)) {
			g->st.tx_hdr_modified++;
			memset(g->txs[s].hdr, 0, g->hdr_len);
		}
		g->tx_free[g->ntx_free++] = s;
		g->st.tx_completed++;
	}
	return n;
}

/**
 * tx_fill() - build and queue up to @count test frames
 * @g:		guest
 * @count:	frames wanted
 * @len:	frame length
 * @dst:	destination MAC
 * @flow:	flow id
 *
 * Return: frames queued (not yet published).
 */
static uint32_t tx_fill(struct xn_guest *g, uint64_t count, uint32_t len,
			const uint8_t *dst, uint32_t flow)
{
	uint32_t n = 0;
	int s;

	while (n < count) {
		s = tx_take_slot(g);
		if (s < 0) {
			g->st.tx_no_slot++;
			break;
		}
		xn_frame_build(g->txs[s].frame, len, dst, g->mac, flow, g->tx_seq++);
		tx_queue(g, (uint32_t)s, len);
		n++;
	}
	return n;
}

/**
 * tx_len_ok() - whether every tx slot can hold a @len-byte test frame
 * @g:		guest
 * @len:	frame length
 *
 * Return: true if so.
 */
static bool tx_len_ok(const struct xn_guest *g, uint32_t len)
{
	uint32_t s;

	if (len < XN_FRAME_MIN_LEN)
		return false;
	for (s = 0; s < g->ntx; s++)
		if (len > g->txs[s].cap)
			return false;
	return true;
}

/* ---- sleeping ---------------------------------------------------------- */

/**
 * drain() - read an eventfd's counter
 * @fd:		the eventfd (non-blocking)
 *
 * Return: true if it had been signalled.
 */
static bool drain(int fd)
{
	uint64_t v;

	return fd >= 0 && read(fd, &v, sizeof(v)) == sizeof(v);
}

/**
 * guest_sleep() - wait for an interrupt (call eventfd) or a stop request
 * @g:		guest
 * @want_tx:	also wait on the tx call eventfd
 * @timeout_ms:	poll() timeout, -1 = none
 *
 * Return: 0, or -errno from poll().
 */
static int guest_sleep(struct xn_guest *g, bool want_tx, int timeout_ms)
{
	struct pollfd p[3];
	nfds_t n = 0;
	int rx = -1, tx = -1;

	if (g->rx.call_fd >= 0) {
		rx = (int)n;
		p[n++] = (struct pollfd){ .fd = g->rx.call_fd, .events = POLLIN };
	}
	if (want_tx && g->tx.call_fd >= 0) {
		tx = (int)n;
		p[n++] = (struct pollfd){ .fd = g->tx.call_fd, .events = POLLIN };
	}
	p[n++] = (struct pollfd){ .fd = g->stop_fd, .events = POLLIN };
	g->st.sleeps++;
	if (poll(p, n, timeout_ms) < 0)
		return errno == EINTR ? 0 : -errno;
	if (rx >= 0 && (p[rx].revents & POLLIN) && drain(g->rx.call_fd)) {
		g->st.interrupts++;
		g->st.rx_interrupts++;
	}
	if (tx >= 0 && (p[tx].revents & POLLIN) && drain(g->tx.call_fd)) {
		g->st.interrupts++;
		g->st.tx_interrupts++;
	}
	return 0;
}

/**
 * guest_idle() - arm interrupts and sleep if the device has nothing for us
 * @g:		guest
 * @tx_blocked:	we wait for tx slots to send more frames
 * @timeout_ms:	poll() timeout, -1 = none
 *
 * Interrupts are asked for on rx always and on tx only while frames are in
 * flight; with EVENT_IDX a blocked sender asks to be woken once three
 * quarters of them completed, as Linux's virtqueue_enable_cb_delayed().
 *
 * Return: 0 (slept, or found work), or -errno from poll().
 */
static int guest_idle(struct xn_guest *g, bool tx_blocked, int timeout_ms)
{
	bool want_tx = g->tx.inflight > 0;
	uint16_t delay = tx_blocked ? (uint16_t)(g->tx.inflight * 3 / 4) : 0;
	int rc = 0;

	if (gvq_arm(g, &g->rx, 0) && (!want_tx || gvq_arm(g, &g->tx, delay)))
		rc = guest_sleep(g, want_tx, timeout_ms);
	gvq_disarm(g, &g->rx);
	gvq_disarm(g, &g->tx);
	return rc;
}

/* ---- public ------------------------------------------------------------ */

/**
 * xn_guest_create() - set up one queue pair in guest memory
 * @out:	filled with the new guest
 * @cfg:	geometry, descriptors' buffers, eventfds
 *
 * Writes the descriptor tables, indirect tables, zeroed tx headers and rx
 * guards, and makes every rx buffer available (without kicking: the
 * backend may not know the rings yet; see xn_guest_kick()).
 *
 * Return: 0, -EINVAL or -ERANGE for a bad configuration, -ENOMEM.
 */
int xn_guest_create(struct xn_guest **out, const struct xn_guest_config *cfg)
{
	struct xn_guest *g;
	uint32_t b;
	int rc;

	if (!out || !cfg || !cfg->mem || !cfg->nregions ||
	    cfg->nregions > XN_GUEST_MAX_REGIONS ||
	    (cfg->hdr_len != 10 && cfg->hdr_len != 12) ||
	    ((cfg->flags & XN_GUEST_F_MRG_RXBUF) && cfg->hdr_len != 12))
		return -EINVAL;
	g = calloc(1, sizeof(*g));
	if (!g)
		return -ENOMEM;
	g->stop_fd = -1;
	g->mem = cfg->mem;
	g->mem_size = cfg->mem_size;
	g->nregions = cfg->nregions;
	g->flags = cfg->flags;
	g->hdr_len = cfg->hdr_len;
	memcpy(g->regions, cfg->regions, sizeof(g->regions));
	memcpy(g->mac, cfg->mac, 6);
	for (b = 0; b < XN_GUEST_GUARD_LEN; b++)
		g->guard[b] = guard_byte(b);
	g->as.buf = malloc(SCRATCH_LEN);
	g->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (!g->as.buf || g->stop_fd < 0) {
		rc = g->stop_fd < 0 ? -errno : -ENOMEM;
		goto fail;
	}
	if ((rc = gvq_init(g, &g->rx, &cfg->rx, cfg->nrx)) ||
	    (rc = gvq_init(g, &g->tx, &cfg->tx, cfg->ntx)) ||
	    (rc = rx_setup(g, cfg)) || (rc = tx_setup(g, cfg)))
		goto fail;
	for (b = 0; b < g->nrx; b++)
		rx_post(g, b);
	__atomic_store_n(g->rx.avail_idx_p, g->rx.avail_idx, __ATOMIC_RELEASE);
	g->rx.published = g->rx.avail_idx;
	*out = g;
	return 0;
fail:
	xn_guest_destroy(g);
	return rc;
}

/**
 * xn_guest_destroy() - free a guest (guest memory itself is the caller's)
 * @g:		guest, may be NULL
 */
void xn_guest_destroy(struct xn_guest *g)
{
	if (!g)
		return;
	if (g->stop_fd >= 0)
		close(g->stop_fd);
	free(g->rx.head2buf);
	free(g->rx.posted);
	free(g->tx.head2buf);
	free(g->tx.posted);
	free(g->rxb);
	free(g->txs);
	free(g->tx_free);
	free(g->as.buf);
	free(g);
}

/**
 * xn_guest_kick() - notify the backend unconditionally
 * @g:		guest
 * @ring:	XN_GUEST_RX or XN_GUEST_TX
 *
 * Used once after the rings are enabled, for buffers made available
 * before the backend knew the rings.
 *
 * Return: 0, -EINVAL for a bad @ring, -errno of write().
 */
int xn_guest_kick(struct xn_guest *g, int ring)
{
	if (ring != XN_GUEST_RX && ring != XN_GUEST_TX)
		return -EINVAL;
	return gvq_kick(g, ring == XN_GUEST_RX ? &g->rx : &g->tx);
}

/**
 * xn_guest_send() - one tx pass: reclaim, build and post up to @count frames
 * @g:		guest
 * @count:	frames wanted
 * @len:	frame length (XN_FRAME_MIN_LEN .. tx slot size)
 * @dst:	destination MAC (6 bytes)
 * @flow:	flow id
 *
 * Return: frames posted (may be fewer than @count if the ring is full),
 * -EINVAL for a bad length, -errno if the kick failed.
 */
int xn_guest_send(struct xn_guest *g, uint32_t count, uint32_t len,
		  const uint8_t *dst, uint32_t flow)
{
	uint32_t n;
	int rc;

	if (!dst || !tx_len_ok(g, len))
		return -EINVAL;
	tx_reap(g);
	n = tx_fill(g, count, len, dst, flow);
	rc = gvq_publish(g, &g->tx);
	return rc < 0 ? rc : (int)n;
}

/**
 * xn_guest_poll() - one receive pass, sleeping first if there is nothing
 * @g:		guest
 * @timeout_ms:	how long to sleep on the call eventfds when idle
 *		(0 = do not sleep, -1 = forever)
 * @flags:	XN_GUEST_RUN_REFLECT to send verified frames back
 *
 * Reaps rx (reposting buffers) and tx; if nothing was there and
 * @timeout_ms allows, arms interrupts, sleeps, and makes a second pass.
 * xn_guest_stop() cuts the sleep short.
 *
 * Return: complete rx frames reaped, or -errno.
 */
int xn_guest_poll(struct xn_guest *g, int timeout_ms, uint32_t flags)
{
	uint64_t rx0 = g->st.rx_frames;
	uint32_t work;
	int rc, pass;

	__atomic_store_n(&g->stop, 0, __ATOMIC_RELAXED);
	drain(g->stop_fd);
	g->reflect = flags & XN_GUEST_RUN_REFLECT;
	for (pass = 0; pass < 2; pass++) {
		work = tx_reap(g);
		work += rx_reap(g);
		if ((rc = gvq_publish(g, &g->tx)) < 0)
			return rc;
		g->st.passes++;
		if (work || !timeout_ms || pass)
			break;
		if ((rc = guest_idle(g, false, timeout_ms)) < 0)
			return rc;
	}
	return (int)(g->st.rx_frames - rx0);
}

/**
 * xn_guest_run() - the driver loop: send, receive, sleep when idle
 * @g:		guest
 * @duration_ms: deadline; 0 = none (then XN_GUEST_RUN_UNTIL_DONE is needed)
 * @tx_count:	frames to send, XN_GUEST_UNLIMITED to flood until the deadline
 * @tx_len:	their length
 * @dst:	their destination MAC (may be NULL if @tx_count is 0)
 * @flow:	their flow id
 * @rx_target:	with XN_GUEST_RUN_UNTIL_DONE, rx frames to wait for
 * @flags:	XN_GUEST_RUN_*
 *
 * Call with the GIL released.  Each pass reclaims tx, reaps and reposts
 * rx (reflecting verified frames in reflect mode), queues new frames into
 * free tx slots and publishes, kicking only when the backend asked for it.
 * When a pass finds nothing to do, the loop arms interrupts and sleeps on
 * the call eventfds (unless XN_GUEST_RUN_BUSY_POLL).  xn_guest_stop()
 * ends it from another thread.
 *
 * Return: 1 if it finished because the work was done, 0 at the deadline
 * or on xn_guest_stop(), -EINVAL for bad arguments, -errno on failure.
 */
int xn_guest_run(struct xn_guest *g, uint64_t duration_ms, uint64_t tx_count,
		 uint32_t tx_len, const uint8_t *dst, uint32_t flow,
		 uint64_t rx_target, uint32_t flags)
{
	bool until_done = flags & XN_GUEST_RUN_UNTIL_DONE;
	uint64_t deadline = duration_ms ? now_ms() + duration_ms : 0;
	uint64_t rx0 = g->st.rx_frames, sent = 0, now;
	uint32_t work;
	int rc, timeout;

	if ((tx_count && (!dst || !tx_len_ok(g, tx_len))) || (!duration_ms && !until_done))
		return -EINVAL;
	__atomic_store_n(&g->stop, 0, __ATOMIC_RELAXED);
	drain(g->stop_fd);
	g->reflect = flags & XN_GUEST_RUN_REFLECT;
	for (;;) {
		if (__atomic_load_n(&g->stop, __ATOMIC_RELAXED))
			return 0;
		work = tx_reap(g);
		work += rx_reap(g);
		if (sent < tx_count) {
			uint32_t n = tx_fill(g, tx_count - sent, tx_len, dst, flow);

			sent += n;
			work += n;
		}
		if ((rc = gvq_publish(g, &g->tx)) < 0)
			return rc;
		g->st.passes++;
		if (until_done && sent >= tx_count && !g->tx.inflight &&
		    g->st.rx_frames - rx0 >= rx_target)
			return 1;
		now = deadline ? now_ms() : 0;
		if (deadline && now >= deadline)
			return 0;
		if (work || (flags & XN_GUEST_RUN_BUSY_POLL))
			continue;
		timeout = !deadline ? -1 :
			  deadline - now > 1000 ? 1000 : (int)(deadline - now);
		rc = guest_idle(g, sent < tx_count && !g->ntx_free, timeout);
		if (rc < 0)
			return rc;
	}
}

/**
 * xn_guest_stop() - make a running xn_guest_run() return (any thread)
 * @g:		guest
 */
void xn_guest_stop(struct xn_guest *g)
{
	uint64_t one = 1;

	__atomic_store_n(&g->stop, 1, __ATOMIC_RELAXED);
	if (write(g->stop_fd, &one, sizeof(one)) < 0) {
		/* counter full: it is signalled anyway */
	}
}

/**
 * xn_guest_get_stats() - copy the counters
 * @g:		guest
 * @out:	filled with a copy, each u64 read whole
 */
void xn_guest_get_stats(const struct xn_guest *g, struct xn_guest_stats *out)
{
	const uint64_t *src = (const uint64_t *)&g->st;
	uint64_t *dst = (uint64_t *)out;
	size_t i;

	for (i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
		dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

/**
 * xn_guest_rx_trace() - the last used rx entries, oldest first
 * @g:		guest (not running)
 * @out:	array of @max entries
 * @max:	its size
 *
 * Return: entries copied (at most XN_GUEST_TRACE_LEN).
 */
int xn_guest_rx_trace(const struct xn_guest *g, struct xn_guest_trace *out, uint32_t max)
{
	uint64_t n = g->ntrace < XN_GUEST_TRACE_LEN ? g->ntrace : XN_GUEST_TRACE_LEN;
	uint64_t i, first;

	if (n > max)
		n = max;
	first = g->ntrace - n;
	for (i = 0; i < n; i++)
		out[i] = g->trace[(first + i) % XN_GUEST_TRACE_LEN];
	return (int)n;
}

/**
 * xn_guest_check_guards() - scan the guards of every rx buffer
 * @g:		guest
 * @first_gpa:	set to the guest address of the first changed byte (if any;
 *		may be NULL)
 *
 * Return: number of guard bytes that no longer hold the pattern.
 */
int xn_guest_check_guards(const struct xn_guest *g, uint64_t *first_gpa)
{
	uint64_t first = 0;
	uint32_t b, n = 0;

	for (b = 0; b < g->nrx; b++)
		n += rx_check_guards(g, &g->rxb[b], &first);
	if (first_gpa)
		*first_gpa = first;
	return (int)n;
}

/**
 * xn_guest_tx_seq() - sequence number of the next frame to be built
 * @g:		guest
 *
 * Return: the sequence number.
 */
uint64_t xn_guest_tx_seq(const struct xn_guest *g)
{
	return g->tx_seq;
}

/**
 * xn_gvq_info() - the driver's and the rings' view of one virtqueue
 * @g:		guest
 * @ring:	XN_GUEST_RX or XN_GUEST_TX
 * @out:	filled in
 *
 * Return: 0, or -EINVAL for a bad @ring.
 */
int xn_gvq_info(const struct xn_guest *g, int ring, struct xn_gvq_info *out)
{
	const struct gvq *vq;

	if (ring != XN_GUEST_RX && ring != XN_GUEST_TX)
		return -EINVAL;
	vq = ring == XN_GUEST_RX ? &g->rx : &g->tx;
	memset(out, 0, sizeof(*out));
	out->num = vq->num;
	out->avail_idx = vq->published;
	out->last_used = vq->last_used;
	out->used_idx = __atomic_load_n(vq->used_idx_p, __ATOMIC_ACQUIRE);
	out->used_flags = __atomic_load_n(vq->used_flags, __ATOMIC_RELAXED);
	out->avail_event = __atomic_load_n(vq->avail_event, __ATOMIC_RELAXED);
	out->used_event = __atomic_load_n(vq->used_event, __ATOMIC_RELAXED);
	out->avail_flags = __atomic_load_n(vq->avail_flags, __ATOMIC_RELAXED);
	out->inflight = vq->inflight;
	return 0;
}
