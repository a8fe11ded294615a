"""ULIP (Point-BERT) and Uni3D architectures, key-compatible with the official checkpoints."""
