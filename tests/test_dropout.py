"""The CPU dropout mask (nmt.models.dropout) and the CPU training's reuse of freed memory."""

import ctypes
import ctypes.util
import sys

import pytest
import torch
import torch.nn.functional as F

from nmt.config import ModelConfig
from nmt.devices import keep_freed_memory
from nmt.models import build_model
from nmt.models.dropout import Dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_cpu_mask_drops_the_share_asked_for_and_scales_the_rest(p):
    torch.manual_seed(0)
    out = Dropout(p).train()(torch.ones(400, 500))
    kept = out != 0
    # 200,000 draws: the kept share's standard deviation is at most 0.0012.
    assert abs(kept.float().mean().item() - (1 - p)) < 0.006
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)))


def test_cpu_mask_elements_are_independent():
    """Neighbouring rows and columns agree as often as independent draws do: p² + (1-p)²."""
    p = 0.3
    torch.manual_seed(0)
    kept = Dropout(p).train()(torch.ones(500, 400)) != 0
    independent = p**2 + (1 - p) ** 2
    for a, b in ((kept[1:], kept[:-1]), (kept[:, 1:], kept[:, :-1]), (kept[:, ::2], kept[:, 1::2])):
        assert abs((a == b).float().mean().item() - independent) < 0.01
    shares = kept.float().mean(1)  # (rows,): no row drops much more than another
    assert shares.std().item() < 3 * (p * (1 - p) / 400) ** 0.5


def test_cpu_mask_follows_torch_seed_and_changes_between_calls():
    dropout, x = Dropout(0.2).train(), torch.ones(64, 64)
    torch.manual_seed(5)
    first, second = dropout(x), dropout(x)
    torch.manual_seed(5)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(first, second)


def test_gradient_passes_the_kept_elements_scaled():
    x = torch.randn(30, 40, requires_grad=True)
    out = Dropout(0.25).train()(x)
    out.sum().backward()
    multiplier = out.detach() / x.detach()
    assert torch.allclose(x.grad, multiplier)


def test_identity_in_eval_mode_and_at_zero_probability():
    x = torch.randn(8, 9)
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x


def test_torch_mask_when_asked_for():
    """`cpu_mask = False` is torch's own dropout (`nmt bench`'s plain baseline): the same draws."""
    dropout, x = Dropout(0.4).train(), torch.randn(50, 60)
    dropout.cpu_mask = False
    torch.manual_seed(3)
    ours = dropout(x)
    torch.manual_seed(3)
    assert torch.equal(ours, F.dropout(x, 0.4, True))


def test_every_model_uses_the_dropout_module():
    for arch in ("transformer", "rnn"):
        model = build_model(ModelConfig(arch=arch, embed_dim=16, ff_dim=32, hidden_dim=16, heads=2), 20, 20)
        assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules()), arch
        assert any(isinstance(m, Dropout) for m in model.modules()), arch


def test_a_bad_probability_is_refused():
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


class _MallInfo(ctypes.Structure):  # glibc's struct mallinfo2: the main heap's figures in bytes
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap() -> _MallInfo:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo
    return libc.mallinfo2()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_stays_with_the_process_for_the_next_allocation():
    """64 MiB (above glibc's largest mmap threshold) comes from the heap, not from a mapping of
    its own that free gives back to the kernel, and stays there once freed: the next tensor of
    that size reuses pages already mapped instead of faulting them in afresh. (Whether a free
    trims the heap depends on what lies above the block; here it is not at the top.)"""
    if not keep_freed_memory() or not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"):
        pytest.skip("the C library is not glibc 2.33 or later")
    size = 64 * 2**20
    before = _heap()
    tensor = torch.ones(size // 4)
    held = _heap()
    del tensor
    freed = _heap()
    assert held.hblkhd - before.hblkhd < size  # not a mapping of its own
    assert freed.arena >= held.arena and freed.fordblks >= size  # the heap kept it, free for the next one
