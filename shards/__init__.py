"""Dataset-building stages: synthetic data, source readers, WebDataset shard writer."""
