"""CUDA host functions: a C function the GPU stream calls itself, in order with its kernels.

Captured into a CUDA graph, such a call becomes a host node, so a replayed decode step starts
and awaits the CPU expert kernels without Python. The CUDA driver's cuLaunchHostFunc is called
through ctypes: the driver library is present wherever a CUDA device is, whatever runtime
torch was built with. The functions must not call CUDA themselves (ours do not).
"""
from __future__ import annotations

import ctypes
import functools

import torch


@functools.cache
def _launch_host_func():
    fn = ctypes.CDLL("libcuda.so.1").cuLaunchHostFunc
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def launch_host_func(fn: int, arg: int, stream: torch.cuda.Stream | None = None) -> None:
    """Enqueues fn(arg) (C: void fn(void *)) on `stream` (default: the current stream)."""
    stream = stream if stream is not None else torch.cuda.current_stream()
    rc = _launch_host_func()(stream.cuda_stream, fn, arg)
    if rc != 0:
        raise RuntimeError(f"cuLaunchHostFunc failed: CUDA driver error {rc}")


def call_host_func(fn: int, arg: int) -> None:
    """fn(arg) right away: what the stream would do, for the same code path without CUDA."""
    ctypes.CFUNCTYPE(None, ctypes.c_void_p)(fn)(arg)
