"""Proposing trials: the grid enumerated in W&B's order, or Optuna's samplers (random, TPE for
``bayes``) through their ask/tell interface."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

from .spec import grid_points, param_kind, params_key, swept_names


class GridProposer:
    """Every grid point once, in order (the first ``count`` of them, when given)."""

    def __init__(self, cfg: Mapping[str, Any], count: Optional[int]) -> None:
        self.points = grid_points(cfg)[: count if count else None]
        self._i = 0

    def ask(self) -> Optional[dict[str, Any]]:
        if self._i >= len(self.points):
            return None
        self._i += 1
        return self.points[self._i - 1]

    def tell(self, params: Mapping[str, Any], value: Optional[float]) -> None:
        pass


class OptunaProposer:
    """Random (``RandomSampler``) or Bayesian (``TPESampler``) search with Optuna's ask/tell."""

    def __init__(self, cfg: Mapping[str, Any], count: int, seed: int = 0) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        self.names = swept_names(cfg)
        self.dists: dict[str, Any] = {}
        self.choices: dict[str, list[Any]] = {}
        for n in self.names:
            spec = cfg["parameters"][n]
            kind = param_kind(n, spec, cfg["method"])
            if kind == "categorical":  # by index: values may be lists or dicts, which Optuna cannot hold
                self.choices[n] = list(spec["values"])
                self.dists[n] = CategoricalDistribution(list(range(len(spec["values"]))))
            elif kind == "int_uniform":
                self.dists[n] = IntDistribution(int(spec["min"]), int(spec["max"]))
            elif kind == "uniform":
                self.dists[n] = FloatDistribution(float(spec["min"]), float(spec["max"]))
            elif kind == "log_uniform_values":
                self.dists[n] = FloatDistribution(float(spec["min"]), float(spec["max"]), log=True)
            elif kind == "log_uniform":  # W&B: min and max are natural-log exponents
                self.dists[n] = FloatDistribution(math.exp(spec["min"]), math.exp(spec["max"]), log=True)
            elif kind == "q_uniform":
                self.dists[n] = FloatDistribution(float(spec["min"]), float(spec["max"]), step=float(spec["q"]))
        sampler = (optuna.samplers.RandomSampler(seed=seed) if cfg["method"] == "random"
                   else optuna.samplers.TPESampler(seed=seed))
        direction = "minimize" if cfg["metric"]["goal"] == "minimize" else "maximize"
        self.study = optuna.create_study(direction=direction, sampler=sampler)
        self.count = count
        self._asked = 0
        self._open: dict[str, Any] = {}  # json of params -> optuna trial

    def ask(self) -> Optional[dict[str, Any]]:
        if self._asked >= self.count:
            return None
        self._asked += 1
        trial = self.study.ask(self.dists)
        params = {n: (self.choices[n][trial.params[n]] if n in self.choices else trial.params[n]) for n in self.names}
        self._open.setdefault(params_key(params), []).append(trial)
        return params

    def tell(self, params: Mapping[str, Any], value: Optional[float]) -> None:
        import optuna

        trials = self._open.get(params_key(params))
        if not trials:
            return
        trial = trials.pop(0)
        if value is None or not math.isfinite(value):
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, value)


Proposer = Union[GridProposer, OptunaProposer]


def make_proposer(cfg: Mapping[str, Any], count: Optional[int]) -> Proposer:
    """The grid for ``method: grid``, else an Optuna sampler of ``count`` trials."""
    return GridProposer(cfg, count) if cfg["method"] == "grid" else OptunaProposer(cfg, int(count))
