"""Test session setup: 8 simulated CPU devices, so sharding is exercised everywhere."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain's mp_prefetch reads absl flags
