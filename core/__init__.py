"""The ground floor every stage stands on: strict configs, atomic files, the shard format, the
manifest, MLflow tracking and Ray sessions / bounded fan-out. Imports nothing from know3d."""
