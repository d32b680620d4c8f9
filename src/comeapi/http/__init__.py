"""HTTP plumbing shared by the backend and the gateway: errors, bodies, JSON responses."""
