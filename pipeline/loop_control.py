"""What the training loop hears and shows: :class:`StopSignal` (SIGINT/SIGTERM as a flag read at
the end of each step) and :class:`Progress` (the tqdm bar)."""
from __future__ import annotations

import signal
import sys
from typing import Any, Optional


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop reads at the end of each step."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nsignal {signum}: writing a checkpoint, then exiting", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Progress:
    """A tqdm bar showing the loss (read at log intervals only: no per-step sync) and steps/s."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._shown = None

    def update(self, step: int, values: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        loss = values.get("train/loss")
        if loss is not None and loss != self._shown:
            self._shown = loss
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
