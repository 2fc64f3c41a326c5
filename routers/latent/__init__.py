"""LatentRouter: predict each pool model's quality and cost from the query, pick by utility.

- :mod:`~routers.latent.router`: the model (:class:`LatentRouterModel`), its pool and the decision.
- :mod:`~routers.latent.encoders`: the query encoders (MiniLM text, the probes' backbone, hashing).
- :mod:`~routers.latent.training`: ``switchyard train latent-router``'s loop.
- :mod:`~routers.latent.evaluation`: the λ sweep, the cost–quality frontier, pool shifts.
- :mod:`~routers.latent.cli`: ``train latent-router`` and the LatentRouter side of ``eval`` and
  ``calibrate``.

Nothing is imported here: each module loads torch & co. itself, when it needs them.
"""
