"""The orchestrator: durable workflows with saga compensation (see :mod:`.engine`)."""
