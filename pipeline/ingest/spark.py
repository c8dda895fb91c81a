"""img2dataset's ``pyspark`` distributor, on a SparkSession that capfilt starts and stops.

img2dataset's pyspark distributor runs every shard as one Spark task on the session active in
the calling thread; when there is none it makes its own, ``local[processes_count]`` with a
16 GB driver. ``download`` runs in a freshly spawned process of capfilt's
(:func:`capfilt.pipeline.ingest.lock.run_download`), where no session exists yet, so capfilt
starts one there before ``download`` and stops it after (:func:`download_on_spark`): on
``--spark-master`` when given, else on Spark's own choice (``spark.master`` in
``$SPARK_CONF_DIR/spark-defaults.conf``, else ``$MASTER``, else ``local[*]``). Every other
Spark setting comes from Spark's configuration (spark-defaults.conf, ``PYSPARK_SUBMIT_ARGS``).

The driver's JVM is a child of that process, so it is in the process group a killed capfilt
takes down; the cluster then ends the application's executors, as for any lost driver.
"""
from __future__ import annotations

import importlib.util
import os
import sys

INSTALL = "pip install 'capfilt[spark]'"


def require_pyspark() -> None:
    """ValueError naming the extra to install when pyspark is missing."""
    if importlib.util.find_spec("pyspark") is None:
        raise ValueError(f"--distributor pyspark needs pyspark, which is not installed: {INSTALL}")


def download_on_spark(download, master: str | None, **kwargs) -> None:
    """``download(**kwargs)`` with a SparkSession on ``master`` (None: Spark's default) active.

    Executors run ``$PYSPARK_PYTHON``; unset, it is set to this interpreter, which has
    img2dataset (Spark's own default, ``python3`` on the PATH, may not)."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(f"capfilt ingest {kwargs.get('output_folder', '')}".strip())
    if master:
        builder = builder.master(master)
    spark = builder.getOrCreate()
    try:
        download(**kwargs)
    finally:
        spark.stop()
