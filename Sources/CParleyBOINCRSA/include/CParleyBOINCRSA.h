// Raw RSA for BOINC's code signing (Parley Work's BOINC front end).
//
// A BOINC client checks a file's signature by decrypting it with the project's public key
// (PKCS#1 v1.5 block type 1, NO DigestInfo) and comparing the result with the file's MD5 in
// hex. swift-crypto's Swift API signs only with a DigestInfo (and refuses keys under 2048
// bits), so this glue calls the BoringSSL that swift-crypto builds and links into every
// program that uses it (its symbols carry the prefix CCryptoBoringSSL_), as CParleyAEAD does.
// Only this glue is ours; the arithmetic, the padding and key generation are BoringSSL's.
//
// Keys travel as BOINC's R_RSA_PRIVATE_KEY / R_RSA_PUBLIC_KEY bodies (lib/crypt.h), big-endian
// and left-padded with zeros:
//   private (704 bytes): modulus[128] publicExponent[128] exponent[128] prime[2][64]
//                        primeExponent[2][64] coefficient[64]
//   public  (256 bytes): modulus[128] exponent[128]
#ifndef CPARLEY_BOINC_RSA_H
#define CPARLEY_BOINC_RSA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    CPARLEY_BOINC_MODULUS_LEN = 128,
    CPARLEY_BOINC_PRIME_LEN = 64,
    CPARLEY_BOINC_PRIVATE_LEN = 704,
    CPARLEY_BOINC_PUBLIC_LEN = 256,
};

/// A new key of `bits` bits (512 to 1024) with exponent 65537, written as a private body.
/// Returns 1 on success, 0 on failure.
int cparley_boinc_rsa_generate(int bits, uint8_t body[CPARLEY_BOINC_PRIVATE_LEN]);

/// The private-key operation on `message` padded with PKCS#1 v1.5 block type 1 (no
/// DigestInfo): writes the signature (the modulus's length) to `out` and its length to
/// `out_len`. Returns 1 on success, 0 on failure (a key that does not hold together, a
/// message too long for the modulus).
int cparley_boinc_rsa_sign(const uint8_t body[CPARLEY_BOINC_PRIVATE_LEN], const uint8_t *message, size_t message_len,
                           uint8_t *out, size_t max_out, size_t *out_len);

/// The public-key operation on `signature`, checking and removing block type 1 padding:
/// writes the message to `out` and its length to `out_len`. Returns 1 on success, 0 if the
/// signature is not one of this key (or the key is malformed).
int cparley_boinc_rsa_recover(const uint8_t body[CPARLEY_BOINC_PUBLIC_LEN], const uint8_t *signature, size_t signature_len,
                              uint8_t *out, size_t max_out, size_t *out_len);

#ifdef __cplusplus
}
#endif
#endif
