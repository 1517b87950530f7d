"""The baselines the benchmarks compare against (what users write today):

- ``naive_step``: the tightest plain Python loop over layers (two matvecs, the norms, an in-place
  ``addr_``), about ten small kernels per layer;
- ``naive_outer_step``: the paper's Algorithm 1 read literally (``G += lam*sigma*outer(u, v)``,
  a full-size temporary), as the opt-in column ``naive-outer`` (``--baselines``);
- ``grouped_step`` (with a ``GroupPlan`` built once): layers grouped by shape and dtype and
  stacked, one ``torch.bmm`` per group and iteration, ``torch._foreach_*`` for the write-back.

They live in the installed package (``spectral_ext/experiments/naive.py``) because ``make demo``
runs the naive loop too; this module is where the benchmarks take them from.  Both are tested
against ``spectral_ext.reference`` in ``tests/test_experiments.py``, and every benchmark case
checks one step against the reference before it is timed (benchmarks/harness.py).
"""

from spectral_ext.experiments.naive import GroupPlan, grouped_step, naive_outer_step, naive_step

__all__ = ["naive_step", "naive_outer_step", "grouped_step", "GroupPlan"]
