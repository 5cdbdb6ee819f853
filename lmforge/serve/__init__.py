"""Serving: an OpenAI-compatible HTTP API on the inference engine (`lmforge serve`)."""
