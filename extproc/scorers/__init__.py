"""What a learned scorer is, to extproc: the :class:`Scorer` interface and its spec, the
declaration of each scorer kind, and finding a kind's loader to describe checkpoints without
torch. Running scorers on requests is :mod:`extproc.scoring`'s job."""
