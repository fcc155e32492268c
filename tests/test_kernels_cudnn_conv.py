"""kernels/cudnn_conv.py without a GPU: which calls it takes, and the plan choice kept in the decision cache (its
convolutions against the float one and the Triton kernel are GPU tests in test_kernels_triton.py)."""

from __future__ import annotations

import pytest
import torch

from dmquant.kernels import cudnn_conv, decision_cache


class RankedPlans:
    """The part of a cuDNN graph the plan choice uses: ``count`` ranked plans, some that do not build."""

    def __init__(self, count: int, refused: frozenset[int] = frozenset()) -> None:
        self.count, self.refused, self.built = count, refused, []

    def get_execution_plan_count(self) -> int:
        return self.count

    def build_plan_at_index(self, index: int) -> None:
        if index in self.refused:
            raise RuntimeError("this plan no longer builds")
        self.built.append(index)

    def get_workspace_size_plan_at_index(self, index: int) -> int:
        return 16


@pytest.fixture
def autotuned(tmp_path, monkeypatch):
    """The decision cache in ``tmp_path``, and the shapes autotuned (each choosing plan 3)."""
    monkeypatch.setenv(decision_cache.CACHE_VARIABLE, str(tmp_path))
    tuned = []

    def fastest(graph, pack, handle, device):
        tuned.append(graph)
        return 3, torch.empty(0)

    monkeypatch.setattr(cudnn_conv, "_fastest_plan", fastest)
    return tuned


def _choose(graph: RankedPlans, key: str = "shape") -> int:
    return cudnn_conv._chosen_plan(graph, dict, None, torch.device("cpu"), key)[0]


def test_a_shape_is_autotuned_once_and_its_plan_built_alone_after(autotuned, tmp_path):
    first = RankedPlans(8)
    assert _choose(first) == 3 and autotuned == [first]
    assert (tmp_path / cudnn_conv.PLAN_FILE).exists()
    later = RankedPlans(8)  # another process: the cache answers
    assert _choose(later) == 3 and autotuned == [first] and later.built == [3]
    assert _choose(RankedPlans(8), key="another shape") == 3 and len(autotuned) == 2


@pytest.mark.parametrize("graph", [RankedPlans(8, frozenset({3})), RankedPlans(2)], ids=["refused", "unranked"])
def test_a_cached_plan_that_does_not_build_is_autotuned_again(autotuned, graph):
    _choose(RankedPlans(8))
    assert _choose(graph) == 3 and autotuned[-1] is graph


def test_the_kernel_takes_hopper_cuda_calls_without_groups():
    assert not cudnn_conv.takes(torch.zeros(1, 4, 8, 8), groups=1)  # CPU
    assert cudnn_conv.output_size(64, 3, 2, 1, 1) == 32 and cudnn_conv.output_size(64, 3, 1, 1, 1) == 64
