# sandboxd's change to criu/sk-unix.c (perl -0pi, from build-criu.sh): see build-criu.sh.
# A unix socket bound on an overlay is the same file as its path when the inode numbers agree: the overlay's
# st_dev is the overlay's, the socket's (from sock_diag) is that of the filesystem below it.
s{(\} else if \(\(st\.st_ino != d->vfs_ino\) \|\| )(!phys_stat_dev_match\(st\.st_dev, d->vfs_dev, ns, name\))(\) \{)}
 {$1($2 && !phys_stat_on_overlay(ns, name) /* sandboxd: overlay */)$3};
