"""Read local lakes with Spark (local mode) and print what the tests check, as one JSON line: each
lake's path -> what Spark saw there. One process for every lake: a JVM costs ~20 s of CPU to start.

Run as its own process by tests/test_refresh.py: a JVM started inside the test process, beside
that process's Ray driver, was followed each time by the driver losing its GCS subscription
(an actor never reported alive, or a fatal check in Ray's subscriber), so Spark stays out of it.

    python tests/spark_read_lake.py LAKE_PATH [LAKE_PATH ...]
"""
from __future__ import annotations

import json
import sys

from pyspark.sql import SparkSession


def describe(spark: SparkSession, lake: str) -> dict:
    labels, features = spark.read.parquet(f"{lake}/labels"), spark.read.parquet(f"{lake}/features")
    joined = labels.join(features.drop("shard", "write_id"), "key")
    manifest = spark.read.parquet(f"{lake}/manifest/manifest.parquet")
    return {
        "label_types": {f.name: f.dataType.simpleString() for f in labels.schema.fields},
        "feature_types": {f.name: f.dataType.simpleString() for f in features.schema.fields},
        "joined_rows": joined.count(),
        "joined_keys": joined.select("key").distinct().count(),
        "joined_shards": joined.select("shard").distinct().count(),
        "manifest_columns": sorted(f.name for f in manifest.schema.fields),
    }


def main() -> None:
    spark = (SparkSession.builder.master("local[1]").appName("rayclust-lake-contract")
             .config("spark.ui.enabled", "false").config("spark.sql.session.timeZone", "UTC")
             .getOrCreate())
    try:
        print(json.dumps({lake: describe(spark, lake) for lake in sys.argv[1:]}))
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
