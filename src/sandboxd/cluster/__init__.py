"""The cluster layer: servers that share their state in PostgreSQL are nodes of one cluster (membership.py: leases,
lost nodes, their return). Above core; the state interface is state/'s."""

CLUSTER_HEADER = b"x-sandboxd-cluster"  # the cluster's token (--cluster-token), from an API replica to a node
LEASE_SECONDS = 6.0  # a node's lease (serve --lease), by default: silent this long, it is declared lost
BEAT_SECONDS = 2.0  # how often it renews it (serve --heartbeat)
