/* SPDX-License-Identifier: MIT */
/*
 * virtq.c - the device side of a virtio split virtqueue over guest memory
 * mapped into the UMEM: address translation, validated descriptor-chain
 * walks, the used ring and notifications.
 *
 * Everything a guest writes is hostile until checked: every descriptor is
 * read once into a local copy, every address and length is translated
 * with overflow checks, chains are bounded by the table size, and the
 * first violation stops the queue (virtio NEEDS_RESET semantics) with its
 * reason in the counters.
 */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "dp.h"

/**
 * xn_translate() - translate a guest-physical range to a UMEM offset
 * @mem:	the UMEM map
 * @gpa:	guest physical address
 * @len:	length of the range, may be 0
 * @off:	set to the UMEM offset of @gpa on success
 *
 * The whole range must lie inside one region; a range that wraps or
 * crosses a region's end is refused.
 *
 * Return: 0, or -EFAULT if the range is not guest memory.
 */
int xn_translate(const struct xn_memmap *mem, uint64_t gpa, uint64_t len, uint64_t *off)
{
	uint32_t i;

	if (gpa + len < gpa)
		return -EFAULT;
	for (i = 0; i < mem->nregions; i++) {
		const struct xn_region *r = &mem->regions[i];

		if (gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa)) {
			*off = r->umem_off + (gpa - r->gpa);
			return 0;
		}
	}
	return -EFAULT;
}

/**
 * xn_vq_init() - set up the device view of one virtqueue
 * @vq:		the queue to fill in
 * @mem:	the UMEM map the ring offsets refer to
 * @c:		ring configuration from the control plane (offsets checked there)
 * @features:	negotiated virtio features
 * @device_writes: true for rx (descriptors must be device-writable)
 *
 * Return: 0, or -EINVAL for a bad queue size or a ring outside the UMEM.
 */
int xn_vq_init(struct xn_vq *vq, const struct xn_memmap *mem,
	       const struct xn_vring_config *c, uint64_t features, bool device_writes)
{
	uint64_t n = c->num;

	memset(vq, 0, sizeof(*vq));
	if (n == 0 || n > 32768 || (n & (n - 1)))
		return -EINVAL;
	if (c->desc_off % 16 || c->avail_off % 2 || c->used_off % 4)
		return -EINVAL;
	if (c->desc_off + 16 * n > mem->size || c->avail_off + 6 + 2 * n > mem->size ||
	    c->used_off + 6 + 8 * n > mem->size)
		return -EINVAL;
	vq->desc = (struct vring_desc *)xn_umem_ptr(mem, c->desc_off);
	vq->avail = (struct vring_avail *)xn_umem_ptr(mem, c->avail_off);
	vq->used = (struct vring_used *)xn_umem_ptr(mem, c->used_off);
	vq->used_event = &vq->avail->ring[n];
	vq->avail_event = (uint16_t *)&vq->used->ring[n];
	vq->num = (uint32_t)n;
	vq->last_avail = c->last_avail_idx;
	vq->avail_idx = c->last_avail_idx;
	/* Resume from the used index in guest memory: after a stop or a
	 * reconnect it is the truth the guest has seen. */
	vq->used_idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
	vq->event_idx = features & (1ULL << VIRTIO_RING_F_EVENT_IDX);
	vq->indirect = features & (1ULL << VIRTIO_RING_F_INDIRECT_DESC);
	vq->device_writes = device_writes;
	vq->enabled = c->enabled;
	vq->kick_fd = c->kick_fd;
	vq->call_fd = c->call_fd;
	return 0;
}

/**
 * xn_vq_init_pair() - set up a queue pair's rx and tx virtqueues and
 * point their counters into the pair's counter block
 * @rx, @tx:	the queues
 * @mem:	the UMEM map
 * @rxc, @txc:	the frontend's ring configurations
 * @features:	negotiated virtio features
 * @ctr:	counter block: keeps counting, only the broken reasons are
 *		reset (the rings start afresh)
 *
 * Return: 0, or -EINVAL from xn_vq_init().
 */
int xn_vq_init_pair(struct xn_vq *rx, struct xn_vq *tx, const struct xn_memmap *mem,
		    const struct xn_vring_config *rxc, const struct xn_vring_config *txc,
		    uint64_t features, struct xn_counters *ctr)
{
	int err;

	ctr->rx_broken = 0;
	ctr->tx_broken = 0;
	err = xn_vq_init(rx, mem, rxc, features, true);
	if (!err)
		err = xn_vq_init(tx, mem, txc, features, false);
	if (err)
		return err;
	rx->broken = &ctr->rx_broken;
	tx->broken = &ctr->tx_broken;
	rx->notify_ctr = &ctr->rx_notify;
	tx->notify_ctr = &ctr->tx_notify;
	rx->kick_ctr = &ctr->rx_kicks;
	tx->kick_ctr = &ctr->tx_kicks;
	return 0;
}

/**
 * xn_vq_set_enabled() - SET_VRING_ENABLE from the control thread
 * @vq:		the queue
 * @enabled:	the new state; the caller then wakes the datapath loop
 */
void xn_vq_set_enabled(struct xn_vq *vq, int enabled)
{
	__atomic_store_n(&vq->enabled, !!enabled, __ATOMIC_RELEASE);
}

/**
 * xn_vq_set_call_fd() - swap the call eventfd from the control thread
 * @vq:		the queue
 * @fd:		new eventfd, -1 for none; the caller keeps the old one open
 *		until the loop has stopped (it may be writing to it now)
 */
void xn_vq_set_call_fd(struct xn_vq *vq, int fd)
{
	__atomic_store_n(&vq->call_fd, fd, __ATOMIC_RELEASE);
}

/**
 * xn_efd_signal() - add one to an eventfd (a saturated counter is
 * signalled already, so a failed write is fine)
 * @fd:		the eventfd
 */
void xn_efd_signal(int fd)
{
	uint64_t one = 1;

	if (write(fd, &one, sizeof(one)) < 0) {
		/* saturated: the reader is woken anyway */
	}
}

/* xn_efd_drain() - read an eventfd to zero; Return: true if it was signalled. */
bool xn_efd_drain(int fd)
{
	uint64_t v;

	return fd >= 0 && read(fd, &v, sizeof(v)) == sizeof(v);
}

/**
 * xn_vq_break() - stop a queue after the guest broke the ring protocol
 * @vq:		the queue
 * @reason:	XN_BROKEN_* code, kept for the control plane to log once
 */
void xn_vq_break(struct xn_vq *vq, int reason)
{
	if (!*vq->broken)
		__atomic_store_n(vq->broken, (uint64_t)reason, __ATOMIC_RELEASE);
}

/**
 * xn_vq_avail() - how many entries the guest has made available
 * @vq:		the queue
 *
 * One acquire load of avail->idx; entries read after it are valid.
 *
 * Return: the count (0 if the queue is broken or disabled), or -EIO if
 * the guest claims more than the queue size (the queue is then broken).
 */
int xn_vq_avail(struct xn_vq *vq)
{
	uint16_t n;

	if (*vq->broken || !__atomic_load_n(&vq->enabled, __ATOMIC_RELAXED))
		return 0;
	if (vq->avail_idx == vq->last_avail)
		vq->avail_idx = __atomic_load_n(&vq->avail->idx, __ATOMIC_ACQUIRE);
	n = (uint16_t)(vq->avail_idx - vq->last_avail);
	if (n > vq->num) {
		xn_vq_break(vq, XN_BROKEN_AVAIL_IDX);
		return -EIO;
	}
	return n;
}

/**
 * chain_add() - append a translated piece to a chain, merging with the
 * previous piece when it continues it in the UMEM
 *
 * Return: 0, or -E2BIG when the chain has more than XN_MAX_SEGS pieces.
 */
static int chain_add(struct xn_chain *ch, uint64_t off, uint32_t len)
{
	struct xn_seg *last = ch->nseg ? &ch->seg[ch->nseg - 1] : NULL;

	if (last && last->off + last->len == off) {
		last->len += len;
	} else {
		if (ch->nseg == XN_MAX_SEGS)
			return -E2BIG;
		ch->seg[ch->nseg].off = off;
		ch->seg[ch->nseg].len = len;
		ch->nseg++;
	}
	ch->total += len;
	return 0;
}

/**
 * xn_vq_walk() - validate and translate the descriptor chain at @head
 * @mem:	the UMEM map
 * @vq:		the queue (its direction decides which flag is required)
 * @head:	head index taken from the avail ring
 * @ch:		filled with the chain's pieces as UMEM offsets
 *
 * Follows NEXT links and one level of indirect table.  Refuses (and
 * breaks the queue): a head or next index beyond the table, a chain
 * longer than its table (loops), nested indirect tables, an indirect
 * descriptor with NEXT, an indirect table of bad size or outside memory,
 * a descriptor outside guest memory or wrapping, a descriptor of the
 * wrong direction, a zero-length descriptor, a frame over 64 KiB.
 *
 * Return: 0, or -EIO after breaking the queue.
 */
int xn_vq_walk(const struct xn_memmap *mem, struct xn_vq *vq, uint16_t head,
	       struct xn_chain *ch)
{
	const struct vring_desc *table = vq->desc;
	uint32_t n = vq->num, i = head, steps = 0;
	bool in_indirect = false;
	int reason;

	ch->head = head;
	ch->nseg = 0;
	ch->total = 0;
	if (head >= n) {
		reason = XN_BROKEN_DESC_HEAD;
		goto broken;
	}
	for (;;) {
		const volatile struct vring_desc *vd = &table[i];
		struct vring_desc d;
		uint64_t off;

		/* Read each field exactly once: the guest may rewrite it. */
		d.addr = vd->addr;
		d.len = vd->len;
		d.flags = vd->flags;
		d.next = vd->next;

		if (d.flags & VRING_DESC_F_INDIRECT) {
			if (!vq->indirect || in_indirect || (d.flags & VRING_DESC_F_NEXT) ||
			    steps != 0 || d.len == 0 || d.len % sizeof(struct vring_desc) ||
			    d.len / sizeof(struct vring_desc) > 32768) {
				reason = XN_BROKEN_DESC_INDIRECT;
				goto broken;
			}
			if (xn_translate(mem, d.addr, d.len, &off) || off % 8) {
				reason = XN_BROKEN_DESC_INDIRECT;
				goto broken;
			}
			table = (const struct vring_desc *)xn_umem_ptr(mem, off);
			n = d.len / sizeof(struct vring_desc);
			i = 0;
			in_indirect = true;
			continue;
		}
		if (d.len == 0) {
			reason = XN_BROKEN_DESC_LEN;
			goto broken;
		}
		if (!!(d.flags & VRING_DESC_F_WRITE) != vq->device_writes) {
			reason = XN_BROKEN_DESC_DIRECTION;
			goto broken;
		}
		if (xn_translate(mem, d.addr, d.len, &off)) {
			reason = XN_BROKEN_DESC_ADDR;
			goto broken;
		}
		if (ch->total + (uint64_t)d.len > 65536 + XN_VNET_HDR_LEN ||
		    chain_add(ch, off, d.len)) {
			reason = XN_BROKEN_DESC_CHAIN;
			goto broken;
		}
		if (!(d.flags & VRING_DESC_F_NEXT))
			return 0;
		i = d.next;
		if (i >= n || ++steps >= n) {
			reason = XN_BROKEN_DESC_CHAIN;
			goto broken;
		}
	}
broken:
	xn_vq_break(vq, reason);
	return -EIO;
}

/**
 * chain_copy() - copy @len bytes between @buf and a walked chain, from
 * byte @skip of the chain on
 * @to_chain:	true: @buf -> chain; false: chain -> @buf
 *
 * Return: bytes copied (less than @len if the chain is shorter).
 */
static uint32_t chain_copy(const struct xn_memmap *mem, const struct xn_chain *ch,
			   uint32_t skip, uint8_t *buf, uint32_t len, bool to_chain)
{
	uint32_t done = 0, i;

	for (i = 0; i < ch->nseg && done < len; i++) {
		uint32_t n = ch->seg[i].len;
		uint8_t *p;

		if (skip >= n) {
			skip -= n;
			continue;
		}
		n -= skip;
		if (n > len - done)
			n = len - done;
		p = xn_umem_ptr(mem, ch->seg[i].off + skip);
		if (to_chain)
			memcpy(p, buf + done, n);
		else
			memcpy(buf + done, p, n);
		done += n;
		skip = 0;
	}
	return done;
}

/**
 * xn_chain_read() - copy up to @len bytes out of a walked chain, from
 * byte @skip of the chain on, into @dst
 *
 * Return: bytes copied (less than @len if the chain is shorter).
 */
uint32_t xn_chain_read(const struct xn_memmap *mem, const struct xn_chain *ch, uint32_t skip,
		       uint8_t *dst, uint32_t len)
{
	return chain_copy(mem, ch, skip, dst, len, false);
}

/**
 * xn_chain_write() - copy up to @len bytes from @src into a walked chain,
 * from byte @skip of the chain on
 *
 * Return: bytes copied (less than @len if the chain is shorter).
 */
uint32_t xn_chain_write(const struct xn_memmap *mem, const struct xn_chain *ch, uint32_t skip,
			const uint8_t *src, uint32_t len)
{
	return chain_copy(mem, ch, skip, (uint8_t *)src, len, true);
}

/**
 * xn_vq_used_add() - put one used element in the ring (not yet published)
 * @vq:		the queue
 * @head:	descriptor chain head being returned
 * @len:	bytes the device wrote into it
 */
void xn_vq_used_add(struct xn_vq *vq, uint16_t head, uint32_t len)
{
	struct vring_used_elem *e = &vq->used->ring[vq->used_idx & (vq->num - 1)];

	e->id = head;
	e->len = len;
	vq->used_idx++;
}

/**
 * xn_vq_used_publish() - make the used elements added so far visible
 * @vq:		the queue
 *
 * One release store of used->idx per batch.
 */
void xn_vq_used_publish(struct xn_vq *vq)
{
	__atomic_store_n(&vq->used->idx, vq->used_idx, __ATOMIC_RELEASE);
}

/**
 * xn_vq_flush() - publish the used entries added since the last signal
 * and signal the guest if it asked for it; nothing when there are none
 * @vq:		the queue
 */
void xn_vq_flush(struct xn_vq *vq)
{
	if (vq->used_idx == vq->signalled && vq->signalled_valid)
		return;
	xn_vq_used_publish(vq);
	xn_vq_notify(vq);
}

/**
 * xn_vq_notify() - signal the guest for the used entries published since
 * the last signal, if it asked for it (EVENT_IDX used_event or the
 * NO_INTERRUPT flag)
 * @vq:		the queue
 */
void xn_vq_notify(struct xn_vq *vq)
{
	uint16_t old = vq->signalled, new_idx = vq->used_idx;
	bool notify;
	int fd;

	/* Order the used->idx store before reading the guest's wishes. */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (vq->event_idx) {
		uint16_t event = __atomic_load_n(vq->used_event, __ATOMIC_RELAXED);

		notify = !vq->signalled_valid || vring_need_event(event, new_idx, old);
		if (old == new_idx && vq->signalled_valid)
			notify = false;
	} else {
		notify = old != new_idx &&
			 !(__atomic_load_n(&vq->avail->flags, __ATOMIC_RELAXED) &
			   VRING_AVAIL_F_NO_INTERRUPT);
	}
	vq->signalled = new_idx;
	vq->signalled_valid = true;
	fd = __atomic_load_n(&vq->call_fd, __ATOMIC_ACQUIRE);
	if (notify && fd >= 0) {
		uint64_t one = 1;

		if (write(fd, &one, sizeof(one)) == sizeof(one))
			(*vq->notify_ctr)++;
	}
}

/**
 * xn_vq_enable_kick() - ask the guest to kick (or not) when it adds
 * buffers: avail_event with EVENT_IDX, else the NO_NOTIFY flag
 * @vq:		the queue
 * @enable:	true before sleeping, false while polling
 *
 * The caller re-checks xn_vq_avail() after enabling, to close the race
 * with a guest that added buffers just before.
 */
void xn_vq_enable_kick(struct xn_vq *vq, bool enable)
{
	if (vq->event_idx) {
		if (enable)
			__atomic_store_n(vq->avail_event, vq->last_avail, __ATOMIC_RELAXED);
	} else {
		__atomic_store_n(&vq->used->flags, enable ? 0 : VRING_USED_F_NO_NOTIFY,
				 __ATOMIC_RELAXED);
	}
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (enable)
		vq->avail_idx = vq->last_avail;   /* force a fresh read */
}
