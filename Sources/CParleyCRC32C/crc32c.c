// CRC-32C (Castagnoli). Hardware paths: x86-64 SSE4.2 `crc32` instruction, AArch64 CRC32C
// instructions; both selected at run time. Fallback: slicing-by-8 tables.
#include "CParleyCRC32C.h"
#include <string.h>

#define POLY 0x82F63B78u

static uint32_t table[8][256];
static int table_ready = 0;

static void build_tables(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = table[0][n];
        for (int k = 1; k < 8; k++) {
            c = table[0][c & 0xFF] ^ (c >> 8);
            table[k][n] = c;
        }
    }
    __atomic_store_n(&table_ready, 1, __ATOMIC_RELEASE);
}

uint32_t parley_crc32c_portable(uint32_t crc, const void *data, size_t length) {
    if (!__atomic_load_n(&table_ready, __ATOMIC_ACQUIRE)) build_tables();
    const uint8_t *p = (const uint8_t *)data;
    uint32_t c = ~crc;
    while (length && ((uintptr_t)p & 7)) { c = table[0][(c ^ *p++) & 0xFF] ^ (c >> 8); length--; }
    while (length >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        uint32_t lo = (uint32_t)w ^ c, hi = (uint32_t)(w >> 32);
        c = table[7][lo & 0xFF] ^ table[6][(lo >> 8) & 0xFF] ^ table[5][(lo >> 16) & 0xFF] ^ table[4][lo >> 24] ^
            table[3][hi & 0xFF] ^ table[2][(hi >> 8) & 0xFF] ^ table[1][(hi >> 16) & 0xFF] ^ table[0][hi >> 24];
        p += 8;
        length -= 8;
    }
    while (length--) c = table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return ~c;
}

#if defined(__x86_64__)
#include <cpuid.h>
#include <pthread.h>

// Three-way interleaving: the crc32 instruction has a latency of 3 cycles but a throughput of
// one per cycle, so one dependent chain runs at a third of the speed the core allows. Long
// inputs are cut into three consecutive blocks whose CRCs are computed at once and then
// joined: CRC(A || B) = shift(CRC(A), |B| zero bytes) ^ CRC0(B), where shift is a linear map
// over GF(2) applied with four 256-entry tables, one per byte of the register.
#define BLOCK_LONG 8192
#define BLOCK_SHORT 256

static uint32_t shift_long[4][256];
static uint32_t shift_short[4][256];
static pthread_once_t shift_once = PTHREAD_ONCE_INIT;

// Applies the 32x32 GF(2) matrix `m` (m[i] is the image of bit i) to `v`.
static uint32_t gf2_apply(const uint32_t *m, uint32_t v) {
    uint32_t r = 0;
    for (int i = 0; v; i++, v >>= 1)
        if (v & 1) r ^= m[i];
    return r;
}

static void gf2_square(uint32_t *out, const uint32_t *m) {
    for (int i = 0; i < 32; i++) out[i] = gf2_apply(m, m[i]);
}

// The operator that appends `bytes` zero bytes (a power of two) to a reflected CRC-32C register.
static void zeros_operator(uint32_t *op, size_t bytes) {
    uint32_t a[32], b[32];
    a[0] = POLY;  // one zero bit: shift right, fold the polynomial in when bit 0 falls out
    for (int i = 1; i < 32; i++) a[i] = 1u << (i - 1);
    gf2_square(b, a);  // 2 bits
    gf2_square(a, b);  // 4 bits
    gf2_square(b, a);  // 8 bits = 1 byte
    uint32_t *cur = b, *next = a;
    for (size_t n = 1; n < bytes; n <<= 1) {
        gf2_square(next, cur);
        uint32_t *t = cur; cur = next; next = t;
    }
    for (int i = 0; i < 32; i++) op[i] = cur[i];
}

static void shift_table(uint32_t table[4][256], size_t bytes) {
    uint32_t op[32];
    zeros_operator(op, bytes);
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 0; k < 4; k++) table[k][n] = gf2_apply(op, n << (8 * k));
}

static void build_shift_tables(void) {
    shift_table(shift_long, BLOCK_LONG);
    shift_table(shift_short, BLOCK_SHORT);
}

static inline uint32_t shift(uint32_t table[4][256], uint32_t crc) {
    return table[0][crc & 0xFF] ^ table[1][(crc >> 8) & 0xFF] ^ table[2][(crc >> 16) & 0xFF] ^ table[3][crc >> 24];
}

__attribute__((target("sse4.2")))
static uint64_t three_way(uint64_t c0, const uint8_t **pp, size_t *lengthp, size_t block, uint32_t table[4][256]) {
    const uint8_t *p = *pp;
    size_t length = *lengthp;
    while (length >= 3 * block) {
        uint64_t c1 = 0, c2 = 0;
        const uint8_t *end = p + block;
        do {
            uint64_t w0, w1, w2;
            memcpy(&w0, p, 8);
            memcpy(&w1, p + block, 8);
            memcpy(&w2, p + 2 * block, 8);
            c0 = __builtin_ia32_crc32di(c0, w0);
            c1 = __builtin_ia32_crc32di(c1, w1);
            c2 = __builtin_ia32_crc32di(c2, w2);
            p += 8;
        } while (p < end);
        c0 = shift(table, (uint32_t)c0) ^ (uint32_t)c1;
        c0 = shift(table, (uint32_t)c0) ^ (uint32_t)c2;
        p += 2 * block;
        length -= 3 * block;
    }
    *pp = p;
    *lengthp = length;
    return c0;
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw(uint32_t crc, const void *data, size_t length) {
    const uint8_t *p = (const uint8_t *)data;
    uint64_t c = (uint32_t)~crc;
    while (length && ((uintptr_t)p & 7)) { c = __builtin_ia32_crc32qi((uint32_t)c, *p++); length--; }
    if (length >= 3 * BLOCK_SHORT) {
        pthread_once(&shift_once, build_shift_tables);
        c = three_way(c, &p, &length, BLOCK_LONG, shift_long);
        c = three_way(c, &p, &length, BLOCK_SHORT, shift_short);
    }
    while (length >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        length -= 8;
    }
    while (length--) c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
static int detect(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c & bit_SSE4_2) != 0;
}
#elif defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif
__attribute__((target("crc")))
static uint32_t crc32c_hw(uint32_t crc, const void *data, size_t length) {
    const uint8_t *p = (const uint8_t *)data;
    uint32_t c = ~crc;
    while (length && ((uintptr_t)p & 7)) { c = __builtin_arm_crc32cb(c, *p++); length--; }
    while (length >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_arm_crc32cd(c, w);
        p += 8;
        length -= 8;
    }
    while (length--) c = __builtin_arm_crc32cb(c, *p++);
    return ~c;
}
static int detect(void) { return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0; }
#else
static uint32_t crc32c_hw(uint32_t crc, const void *data, size_t length) {
    return parley_crc32c_portable(crc, data, length);
}
static int detect(void) { return 0; }
#endif

// -1 unknown, 0 portable, 1 hardware. Racing first calls both compute the same answer.
static int mode = -1;

int parley_crc32c_hardware(void) {
    int m = __atomic_load_n(&mode, __ATOMIC_RELAXED);
    if (m < 0) {
        m = detect();
        __atomic_store_n(&mode, m, __ATOMIC_RELAXED);
    }
    return m;
}

uint32_t parley_crc32c(uint32_t crc, const void *data, size_t length) {
    if (parley_crc32c_hardware()) return crc32c_hw(crc, data, length);
    return parley_crc32c_portable(crc, data, length);
}
