"""Transport security, authentication and limits of the control plane (see SECURITY.md)."""
