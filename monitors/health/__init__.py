"""The doctor: every finding about the prototypes is judged here. :class:`HealthDoctor`
(:mod:`.doctor`) drives groups of checks through one interface: the static checks of the setup
(:mod:`.static_checks`), the checks of each log interval (:mod:`.interval_checks`), the checks of a
foreign trainer's step (:mod:`.trainer_checks`, the ``checks`` monitor) and the checkpoint check
(:mod:`.checkpoint_check`), with the optimizer lookups they share (:mod:`.optimizer_lookup`). A
finding leaves the wing through :meth:`monitors.core.base.Monitor.report`."""
from .doctor import HealthDoctor

__all__ = ["HealthDoctor"]
