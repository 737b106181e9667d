"""``zeroprefill.common``: the engine-agnostic core the plugins, the router and the planner share.

AsyncEP itself (expert sharding, checkpoint reading, weight transports, the streamer, the MoE
layer); what work costs and what hardware gives (model spec, true-FLOPs cost model, hardware
profiles, planner; shipped JSON in ``model_configs/`` and ``profiles/``); and routing (prefix
index, home-replica queue, router policy). Nothing here imports vLLM or SGLang.
"""
