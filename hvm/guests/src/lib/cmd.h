/* cmd.h - the guests' side of the command device (hvm/devices/cmddev.py): iobench, exitmix.
 *
 * A command is a 16-byte descriptor of little-endian u32s {seq, buf_gpa, len,
 * result_gpa}; the device writes the CRC-32 (zlib's) of the len bytes at
 * buf_gpa to result_gpa and increments its completed counter (STATUS).
 *     pio    STATUS = inl 0x520, DOORBELL = outl 0x524 <descriptor address>
 *     mmio   STATUS = [0xD0000000], DOORBELL = [0xD0000004] (32-bit)
 *     dirty  ordinary memory at 0xD0100000: +0 STATUS (device-written),
 *            +4 PRODUCER (guest-written), +0x1000 a ring of 256 descriptors
 * Command k: CMD_LEN bytes, byte i = (k * 7 + i) & 0xFF, in buffer slot k % SLOTS;
 * its result at RESULTS_GPA + 4k.
 */
#ifndef HVM_GUEST_CMD_H
#define HVM_GUEST_CMD_H

#include "rt.h"

#define PIO_STATUS_PORT 0x520
#define PIO_DOORBELL_PORT 0x524
#define MMIO_STATUS_GPA 0xD0000000
#define MMIO_DOORBELL_GPA 0xD0000004
#define DIRTY_GPA 0xD0100000         /* +0 STATUS, +4 PRODUCER */
#define DIRTY_RING_GPA 0xD0101000    /* SLOTS descriptor slots of 16 bytes */
#define RESULTS_GPA 0x01000000       /* u32 results[commands] */
#define SLOTS 256
#define CMD_LEN 64

struct desc {
    u32 seq, buf_gpa, len, result_gpa;
};

/* The data of every command: bufs[s] holds command k's bytes for each k == s mod SLOTS
 * (byte i = (k * 7 + i) & 0xFF depends on k only mod 256), expected[s] their CRC-32. */
extern u8 cmd_bufs[SLOTS][CMD_LEN];
extern u32 cmd_expected[SLOTS];

void cmd_init(void);                          /* the CRC table, cmd_bufs and cmd_expected */
u32 crc32(const volatile u8 *p, u32 len);     /* zlib.crc32(data); after cmd_init() */

#endif
