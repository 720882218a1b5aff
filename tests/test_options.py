"""The shared option checks and the cadence rule."""
import pytest

from monitors.cadence import Every
from monitors.options import number_in, one_of, optional_positive_int, positive_int


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
