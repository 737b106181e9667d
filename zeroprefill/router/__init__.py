"""The prefill-only router gateway: ``zeroprefill router --backend URL ... --model DIR``.

An asyncio (aiohttp) OpenAI-compatible server in front of vLLM or SGLang replicas. The
placement decisions are :class:`zeroprefill.common.router_policy.RouterPolicy`'s; this package
is the thin server around it:

- ``prompts.py``: request bodies -> prompt token ids (the model's fast tokenizer)
- ``backends.py``: replicas, the keep-alive client pool, health checks, SGLang path dialect
- ``app.py``: the aiohttp handlers: parse, place, forward, retry, time out
- ``metrics.py``: Prometheus text at ``/metrics``
- ``cli.py``: the ``zeroprefill router`` subcommand
"""
