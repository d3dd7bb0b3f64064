# sandboxd's change to CRIU's check_user_ns (criu/namespaces.c): see scripts/build-criu.sh. perl -0pi FILE
s{\t\tif \(switch_ns\(pid, &user_ns_desc, NULL\)\)\n\t\t\texit\(1\);\n\n\t\tif \(\(root_ns_mask & CLONE_NEWNET\) && switch_ns\(pid, &net_ns_desc, NULL\)\)\n\t\t\texit\(1\);\n\t\tif \(\(root_ns_mask & CLONE_NEWUTS\) && switch_ns\(pid, &uts_ns_desc, NULL\)\)\n\t\t\texit\(1\);\n\t\tif \(\(root_ns_mask & CLONE_NEWTIME\) && switch_ns\(pid, &time_ns_desc, NULL\)\)\n\t\t\texit\(1\);\n\t\tif \(\(root_ns_mask & CLONE_NEWIPC\) && switch_ns\(pid, &ipc_ns_desc, NULL\)\)\n\t\t\texit\(1\);\n\t\tif \(\(root_ns_mask & CLONE_NEWNS\) && switch_ns\(pid, &mnt_ns_desc, NULL\)\)\n\t\t\texit\(1\);\n}{\t\t/* sandboxd: the namespaces are opened before the user namespace is entered (see build-criu.sh) */
\t\t{
\t\tstruct ns_desc *sbx_nd[] = {&net_ns_desc, &uts_ns_desc, &time_ns_desc, &ipc_ns_desc, &mnt_ns_desc};
\t\tint sbx_fd[5] = {-1, -1, -1, -1, -1};
\t\tfor (int k = 0; k < 5; k++)
\t\t\tif ((root_ns_mask & sbx_nd[k]->cflag) && (sbx_fd[k] = open_proc(pid, "ns/%s", sbx_nd[k]->str)) < 0)
\t\t\t\texit(1);
\t\tif (switch_ns(pid, &user_ns_desc, NULL))
\t\t\texit(1);
\t\tfor (int k = 0; k < 5; k++)
\t\t\tif (sbx_fd[k] >= 0 && switch_ns_by_fd(sbx_fd[k], sbx_nd[k], NULL))
\t\t\t\texit(1);
\t\t}
};
