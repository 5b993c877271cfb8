"""Tethered and fleet policy serving: an authenticated WebSocket server speaking openpi's protocol.

- ``serve.wire``: msgpack with numpy arrays as openpi's ``msgpack_numpy`` encodes them (never pickle).
- ``serve.server``: `PolicyServer` (``magma-ros serve``), auth, limits, batching, per-arm state.
- ``serve.client``: `RemotePolicy`, the project's client behind the ``infer(obs) -> dict`` contract.
- ``serve.ray_engine``: the engine as a Ray Serve deployment (``magma-ros serve --ray``).

The policy contract itself lives in ``magma_ros.core.policy_api``. See docs/serving.md.
"""
