/* Gaussian noise from keystream words: each value the sum of two Box-Muller draws, computed branch-free so the
 * compiler vectorises the loop (dptrain/native.py builds and loads this file; dptrain/secure_random.py holds the
 * torch reference it is tested against). */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(DPTRAIN_PLAIN)  /* native.py retries with PLAIN */
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

static inline float as_float(uint32_t bits) { float f; memcpy(&f, &bits, 4); return f; }
static inline uint32_t as_bits(float f) { uint32_t bits; memcpy(&bits, &f, 4); return bits; }

/* ln(j 2^-24) for an integer j in [1, 2^24]: j = m 2^e with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s),
 * s = (m - 1) / (m + 1) in [-0.172, 0.172], whose odd series to s^11 is within 2e-11; e ln 2 with ln 2 split in a
 * short high part (exact products) and a low part. */
static inline float log_unit(uint32_t j) {
    uint32_t bits = as_bits((float)j);                                       /* exact: j <= 2^24 */
    uint32_t high = (bits & 0x007fffffu) > 0x003504f3u;                      /* mantissa above sqrt(2) */
    float m = as_float((bits & 0x007fffffu) | ((0x7fu - high) << 23));
    float e = (float)((int)(bits >> 23) - 127 + (int)high - 24);
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    float series = 1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9 + s2 * (1.0f / 11))));
    return e * 0.693145752f + (e * 1.42860677e-06f + (2.0f * s + 2.0f * s * s2 * series));
}

/* (cos, sin) of 2 pi t 2^-24 for t in [0, 2^24): the quadrant from t's top two bits (exact), within it
 * y = pi / 4 + z, z in [-pi/4, pi/4), by Taylor series to z^9 and z^10 (within 2e-9). */
static inline void cos_sin_turns(uint32_t t, float *c, float *s) {
    uint32_t quadrant = t >> 22;
    float z = ((float)(t & 0x3fffffu) * (1.0f / 4194304) - 0.5f) * 1.57079633f;
    float z2 = z * z;
    float sin_z = z * (1.0f + z2 * (-1.0f / 6 + z2 * (1.0f / 120 + z2 * (-1.0f / 5040 + z2 * (1.0f / 362880)))));
    float cos_z = 1.0f + z2 * (-0.5f + z2 * (1.0f / 24 + z2 * (-1.0f / 720 + z2 * (1.0f / 40320
                  + z2 * (-1.0f / 3628800)))));
    float sin_y = (cos_z + sin_z) * 0.707106781f, cos_y = (cos_z - sin_z) * 0.707106781f;
    uint32_t odd = quadrant & 1u;                               /* quadrants 1 and 3 swap cos and sin */
    float c0 = odd ? sin_y : cos_y, s0 = odd ? cos_y : sin_y;
    *c = as_float(as_bits(c0) ^ ((((quadrant + 1u) >> 1) & 1u) << 31));  /* negative in quadrants 1, 2 */
    *s = as_float(as_bits(s0) ^ (((quadrant >> 1) & 1u) << 31));         /* negative in quadrants 2, 3 */
}

/* One Box-Muller draw from two words: radius sqrt(-2 ln u), u = (k + 1) 2^-24 in (0, 1]; angle 2 pi (k' + 1)
 * 2^-24 (k, k' the words' low 24 bits, as secure_random.Keystream.uniforms cuts them). */
static inline void box_muller(uint32_t radius_word, uint32_t angle_word, float *c, float *s) {
    float r = sqrtf(-2.0f * log_unit((radius_word & 0x00ffffffu) + 1u));
    cos_sin_turns(((angle_word & 0x00ffffffu) + 1u) & 0x00ffffffu, c, s);
    *c *= r;
    *s *= r;
}

/* words: (4, pairs) planes (radius and angle words of draw 1, then of draw 2). noise[i] and noise[pairs + i]
 * <- scale times the cosine and sine halves of pair i, summed over the two draws. */
VECTOR_CLONES
void keystream_normals(const uint32_t *restrict words, size_t pairs, float scale, float *restrict noise) {
    for (size_t i = 0; i < pairs; i++) {
        float c1, s1, c2, s2;
        box_muller(words[i], words[pairs + i], &c1, &s1);
        box_muller(words[2 * pairs + i], words[3 * pairs + i], &c2, &s2);
        noise[i] = scale * (c1 + c2);
        noise[pairs + i] = scale * (s1 + s2);
    }
}

/* out[i] <- scale out[i] + values[i] (serial: the caller's thread, no OpenMP team). */
VECTOR_CLONES
void scale_add(float *restrict out, const float *restrict values, size_t n, float scale) {
    for (size_t i = 0; i < n; i++)
        out[i] = scale * out[i] + values[i];
}
