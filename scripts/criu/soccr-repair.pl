# sandboxd's change to soccr/soccr.c (perl -0pi, from build-criu.sh): see build-criu.sh.
# Where setting TCP_REPAIR is refused (EPERM), libsoccr_set_repair (if CRIU set it) does it for the caller.
s{(static int tcp_repair_on\(int fd\)\n\{\n\tint ret, aux = 1;\n\n\tret = setsockopt\(fd, SOL_TCP, TCP_REPAIR, &aux, sizeof\(aux\)\);\n)}
 {int (*libsoccr_set_repair)(int fd, int on); /* sandboxd: TCP repair through CRIU's usernsd */\n\n$1\tif (ret < 0 && errno == EPERM && libsoccr_set_repair)\n\t\tret = libsoccr_set_repair(fd, 1);\n};
s{(static int tcp_repair_off\(int fd\)\n\{\n\tint aux = 0, ret;\n\n\tret = setsockopt\(fd, SOL_TCP, TCP_REPAIR, &aux, sizeof\(aux\)\);\n)}
 {$1\tif (ret < 0 && errno == EPERM && libsoccr_set_repair)\n\t\tret = libsoccr_set_repair(fd, 0);\n};
