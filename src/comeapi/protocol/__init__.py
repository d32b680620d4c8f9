"""Wire formats shared by every server in comeapi: request parsing and response bodies.

No I/O here; the backend, the gateway and the Lambda handler all speak through it.
"""
