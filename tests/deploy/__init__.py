"""Checks of what tiermem ships for deployment: Dockerfile, kustomize, Helm, KEDA."""
