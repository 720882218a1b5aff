"""End to end through real W&B: a run of a bug reproduction with the default monitors, read back
from its offline .wandb log with `wandb leet inspect --json`."""
from __future__ import annotations

from conftest import ROOT, history_keys, wandb_records, wandb_summary
from pipeline.config import load_config
from pipeline.train import train


def test_monitors_reach_wandb(micro):
    overrides = [o for o in micro if not o.startswith(("monitors=", "epochs="))] + [
        "epochs=10", "max_steps=12", "ckpt_every=6",
        "monitors={norms: {hist_every: 4}, gradients: {}, deltas: {}, usage: {}, similarity: {every_n_steps: 2},"
        " tsne: {frame_every: 4}, evolution: {every_n_steps: 2, image_every: 4, min_render_seconds: 0}, health: {}}",
    ]
    cfg = load_config(ROOT / "experiments/bugs/proto_not_in_optimizer.yaml", overrides)
    res = train(cfg)
    records = wandb_records(res["wandb_run_dir"])
    keys = history_keys(records)
    for prefix in ("proto/norm/", "proto/grad/", "proto/delta/", "proto/usage/", "proto/similarity/",
                   "train/", "eval/", "perf/", "health/"):
        assert any(k.startswith(prefix) for k in keys), (prefix, sorted(keys))
    assert "proto/norm/hist._type" in keys                       # a histogram
    assert "proto/tsne._type" in keys                            # the t-SNE image ...
    assert "proto/tsne_table._type" in keys                      # ... and its table
    images = [r for r in records if r.get("type") == "history"
              and r["history"]["item"].get("proto/tsne._type") == "image-file"]
    assert images
    files = {f["path"] for r in records if r.get("type") == "files" for f in r["files"]["files"]}
    assert any(p.startswith("media/images/proto/tsne") for p in files)
    assert any(p.startswith("media/table/proto/tsne_table") for p in files)
    # every panel on the shared step axis
    metrics = [r["metric"] for r in records if r.get("type") == "metric"]
    assert any(m.get("glob_name") == "*" and m.get("step_metric") == "trainer/step" for m in metrics)

    summary = wandb_summary(res["wandb_run_dir"])
    assert summary["health/errors"] >= 1
    assert "PROTO_NOT_IN_OPTIMIZER" in summary["health/codes"]
    assert "PROTO_NOT_UPDATING" in summary["health/codes"]
    assert summary["health/codes"] == sorted(summary["health/codes"])
    assert "add_param_group" in summary["health/finding/PROTO_NOT_IN_OPTIMIZER"]
