"""The Ingress role loads no torch: what its replicas import (the role, both API edges) stays free of it."""

import subprocess
import sys


def test_the_ingress_and_its_edges_import_no_torch():
    code = ("import sys; import cluster.ingress, cluster.http_api, cluster.grpc_api; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
