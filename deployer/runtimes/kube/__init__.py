"""Serving on Kubernetes: manifests, the decisions that reconcile them, and the runtime.

``manifests`` and ``decisions`` are pure (no client, no cluster), so every choice the
runtime makes is tested without a cluster; ``runtime`` applies them with the official
``kubernetes`` client (the optional ``kubernetes`` extra).
"""
