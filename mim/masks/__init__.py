"""Data-independent masking strategies (registered in mim/masking.py's STRATEGIES).

Each module has `DEFAULTS` (its `config.masking.<name>` section), `scores(rng, ctx, params)`
(B, L) with lower = visible, and `check(params, grid, num_keep)` raising ValueError that names
the full config key. They import nothing from mim.masking, so registering them makes no cycle.
"""


def key(section: str, name: str, params) -> str:
  """'masking.<section>.<name>=<value>', how every check names what is wrong."""
  return f'masking.{section}.{name}={params[name]!r}'
