"""Integrations with federated-learning frameworks (optional extras, imported on use)."""
