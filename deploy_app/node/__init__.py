"""The CT-FM DICOM node: ``python -m deploy_app serve`` listens on an AE title, keeps every received study in a spool
and a durable SQLite job queue, runs each complete study through the deploy app (``python -m deploy_app -i -o``, the
MAP's own entry) and delivers the results to the PACS through the engine's outbox; ``python -m deploy_app status``
reports the queue.

    receiver (pynetdicom SCP) -> spool + queue (SQLite WAL) -> scheduler (quiet period) -> workers (deploy app)
                                                                                      -> delivery (outbox -> PACS)

Nothing here imports the MONAI Deploy SDK or Holoscan: the node process stays small and each study runs in a child
process of its own, which the node can lose (kill -9) or kill without losing the study.
"""
