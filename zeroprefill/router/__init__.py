"""The prefill-only router gateway: ``zeroprefill router --backend URL ... --model DIR``.

An asyncio (``httptools``) OpenAI-compatible server in front of vLLM or SGLang replicas. The
placement decisions are :class:`zeroprefill.common.router_policy.RouterPolicy`'s; this package
is the thin server around it:

- ``prompts.py``: request bodies -> prompt token ids (the model's fast tokenizer)
- ``http.py``: minimal HTTP/1.1 server and keep-alive client (asyncio protocols, ``httptools``)
- ``backends.py``: replicas, their connection pools, health checks, SGLang path dialect
- ``app.py``: the handlers: parse, place, forward, retry, time out
- ``metrics.py``: Prometheus text at ``/metrics``
- ``cli.py``: the ``zeroprefill router`` subcommand
"""
