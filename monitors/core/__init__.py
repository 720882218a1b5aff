"""The core: what every other wing builds on. The events and the context a loop fills
(:mod:`.events`), the :class:`~.base.Monitor` plugin interface (:mod:`.base`), the hub that runs
the monitors and buffers their values on the device until the log interval (:mod:`.hub`), the
cadences (:mod:`.cadence`), option checks (:mod:`.options`), findings and the table of their codes
(:mod:`.finding`, :mod:`.codes`), the value wrappers monitors return (:mod:`.media`), the
prototype statistics several monitors share in one event (:mod:`.proto_stats`), rank and world
size (:mod:`.distributed`), the registry of monitor names (:mod:`.registry`) and how a
torch.amp.GradScaler is found and read (:mod:`.grad_scaling`). The core imports
no other wing."""
