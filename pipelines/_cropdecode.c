/* Crop-decoding JPEG reader for MAE-style RandomResizedCrop (issue 14).
 *
 * Given a JPEG and a crop box, decode only what the box needs, then resample straight into the caller's
 * output slot (a sample's [H, W, 3] uint8 place in the batch):
 *   - rows above the box are skipped (jpeg_skip_scanlines: entropy-decoded, no IDCT, no colour conversion),
 *     rows below it are never read (the decompressor is aborted);
 *   - columns are restricted to the iMCU columns covering the box (jpeg_crop_scanline);
 *   - when the box is at least 2, 4 or 8 times larger than the output on both axes, libjpeg-turbo's scaled
 *     IDCT decodes at 1/2, 1/4 or 1/8 (a good low-pass filter in itself);
 *   - the resample is Pillow's separable convolution (bilinear = triangle, bicubic a = -0.5; support widened by
 *     the downscale factor, i.e. antialiased) through a uint8 intermediate as Pillow's, the shrinking pass
 *     first; the horizontal pass in 14-bit fixed point with SSE4.1 / AVX2 (pillow-simd's scheme) where the CPU
 *     has them, the vertical one vectorised by the compiler; the flip is folded into the output column order;
 *   - when the batch stays on the host, the pixels are normalised ((x - mean) / std, fp32 or bf16, planar) in
 *     the same call, so the training process never makes a pass over the batch.
 * The crop box semantics are torchvision's RandomResizedCrop on a PIL image: crop the integer box, then
 * resize it (pixels outside the box never contribute).
 *
 * Randomness: the box, the filter and the flip are drawn from the sample's key (pipelines.base.sample_seed,
 * recomputed here from seed, epoch and index; plus a view's offset in a multi-view batch) with splitmix64,
 * following torchvision's RandomResizedCrop.get_params (10 attempts, then the ratio-clamped centre crop).
 * pipelines/cropdecode.py holds the Python twin of the sampler; tests check the two agree.
 *
 * Errors never produce an image silently: libjpeg's fatal errors and its corrupt-data warnings (premature
 * end of file, a marker inside entropy-coded data) return a negative code and a message.
 *
 * Loaded with ctypes (also from numba code inside FFCV's pipeline); ctypes releases the GIL around calls.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jerror.h>
#include <jpeglib.h>

/* Per-thread scratch buffers, grown as needed and kept: a crop's buffers are 100-300 KB, above glibc's mmap
 * threshold, so malloc/free per sample were an mmap + munmap + page faults each (a quarter of the CPU time). */
enum { SCRATCH_DECODE, SCRATCH_TMP, SCRATCH_PLANES, SCRATCH_ACC, SCRATCH_PIXELS, SCRATCH_SLOTS };
static __thread struct {
    void *p;
    size_t cap;
} scratch_pool[SCRATCH_SLOTS];

/* freed when its thread exits (a loader's pool threads end with the loader): a pthread key's destructor */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_release(void *unused) {
    (void)unused;
    for (int i = 0; i < SCRATCH_SLOTS; i++) {
        free(scratch_pool[i].p);
        scratch_pool[i].p = NULL;
        scratch_pool[i].cap = 0;
    }
}

static void scratch_key_create(void) { pthread_key_create(&scratch_key, scratch_release); }

static void *scratch(int slot, size_t bytes) {
    if (scratch_pool[slot].cap < bytes) {
        pthread_once(&scratch_once, scratch_key_create);
        pthread_setspecific(scratch_key, (void *)1); /* any non-NULL value: the destructor runs at exit */
        free(scratch_pool[slot].p);
        scratch_pool[slot].p = malloc(bytes);
        scratch_pool[slot].cap = scratch_pool[slot].p ? bytes : 0;
    }
    return scratch_pool[slot].p;
}

/* ------------------------------------------------------------------------------------------ sampling */

static const uint64_t K_SEED = 0x9E3779B97F4A7C15ULL, K_EPOCH = 0xBF58476D1CE4E5B9ULL,
                      K_INDEX = 0x94D049BB133111EBULL;

/* pipelines.base.sample_seed, bit for bit */
int64_t fv_sample_seed(int64_t seed, int64_t epoch, int64_t index) {
    uint64_t h = (uint64_t)seed * K_SEED + (uint64_t)epoch * K_EPOCH + (uint64_t)index * K_INDEX;
    h ^= h >> 31;
    return (int64_t)(h & 0x7FFFFFFFFFFFFFFFULL);
}

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* uniform in [0, 1) with 53 random bits */
static double uniform(uint64_t *state) { return (double)(splitmix64(state) >> 11) * (1.0 / 9007199254740992.0); }

/* params: [0] top, [1] left, [2] height, [3] width, [4] filter (0 bilinear, 1 bicubic), [5] flip (0/1).
 * filter_mode: 0 bilinear, 1 bicubic, 2 random (each with p = 0.5). The draw order is fixed: flip, filter,
 * then the crop attempts; a Python twin (cropdecode.rrc_params) must follow it exactly. */
void fv_rrc_params(int64_t key, int32_t height, int32_t width, double scale_lo, double scale_hi,
                   double ratio_lo, double ratio_hi, double hflip, int32_t filter_mode, int32_t *params) {
    uint64_t st = (uint64_t)key;
    double u_flip = uniform(&st), u_filter = uniform(&st);
    params[5] = u_flip < hflip;
    params[4] = filter_mode == 2 ? (u_filter < 0.5 ? 0 : 1) : filter_mode;
    double area = (double)height * (double)width;
    double log_lo = log(ratio_lo), log_hi = log(ratio_hi);
    for (int attempt = 0; attempt < 10; attempt++) {
        double target = area * (scale_lo + (scale_hi - scale_lo) * uniform(&st));
        double aspect = exp(log_lo + (log_hi - log_lo) * uniform(&st));
        double u_top = uniform(&st), u_left = uniform(&st);
        int32_t w = (int32_t)nearbyint(sqrt(target * aspect));
        int32_t h = (int32_t)nearbyint(sqrt(target / aspect));
        if (0 < w && w <= width && 0 < h && h <= height) {
            params[0] = (int32_t)(u_top * (double)(height - h + 1));
            params[1] = (int32_t)(u_left * (double)(width - w + 1));
            params[2] = h;
            params[3] = w;
            return;
        }
    }
    /* torchvision's fallback: the whole image, clamped to the ratio range, centred */
    double in_ratio = (double)width / (double)height;
    int32_t w, h;
    if (in_ratio < ratio_lo) {
        w = width;
        h = (int32_t)nearbyint(w / ratio_lo);
    } else if (in_ratio > ratio_hi) {
        h = height;
        w = (int32_t)nearbyint(h * ratio_hi);
    } else {
        w = width;
        h = height;
    }
    params[0] = (height - h) / 2;
    params[1] = (width - w) / 2;
    params[2] = h;
    params[3] = w;
}

/* Evaluation: the centred square of side round(ratio * short side), bicubic, no flip: torchvision's
 * Resize(img / ratio) + CenterCrop(img) expressed as one box (FFCV's CenterCropRGBImageDecoder). */
void fv_center_params(int32_t height, int32_t width, double ratio, int32_t *params) {
    int32_t side = (int32_t)nearbyint(ratio * (double)(height < width ? height : width));
    if (side < 1) side = 1;
    params[0] = (height - side) / 2;
    params[1] = (width - side) / 2;
    params[2] = side;
    params[3] = side;
    params[4] = 1;
    params[5] = 0;
}

/* -------------------------------------------------------------------------------------- resampling */

static double f_bilinear(double x) {
    x = fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

static double f_bicubic(double x) { /* Keys, a = -0.5, as Pillow */
    const double a = -0.5;
    x = fabs(x);
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
    return 0.0;
}

typedef struct {
    int ksize;   /* taps per output pixel */
    int *bounds; /* [out][2]: first input index, tap count */
    float *k;    /* [out][ksize] */
    int32_t *index; /* [out][ksize]: input index of each tap, clamped in range where the weight is 0 */
    float *kt;      /* k and index transposed, [ksize][out], for the horizontal pass */
    int32_t *indext;
    int kpad;       /* ksize rounded up to even */
    int32_t *kpair; /* [out][kpad / 2]: weights t, t+1 as 14-bit fixed point int16 pairs (low, high) */
} coeffs_t;



/* Pillow's precompute_coeffs: output pixel i covers [in0 + i * scale, in0 + (i + 1) * scale) of the input
 * line. Taps are clamped to the box's own pixels [floor(in0), ceil(in1)), not to the line: torchvision crops,
 * then resizes, so nothing outside the box contributes. Returns 0, or -1 when out of memory. */
static int precompute(double in0, double in1, int out_size, int filter, coeffs_t *c) {
    const int lo = (int)floor(in0), hi = (int)ceil(in1);
    double (*fn)(double) = filter ? f_bicubic : f_bilinear;
    double support = filter ? 2.0 : 1.0;
    double scale = (in1 - in0) / out_size, fscale = scale < 1.0 ? 1.0 : scale;
    support *= fscale;
    c->ksize = (int)ceil(support) * 2 + 1;
    c->bounds = (int *)malloc(sizeof(int) * 2 * out_size);
    c->k = (float *)malloc(sizeof(float) * c->ksize * out_size);
    c->index = (int32_t *)malloc(sizeof(int32_t) * c->ksize * out_size);
    c->kt = (float *)malloc(sizeof(float) * c->ksize * out_size);
    c->indext = (int32_t *)malloc(sizeof(int32_t) * c->ksize * out_size);
    c->kpad = (c->ksize + 1) & ~1;
    c->kpair = (int32_t *)calloc((size_t)(c->kpad / 2) * out_size, sizeof(int32_t));
    if (!c->bounds || !c->k || !c->index || !c->kt || !c->indext || !c->kpair) return -1;
    double ss = 1.0 / fscale;
    for (int i = 0; i < out_size; i++) {
        double center = in0 + (i + 0.5) * scale;
        int xmin = (int)floor(center - support + 0.5);
        if (xmin < lo) xmin = lo;
        int xmax = (int)floor(center + support + 0.5);
        if (xmax > hi) xmax = hi;
        xmax -= xmin;
        float *k = c->k + (size_t)i * c->ksize;
        int n = xmax < c->ksize ? xmax : c->ksize;
        double ww = 0.0;
        for (int x = 0; x < n; x++) {
            k[x] = (float)fn((x + xmin - center + 0.5) * ss);
            ww += k[x];
        }
        int32_t *index = c->index + (size_t)i * c->ksize;
        for (int x = 0; x < c->ksize; x++) {
            k[x] = (x < n && ww != 0.0) ? (float)(k[x] / ww) : 0.0f;
            index[x] = x < n ? xmin + x : (n > 0 ? xmin + n - 1 : lo);
            c->kt[(size_t)x * out_size + i] = k[x];
            c->indext[(size_t)x * out_size + i] = index[x];
            const uint32_t q = (uint16_t)(int16_t)lrintf(k[x] * 16384.0f);
            c->kpair[(size_t)i * (c->kpad / 2) + x / 2] |= (int32_t)(x & 1 ? q << 16 : q);
        }
        c->bounds[2 * i] = xmin;
        c->bounds[2 * i + 1] = n;
    }
    return 0;
}

static void free_coeffs(coeffs_t *c) {
    free(c->bounds);
    free(c->k);
    free(c->index);
    free(c->kt);
    free(c->indext);
    free(c->kpair);
}

static inline uint8_t clip8(float v) {
    int x = (int)(v + 0.5f);
    return x < 0 ? 0 : (x > 255 ? 255 : (uint8_t)x);
}

/* Horizontal pass over nrows rows: src pixel (index - base) of each row -> out_w pixels of dst (flipped or
 * not). Portable version (any CPU): each row is widened once into three float planes; then, taps outer and
 * output pixels inner, every tap is out_w independent multiply-adds per plane instead of three dependent
 * chains per pixel (FP-add latency bound). */
static void hpass_float(const uint8_t *src, size_t src_stride, int nrows, int base, const coeffs_t *c, int out_w,
                        int flip, uint8_t *dst, size_t dst_stride, float *planes, float *acc) {
    int lo = c->index[0], hi = lo + 1;
    for (size_t e = 0; e < (size_t)out_w * c->ksize; e++) {
        if (c->index[e] < lo) lo = c->index[e];
        if (c->index[e] + 1 > hi) hi = c->index[e] + 1;
    }
    const int in_w = hi - lo; /* the planes hold the span the taps read, [lo, hi), nothing before it */
    float *restrict R = planes, *restrict G = planes + in_w, *restrict B = planes + 2 * in_w;
    float *restrict aR = acc, *restrict aG = acc + out_w, *restrict aB = acc + 2 * out_w;
    for (int y = 0; y < nrows; y++) {
        const uint8_t *s = src + (size_t)y * src_stride + (size_t)(lo - base) * 3;
        for (int x = 0; x < in_w; x++) {
            R[x] = s[3 * x];
            G[x] = s[3 * x + 1];
            B[x] = s[3 * x + 2];
        }
        for (int i = 0; i < 3 * out_w; i++) acc[i] = 0.f;
        for (int t = 0; t < c->ksize; t++) {
            const float *restrict w = c->kt + (size_t)t * out_w;
            const int32_t *restrict ix = c->indext + (size_t)t * out_w;
            for (int i = 0; i < out_w; i++) {
                const int j = ix[i] - lo;
                aR[i] += R[j] * w[i];
                aG[i] += G[j] * w[i];
                aB[i] += B[j] * w[i];
            }
        }
        uint8_t *d = dst + (size_t)y * dst_stride;
        for (int i = 0; i < out_w; i++) {
            const int o = flip ? out_w - 1 - i : i;
            d[3 * o] = clip8(aR[i]);
            d[3 * o + 1] = clip8(aG[i]);
            d[3 * o + 2] = clip8(aB[i]);
        }
    }
}


#if defined(__x86_64__)
#include <immintrin.h>
#define HAVE_SSE41_PASS 1
/* RGB -> RGBx (x = 0) for n pixels: 4 pixels per byte shuffle; the last few one by one, so that no byte past
 * the row's n pixels is read */
__attribute__((target("sse4.1"))) static inline void widen_rgbx(const uint8_t *s, int n, uint8_t *rgbx) {
    const __m128i spread = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    int x = 0;
    for (; 3 * x + 16 <= 3 * n; x += 4)
        _mm_storeu_si128((__m128i *)(rgbx + 4 * x), _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(s + 3 * x)), spread));
    for (; x < n; x++) {
        rgbx[4 * x] = s[3 * x];
        rgbx[4 * x + 1] = s[3 * x + 1];
        rgbx[4 * x + 2] = s[3 * x + 2];
        rgbx[4 * x + 3] = 0;
    }
}

/* The same pass with SSE4.1 (every x86-64 server since 2008), as pillow-simd does it: a row is widened to
 * 4 bytes per pixel (RGBx, zero-padded), and per output pixel two taps at a time are one byte shuffle
 * ([R0 G0 B0 x0 R1 G1 B1 x1] -> [R0 R1 G0 G1 B0 B1 x0 x1]), one widening to int16 and one multiply-add of
 * int16 pairs (pmaddwd) against the pair of 14-bit fixed-point weights: 4 lanes (R, G, B, x) of int32 sums.
 * ~5x fewer instructions than the float pass; results differ from it by rounding only. */
__attribute__((target("sse4.1"))) static void hpass_sse41(const uint8_t *src, size_t src_stride, int nrows,
                                                          int base, const coeffs_t *c, int out_w, int flip,
                                                          uint8_t *dst, size_t dst_stride, uint8_t *rgbx) {
    int lo = c->bounds[0], hi = lo;
    for (int i = 0; i < out_w; i++) {
        if (c->bounds[2 * i] < lo) lo = c->bounds[2 * i];
        if (c->bounds[2 * i] + c->bounds[2 * i + 1] > hi) hi = c->bounds[2 * i] + c->bounds[2 * i + 1];
    }
    const int kpad = c->kpad;
    const __m128i shuf = _mm_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
    memset(rgbx + (size_t)(hi - lo) * 4, 0, (size_t)(kpad + 4) * 4);
    for (int y = 0; y < nrows; y++) {
        widen_rgbx(src + (size_t)y * src_stride + (size_t)(lo - base) * 3, hi - lo, rgbx);
        uint8_t *d = dst + (size_t)y * dst_stride;
        for (int i = 0; i < out_w; i++) {
            const uint8_t *p = rgbx + (size_t)(c->bounds[2 * i] - lo) * 4;
            const int32_t *w = c->kpair + (size_t)i * (kpad / 2);
            const int n = (c->bounds[2 * i + 1] + 1) & ~1;
            __m128i acc = _mm_set1_epi32(1 << 13);
            int t = 0;
            for (; t + 4 <= n; t += 4) {
                __m128i px = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 4 * t)), shuf);
                acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_cvtepu8_epi16(px), _mm_set1_epi32(w[t / 2])));
                acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_cvtepu8_epi16(_mm_srli_si128(px, 8)),
                                                        _mm_set1_epi32(w[t / 2 + 1])));
            }
            if (t < n) {
                __m128i px = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)(p + 4 * t)), shuf);
                acc = _mm_add_epi32(acc, _mm_madd_epi16(_mm_cvtepu8_epi16(px), _mm_set1_epi32(w[t / 2])));
            }
            acc = _mm_srai_epi32(acc, 14);
            acc = _mm_packus_epi16(_mm_packs_epi32(acc, acc), acc);
            const int32_t v = _mm_cvtsi128_si32(acc);
            memcpy(d + 3 * (flip ? out_w - 1 - i : i), &v, 3);
        }
    }
}

/* The SSE4.1 pass with two output pixels per instruction: AVX2's byte shuffle, unpack and multiply-add work
 * within 128-bit lanes, so pixel i rides in the low lane and pixel i + 1 in the high one (each with its own
 * weights; the shorter of the two is padded with zero weights). Half the instructions per pixel. */
__attribute__((target("avx2"))) static void hpass_avx2(const uint8_t *src, size_t src_stride, int nrows, int base,
                                                       const coeffs_t *c, int out_w, int flip, uint8_t *dst,
                                                       size_t dst_stride, uint8_t *rgbx) {
    int lo = c->bounds[0], hi = lo;
    for (int i = 0; i < out_w; i++) {
        if (c->bounds[2 * i] < lo) lo = c->bounds[2 * i];
        if (c->bounds[2 * i] + c->bounds[2 * i + 1] > hi) hi = c->bounds[2 * i] + c->bounds[2 * i + 1];
    }
    const int kpad = c->kpad, half = kpad / 2;
    const __m256i shuf = _mm256_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15, 0, 4, 1, 5, 2, 6, 3,
                                          7, 8, 12, 9, 13, 10, 14, 11, 15);
    const __m256i zero = _mm256_setzero_si256();
    memset(rgbx + (size_t)(hi - lo) * 4, 0, (size_t)(kpad + 4) * 4);
    for (int y = 0; y < nrows; y++) {
        widen_rgbx(src + (size_t)y * src_stride + (size_t)(lo - base) * 3, hi - lo, rgbx);
        uint8_t *d = dst + (size_t)y * dst_stride;
        for (int i = 0; i < out_w; i += 2) {
            const int j = i + 1 < out_w ? i + 1 : i; /* an odd width computes its last pixel twice */
            const uint8_t *pa = rgbx + (size_t)(c->bounds[2 * i] - lo) * 4, *pb = rgbx + (size_t)(c->bounds[2 * j] - lo) * 4;
            const int32_t *wa = c->kpair + (size_t)i * half, *wb = c->kpair + (size_t)j * half;
            const int na = c->bounds[2 * i + 1], nb = c->bounds[2 * j + 1];
            const int n = ((na > nb ? na : nb) + 1) & ~1;
            __m256i acc = _mm256_set1_epi32(1 << 13);
            int t = 0;
            for (; t + 4 <= n; t += 4) {
                __m256i px = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(pa + 4 * t))),
                                                     _mm_loadu_si128((const __m128i *)(pb + 4 * t)), 1);
                px = _mm256_shuffle_epi8(px, shuf);
                const __m256i w0 = _mm256_setr_epi32(wa[t / 2], wa[t / 2], wa[t / 2], wa[t / 2], wb[t / 2], wb[t / 2],
                                                     wb[t / 2], wb[t / 2]);
                const __m256i w1 = _mm256_setr_epi32(wa[t / 2 + 1], wa[t / 2 + 1], wa[t / 2 + 1], wa[t / 2 + 1],
                                                     wb[t / 2 + 1], wb[t / 2 + 1], wb[t / 2 + 1], wb[t / 2 + 1]);
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_unpacklo_epi8(px, zero), w0));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_unpackhi_epi8(px, zero), w1));
            }
            if (t < n) {
                __m256i px = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadl_epi64((const __m128i *)(pa + 4 * t))),
                                                     _mm_loadl_epi64((const __m128i *)(pb + 4 * t)), 1);
                px = _mm256_shuffle_epi8(px, shuf);
                const __m256i w0 = _mm256_setr_epi32(wa[t / 2], wa[t / 2], wa[t / 2], wa[t / 2], wb[t / 2], wb[t / 2],
                                                     wb[t / 2], wb[t / 2]);
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_unpacklo_epi8(px, zero), w0));
            }
            acc = _mm256_srai_epi32(acc, 14);
            acc = _mm256_packus_epi16(_mm256_packs_epi32(acc, acc), acc);
            const int32_t va = _mm256_cvtsi256_si32(acc), vb = _mm_cvtsi128_si32(_mm256_extracti128_si256(acc, 1));
            memcpy(d + 3 * (flip ? out_w - 1 - i : i), &va, 3);
            memcpy(d + 3 * (flip ? out_w - 1 - j : j), &vb, 3);
        }
    }
}
#endif

/* Vertical pass: out_h rows of len bytes from src rows (index - base); taps outer, bytes inner: a contiguous
 * multiply-add the compiler vectorises. */
__attribute__((target_clones("avx2", "default"))) static void vpass(const uint8_t *src, size_t src_stride, int base, const coeffs_t *c, int out_h, int len,
                  uint8_t *dst, size_t dst_stride, float *acc) {
    for (int j = 0; j < out_h; j++) {
        const float *k = c->k + (size_t)j * c->ksize;
        const int y0 = c->bounds[2 * j] - base, n = c->bounds[2 * j + 1];
        for (int x = 0; x < len; x++) acc[x] = 0.f;
        for (int t = 0; t < n; t++) {
            const uint8_t *p = src + (size_t)(y0 + t) * src_stride;
            const float w = k[t];
            for (int x = 0; x < len; x++) acc[x] += p[x] * w;
        }
        uint8_t *d = dst + (size_t)j * dst_stride;
        for (int x = 0; x < len; x++) d[x] = clip8(acc[x]);
    }
}

/* The horizontal pass's instruction set: 2 AVX2, 1 SSE4.1, 0 portable C; each used only where the CPU has it.
 * Settable (fv_set_simd) so that tests cover every path on any machine. */
static int simd_level = 2;

int fv_set_simd(int32_t level) {
    int previous = simd_level;
    simd_level = level;
    return previous;
}

/* planes: scratch of 3 * (input span + kpad + 4) floats (also holds the SSE4.1 pass's RGBx row) */
static void hpass(const uint8_t *src, size_t src_stride, int nrows, int base, const coeffs_t *c, int out_w, int flip,
                  uint8_t *dst, size_t dst_stride, float *planes, float *acc) {
#ifdef HAVE_SSE41_PASS
    if (simd_level >= 2 && __builtin_cpu_supports("avx2")) {
        hpass_avx2(src, src_stride, nrows, base, c, out_w, flip, dst, dst_stride, (uint8_t *)planes);
        return;
    }
    if (simd_level >= 1 && __builtin_cpu_supports("sse4.1")) {
        hpass_sse41(src, src_stride, nrows, base, c, out_w, flip, dst, dst_stride, (uint8_t *)planes);
        return;
    }
#endif
    hpass_float(src, src_stride, nrows, base, c, out_w, flip, dst, dst_stride, planes, acc);
}

static void span(const coeffs_t *c, int n_out, int *lo, int *hi) {
    *lo = c->bounds[0];
    *hi = c->bounds[0] + c->bounds[1];
    for (int i = 0; i < n_out; i++) {
        if (c->bounds[2 * i] < *lo) *lo = c->bounds[2 * i];
        if (c->bounds[2 * i] + c->bounds[2 * i + 1] > *hi) *hi = c->bounds[2 * i] + c->bounds[2 * i + 1];
    }
}

/* src: rows of RGB pixels, src_stride bytes apart; box (fractional, in src pixels, inside the rows) ->
 * out [out_h][out_w][3], through a uint8 intermediate as Pillow. The pass that shrinks goes first (Pillow
 * always runs the horizontal one first; the order changes results by rounding only), so a downscaled box
 * never runs its costly horizontal taps over rows the vertical pass is about to merge.
 * Returns 0 or -1 (out of memory). */
static int resample(const uint8_t *src, size_t src_stride,
                                                                      double bx0, double by0, double bx1, double by1,
                                                                      int filter, int flip, uint8_t *out, int out_h,
                                                                      int out_w) {
    coeffs_t ch = {0}, cv = {0};
    uint8_t *tmp = NULL;
    float *planes = NULL, *acc = NULL;
    int rc = -1;
    if (precompute(bx0, bx1, out_w, filter, &ch) || precompute(by0, by1, out_h, filter, &cv)) goto done;
    int xlo, xhi, ylo, yhi;
    span(&ch, out_w, &xlo, &xhi);
    span(&cv, out_h, &ylo, &yhi);
    const int in_w = xhi - xlo, wide = ((in_w > out_w ? in_w : out_w) + ch.kpad + 4) * 3;
    planes = (float *)scratch(SCRATCH_PLANES, sizeof(float) * (size_t)wide);
    acc = (float *)scratch(SCRATCH_ACC, sizeof(float) * (size_t)wide);
    if (!planes || !acc) goto done;
    if (yhi - ylo > out_h) { /* vertical first: out_h rows of the box's columns, then horizontal */
        tmp = (uint8_t *)scratch(SCRATCH_TMP, (size_t)out_h * in_w * 3);
        if (!tmp) goto done;
        vpass(src + (size_t)xlo * 3, src_stride, 0, &cv, out_h, in_w * 3, tmp, (size_t)in_w * 3, acc);
        hpass(tmp, (size_t)in_w * 3, out_h, xlo, &ch, out_w, flip, out, (size_t)out_w * 3, planes, acc);
    } else { /* horizontal first over the rows the vertical pass reads, then vertical */
        tmp = (uint8_t *)scratch(SCRATCH_TMP, (size_t)(yhi - ylo) * out_w * 3);
        if (!tmp) goto done;
        hpass(src + (size_t)ylo * src_stride, src_stride, yhi - ylo, 0, &ch, out_w, flip, tmp, (size_t)out_w * 3,
              planes, acc);
        vpass(tmp, (size_t)out_w * 3, ylo, &cv, out_h, out_w * 3, out, (size_t)out_w * 3, acc);
    }
    rc = 0;
done:
    free_coeffs(&ch);
    free_coeffs(&cv);
    return rc;
}

/* -------------------------------------------------------------------------------------------- JPEG */

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char *msg;
    int msg_len;
} error_mgr;

static void on_error(j_common_ptr cinfo) {
    error_mgr *e = (error_mgr *)cinfo->err;
    char buf[JMSG_LENGTH_MAX];
    (*cinfo->err->format_message)(cinfo, buf);
    if (e->msg && e->msg_len > 0) snprintf(e->msg, (size_t)e->msg_len, "%s", buf);
    longjmp(e->jump, 1);
}

/* libjpeg reports truncated or damaged data as a warning and fills what it could not decode with grey; here
 * every warning is an error except the notices about headers that decode correctly (extra bytes between
 * markers, a newer JFIF version, an unknown Adobe transform, a bad ICC chunk), which Pillow passes too */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) {
        int code = cinfo->err->msg_code;
        if (code != JWRN_EXTRANEOUS_DATA && code != JWRN_JFIF_MAJOR && code != JWRN_ADOBE_XFORM &&
            code != JWRN_BOGUS_ICC)
            on_error(cinfo);
        cinfo->err->num_warnings++;
    }
}

enum { FV_OK = 0, FV_ERR_JPEG = -1, FV_ERR_MEMORY = -2, FV_ERR_ARG = -3, FV_ERR_COLOR = -4 };

static void set_msg(char *msg, int msg_len, const char *text) {
    if (msg && msg_len > 0) snprintf(msg, (size_t)msg_len, "%s", text);
}

/* Decode box params = (top, left, h, w, filter, flip) of a JPEG, resample it to [out_h][out_w][3] at out; or,
 * with params NULL, read the header alone and return its width and height in wh. */
static int decode_jpeg(const uint8_t *data, int64_t size, const int32_t *params, uint8_t *out, int32_t out_h,
                       int32_t out_w, int32_t *info, int32_t *wh, char *msg, int32_t msg_len) {
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.msg = msg;
    err.msg_len = msg_len;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return FV_ERR_JPEG;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, (unsigned long)size);
    jpeg_read_header(&cinfo, TRUE);
    if (!params) {
        wh[0] = (int32_t)cinfo.image_width;
        wh[1] = (int32_t)cinfo.image_height;
        jpeg_destroy_decompress(&cinfo);
        return FV_OK;
    }
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        set_msg(msg, msg_len, "CMYK/YCCK JPEG: convert it to RGB first (fastvit convert does)");
        jpeg_destroy_decompress(&cinfo);
        return FV_ERR_COLOR;
    }
    const int W = (int)cinfo.image_width, H = (int)cinfo.image_height;
    const int top = params[0], left = params[1], bh = params[2], bw = params[3];
    if (bh < 1 || bw < 1 || top < 0 || left < 0 || top + bh > H || left + bw > W || out_h < 1 || out_w < 1) {
        set_msg(msg, msg_len, "crop box outside the image");
        jpeg_destroy_decompress(&cinfo);
        return FV_ERR_ARG;
    }
    /* the largest DCT reduction that keeps the box at least as large as the output on both axes */
    int denom = 1;
    while (denom < 8 && bw / (denom * 2) >= out_w && bh / (denom * 2) >= out_h) denom *= 2;
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)denom;
    cinfo.dct_method = JDCT_ISLOW; /* Pillow's and FFCV's default: same pixels as the reference path */
    jpeg_start_decompress(&cinfo);
    /* the box in scaled output coordinates (fractional), and the whole pixels covering it */
    /* scaled pixel k covers source pixels [k * denom, (k + 1) * denom): exactly 1 / denom (the scaled size is
     * rounded up, so output_width / W would stretch the box by up to half a scaled pixel) */
    const double sx = 1.0 / denom, sy = 1.0 / denom;
    double x0 = left * sx, x1 = (left + bw) * sx, y0 = top * sy, y1 = (top + bh) * sy;
    int cx0 = (int)floor(x0), cx1 = (int)ceil(x1), ry0 = (int)floor(y0), ry1 = (int)ceil(y1);
    if (cx1 > (int)cinfo.output_width) cx1 = (int)cinfo.output_width;
    if (ry1 > (int)cinfo.output_height) ry1 = (int)cinfo.output_height;
    /* jpeg_crop_scanline widens the columns to iMCU boundaries, and the first and last decoded columns get
     * their chroma upsampled without a neighbour: ask for one column more on each side, so that the box's own
     * edge columns are decoded exactly as in a full decode */
    int want0 = cx0 > 0 ? cx0 - 1 : 0, want1 = cx1 < (int)cinfo.output_width ? cx1 + 1 : cx1;
    JDIMENSION xoff = (JDIMENSION)want0, cw = (JDIMENSION)(want1 - want0);
    if (cw < cinfo.output_width) jpeg_crop_scanline(&cinfo, &xoff, &cw);
    const size_t stride = (size_t)cinfo.output_width * 3;
    const int rows = ry1 - ry0;
    uint8_t *buf = (uint8_t *)scratch(SCRATCH_DECODE, stride * (size_t)rows);
    if (!buf) {
        set_msg(msg, msg_len, "out of memory");
        jpeg_destroy_decompress(&cinfo);
        return FV_ERR_MEMORY;
    }
    if (ry0 > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)ry0);
    while ((int)cinfo.output_scanline < ry1) {
        JSAMPROW row = buf + (size_t)((int)cinfo.output_scanline - ry0) * stride;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_abort_decompress(&cinfo); /* rows below the box are never decoded */
    jpeg_destroy_decompress(&cinfo);
    const double off = (double)((int)xoff);
    int rc = resample(buf, stride, x0 - off, y0 - ry0, x1 - off, y1 - ry0, params[4], params[5], out,
                      out_h, out_w);
    if (info) {
        info[0] = denom;
        info[1] = rows;
    }
    if (rc) {
        set_msg(msg, msg_len, "out of memory");
        return FV_ERR_MEMORY;
    }
    return FV_OK;
}

/* Header only: width and height. Returns 0 or an error code (message in msg). */
int fv_jpeg_size(const uint8_t *data, int64_t size, int32_t *wh, char *msg, int32_t msg_len) {
    return decode_jpeg(data, size, NULL, NULL, 0, 0, NULL, wh, msg, msg_len);
}

/* Decode box (top, left, h, w) of a JPEG, resample it to [out_h][out_w][3] at out.
 * info (optional, 2 int32): the DCT scale denominator used (1, 2, 4 or 8), the decoded rows. */
int fv_decode_box(const uint8_t *data, int64_t size, const int32_t *params, uint8_t *out, int32_t out_h,
                  int32_t out_w, int32_t *info, char *msg, int32_t msg_len) {
    return decode_jpeg(data, size, params, out, out_h, out_w, info, NULL, msg, msg_len);
}

/* Raw RGB pixels [height][width][3] (FFCV's raw mode): the same box + resample, nothing to decode. */
int fv_resample_box(const uint8_t *pixels, int32_t height, int32_t width, const int32_t *params, uint8_t *out,
                    int32_t out_h, int32_t out_w) {
    const int top = params[0], left = params[1], bh = params[2], bw = params[3];
    if (bh < 1 || bw < 1 || top < 0 || left < 0 || top + bh > height || left + bw > width) return FV_ERR_ARG;
    const size_t stride = (size_t)width * 3;
    return resample(pixels + (size_t)top * stride + (size_t)left * 3, stride, 0.0, 0.0, bw, bh, params[4],
                    params[5], out, out_h, out_w)
               ? FV_ERR_MEMORY
               : FV_OK;
}

/* uint8 [h][w][3] -> normalised [3][h][w] in fp32 (out_kind 1) or bf16 (2): (x - mean) * inv_std in fp32, the
 * arithmetic DeviceNormalize does, then round-to-nearest-even to bf16 as torch's .to(bfloat16). */
__attribute__((target_clones("avx2", "default"))) static void normalize_chw(const uint8_t *restrict src, int h,
                                                                            int w, const double *norm, int out_kind,
                                                                            void *out) {
    const size_t plane = (size_t)h * w;
    for (int c = 0; c < 3; c++) { /* plane by plane: a stride-3 gather the compiler vectorises with shuffles */
        const float m = (float)norm[c], inv = (float)norm[3 + c];
        const uint8_t *restrict s = src + c;
        if (out_kind == 1) {
            float *restrict o = (float *)out + c * plane;
            for (size_t p = 0; p < plane; p++) o[p] = ((float)s[3 * p] - m) * inv;
        } else {
            uint16_t *restrict o = (uint16_t *)out + c * plane;
            for (size_t p = 0; p < plane; p++) {
                float v = ((float)s[3 * p] - m) * inv;
                uint32_t u;
                memcpy(&u, &v, 4);
                o[p] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
            }
        }
    }
}

/* One sample of a batch, everything from its index: the key (seed, *epoch, index) + key_add, the box (train: RRC
 * draws; eval: centre crop), decode or resample. kind: 0 JPEG, 1 raw pixels (height x width x 3).
 * aug: [scale lo, hi, ratio lo, hi, hflip, eval ratio, mean x 255 (3), 1 / (std x 255) (3)].
 * out_kind: 0 uint8 [out_h][out_w][3] (for a copy to a GPU: 4x fewer bytes than fp32), 1 fp32 or 2 bf16
 * normalised [3][out_h][out_w] (when the batch stays on the host: normalised here, in the decoding threads).
 * On failure the sample's index is stored into *error_index (the first failure wins), the slot is zeroed and
 * the code returned: FFCV's batch thread cannot raise (an exception there would leave the consumer waiting
 * forever), so the loaders check error_index after each batch and raise naming the sample.
 * key_add is a multi-view batch's view offset (pipelines.base.view_key: view v's key is the sample's key +
 * v x VIEW_STRIDE, wrapping), 0 for view 0 and single-view batches. */
int fv_sample_view(const uint8_t *data, int64_t size, int32_t kind, int32_t height, int32_t width, int64_t seed,
                   const int64_t *epoch, int64_t index, int32_t train, const double *aug, int32_t filter_mode,
                   int32_t out_kind, void *out, int32_t out_h, int32_t out_w, int64_t *error_index, int64_t key_add) {
    int32_t params[6];
    if (kind == 0 && (height <= 0 || width <= 0)) { /* a file from a folder: its size is in its header */
        int32_t wh[2];
        if (fv_jpeg_size(data, size, wh, NULL, 0) != FV_OK) {
            height = width = 1; /* fails again below, with the slot zeroed and the error recorded */
        } else {
            width = wh[0];
            height = wh[1];
        }
    }
    if (train) {
        /* unsigned: the sum wraps like pipelines.base.view_key's int64 arithmetic, without signed overflow */
        int64_t key = (int64_t)((uint64_t)fv_sample_seed(seed, *epoch, index) + (uint64_t)key_add);
        fv_rrc_params(key, height, width, aug[0], aug[1], aug[2], aug[3], aug[4], filter_mode, params);
    } else {
        fv_center_params(height, width, aug[5], params);
    }
    const size_t n = (size_t)out_h * out_w * 3;
    uint8_t *pixels = out_kind == 0 ? (uint8_t *)out : (uint8_t *)scratch(SCRATCH_PIXELS, n);
    int rc;
    if (!pixels)
        rc = FV_ERR_MEMORY;
    else if (kind == 0)
        rc = fv_decode_box(data, size, params, pixels, out_h, out_w, NULL, NULL, 0);
    else if (size < (int64_t)height * width * 3) /* the file's metadata and its payload disagree */
        rc = FV_ERR_ARG;
    else
        rc = fv_resample_box(data, height, width, params, pixels, out_h, out_w);
    if (rc == FV_OK && out_kind != 0) normalize_chw(pixels, out_h, out_w, aug + 6, out_kind, out);
    if (rc != FV_OK) {
        if (error_index) {
            int64_t none = -1;
            __atomic_compare_exchange_n(error_index, &none, index, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        }
        memset(out, 0, n * (out_kind == 0 ? 1 : out_kind == 1 ? 4 : 2));
    }
    return rc;
}

/* fv_sample_view for view 0: the single-view entry point, kept for callers built against it */
int fv_sample(const uint8_t *data, int64_t size, int32_t kind, int32_t height, int32_t width, int64_t seed,
              const int64_t *epoch, int64_t index, int32_t train, const double *aug, int32_t filter_mode,
              int32_t out_kind, void *out, int32_t out_h, int32_t out_w, int64_t *error_index) {
    return fv_sample_view(data, size, kind, height, width, seed, epoch, index, train, aug, filter_mode, out_kind,
                          out, out_h, out_w, error_index, 0);
}

/* a module so that the build and `import pipelines._cropdecode` locate the library; calls go through ctypes */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cropdecode", "see pipelines/cropdecode.py", -1, NULL};
PyMODINIT_FUNC PyInit__cropdecode(void) { return PyModule_Create(&module); }
