"""The graph step's hand-off kernels (moe/handoff_triton.py) against a dispatcher played by a
Python thread: the inputs it reads must be the GPU's, and collect must wait for its done flag
and add its output. CUDA only (inline PTX); eagerly and inside a CUDA graph."""
from __future__ import annotations

import threading
import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

HIDDEN, TOP_K = 2048, 8


class FakeDispatcher(threading.Thread):
    """Waits for ready == 1 once per answer; each time checks the staged inputs against what
    the test expects, writes the answer as the CPU output (after `pause_s`, so collect must
    really wait), clears ready and sets done. Never leaves the GPU waiting: after a missing
    flag it records the failure and keeps setting done until stop() (from the test, once the
    GPU is through)."""

    def __init__(self, flags, host, expected, answers, pause_s=0.002):
        super().__init__(daemon=True)
        self.flags, self.host, self.expected, self.answers = flags.numpy(), host, expected, answers
        self.pause_s, self.errors, self._quit = pause_s, [], threading.Event()

    def stop(self):
        self._quit.set()
        self.join(30)

    def run(self):
        for i, answer in enumerate(self.answers):
            deadline = time.monotonic() + 20
            while self.flags[0, 0] != 1 and time.monotonic() < deadline:
                pass
            if self.flags[0, 0] != 1:
                self.errors.append(f"round {i}: no ready flag")
                break
            if self.flags[1, 0] != 0:
                self.errors.append(f"round {i}: done not cleared before ready")
            for name, got, want in zip(("x", "ids", "w"), self.host[:3], self.expected[i], strict=True):
                if not torch.equal(got, want):
                    self.errors.append(f"round {i}: staged {name} differs")
            time.sleep(self.pause_s)
            self.host[3].copy_(answer)
            self.flags[0, 0] = 0
            self.flags[1, 0] = 1
        while self.errors and not self._quit.is_set():  # unblock whatever waits
            self.flags[0, 0], self.flags[1, 0] = 0, 1
            time.sleep(1e-4)


def _buffers(rows):
    from ktengine.cuda_host import mapped_tensor

    host = (torch.zeros(rows, HIDDEN, dtype=torch.bfloat16).pin_memory(),
            torch.zeros(rows, TOP_K, dtype=torch.int64).pin_memory(),
            torch.zeros(rows, TOP_K, dtype=torch.float32).pin_memory(),
            torch.zeros(rows, HIDDEN, dtype=torch.bfloat16).pin_memory())
    flags = torch.zeros(2, 16, dtype=torch.int32).pin_memory()  # ready, done: a line each
    mflags = mapped_tensor(flags)
    return host, tuple(mapped_tensor(t) for t in host), flags, (mflags[0, :1], mflags[1, :1])


def _inputs(rows, gen):
    return (torch.randn(rows, HIDDEN, generator=gen).bfloat16(),
            torch.randint(0, 128, (rows, TOP_K), generator=gen),
            torch.rand(rows, TOP_K, generator=gen))


@pytest.mark.parametrize("rows,num_rounds,pause_s", [
    (1, 4, 0.002), (3, 4, 0.002), (64, 4, 0.002),  # one program, and several (the last signals)
    (1, 300, 0.0), (64, 100, 0.0),  # a dispatcher that answers at once: done = 0 must land first
])
@pytest.mark.parametrize("unreduced", [False, True], ids=["summed", "per_pair_rows"])
def test_hand_off_and_collect_eagerly(rows, num_rounds, pause_s, unreduced):
    from ktengine.moe.handoff_triton import collect, hand_off

    gen = torch.Generator().manual_seed(rows)
    host, mapped, flags, mflags = _buffers(rows)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    rounds = [_inputs(rows, gen) for _ in range(num_rounds)]
    answers = [torch.randn(rows, HIDDEN, generator=gen).bfloat16() for _ in rounds]
    shape = (rows, TOP_K, HIDDEN) if unreduced else (rows, HIDDEN)  # fp32 per-pair rows, or bf16
    gpu_outs = [torch.randn(*shape, generator=gen).to(torch.float32 if unreduced else torch.bfloat16).cuda()
                for _ in rounds]
    rounds_gpu = [tuple(t.cuda() for t in inputs) for inputs in rounds]
    cpu = FakeDispatcher(flags, host, rounds, answers, pause_s)
    cpu.start()
    outs = []
    for inputs, gpu_out in zip(rounds_gpu, gpu_outs, strict=True):
        hand_off(inputs, mapped[:3], mflags[0], mflags[1], counter)
        outs.append(collect(gpu_out, mapped[3], mflags[1]))
    torch.cuda.synchronize()
    cpu.stop()
    assert not cpu.errors
    assert int(counter.item()) == 0
    for out, gpu_out, answer in zip(outs, gpu_outs, answers, strict=True):
        gpu_out = gpu_out.cpu()
        if unreduced:  # the rows summed in order in fp32, the CPU's output added, rounded once
            acc = gpu_out[:, 0]
            for j in range(1, TOP_K):
                acc = acc + gpu_out[:, j]
            want = (acc + answer.float()).bfloat16()
        else:
            want = gpu_out + answer  # the same rounding as torch's add
        assert out.dtype == torch.bfloat16 and torch.equal(out.cpu(), want)


def test_hand_off_and_collect_replayed_in_a_cuda_graph():
    from ktengine.moe.handoff_triton import collect, hand_off

    rows, gen = 8, torch.Generator().manual_seed(0)
    host, mapped, flags, mflags = _buffers(rows)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    static_in = tuple(t.cuda() for t in _inputs(rows, gen))
    static_gpu = torch.zeros(rows, HIDDEN, dtype=torch.bfloat16, device="cuda")

    def step():
        hand_off(static_in, mapped[:3], mflags[0], mflags[1], counter)
        return collect(static_gpu * 2, mapped[3], mflags[1])

    warm = FakeDispatcher(flags, host, [tuple(t.cpu() for t in static_in)], [host[3].clone()])
    warm.start()
    step()  # compiles the kernels
    torch.cuda.synchronize()
    warm.stop()
    assert not warm.errors
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()  # captured only: nothing runs, no flag is written
    torch.cuda.synchronize()
    assert flags[0, 0] == 0

    rounds = [_inputs(rows, gen) for _ in range(5)]
    answers = [torch.randn(rows, HIDDEN, generator=gen).bfloat16() for _ in rounds]
    gpu_ins = [torch.randn(rows, HIDDEN, generator=gen).bfloat16() for _ in rounds]
    cpu = FakeDispatcher(flags, host, rounds, answers)
    cpu.start()
    for inputs, gpu_in, answer in zip(rounds, gpu_ins, answers, strict=True):
        for s, t in zip(static_in, inputs, strict=True):
            s.copy_(t)
        static_gpu.copy_(gpu_in)
        graph.replay()
        got = out.cpu()
        assert cpu.errors or torch.equal(got, gpu_in * 2 + answer)
    cpu.stop()
    assert not cpu.errors
