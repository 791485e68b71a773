"""The expert distribution recorder on its own: exact totals, restarts during a pass, dump errors."""
from __future__ import annotations

import threading

import pytest
import torch
from test_loader import BASE

from ktengine.config import ModelConfig
from ktengine.errors import KtengineError
from ktengine.moe.recorder import ExpertDistributionRecorder

CONFIG = ModelConfig.from_hf({**BASE, "num_experts": 8})  # 2 MoE layers, 8 experts, top-2


def _pass(rec: ExpertDistributionRecorder, ids: list[torch.Tensor]) -> None:
    rec.begin_pass(torch.zeros(ids[0].shape[0], dtype=torch.long))
    for layer, topk in enumerate(ids):
        rec.observe(layer, topk)
    rec.end_pass()


def test_stat_approx_counts_every_pass_in_full_and_decode_exactly():
    gen = torch.Generator().manual_seed(0)
    exact, approx = (ExpertDistributionRecorder(CONFIG, m) for m in ("stat", "stat_approx"))
    for rec in (exact, approx):
        rec.start()
    for tokens in (1, 1, 3, 11, 1, 8, 1):
        ids = [torch.randint(0, 8, (tokens, 2), generator=gen) for _ in range(2)]
        for rec in (exact, approx):
            _pass(rec, ids)
    e, a = exact._snapshot()["logical_count"][0], approx._snapshot()["logical_count"][0]
    layers = CONFIG.moe_layer_ids
    assert e[layers].sum(dim=1).tolist() == a[layers].sum(dim=1).tolist() == [26 * 2] * 2
    # a decode pass (1 token) is counted as it is
    one = ExpertDistributionRecorder(CONFIG, "stat_approx")
    one.start()
    _pass(one, [torch.tensor([[3, 5]]), torch.tensor([[0, 7]])])
    counts = one._snapshot()["logical_count"][0]
    assert counts[layers[0]].tolist() == [0, 0, 0, 1, 0, 1, 0, 0]


def test_a_restart_during_a_pass_neither_fails_nor_counts_it():
    rec = ExpertDistributionRecorder(CONFIG, "per_token")
    rec.start()
    rec.begin_pass(torch.zeros(2, dtype=torch.long))
    rec.observe(0, torch.tensor([[1, 2], [3, 4]]))
    rec.start()  # from the event loop, while the model thread is inside the pass
    rec.observe(1, torch.tensor([[1, 2], [3, 4]]))
    rec.end_pass()
    data = rec._snapshot()
    assert data["logical_count"].shape[0] == 0 and data["input_ids"] == []
    _pass(rec, [torch.tensor([[1, 2]]), torch.tensor([[5, 6]])])
    assert int(rec._snapshot()["logical_count"].sum()) == 4

    # many restarts racing real passes
    stop = threading.Event()
    errors: list[BaseException] = []

    def feed():
        try:
            while not stop.is_set():
                _pass(rec, [torch.tensor([[1, 2]]), torch.tensor([[5, 6]])])
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    thread = threading.Thread(target=feed)
    thread.start()
    for _ in range(2000):
        rec.start()
    stop.set()
    thread.join()
    assert not errors


def test_dump_to_an_unwritable_place_is_a_clear_error(tmp_path):
    rec = ExpertDistributionRecorder(CONFIG, "stat")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(KtengineError, match="cannot write"):
        rec.dump(tmp_path / "afile")
