"""The Python kernel: ipykernel started as `python -m ipykernel_launcher` starts it, without its debugger.

ipykernel loads debugpy when a kernel starts, for Jupyter's debug protocol: about 7 MiB of every idle
code-interpreter sandbox, for messages that no E2B SDK sends. It is kept out while the kernel starts
(ipykernel then runs without a debugger, as it does where debugpy is not installed); code run in the
kernel may still import debugpy afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    # as ipykernel_launcher: the working directory is not on sys.path while the kernel loads
    # (IPython puts it back for the user's code)
    if sys.path and (sys.path[0] == "" or Path(sys.path[0]) == Path.cwd()):
        del sys.path[0]
    sys.modules["debugpy"] = None  # type: ignore[assignment]  # `import debugpy` raises ImportError
    try:
        from ipykernel.kernelapp import IPKernelApp

        app = IPKernelApp.instance()
        app.initialize()
    finally:
        del sys.modules["debugpy"]
    app.start()


if __name__ == "__main__":
    main()
