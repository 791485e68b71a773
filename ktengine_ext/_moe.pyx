# cython: language_level=3
"""Binding over the C kernels: converts types and releases the GIL; no logic lives here."""

cdef extern from "cpu_features.h":
    ctypedef struct kt_cpu_features:
        int avx2
        int avx512f
        int avx512bw
        int avx512vl
        int avx512_bf16
        int avx512_vnni
        int amx_tile
        int amx_bf16
        int amx_int8
        int amx_permitted
    void kt_detect_cpu(kt_cpu_features *out)


def detect_cpu() -> dict:
    """The instruction sets this CPU and OS let us use (AMX only when the kernel granted it)."""
    cdef kt_cpu_features f
    kt_detect_cpu(&f)
    return {
        "avx2": bool(f.avx2),
        "avx512f": bool(f.avx512f),
        "avx512bw": bool(f.avx512bw),
        "avx512vl": bool(f.avx512vl),
        "avx512_bf16": bool(f.avx512_bf16),
        "avx512_vnni": bool(f.avx512_vnni),
        "amx_tile": bool(f.amx_tile and f.amx_permitted),
        "amx_bf16": bool(f.amx_bf16 and f.amx_permitted),
        "amx_int8": bool(f.amx_int8 and f.amx_permitted),
    }
