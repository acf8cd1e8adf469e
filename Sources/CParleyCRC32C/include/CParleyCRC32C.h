#ifndef CPARLEY_CRC32C_H
#define CPARLEY_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/// Extends a CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) over `length` bytes.
///
/// `crc` is the running value *without* the final inversion: start with 0 for a fresh
/// checksum; the function applies the standard pre/post inversion internally, so
/// `parley_crc32c(0, "123456789", 9) == 0xE3069283` and chaining calls over consecutive
/// pieces gives the same result as one call over the concatenation.
uint32_t parley_crc32c(uint32_t crc, const void *data, size_t length);

/// 1 when the hardware path (SSE4.2 `crc32` or ARMv8 CRC32C instructions) is in use.
int parley_crc32c_hardware(void);

/// The portable table-driven implementation, exposed so tests can compare both paths.
uint32_t parley_crc32c_portable(uint32_t crc, const void *data, size_t length);

#endif
