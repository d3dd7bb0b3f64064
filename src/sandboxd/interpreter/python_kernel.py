"""The Python kernel: ipykernel started as `python -m ipykernel_launcher` starts it, lighter.

While the kernel starts, two optional packages are kept out:
- debugpy, which ipykernel loads for Jupyter's debug protocol: about 7 MiB of every idle
  code-interpreter sandbox, for messages that no E2B SDK sends (ipykernel then runs without a
  debugger, as it does where debugpy is not installed);
- psutil (~0.8 MiB), which IPython uses to look for a kitty terminal among its ancestors and
  jupyter_client to list the machine's addresses; both have fallbacks (/proc, `ip addr`).
Code run in the kernel may import either afterwards.
"""

from __future__ import annotations

import sys
from pathlib import Path

KEPT_OUT = ("debugpy", "psutil")


def main() -> None:
    # as ipykernel_launcher: the working directory is not on sys.path while the kernel loads
    # (IPython puts it back for the user's code)
    if sys.path and (sys.path[0] == "" or Path(sys.path[0]) == Path.cwd()):
        del sys.path[0]
    for name in KEPT_OUT:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        from ipykernel.kernelapp import IPKernelApp

        app = IPKernelApp.instance()
        app.initialize()
    finally:
        for name in KEPT_OUT:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    app.start()


if __name__ == "__main__":
    main()
