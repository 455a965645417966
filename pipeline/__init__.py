"""pixelmill: raw images -> Parquet -> Horovod-on-Spark training -> predictions."""
