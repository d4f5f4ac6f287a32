"""The service registry: leases, active health, outlier ejection, discovery, watch.

Import from the modules (:mod:`.registry`, :mod:`.validation`, ...): this package
imports nothing, so reading a validation rule does not load the store.
"""
