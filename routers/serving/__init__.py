"""Serving learned scorers: the in-process runtime and the remote scorer service.

- :mod:`~routers.serving.batcher`: the micro-batcher (one padded forward on a worker thread).
- :mod:`~routers.serving.prefill`: one loaded backbone and one prefill per request, shared
  by every scorer on it.
- :mod:`~routers.serving.probe_scorer`, :mod:`~routers.serving.latent_scorer`: the
  ``probe`` and ``latent_router`` scorers (:class:`extproc.Scorer`).
- :mod:`~routers.serving.images`: ``image_url`` parts decoded (and fetched, from allowed
  hosts only) under the policy's limits.
- :mod:`~routers.serving.loaders`: the ``switchyard.scorers`` entry points.
- :mod:`~routers.serving.remote_server`: the remote scorer service;
  :mod:`~routers.serving.cli`: its command, ``switchyard scorer serve``.

Nothing is imported here, so ``import routers.serving.loaders`` stays torch-free.
"""
