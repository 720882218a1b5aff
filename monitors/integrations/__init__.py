"""Integrations with training frameworks: :mod:`.lightning` gives
:class:`~.lightning.PrototypeMonitorCallback`, a Lightning callback that drives the attached hub
of :mod:`monitors.attaching` from Lightning's own hooks."""
