"""Training pieces that know no particular method: the LightningModule, optimizer and
schedule, hardware and precision, loggers, fault handling, checkpoints and resumable loaders."""
