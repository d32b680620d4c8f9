"""comeapi: serve LLM answers from a pre-generated cache, with llama.cpp behind it.

Importing the package is cheap on purpose: the Lambda handler and the CLI import it,
and neither should pay for llama.cpp or the web stack unless it uses them.
"""

from comeapi.errors import ComeapiError

__all__ = ["ComeapiError", "__version__"]
__version__ = "0.1.0"
