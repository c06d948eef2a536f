"""Data layer: interactions (parse, validate, split, CSR), item catalog, WebDataset shards,
the synthetic benchmark generator."""
