// SPDX-License-Identifier: MIT
/*
 * fault.c - survive a frontend that truncates guest memory under us.
 *
 * The datapath reads and writes the virtqueues through its own shared
 * mapping of guest memory.  If the frontend shrinks the file behind that
 * mapping (a memfd that could not be sealed, a tmpfs or hugetlbfs file),
 * the next access is SIGBUS, which would kill the process and every VM
 * it serves.  Entry points that touch guest memory (xn_qp_run, drain,
 * quiesce) arm a per-thread recovery point; the SIGBUS handler jumps back
 * to it when the faulting address lies in that queue pair's mapping, and
 * the pair is then stopped for good (XN_BROKEN_MEMORY) without touching
 * guest memory again.  Any other SIGBUS goes to the handler that was
 * installed before ours (Python's faulthandler, or the default action).
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>

#include "dp.h"

static __thread struct xn_fault_guard *armed;
static struct sigaction previous;
static pthread_once_t install_once = PTHREAD_ONCE_INIT;

/* on_sigbus() - jump back to an armed guard if the fault is in its range */
static void on_sigbus(int sig, siginfo_t *si, void *ctx)
{
	struct xn_fault_guard *g = armed;
	uintptr_t a = (uintptr_t)si->si_addr;

	if (g && a >= g->lo && a < g->hi) {
		armed = NULL;
		siglongjmp(g->jb, 1);
	}
	if (previous.sa_flags & SA_SIGINFO) {
		if (previous.sa_sigaction) {
			previous.sa_sigaction(sig, si, ctx);
			return;
		}
	} else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
		previous.sa_handler(sig);
		return;
	}
	signal(SIGBUS, SIG_DFL);
	raise(SIGBUS);
}

/* install() - put on_sigbus in place once per process, keeping the old handler */
static void install(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, &previous);
}

/**
 * xn_fault_arm() - make @g the recovery point of this thread for faults
 * in the UMEM range of @mem (call right after sigsetjmp(g->jb, 1) == 0)
 */
void xn_fault_arm(struct xn_fault_guard *g, const struct xn_memmap *mem)
{
	pthread_once(&install_once, install);
	g->lo = (uintptr_t)mem->base;
	g->hi = (uintptr_t)mem->base + mem->size;
	armed = g;
}

/* xn_fault_disarm() - leave the guarded section */
void xn_fault_disarm(void)
{
	armed = NULL;
}

/**
 * xn_fault_caught() - after a jump back: stop the pair for good
 *
 * Return: -EFAULT.
 */
int xn_fault_caught(struct xn_qp *qp)
{
	armed = NULL;
	qp->mem_fault = true;
	xn_vq_break(&qp->rx, XN_BROKEN_MEMORY);
	xn_vq_break(&qp->tx, XN_BROKEN_MEMORY);
	return -EFAULT;
}
