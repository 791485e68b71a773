/* CPU instruction-set detection, run once at import.
 *
 * AMX needs two things: the CPUID bits, and the Linux permission to use the tile-data
 * state (arch_prctl ARCH_REQ_XCOMP_PERM), which must be asked for before the first tile
 * instruction. kt_detect_cpu() does both and reports what is really usable.
 */
#ifndef KT_CPU_FEATURES_H
#define KT_CPU_FEATURES_H

typedef struct {
    int avx2;
    int avx512f;
    int avx512bw;
    int avx512vl;
    int avx512_bf16;
    int avx512_vnni;
    int amx_tile;
    int amx_bf16;
    int amx_int8;
    int amx_permitted; /* the kernel granted the tile-data permission */
} kt_cpu_features;

void kt_detect_cpu(kt_cpu_features *out);

#endif
