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
def _driver(name: str, *argtypes):
    """A CUDA driver function (its _v2 symbol where the driver has one), returning CUresult."""
    lib = ctypes.CDLL("libcuda.so.1")
    fn = getattr(lib, name + "_v2", None) or getattr(lib, name)
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed: CUDA driver error {rc}")


def launch_host_func(fn: int, arg: int, stream: torch.cuda.Stream | None = None) -> None:
    """Enqueues fn(arg) (C: void fn(void *)) on `stream` (default: the current stream)."""
    stream = stream if stream is not None else torch.cuda.current_stream()
    launch = _driver("cuLaunchHostFunc", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    _check(launch(stream.cuda_stream, fn, arg), "cuLaunchHostFunc")


def call_host_func(fn: int, arg: int) -> None:
    """fn(arg) right away: what the stream would do, for the same code path without CUDA."""
    ctypes.CFUNCTYPE(None, ctypes.c_void_p)(fn)(arg)


# -- stream memory operations: flags in pinned memory, written and awaited by the stream ------

_WAIT_VALUE_EQ = 0x1


def device_pointer(host_ptr: int) -> int:
    """The device address of pinned host memory (the same under unified addressing)."""
    out = ctypes.c_uint64()
    fn = _driver("cuMemHostGetDevicePointer", ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p,
                 ctypes.c_uint)
    _check(fn(ctypes.byref(out), host_ptr, 0), "cuMemHostGetDevicePointer")
    return out.value


def mapped_tensor(host: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor over pinned host memory (same shape and dtype, no copy): kernels read
    and write it across the bus."""
    if not host.is_pinned() or not host.is_contiguous():
        raise ValueError("mapped_tensor needs a contiguous pinned tensor")
    iface = type("Mapped", (), {"__cuda_array_interface__": {
        "shape": (host.numel() * host.element_size(),), "typestr": "|u1", "version": 3,
        "data": (device_pointer(host.data_ptr()), False)}})()
    return torch.as_tensor(iface, device="cuda").view(host.dtype).view(host.shape)


def stream_write_value32(addr: int, value: int, stream: torch.cuda.Stream | None = None) -> None:
    """The stream writes `value` to the 32-bit word at device address `addr`, in order."""
    stream = stream if stream is not None else torch.cuda.current_stream()
    fn = _driver("cuStreamWriteValue32", ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint)
    _check(fn(stream.cuda_stream, addr, value, 0), "cuStreamWriteValue32")


def stream_wait_value32(addr: int, value: int, stream: torch.cuda.Stream | None = None) -> None:
    """The stream waits until the 32-bit word at device address `addr` equals `value`."""
    stream = stream if stream is not None else torch.cuda.current_stream()
    fn = _driver("cuStreamWaitValue32", ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint)
    _check(fn(stream.cuda_stream, addr, value, _WAIT_VALUE_EQ), "cuStreamWaitValue32")
