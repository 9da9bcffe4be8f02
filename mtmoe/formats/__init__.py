"""What mtmoe writes to disk and reads back, owned in one place below train/ and export/:
the DeepSpeed checkpoint format of a run (`ds_checkpoint`, sealed by `integrity`, resharded by
`reshard` through the layout-free optimizer state of `optimizer_state`), the run's model
description (`run_description`), and the standalone export format (`export_format`)."""
