"""agentcg.client (and its asyncio variant) import with the standard library only."""
from __future__ import annotations

import subprocess
import sys


def test_client_imports_only_the_standard_library():
    code = ("import sys; import agentcg.client, agentcg.client.aio; "
            "third = sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'agentcg'});"
            "print(','.join(m for m in third if not m.startswith('_')))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": __import__("os").path.dirname(__import__("agentcg").__path__[0])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_exit_status_of_a_signal_is_128_plus_n():
    from agentcg.client import exit_status
    assert exit_status(-9) == 137 and exit_status(3) == 3
