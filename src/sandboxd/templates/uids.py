"""The template uid range: sandbox uid/gid 0..UID_RANGE-1 are host uid/gid UID_SHIFT..UID_SHIFT+UID_RANGE-1
in templates' files (a sandbox maps them to its own range through an idmapped mount)."""

UID_SHIFT = 100000
UID_RANGE = 65536
