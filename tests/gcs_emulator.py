"""A real GCS protocol server on 127.0.0.1 for the `gs://` tests (tests/test_storage.py, tests/test_storage_vlm.py).

`gcp-storage-emulator` (the `test` extra) serves the GCS JSON API; the libraries are pointed at it by their own
emulator settings: `STORAGE_EMULATOR_HOST` for gcsfs (etils.epath's gs:// backend) and, through
`recogdrive_jax.storage`, `TENSORSTORE_GCS_HTTP_URL` for TensorStore's `gcs` kvstore (Orbax's arrays, the cache).
A test module uses the fixtures with `from gcs_emulator import emulator, gcs  # noqa: F401`.
"""
import os
import socket
import subprocess
import sys
import time

import pytest

BUCKET = "recogdrive-test"
# The emulator as a script. Its media downloads lack the `x-goog-generation` header real GCS sends; TensorStore reads
# an object's generation from it and its OCDBT manifest (Orbax's checkpoint format) is updated by a write conditioned
# on that generation, so without it the second manifest write fails ("Malformed StorageGeneration"). The wrapper
# adds the header (and `x-goog-metageneration`) from the emulator's own object record.
_EMULATOR = """
import sys, time
from gcp_storage_emulator import server as srv
from gcp_storage_emulator.handlers import objects

_download = objects.download

def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if int(response.status) in (200, 206):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])

objects.download = download
for _, methods in srv.HANDLERS:
    for method, fn in list(methods.items()):
        if fn is _download:
            methods[method] = download
server = srv.create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2])
server.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator():
    """`http://127.0.0.1:PORT` of an in-memory GCS emulator with the bucket `BUCKET`, stopped after the module."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _EMULATOR, str(port), BUCKET], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"GCS emulator exited: {proc.stderr.read()}")
                time.sleep(0.2)
        else:
            raise RuntimeError("GCS emulator did not start within 60 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def emulator_env(url: str) -> dict:
    # GOOGLE_AUTH_TOKEN_FOR_TESTING: TensorStore sends it instead of searching for credentials (the emulator
    # accepts any token); the rest is derived from STORAGE_EMULATOR_HOST by recogdrive_jax.storage.
    return {"STORAGE_EMULATOR_HOST": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}


@pytest.fixture
def gcs(emulator, monkeypatch):
    """In-process access to the emulator (same settings a subprocess gets from its environment)."""
    from recogdrive_jax import storage
    for k, v in emulator_env(emulator).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", emulator)
    storage.configure_emulator()
    return emulator


def no_local_gs_dirs(*roots):
    found = []
    for root in roots:
        for dirpath, dirnames, _ in os.walk(root):
            found += [os.path.join(dirpath, d) for d in dirnames if d.startswith("gs:")]
            dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", "__pycache__")]
    assert not found, f"local gs: directories were created: {found}"


def objects(prefix: str) -> list[str]:
    """Object names (without the bucket) under a gs:// prefix, listed fresh."""
    import fsspec
    fs, _ = fsspec.core.url_to_fs(prefix)
    fs.invalidate_cache()
    return sorted(p.split("/", 1)[1] for p in fs.find(prefix))
