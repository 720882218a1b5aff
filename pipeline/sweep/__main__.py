"""``python -m pipeline.sweep --trial-root DIR -- COMMAND...``: the per-trial launcher of W&B mode."""
import sys

from .wandb_agent import trial_launcher

if __name__ == "__main__":
    raise SystemExit(trial_launcher(sys.argv[1:]))
