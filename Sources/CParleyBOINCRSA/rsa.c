#include "CParleyBOINCRSA.h"

#include <stddef.h>

// BoringSSL's RSA and BIGNUM interfaces (include/openssl/rsa.h, bn.h), as swift-crypto's copy
// names them.
typedef struct rsa_st RSA;
typedef struct bignum_st BIGNUM;
typedef struct bn_gencb_st BN_GENCB;
#define RSA_PKCS1_PADDING 1
extern RSA *CCryptoBoringSSL_RSA_new(void);
extern void CCryptoBoringSSL_RSA_free(RSA *rsa);
extern int CCryptoBoringSSL_RSA_set0_key(RSA *rsa, BIGNUM *n, BIGNUM *e, BIGNUM *d);
extern int CCryptoBoringSSL_RSA_set0_factors(RSA *rsa, BIGNUM *p, BIGNUM *q);
extern int CCryptoBoringSSL_RSA_set0_crt_params(RSA *rsa, BIGNUM *dmp1, BIGNUM *dmq1, BIGNUM *iqmp);
extern void CCryptoBoringSSL_RSA_get0_key(const RSA *rsa, const BIGNUM **n, const BIGNUM **e, const BIGNUM **d);
extern void CCryptoBoringSSL_RSA_get0_factors(const RSA *rsa, const BIGNUM **p, const BIGNUM **q);
extern void CCryptoBoringSSL_RSA_get0_crt_params(const RSA *rsa, const BIGNUM **dmp1, const BIGNUM **dmq1, const BIGNUM **iqmp);
extern int CCryptoBoringSSL_RSA_generate_key_ex(RSA *rsa, int bits, const BIGNUM *e, BN_GENCB *cb);
extern int CCryptoBoringSSL_RSA_sign_raw(RSA *rsa, size_t *out_len, uint8_t *out, size_t max_out, const uint8_t *in, size_t in_len, int padding);
extern int CCryptoBoringSSL_RSA_verify_raw(RSA *rsa, size_t *out_len, uint8_t *out, size_t max_out, const uint8_t *in, size_t in_len, int padding);
extern BIGNUM *CCryptoBoringSSL_BN_new(void);
extern void CCryptoBoringSSL_BN_free(BIGNUM *bn);
extern int CCryptoBoringSSL_BN_set_word(BIGNUM *bn, uint64_t value);
extern BIGNUM *CCryptoBoringSSL_BN_bin2bn(const uint8_t *in, size_t len, BIGNUM *ret);
extern int CCryptoBoringSSL_BN_bn2bin_padded(uint8_t *out, size_t len, const BIGNUM *in);

enum { MOD = CPARLEY_BOINC_MODULUS_LEN, PRIME = CPARLEY_BOINC_PRIME_LEN };

static BIGNUM *bn(const uint8_t *bytes, size_t len) { return CCryptoBoringSSL_BN_bin2bn(bytes, len, NULL); }

// An RSA key from a body (public: n, e; private: everything), or NULL.
static RSA *key_from(const uint8_t *body, int private) {
    RSA *rsa = CCryptoBoringSSL_RSA_new();
    if (rsa == NULL) return NULL;
    BIGNUM *n = bn(body, MOD), *e = bn(body + MOD, MOD), *d = private ? bn(body + 2 * MOD, MOD) : NULL;
    if (n == NULL || e == NULL || (private && d == NULL) || !CCryptoBoringSSL_RSA_set0_key(rsa, n, e, d)) {
        CCryptoBoringSSL_BN_free(n); CCryptoBoringSSL_BN_free(e); CCryptoBoringSSL_BN_free(d);
        CCryptoBoringSSL_RSA_free(rsa);
        return NULL;
    }
    if (private) {
        const uint8_t *c = body + 3 * MOD;
        BIGNUM *p = bn(c, PRIME), *q = bn(c + PRIME, PRIME);
        if (p == NULL || q == NULL || !CCryptoBoringSSL_RSA_set0_factors(rsa, p, q)) {
            CCryptoBoringSSL_BN_free(p); CCryptoBoringSSL_BN_free(q);
            CCryptoBoringSSL_RSA_free(rsa);
            return NULL;
        }
        BIGNUM *dmp1 = bn(c + 2 * PRIME, PRIME), *dmq1 = bn(c + 3 * PRIME, PRIME), *iqmp = bn(c + 4 * PRIME, PRIME);
        if (dmp1 == NULL || dmq1 == NULL || iqmp == NULL || !CCryptoBoringSSL_RSA_set0_crt_params(rsa, dmp1, dmq1, iqmp)) {
            CCryptoBoringSSL_BN_free(dmp1); CCryptoBoringSSL_BN_free(dmq1); CCryptoBoringSSL_BN_free(iqmp);
            CCryptoBoringSSL_RSA_free(rsa);
            return NULL;
        }
    }
    return rsa;
}

int cparley_boinc_rsa_generate(int bits, uint8_t body[CPARLEY_BOINC_PRIVATE_LEN]) {
    if (bits < 512 || bits > 8 * MOD) return 0;
    RSA *rsa = CCryptoBoringSSL_RSA_new();
    BIGNUM *e = CCryptoBoringSSL_BN_new();
    int ok = rsa != NULL && e != NULL && CCryptoBoringSSL_BN_set_word(e, 65537) && CCryptoBoringSSL_RSA_generate_key_ex(rsa, bits, e, NULL);
    if (ok) {
        const BIGNUM *n, *pe, *d, *p, *q, *dmp1, *dmq1, *iqmp;
        CCryptoBoringSSL_RSA_get0_key(rsa, &n, &pe, &d);
        CCryptoBoringSSL_RSA_get0_factors(rsa, &p, &q);
        CCryptoBoringSSL_RSA_get0_crt_params(rsa, &dmp1, &dmq1, &iqmp);
        uint8_t *c = body + 3 * MOD;
        ok = CCryptoBoringSSL_BN_bn2bin_padded(body, MOD, n) && CCryptoBoringSSL_BN_bn2bin_padded(body + MOD, MOD, pe) &&
             CCryptoBoringSSL_BN_bn2bin_padded(body + 2 * MOD, MOD, d) && CCryptoBoringSSL_BN_bn2bin_padded(c, PRIME, p) &&
             CCryptoBoringSSL_BN_bn2bin_padded(c + PRIME, PRIME, q) && CCryptoBoringSSL_BN_bn2bin_padded(c + 2 * PRIME, PRIME, dmp1) &&
             CCryptoBoringSSL_BN_bn2bin_padded(c + 3 * PRIME, PRIME, dmq1) && CCryptoBoringSSL_BN_bn2bin_padded(c + 4 * PRIME, PRIME, iqmp);
    }
    CCryptoBoringSSL_BN_free(e);
    if (rsa != NULL) CCryptoBoringSSL_RSA_free(rsa);
    return ok;
}

int cparley_boinc_rsa_sign(const uint8_t body[CPARLEY_BOINC_PRIVATE_LEN], const uint8_t *message, size_t message_len,
                           uint8_t *out, size_t max_out, size_t *out_len) {
    RSA *rsa = key_from(body, 1);
    if (rsa == NULL) return 0;
    int ok = CCryptoBoringSSL_RSA_sign_raw(rsa, out_len, out, max_out, message, message_len, RSA_PKCS1_PADDING);
    CCryptoBoringSSL_RSA_free(rsa);
    return ok;
}

int cparley_boinc_rsa_recover(const uint8_t body[CPARLEY_BOINC_PUBLIC_LEN], const uint8_t *signature, size_t signature_len,
                              uint8_t *out, size_t max_out, size_t *out_len) {
    RSA *rsa = key_from(body, 0);
    if (rsa == NULL) return 0;
    int ok = CCryptoBoringSSL_RSA_verify_raw(rsa, out_len, out, max_out, signature, signature_len, RSA_PKCS1_PADDING);
    CCryptoBoringSSL_RSA_free(rsa);
    return ok;
}
