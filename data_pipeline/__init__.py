"""Data layer: MMSA pickles and synthetic data -> Parquet -> tensors with seeded missing masks."""
