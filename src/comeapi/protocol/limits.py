"""The request limits every tier applies unless told otherwise: the one place their defaults
are written. ``comeapi.settings`` takes them as its defaults (``max_body_bytes``,
``max_tokens_limit``), the Lambda function's config as its own (``serverless.config``).

Standard library only: the Lambda handler imports this at cold start.
"""

from __future__ import annotations

MAX_BODY_BYTES = 256 * 1024  # a request body over this is 413 (nginx: NGINX_MAX_BODY, 256k)
MAX_TOKENS_LIMIT = 2048  # the largest max_tokens a request may ask for (400 above)
