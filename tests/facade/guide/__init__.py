"""The guide's code blocks, copied verbatim, runnable against a real control plane.

One module per guide section. Each holds the guide's code unchanged between
``# fmt: off`` / ``# fmt: on`` markers (so the formatter keeps the guide's text), with
imports at the top and what the guide leaves undefined (domain classes, helper methods,
the sample request) in sections marked "filled in". Deviations from the guide's text
carry a ``# deviation:`` comment saying why.

Modules whose guide block ends in top-level usage code (``quick_start_*``,
``step4_performance``) run it when executed: ``tests/facade/test_guide.py`` runs them
with :func:`runpy.run_module` once ``FLEXT_MESH_CONTROL_PLANE`` names a control plane.
"""
