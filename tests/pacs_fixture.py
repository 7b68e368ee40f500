"""A real PACS for the tests: Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``) with its DICOMweb
plugin, started on free loopback ports with a throwaway storage folder and a generated configuration
(authentication on, one test user), waited for, and stopped by its PID at the end. The tests that use it
are skipped, saying why, only when the Orthanc binary is not installed (``.ci/run`` installs it)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
USER, PASSWORD = "medexplain-test", "not-a-secret-3141"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dicomweb_plugin() -> str | None:
    for d in PLUGIN_DIRS:
        p = Path(d)
        if p.is_dir():
            for f in sorted(p.glob("libOrthancDicomWeb.so*")):
                return str(f)
    return None


@dataclass
class OrthancServer:
    """A running Orthanc: ``rest`` (its REST API root), ``dicomweb`` (the DICOMweb root), the test user's
    ``auth`` and ``pid``."""

    rest: str
    dicomweb: str
    auth: tuple
    pid: int

    def get(self, path: str, **kw):
        import requests
        r = requests.get(self.rest + path, auth=self.auth, timeout=30, **kw)
        r.raise_for_status()
        return r

    def upload(self, path) -> dict:
        import requests
        r = requests.post(self.rest + "/instances", data=Path(path).read_bytes(), auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does)")
    plugin = _dicomweb_plugin()
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    root = tmp_path_factory.mktemp("orthanc")
    http, dicom = _free_port(), _free_port()
    config = {"Name": "medexplain-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "HttpPort": http, "DicomPort": dicom, "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
              "RegisteredUsers": {USER: PASSWORD}, "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
              "HttpTimeout": 60, "StableAge": 1, "LogExportedResources": False}
    (root / "orthanc.json").write_text(json.dumps(config))
    log = open(root / "orthanc.log", "w")
    proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = OrthancServer(f"http://127.0.0.1:{http}", f"http://127.0.0.1:{http}/dicom-web", (USER, PASSWORD), proc.pid)
    try:
        import requests
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({proc.returncode}): {(root / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(server.rest + "/system", auth=server.auth, timeout=2).ok:
                    break
            except requests.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer on port {http}: {(root / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)     # by its PID
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
