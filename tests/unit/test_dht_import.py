"""protocol/dht.py import_dht_only: our processes import hivemind's DHT without its package __init__."""

import subprocess
import sys

CHECK = """
import sys
from moeswarm.protocol.dht import import_dht_only
import_dht_only()
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey
assert "scipy" not in sys.modules and "hivemind.moe" not in sys.modules and "hivemind.averaging" not in sys.modules
import hivemind
assert hivemind.DHT is DHT  # first use of a top-level name runs the real __init__
assert "hivemind.moe" in sys.modules and hivemind.__version__
from hivemind import Optimizer, DecentralizedAverager
import_dht_only()  # a no-op now
print("ok")
"""


def test_dht_imports_without_hiveminds_other_stacks_and_the_rest_loads_on_first_use():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
