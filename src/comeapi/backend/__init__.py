"""The inference backend: one process running llama.cpp behind ComeAPI's and OpenAI's APIs."""
