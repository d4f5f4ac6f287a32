"""Call metrics: ingest, bucketed sketches, reports, alerts, feedback to the registry
(see :mod:`.service` and :mod:`.aggregator`)."""
