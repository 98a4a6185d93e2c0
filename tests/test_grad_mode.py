"""lookahead_ext.optim._grad_mode.no_grad: the optimizers' cheap torch.no_grad()."""
import pytest
import torch

from lookahead_ext.optim._grad_mode import no_grad


@pytest.mark.parametrize("outer", [True, False])
def test_no_grad_turns_grad_off_and_restores_the_previous_mode(outer):
    x = torch.ones(3, requires_grad=True)
    with torch.set_grad_enabled(outer):
        with no_grad():
            assert not torch.is_grad_enabled()
            assert not (x * 2).requires_grad
            with no_grad():  # nested
                assert not torch.is_grad_enabled()
            assert not torch.is_grad_enabled()
        assert torch.is_grad_enabled() is outer
        assert (x * 2).requires_grad is outer


def test_no_grad_restores_on_exception():
    with torch.enable_grad():
        with pytest.raises(KeyError):
            with no_grad():
                raise KeyError("x")
        assert torch.is_grad_enabled()
