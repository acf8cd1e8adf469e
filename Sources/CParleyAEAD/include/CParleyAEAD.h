// In-place AEAD sealing and opening for Parley's secure mode, over OpenSSL's EVP interface.
//
// Written by hand because swift-crypto's AEADs always allocate their output (a `Data`), and the
// secure frame path seals into the outgoing buffer and opens in the receive buffer. Only this
// glue is ours: the ciphers are OpenSSL's (AES-256-GCM, ChaCha20-Poly1305).
#ifndef CPARLEY_AEAD_H
#define CPARLEY_AEAD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    CPARLEY_AEAD_AES_256_GCM = 1,
    CPARLEY_AEAD_CHACHA20_POLY1305 = 2,
};

/// One direction's cipher context: a cipher and a 32-byte key, set once.
typedef struct cparley_aead cparley_aead;

/// Returns NULL if the cipher is unknown or OpenSSL fails.
cparley_aead *cparley_aead_new(int cipher, const uint8_t key[32], int encrypt);
void cparley_aead_free(cparley_aead *ctx);

/// Starts a message with the 12-byte `nonce`. Returns 1 on success, 0 on failure.
int cparley_aead_begin(cparley_aead *ctx, const uint8_t nonce[12]);

/// Encrypts (sealing context) or decrypts (opening context) the next `length` bytes of the
/// message from `in` to `out`; `out` may equal `in` (in place). Returns 1 on success.
int cparley_aead_update(cparley_aead *ctx, const uint8_t *in, uint8_t *out, size_t length);

/// Ends a sealed message and writes its 16-byte tag. Returns 1 on success.
int cparley_aead_seal_finish(cparley_aead *ctx, uint8_t tag[16]);

/// Ends an opened message and checks its 16-byte tag. Returns 1 if the tag is right, 0
/// otherwise (the bytes decrypted since `begin` are then garbage and must not be used).
int cparley_aead_open_finish(cparley_aead *ctx, const uint8_t tag[16]);

/// 1 if this CPU has AES instructions (AES-NI on x86_64, the ARMv8 crypto extension on arm64).
int cparley_aead_cpu_has_aes(void);

#ifdef __cplusplus
}
#endif
#endif
