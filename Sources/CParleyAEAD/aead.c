#include "CParleyAEAD.h"

#include <stdlib.h>

#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

// BoringSSL's EVP_AEAD interface (include/openssl/aead.h), as swift-crypto's copy names it.
typedef struct evp_aead_st EVP_AEAD;
typedef struct evp_aead_ctx_st EVP_AEAD_CTX;
extern const EVP_AEAD *CCryptoBoringSSL_EVP_aead_aes_256_gcm(void);
extern const EVP_AEAD *CCryptoBoringSSL_EVP_aead_chacha20_poly1305(void);
extern EVP_AEAD_CTX *CCryptoBoringSSL_EVP_AEAD_CTX_new(const EVP_AEAD *aead, const uint8_t *key, size_t key_len, size_t tag_len);
extern void CCryptoBoringSSL_EVP_AEAD_CTX_free(EVP_AEAD_CTX *ctx);
extern int CCryptoBoringSSL_EVP_AEAD_CTX_seal_scatter(
    const EVP_AEAD_CTX *ctx, uint8_t *out, uint8_t *out_tag, size_t *out_tag_len, size_t max_out_tag_len,
    const uint8_t *nonce, size_t nonce_len, const uint8_t *in, size_t in_len, const uint8_t *extra_in,
    size_t extra_in_len, const uint8_t *ad, size_t ad_len);
extern int CCryptoBoringSSL_EVP_AEAD_CTX_open_gather(
    const EVP_AEAD_CTX *ctx, uint8_t *out, const uint8_t *nonce, size_t nonce_len, const uint8_t *in,
    size_t in_len, const uint8_t *in_tag, size_t in_tag_len, const uint8_t *ad, size_t ad_len);

// BoringSSL's EVP_CIPHER interface (include/openssl/cipher.h), for the incremental opening.
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct engine_st ENGINE;
extern const EVP_CIPHER *CCryptoBoringSSL_EVP_aes_256_gcm(void);
extern EVP_CIPHER_CTX *CCryptoBoringSSL_EVP_CIPHER_CTX_new(void);
extern void CCryptoBoringSSL_EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
extern int CCryptoBoringSSL_EVP_DecryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, ENGINE *impl, const uint8_t *key,
                                              const uint8_t *iv);
extern int CCryptoBoringSSL_EVP_DecryptUpdate(EVP_CIPHER_CTX *ctx, uint8_t *out, int *out_len, const uint8_t *in, int in_len);
extern int CCryptoBoringSSL_EVP_DecryptFinal_ex(EVP_CIPHER_CTX *ctx, uint8_t *out, int *out_len);
extern int CCryptoBoringSSL_EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int command, int arg, void *ptr);
// EVP_CTRL_AEAD_SET_TAG (EVP_CTRL_GCM_SET_TAG) in include/openssl/cipher.h.
#define CPARLEY_EVP_CTRL_AEAD_SET_TAG 0x11

struct cparley_aead {
    EVP_AEAD_CTX *ctx;
};

cparley_aead *cparley_aead_new(int cipher, const uint8_t key[32]) {
    const EVP_AEAD *aead;
    switch (cipher) {
    case CPARLEY_AEAD_AES_256_GCM: aead = CCryptoBoringSSL_EVP_aead_aes_256_gcm(); break;
    case CPARLEY_AEAD_CHACHA20_POLY1305: aead = CCryptoBoringSSL_EVP_aead_chacha20_poly1305(); break;
    default: return NULL;
    }
    cparley_aead *a = calloc(1, sizeof(*a));
    if (a == NULL) return NULL;
    a->ctx = CCryptoBoringSSL_EVP_AEAD_CTX_new(aead, key, 32, 16);
    if (a->ctx == NULL) {
        free(a);
        return NULL;
    }
    return a;
}

void cparley_aead_free(cparley_aead *a) {
    if (a == NULL) return;
    CCryptoBoringSSL_EVP_AEAD_CTX_free(a->ctx);
    free(a);
}

int cparley_aead_seal(cparley_aead *a, const uint8_t nonce[12], uint8_t *data, size_t length, uint8_t tag[16]) {
    size_t tag_len = 0;
    return CCryptoBoringSSL_EVP_AEAD_CTX_seal_scatter(a->ctx, data, tag, &tag_len, 16, nonce, 12, data, length, NULL, 0, NULL, 0) == 1
        && tag_len == 16;
}

int cparley_aead_seal_extra(cparley_aead *a, const uint8_t nonce[12], uint8_t *data, size_t length,
                            const uint8_t *extra, size_t extra_length, uint8_t *out) {
    size_t out_len = 0;
    return CCryptoBoringSSL_EVP_AEAD_CTX_seal_scatter(a->ctx, data, out, &out_len, extra_length + 16, nonce, 12, data, length,
                                                      extra, extra_length, NULL, 0) == 1
        && out_len == extra_length + 16;
}

int cparley_aead_open(cparley_aead *a, const uint8_t nonce[12], const uint8_t *in, uint8_t *out, size_t length, const uint8_t tag[16]) {
    return CCryptoBoringSSL_EVP_AEAD_CTX_open_gather(a->ctx, out, nonce, 12, in, length, tag, 16, NULL, 0) == 1;
}

struct cparley_gcm_stream {
    EVP_CIPHER_CTX *ctx;
};

cparley_gcm_stream *cparley_gcm_stream_new(const uint8_t key[32]) {
    cparley_gcm_stream *s = calloc(1, sizeof(*s));
    if (s == NULL) return NULL;
    s->ctx = CCryptoBoringSSL_EVP_CIPHER_CTX_new();
    if (s->ctx == NULL || CCryptoBoringSSL_EVP_DecryptInit_ex(s->ctx, CCryptoBoringSSL_EVP_aes_256_gcm(), NULL, key, NULL) != 1) {
        CCryptoBoringSSL_EVP_CIPHER_CTX_free(s->ctx);
        free(s);
        return NULL;
    }
    return s;
}

void cparley_gcm_stream_free(cparley_gcm_stream *s) {
    if (s == NULL) return;
    CCryptoBoringSSL_EVP_CIPHER_CTX_free(s->ctx);
    free(s);
}

int cparley_gcm_stream_begin(cparley_gcm_stream *s, const uint8_t nonce[12]) {
    // The default GCM nonce length is 12 bytes; the key set at creation stays.
    return CCryptoBoringSSL_EVP_DecryptInit_ex(s->ctx, NULL, NULL, NULL, nonce) == 1;
}

int cparley_gcm_stream_update(cparley_gcm_stream *s, const uint8_t *in, uint8_t *out, size_t length) {
    while (length > 0) {
        int piece = length > (1u << 30) ? (1 << 30) : (int)length;
        int written = 0;
        if (CCryptoBoringSSL_EVP_DecryptUpdate(s->ctx, out, &written, in, piece) != 1 || written != piece) return 0;
        in += piece;
        out += piece;
        length -= (size_t)piece;
    }
    return 1;
}

int cparley_gcm_stream_finish(cparley_gcm_stream *s, const uint8_t tag[16]) {
    int written = 0;
    // SET_TAG copies the tag in (the pointer is not const only because ctrl is generic).
    return CCryptoBoringSSL_EVP_CIPHER_CTX_ctrl(s->ctx, CPARLEY_EVP_CTRL_AEAD_SET_TAG, 16, (void *)tag) == 1
        && CCryptoBoringSSL_EVP_DecryptFinal_ex(s->ctx, NULL, &written) == 1;
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
