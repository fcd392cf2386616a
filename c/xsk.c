/* SPDX-License-Identifier: MIT */
/*
 * xsk.c - the UMEM over guest memory and the AF_XDP sockets bound on it,
 * through libxdp's xsk API (rings are libxdp's, not rewritten here).
 *
 * The UMEM is registered in unaligned-chunk mode with the headroom that
 * makes "chunk - 256 - headroom" the largest frame the kernel will write
 * (see xdpnet.h and docs/design.md).  The program on the NIC is loaded by
 * the control plane (bcc), so sockets are created with
 * XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD and inserted into its XSKMAP by the
 * caller.
 */
#include <errno.h>
#include <linux/if_xdp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "dp.h"

#ifndef XDP_UMEM_UNALIGNED_CHUNK_FLAG
#define XDP_UMEM_UNALIGNED_CHUNK_FLAG (1 << 0)
#endif
#ifndef XDP_MAX_TX_SKB_BUDGET
#define XDP_MAX_TX_SKB_BUDGET 9         /* Linux 6.16+ */
#endif

/**
 * xn_umem_create() - register the UMEM range described by @mem
 * @out:	set to the new UMEM
 * @mem:	the UMEM map (base, size, chunk size, headroom); must outlive it
 * @fill_size:	fill ring entries (power of two)
 * @comp_size:	completion ring entries (power of two)
 *
 * Registration pins every page of the range (guest RAM included).
 *
 * Return: 0, or -errno from libxdp/the kernel (EFAULT: memory that cannot
 * be pinned, e.g. disk-backed or read-only; ENOBUFS/ENOMEM: the memlock
 * limit or a hole in the range).
 */
int xn_umem_create(struct xn_umem **out, const struct xn_memmap *mem,
		   uint32_t fill_size, uint32_t comp_size)
{
	struct xsk_umem_config cfg = {
		.fill_size = fill_size,
		.comp_size = comp_size,
		.frame_size = mem->chunk_size,
		.frame_headroom = mem->headroom,
		.flags = XDP_UMEM_UNALIGNED_CHUNK_FLAG,
	};
	struct xn_umem *u;
	int err;

	u = calloc(1, sizeof(*u));
	if (!u)
		return -ENOMEM;
	u->mem = mem;
	err = xsk_umem__create(&u->umem, mem->base, mem->size, &u->fill, &u->comp, &cfg);
	if (err) {
		free(u);
		return err < 0 ? err : -err;
	}
	*out = u;
	return 0;
}

/* xn_umem_destroy() - unregister a UMEM whose sockets are all destroyed. */
void xn_umem_destroy(struct xn_umem *umem)
{
	if (!umem)
		return;
	xsk_umem__delete(umem->umem);
	free(umem);
}

/* sleep_ms() - nanosleep for @ms milliseconds. */
static void sleep_ms(long ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/**
 * bind_socket() - create one socket on @umem, retrying while the kernel is
 * still releasing an earlier socket on the same queue (EBUSY, 10-30 ms)
 * @x:		the socket: its rx/tx rings are set up here
 * @umem:	libxdp UMEM
 * @fill:	fill ring to use: the UMEM's own for its first socket, else
 *		@x's (libxdp then makes a new fill/completion pair on the new
 *		socket's fd: XDP_SHARED_UMEM on another device or queue)
 * @comp:	completion ring, likewise
 * @ifname:	device
 * @queue:	its queue
 * @ring_size:	rx and tx ring entries
 * @bind_flags:	XDP_COPY/XDP_ZEROCOPY/XDP_USE_NEED_WAKEUP; libxdp drops
 *		them for a shared socket (the kernel refuses flags there: the
 *		mode is the first socket's)
 *
 * The first socket must be handed the UMEM's own ring structs: libxdp
 * unmaps the rings of a failed bind unless they are those, and a retry
 * would then post into an unmapped fill ring.
 *
 * Return: 0 or -errno.
 */
static int bind_socket(struct xn_xsk *x, struct xsk_umem *umem, struct xsk_ring_prod *fill,
		       struct xsk_ring_cons *comp, const char *ifname, uint32_t queue,
		       uint32_t ring_size, uint16_t bind_flags)
{
	struct xsk_socket_config cfg = {
		.rx_size = ring_size,
		.tx_size = ring_size,
		.libxdp_flags = XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD,
		.bind_flags = bind_flags,
	};
	int err, tries = 0;

	do {
		err = xsk_socket__create_shared(&x->xsk, ifname, queue, umem, &x->rx, &x->tx,
						fill, comp, &cfg);
		if (err != -EBUSY)
			break;
		sleep_ms(20);
	} while (++tries < 50);
	return err;
}

/**
 * xn_xsk_probe_zerocopy() - does @ifname queue @queue take a zero-copy
 * socket?  Binds a throw-away socket on a small anonymous UMEM.
 *
 * Return: 1 (zero-copy), 0 (copy mode only), or -errno (e.g. -ENODEV,
 * -EBUSY if someone else holds the queue, -EPERM).
 */
int xn_xsk_probe_zerocopy(const char *ifname, uint32_t queue)
{
	struct xn_xsk x = { 0 };
	struct xsk_ring_prod fill;
	struct xsk_ring_cons comp;
	struct xsk_umem *umem;
	size_t size = 64 * 4096;
	void *area;
	int err, ret;

	area = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (area == MAP_FAILED)
		return -errno;
	err = xsk_umem__create(&umem, area, size, &fill, &comp, NULL);
	if (err) {
		munmap(area, size);
		return err;
	}
	err = bind_socket(&x, umem, &fill, &comp, ifname, queue, 64,
			  XDP_ZEROCOPY | XDP_USE_NEED_WAKEUP);
	if (!err) {
		ret = 1;
		xsk_socket__delete(x.xsk);
	} else if (err == -EOPNOTSUPP || err == -EPROTONOSUPPORT || err == -EINVAL) {
		ret = 0;
	} else {
		ret = err;
	}
	xsk_umem__delete(umem);
	munmap(area, size);
	return ret;
}

/**
 * xsk_new() - bind a socket on @umem and finish setting it up
 * @out:	set to the new socket
 * @umem:	the UMEM
 * @ifname:	device
 * @queue:	its queue
 * @ring_size:	entries of each of its rings (power of two)
 * @zerocopy:	bind in zero-copy mode (first socket only)
 *
 * Return: 0 or -errno.
 */
static int xsk_new(struct xn_xsk **out, struct xn_umem *umem, const char *ifname,
		   uint32_t queue, uint32_t ring_size, bool zerocopy)
{
	uint16_t flags = XDP_USE_NEED_WAKEUP | (zerocopy ? XDP_ZEROCOPY : XDP_COPY);
	bool first = !umem->bound_once;
	struct xn_xsk *x;
	int err, budget = (int)ring_size;

	x = calloc(1, sizeof(*x));
	if (!x)
		return -ENOMEM;
	x->umem = umem;
	x->ring_size = ring_size;
	x->zerocopy = zerocopy;
	err = bind_socket(x, umem->umem, first ? &umem->fill : &x->fill,
			  first ? &umem->comp : &x->comp, ifname, queue, ring_size, flags);
	if (err) {
		free(x);
		return err;
	}
	if (first) {
		/* Our copy of the ring structs: the datapath owns their cached
		 * indices from now on. */
		x->fill = umem->fill;
		x->comp = umem->comp;
		umem->zerocopy = zerocopy;
		umem->bound_once = true;
	}
	umem->nsockets++;
	/* Let one sendto() push the whole tx ring in copy mode (6.16+);
	 * older kernels refuse the option and keep pushing 32 per call. */
	setsockopt(xsk_socket__fd(x->xsk), SOL_XDP, XDP_MAX_TX_SKB_BUDGET,
		   &budget, sizeof(budget));
	*out = x;
	return 0;
}

/**
 * xn_xsk_create() - bind the first AF_XDP socket of @umem on @ifname
 * queue @queue
 * @out:	set to the new socket
 * @umem:	the UMEM (guest memory) it receives into and sends from; no
 *		socket may have been bound on it yet
 * @ifname:	NIC name
 * @queue:	NIC queue index
 * @ring_size:	entries of each of its rings (power of two)
 * @mode:	XN_XSK_MODE_ZEROCOPY, XN_XSK_MODE_COPY or XN_XSK_MODE_AUTO
 *		(the caller probes with xn_xsk_probe_zerocopy() first and
 *		passes the result; AUTO here means copy mode)
 *
 * The socket takes the UMEM's fill and completion rings.  More sockets
 * over the same memory: xn_xsk_create_shared().
 *
 * Return: 0, or -errno (-EBUSY: the queue has another UMEM bound; -EINVAL:
 * @umem has had a socket already, even one destroyed since: its fill and
 * completion rings went with that one).
 */
int xn_xsk_create(struct xn_xsk **out, struct xn_umem *umem, const char *ifname,
		  uint32_t queue, uint32_t ring_size, int mode)
{
	if (umem->bound_once)
		return -EINVAL;
	return xsk_new(out, umem, ifname, queue, ring_size, mode == XN_XSK_MODE_ZEROCOPY);
}

/**
 * xn_xsk_create_shared() - bind one more socket over @umem's memory on
 * another device or queue (XDP_SHARED_UMEM): the pages are pinned once
 * @out:	set to the new socket
 * @umem:	a UMEM that has a socket (xn_xsk_create()) now
 * @ifname:	device, e.g. the VM's port
 * @queue:	its queue
 * @ring_size:	entries of each of its rings (power of two)
 *
 * The new socket gets its own fill and completion rings (the kernel
 * requires them on another device or queue) and inherits the first
 * socket's mode: a zero-copy UMEM can be shared only with a device that
 * does zero-copy too (veth cannot: -EOPNOTSUPP; the caller then registers
 * a second UMEM).
 *
 * Return: 0, or -errno (-EINVAL: @umem has no socket now; libxdp binds
 * a shared socket only beside a live one).
 */
int xn_xsk_create_shared(struct xn_xsk **out, struct xn_umem *umem, const char *ifname,
			 uint32_t queue, uint32_t ring_size)
{
	if (!umem->nsockets)
		return -EINVAL;
	return xsk_new(out, umem, ifname, queue, ring_size, umem->zerocopy);
}

/* xn_xsk_fd() - the socket's fd (for the XSKMAP and poll()). */
int xn_xsk_fd(const struct xn_xsk *xsk)
{
	return xsk_socket__fd(xsk->xsk);
}

/* xn_xsk_is_zerocopy() - Return: 1 if bound in zero-copy mode. */
int xn_xsk_is_zerocopy(const struct xn_xsk *xsk)
{
	return xsk->zerocopy;
}

/**
 * xn_xsk_destroy() - unbind and free a socket; its rings are unmapped, so
 * the kernel stops writing into the UMEM once this returns.
 */
void xn_xsk_destroy(struct xn_xsk *xsk)
{
	if (!xsk)
		return;
	xsk_socket__delete(xsk->xsk);
	xsk->umem->nsockets--;
	free(xsk);
}
