"""The code interpreter that runs inside a sandbox: an HTTP server on the sandbox's port 49999 speaking
the e2b-code-interpreter API, over Jupyter kernels (jupyter_client + ipykernel, bash_kernel, Deno).

This package is bind-mounted read-only into sandboxes of templates that have it as their service
(`/opt/sandboxd/code/sandboxd_interpreter`) and runs with the template's Python: it must import
nothing from the rest of sandboxd.
"""
