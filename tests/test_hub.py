"""The hub: cadence, one batched host transfer per interval, failure isolation, findings,
state round trip; and a raising monitor switched off while the real pipeline trains on."""
from __future__ import annotations

import torch
import pytest

from conftest import ROOT, RecordingSink as FakeSink
from monitors import Finding, Monitor, MonitorHub, RunContext, build_monitors
from monitors.core.media import Histogram


class Counter(Monitor):
    name = "counter"

    def __init__(self, every_n_steps=None):
        super().__init__(every_n_steps)
        self.calls: list[int] = []
        self.total = torch.zeros(())

    def on_step_end(self, ctx):
        self.calls.append(ctx.step)
        self.total = self.total + 1
        return {"c/total": self.total, "c/hist": Histogram(torch.arange(4.0))}

    def state_dict(self):
        return {"total": self.total.clone(), "calls": list(self.calls)}

    def load_state_dict(self, state):
        self.total = state["total"].clone()
        self.calls = list(state["calls"])


class Raiser(Monitor):
    name = "raiser"

    def on_after_backward(self, ctx):
        if ctx.step == 2:
            raise RuntimeError("boom")
        return {"r/ok": 1.0}


def _ctx():
    return RunContext(prototypes=torch.randn(4, 3, requires_grad=True))


def test_cadence_buffering_and_flush_at_interval():
    sink, c = FakeSink(), Counter(every_n_steps=2)
    hub = MonitorHub([c], sinks=[sink], log_every=5, console=None)
    ctx = _ctx()
    for s in range(7):
        ctx.step = s
        hub.emit("on_step_end", ctx)
        if s < 4:
            assert sink.rows == []          # nothing leaves the device before the interval
    assert c.calls == [0, 2, 4, 6]
    steps = [s for s, r in sink.rows if "c/total" in r]
    assert steps == [0, 2, 4]                  # flushed at step 4 (the 5th step)
    assert [r["c/total"] for s, r in sink.rows if "c/total" in r] == [1.0, 2.0, 3.0]
    assert all(isinstance(r["c/total"], float) for _, r in sink.rows if "c/total" in r)
    hub.close()
    assert [s for s, r in sink.rows if "c/total" in r] == [0, 2, 4, 6]
    assert sink.summary["health/errors"] == 0 and sink.summary["health/codes"] == []


def test_raising_monitor_is_reported_once_and_switched_off():
    sink, c = FakeSink(), Counter()
    lines: list[str] = []
    hub = MonitorHub([Raiser(), c], sinks=[sink], log_every=2, console=lines.append)
    ctx = _ctx()
    for s in range(6):
        ctx.step = s
        for e in ("on_after_backward", "on_step_end"):
            hub.emit(e, ctx)
    hub.close()
    assert "raiser" in hub.disabled and "boom" in hub.disabled["raiser"]
    failed = [f for f in hub.findings if f.code == "MONITOR_FAILED"]
    assert len(failed) == 1 and failed[0].step == 2 and "raiser" in failed[0].message
    assert len(lines) == 1 and "switched off" in lines[0]
    assert c.calls == list(range(6))           # the others went on
    assert max(s for s, r in sink.rows if "r/ok" in r) == 1


def test_findings_are_deduplicated_and_summarised():
    sink = FakeSink()
    hub = MonitorHub([], sinks=[sink], console=None)
    for step in range(3):
        hub.report(Finding("PROTO_COLLAPSE", "warning", step, "collapsed"))
    hub.report(Finding("PROTO_COLLAPSE", "error", 5, "still collapsed"))
    hub.report(Finding("PROTO_LR_ZERO", "info", 0, "warm-up"))
    hub.flush()
    assert [(f.code, f.severity) for f in hub.findings] == [
        ("PROTO_COLLAPSE", "warning"), ("PROTO_COLLAPSE", "error"), ("PROTO_LR_ZERO", "info")]
    assert sink.summary["health/errors"] == 1 and sink.summary["health/warnings"] == 1
    assert sink.summary["health/codes"] == ["PROTO_COLLAPSE"]


def test_stop_on_error_sets_should_stop():
    hub = MonitorHub([], stop_on_error=True, console=None)
    hub.report(Finding("PROTO_LR_ZERO", "warning", 0, "x"))
    assert not hub.should_stop
    hub.report(Finding("PROTO_NOT_LEAF", "error", 0, "x"))
    assert hub.should_stop


def test_state_round_trip_continues_counters():
    hub = MonitorHub([Counter()], console=None)
    ctx = _ctx()
    for s in range(3):
        ctx.step = s
        hub.emit("on_step_end", ctx)
    hub.report(Finding("PROTO_DUPLICATES", "warning", 1, "dups"))
    state = hub.state_dict()
    new = MonitorHub([Counter()], console=None)
    new.load_state_dict(state)
    assert float(new.get("counter").total) == 3.0 and new.get("counter").calls == [0, 1, 2]
    assert new.codes() == {"PROTO_DUPLICATES"}
    new.report(Finding("PROTO_DUPLICATES", "warning", 9, "again"))   # already known
    assert len(new.findings) == 1


def test_misspelled_hook_and_bad_names_fail_at_registration():
    class Typo(Monitor):
        name = "typo"

        def on_after_backwrd(self, ctx):
            pass

    with pytest.raises(TypeError, match="did you mean 'on_after_backward'|Did you mean 'on_after_backward'"):
        MonitorHub([Typo()])
    with pytest.raises(ValueError, match="unknown monitor 'norm'.*valid monitors: norms"):
        build_monitors(["norm"])
    with pytest.raises(ValueError, match="monitor 'similarity' has no option 'treshold'"):
        build_monitors({"similarity": {"treshold": 0.5}})
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1"):
        Counter(every_n_steps=0)


class PipelineRaiser(Monitor):
    name = "pipeline_raiser"

    def on_step_end(self, ctx):
        if ctx.step >= 1:
            raise ValueError("monitor bug")


def test_raising_monitor_does_not_stop_the_real_pipeline(micro):
    from pipeline.config import load_config
    from pipeline.train import train

    cfg = load_config(ROOT / "experiments/sdpn_tiny.yaml", micro + ["max_steps=4", "eval_at_init=false",
                                                                   "monitors=[norms,deltas,health]"])
    res = train(cfg, extra_monitors=[PipelineRaiser()])
    assert res["step"] == 4 and "eval/eer" in res
    assert any("MONITOR_FAILED" in f and "pipeline_raiser" in f for f in res["findings"])
