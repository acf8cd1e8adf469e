#include "CParleyAEAD.h"

#include <limits.h>
#include <openssl/evp.h>
#include <stdlib.h>

#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

struct cparley_aead {
    EVP_CIPHER_CTX *ctx;
    int encrypt;
};

cparley_aead *cparley_aead_new(int cipher, const uint8_t key[32], int encrypt) {
    const EVP_CIPHER *evp;
    switch (cipher) {
    case CPARLEY_AEAD_AES_256_GCM: evp = EVP_aes_256_gcm(); break;
    case CPARLEY_AEAD_CHACHA20_POLY1305: evp = EVP_chacha20_poly1305(); break;
    default: return NULL;
    }
    cparley_aead *a = calloc(1, sizeof(*a));
    if (a == NULL) return NULL;
    a->ctx = EVP_CIPHER_CTX_new();
    a->encrypt = encrypt;
    if (a->ctx == NULL
        || EVP_CipherInit_ex(a->ctx, evp, NULL, NULL, NULL, encrypt) != 1
        || EVP_CIPHER_CTX_ctrl(a->ctx, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL) != 1
        || EVP_CipherInit_ex(a->ctx, NULL, NULL, key, NULL, encrypt) != 1) {
        cparley_aead_free(a);
        return NULL;
    }
    return a;
}

void cparley_aead_free(cparley_aead *a) {
    if (a == NULL) return;
    EVP_CIPHER_CTX_free(a->ctx);
    free(a);
}

int cparley_aead_begin(cparley_aead *a, const uint8_t nonce[12]) {
    return EVP_CipherInit_ex(a->ctx, NULL, NULL, NULL, nonce, a->encrypt) == 1;
}

// EVP's update takes an int length: feed larger inputs in pieces (frames are at most a few
// MiB, so this never loops more than once in practice).
int cparley_aead_update(cparley_aead *a, const uint8_t *in, uint8_t *out, size_t length) {
    while (length > 0) {
        int piece = length > (size_t)(INT_MAX / 2) ? INT_MAX / 2 : (int)length;
        int written = 0;
        if (EVP_CipherUpdate(a->ctx, out, &written, in, piece) != 1 || written != piece) return 0;
        in += piece;
        out += piece;
        length -= (size_t)piece;
    }
    return 1;
}

int cparley_aead_seal_finish(cparley_aead *a, uint8_t tag[16]) {
    uint8_t none[16];
    int written = 0;
    if (!a->encrypt) return 0;
    if (EVP_CipherFinal_ex(a->ctx, none, &written) != 1 || written != 0) return 0;
    return EVP_CIPHER_CTX_ctrl(a->ctx, EVP_CTRL_AEAD_GET_TAG, 16, tag) == 1;
}

int cparley_aead_open_finish(cparley_aead *a, const uint8_t tag[16]) {
    uint8_t none[16];
    int written = 0;
    if (a->encrypt) return 0;
    if (EVP_CIPHER_CTX_ctrl(a->ctx, EVP_CTRL_AEAD_SET_TAG, 16, (void *)tag) != 1) return 0;
    return EVP_CipherFinal_ex(a->ctx, none, &written) == 1;
}

int cparley_aead_cpu_has_aes(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("aes") ? 1 : 0;
#elif defined(__aarch64__) && defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_AES) ? 1 : 0;
#elif defined(__aarch64__) && defined(__APPLE__)
    return 1;
#else
    return 0;
#endif
}
