// In-place AEAD sealing and opening for Parley's secure mode.
//
// The ciphers are BoringSSL's, the copy swift-crypto builds and links into every program that
// uses it (its symbols carry the prefix CCryptoBoringSSL_). swift-crypto's Swift API always
// allocates its output (a `Data`); the secure frame path seals into the outgoing buffer and
// opens into the buffer it hands to the application, so it calls BoringSSL's EVP_AEAD
// interface directly. Only this glue is ours. Linux (swift-crypto uses CryptoKit, not
// BoringSSL, on Apple platforms).
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

/// A cipher with its 32-byte key, set once; usable from one thread at a time.
typedef struct cparley_aead cparley_aead;

/// Returns NULL if the cipher is unknown or the key is refused.
cparley_aead *cparley_aead_new(int cipher, const uint8_t key[32]);
void cparley_aead_free(cparley_aead *ctx);

/// Encrypts `length` bytes at `data` in place with the 12-byte `nonce` and writes the 16-byte
/// tag at `tag` (which must not overlap `data`). Returns 1 on success, 0 on failure.
int cparley_aead_seal(cparley_aead *ctx, const uint8_t nonce[12], uint8_t *data, size_t length, uint8_t tag[16]);

/// Encrypts `length` bytes at `data` in place, then `extra_length` bytes from `extra` into
/// `out`, as one message: the ciphertext of `extra` and the 16-byte tag are written at `out`
/// (which must not overlap anything else). With `out == data + length`, the result is one
/// contiguous sealed message, and the bytes of `extra` are read once, never copied.
int cparley_aead_seal_extra(cparley_aead *ctx, const uint8_t nonce[12], uint8_t *data, size_t length,
                            const uint8_t *extra, size_t extra_length, uint8_t *out);

/// Decrypts `length` bytes from `in` to `out` (equal, or not overlapping) and checks the
/// 16-byte `tag`. Returns 1 if the tag is right, 0 otherwise (`out` is then zeroed).
int cparley_aead_open(cparley_aead *ctx, const uint8_t nonce[12], const uint8_t *in, uint8_t *out, size_t length, const uint8_t tag[16]);

/// An AES-256-GCM opening done piece by piece, for a sealed message that arrives in several
/// reads: each piece is decrypted from the read buffer straight into the message's own buffer
/// (no copy to gather the ciphertext first), and the tag is checked at the end. The plaintext
/// must not be used before `cparley_gcm_stream_finish` returns 1. BoringSSL's EVP_CIPHER
/// interface (its EVP_AEAD one has no incremental form). Usable from one thread at a time.
typedef struct cparley_gcm_stream cparley_gcm_stream;

/// Returns NULL if the context cannot be made.
cparley_gcm_stream *cparley_gcm_stream_new(const uint8_t key[32]);
void cparley_gcm_stream_free(cparley_gcm_stream *stream);

/// Starts a message with the 12-byte `nonce` (the key stays). Returns 1 on success.
int cparley_gcm_stream_begin(cparley_gcm_stream *stream, const uint8_t nonce[12]);

/// Decrypts the next `length` bytes of the message from `in` to `out` (not overlapping, or
/// equal). Returns 1 on success.
int cparley_gcm_stream_update(cparley_gcm_stream *stream, const uint8_t *in, uint8_t *out, size_t length);

/// Ends the message: 1 if the 16-byte `tag` is right, 0 otherwise.
int cparley_gcm_stream_finish(cparley_gcm_stream *stream, const uint8_t tag[16]);

/// 1 if this CPU has AES instructions (AES-NI on x86_64, the ARMv8 crypto extension on arm64).
int cparley_aead_cpu_has_aes(void);

#ifdef __cplusplus
}
#endif
#endif
