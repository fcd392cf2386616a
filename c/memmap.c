/* SPDX-License-Identifier: MIT */
/*
 * memmap.c - build the UMEM range out of guest memory: reserve a range,
 * map each region's file into it with MAP_FIXED (shared, read-write: a
 * private mapping would pin copies the guest never sees), fill the rest
 * with anonymous memory (no PROT_NONE hole may remain, or registration
 * fails with ENOMEM).
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/vfs.h>

#include "xdpnet.h"

/**
 * xn_mem_reserve() - reserve @size bytes of address space aligned to @align
 * @size:	bytes (multiple of the page size)
 * @align:	power-of-two alignment (2 MiB so hugetlb regions can be placed)
 * @out:	set to the aligned start
 *
 * The reservation is PROT_NONE; every byte of it must be mapped over
 * before registration.  The unaligned slack is unmapped again.
 *
 * Return: 0 or -errno.
 */
int xn_mem_reserve(uint64_t size, uint64_t align, uint8_t **out)
{
	uint8_t *p, *start;
	uint64_t lead;

	p = mmap(NULL, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		return -errno;
	start = (uint8_t *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
	lead = (uint64_t)(start - p);
	if (lead)
		munmap(p, lead);
	if (align - lead)
		munmap(start + size, align - lead);
	*out = start;
	return 0;
}

/**
 * xn_mem_map_fd() - map @size bytes of @fd at @offset over @addr
 *
 * Return: 0, or -errno (EACCES: the fd is read-only; EPERM: write-sealed;
 * EINVAL: misaligned offset or hugetlb alignment).
 */
int xn_mem_map_fd(uint8_t *addr, uint64_t size, int fd, uint64_t offset)
{
	void *p = mmap(addr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
		       fd, (off_t)offset);

	return p == MAP_FAILED ? -errno : 0;
}

/**
 * xn_mem_map_anon() - map anonymous read-write memory over @addr
 *
 * Return: 0 or -errno.
 */
int xn_mem_map_anon(uint8_t *addr, uint64_t size)
{
	void *p = mmap(addr, size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);

	return p == MAP_FAILED ? -errno : 0;
}

/* xn_mem_unmap() - unmap a range; Return: 0 or -errno. */
int xn_mem_unmap(uint8_t *addr, uint64_t size)
{
	return munmap(addr, size) ? -errno : 0;
}

/**
 * xn_mem_fs_type() - the filesystem magic of the file behind @fd
 *
 * Return: f_type from fstatfs() (TMPFS_MAGIC for memfd/shm,
 * HUGETLBFS_MAGIC for hugetlb), or -errno.
 */
int64_t xn_mem_fs_type(int fd)
{
	struct statfs st;

	if (fstatfs(fd, &st))
		return -errno;
	return (int64_t)(uint64_t)(unsigned long)st.f_type;
}
