"""What sandboxes' network traffic meets on the host, above the plumbing of runtime/network.py: the
policy model (policy.py), the DNS resolver (dns.py) and the egress proxy (egress.py)."""
