"""Balancing and traffic-policy picks: pure functions and small objects, shared by the
registry (server side) and the sidecar's client; imports neither."""
