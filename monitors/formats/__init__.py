"""The on-disk and remote formats, one owner each: the local records of a run (:mod:`.records`:
layout, writer, readers), the sweep directory (:mod:`.sweep_state`), the sinks that write a
run's values to W&B and to the records (:mod:`.sinks`, the only module that imports wandb), and
reading a checkpoint file of any trainer without running pickle code (:mod:`.checkpoints`)."""
