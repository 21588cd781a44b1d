/* cmd.c - command data and CRC-32 for the command-device guests; see cmd.h. */

#include "cmd.h"

u8 cmd_bufs[SLOTS][CMD_LEN] __attribute__((aligned(16)));
u32 cmd_expected[SLOTS];
static u32 crc_table[256];

u32 crc32(const volatile u8 *p, u32 len)
{
    u32 c = 0xFFFFFFFFu;
    while (len--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

void cmd_init(void)
{
    for (u32 n = 0; n < 256; n++) {
        u32 c = n;
        for (int b = 0; b < 8; b++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
    for (u32 s = 0; s < SLOTS; s++) {
        for (u32 i = 0; i < CMD_LEN; i++)
            cmd_bufs[s][i] = (u8)(s * 7 + i); /* (k * 7 + i) & 0xFF for every k == s mod 256 */
        cmd_expected[s] = crc32(cmd_bufs[s], CMD_LEN);
    }
}
