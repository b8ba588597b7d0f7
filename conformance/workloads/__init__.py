"""Whole-model workloads: tiny whole models through a subject's own model management and sampler, run in
sequences of model families (``sequences``), with third-party patches (``patches``), watched by the block suite's
probes step by step (``base``), with the process state around them snapshotted (``state``)."""
