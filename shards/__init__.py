"""The ground floor: sources and their readers, synthetic data, WebDataset shards, the manifest and
storage. Nothing here imports from pipeline/."""
