"""model-orchestrator: one GPU, many vLLM models kept as docker-compose profiles."""

__version__ = "0.1.0"
