/* TEMPORARY: replaced by the real datapath (xsk.c, qp.c) in the next commits. */
#include <errno.h>
#include "xdpnet.h"
int xn_umem_create(struct xn_umem **o, const struct xn_memmap *m, uint32_t f, uint32_t c) { return -ENOSYS; }
void xn_umem_destroy(struct xn_umem *u) {}
int xn_xsk_probe_zerocopy(const char *i, uint32_t q) { return -ENOSYS; }
int xn_xsk_create(struct xn_xsk **o, struct xn_umem *u, const char *i, uint32_t q, uint32_t r, int m) { return -ENOSYS; }
int xn_xsk_fd(const struct xn_xsk *x) { return -1; }
int xn_xsk_is_zerocopy(const struct xn_xsk *x) { return 0; }
void xn_xsk_destroy(struct xn_xsk *x) {}
int xn_qp_create(struct xn_qp **o, const struct xn_qp_config *c, struct xn_counters *k) { return -ENOSYS; }
int xn_qp_run(struct xn_qp *q) { return -ENOSYS; }
int xn_qp_stop(struct xn_qp *q) { return -ENOSYS; }
int xn_qp_set_enabled(struct xn_qp *q, int r, int e) { return -ENOSYS; }
int xn_qp_quiesce(struct xn_qp *q, uint16_t *a, uint16_t *b) { return -ENOSYS; }
void xn_qp_destroy(struct xn_qp *q) {}
