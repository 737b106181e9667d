"""ZeRO-Prefill's vLLM plugin: ``--moe-backend asyncep`` and a prefill-only scheduler.

Entry points (``pyproject.toml``):

- ``vllm.platform_plugins`` -> :func:`vllm_zeroprefill.moe_backend.platform_plugin`: adds
  ``asyncep`` to ``--moe-backend`` before vLLM builds its CLI parser; claims no platform.
- ``vllm.general_plugins`` -> :func:`vllm_zeroprefill.plugin.register`: the FusedMoE method
  hook and the start-up checks, in every vLLM process.

See ``vllm_zeroprefill/README.md`` for the seams and why each is used.
"""
