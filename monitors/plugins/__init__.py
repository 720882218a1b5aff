"""The metric monitors: one plugin per view of the prototypes, each a :class:`~monitors.core.base.Monitor`
that turns the prototypes (and their gradient, update and the projections) into ``proto/*``
metrics: row norms (:mod:`.norms`), gradients (:mod:`.gradients`), per-step updates and drift
(:mod:`.deltas`), usage of the assignments (:mod:`.usage`), pairwise similarity (:mod:`.similarity`)
and the norm and update heatmaps over time (:mod:`.evolution`). They judge nothing: the findings
are the health wing's."""
