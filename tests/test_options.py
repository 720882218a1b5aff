"""The shared option checks and the cadence rule."""
import pytest

from monitors.core.cadence import Every, on_multiple
from monitors.core.options import number_in, one_of, optional_positive_int, positive_int


def test_option_checks_name_owner_option_and_value():
    assert positive_int("M", "n", 3) == 3
    with pytest.raises(ValueError, match=r"M: n must be an integer >= 2, got 1"):
        positive_int("M", "n", 1, minimum=2)
    with pytest.raises(ValueError, match="got True"):
        positive_int("M", "n", True)
    assert optional_positive_int("M", "n", None) is None
    assert number_in("M", "x", 1, 0.0, 2.0) == 1.0
    with pytest.raises(ValueError, match=r"M: x must be a number in \[0.0, 1.0\], got 1.5"):
        number_in("M", "x", 1.5, 0.0, 1.0)
    assert one_of("M", "mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match="M: mode must be one of 'a', 'b', got 'c'"):
        one_of("M", "mode", "c", ("a", "b"))


def test_every_fires_first_then_after_n_steps_and_resumes():
    e = Every(5)
    fired = [s for s in range(0, 23, 2) if e.fire(s)]   # a hook that runs every 2nd step
    assert fired == [0, 6, 12, 18]
    state = e.state_dict()
    e2 = Every(5)
    e2.load_state_dict(state)
    assert not e2.due(22) and e2.fire(23)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        Every(0)


def test_emit_with_clears_the_payload_and_log_train_keeps_scalars():
    import torch
    from monitors import Monitor, MonitorHub, RunContext

    seen = []

    class Boom(Monitor):
        name = "boom"

        def on_save_checkpoint(self, ctx):
            seen.append(ctx.checkpoint)
            raise RuntimeError("x")

    P = torch.zeros(4, 2)
    ctx = RunContext(prototypes=P)
    hub = MonitorHub([Boom()], console=None)
    hub.ctx = ctx
    hub.emit_with("on_save_checkpoint", ctx, checkpoint={"a": 1})
    assert seen == [{"a": 1}] and ctx.checkpoint is None and "boom" in hub.disabled
    hub.log_train(torch.tensor(2.0), {"ploss": torch.tensor([1.0]), "vec": torch.ones(3)}, step=0, lr=0.1,
                  epoch=3, flag=True)
    row = hub._rows[0]
    assert set(row) == {"train/loss", "train/ploss", "train/lr", "train/epoch"}
    assert row["train/epoch"] == 3 and row["train/loss"].shape == ()


def test_on_multiple_is_phase_locked_from_its_start():
    assert [s for s in range(12) if on_multiple(s, 4)] == [0, 4, 8]
    assert [s for s in range(12) if on_multiple(s, 4, start=3)] == [3, 7, 11]
    assert [s for s in range(5) if on_multiple(s, 1, start=2)] == [2, 3, 4]
