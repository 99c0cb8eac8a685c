"""Offline batch generation: ``aigc batch --input rows.jsonl|.parquet --output out.jsonl``.

``rows.py`` reads the input (fsspec URLs) and the output written so far (resume); ``generate.py`` runs rows through
the continuous-batching scheduler in one process; ``ray_backend.py`` spreads them over Ray actors (Ray Data
``map_batches``, one model per actor); ``runner.py`` ties them together and appends results as they finish.
"""

from aigckit.batch.runner import BatchArgs, run_batch  # noqa: F401
