# sandboxd's change to criu/mount.c (perl -0pi, from build-criu.sh): phys_stat_on_overlay(ns, path), whether
# the path is on an overlay mount of the namespace (see unix-on-overlay.pl).
s{(bool phys_stat_dev_match\(dev_t st_dev, dev_t phys_dev, struct ns_id \*ns, const char \*path\)\n\{\n.*?\n\}\n)}
 {$1\n/* sandboxd: on an overlay (see build-criu.sh) */\nbool phys_stat_on_overlay(struct ns_id *ns, const char *path)\n{\n\tstruct mount_info *m = mount_resolve_path(ns->mnt.mntinfo_tree, path);\n\n\treturn m && m->fstype && m->fstype->name && !strcmp(m->fstype->name, "overlay");\n}\n}s;
