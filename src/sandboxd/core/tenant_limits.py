"""What one sandbox may cost the server: the per-sandbox caps on server-side work, in one place.

The envd layer (processes, streams, watches, requests) enforces them; `sandboxd serve` sets them from
its flags (`--max-…`). Every refusal is a Connect `resource_exhausted` (HTTP 429 outside Connect) whose
message names the limit and the flag that changes it. One sandbox at its caps does not slow or refuse
another sandbox's requests: every counter is per sandbox.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TenantLimits:
    # Output of a process that no stream is attached to is kept, up to this many bytes, for the next
    # `Connect`; once it is full the server stops reading the process's pipes, so the process blocks on
    # a full pipe as it would in a shell, and costs the server nothing. Reading resumes on `Connect`.
    output_buffer_bytes: int = 1024 * 1024
    # Queued output events per attached stream before the server stops reading the process (~2 MiB at
    # 32 KiB per event). The slowest attached stream sets the pace.
    stream_queue_events: int = 64
    # A stream whose queue stays full this long while other streams of the same process wait for it is
    # dropped (`resource_exhausted`), so one stalled client cannot hold back the others. A process with
    # a single stalled stream simply blocks, as it would on a full pipe.
    stalled_stream_seconds: float = 30.0
    # Open process streams (Start and Connect) per sandbox.
    process_streams: int = 128
    # Watchers per sandbox: WatchDir streams plus CreateWatcher watchers.
    watchers: int = 64
    # Directories watched per sandbox, over all its watchers (a recursive watch adds one per directory).
    watched_dirs: int = 8192
    # envd requests in flight per sandbox, other than process streams and WatchDir (capped above).
    concurrent_requests: int = 64
    # Processes per sandbox that outlive the server process (envd/kept.py): each keeps up to
    # output_buffer_bytes of its output on the host's disk. Past that, commands end with the server;
    # 0 keeps none (and saves the ~1-2 ms a keeper adds to a command's round trip).
    kept_processes: int = 64
