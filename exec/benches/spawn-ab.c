// spawn-ab: interleaved start-to-exit latency of several commands (docs/BENCHMARKS.md, exec).
//
//   gcc -O2 -o /tmp/spawn-ab exec/benches/spawn-ab.c
//   /tmp/spawn-ab RUNS [NAME=VALUE...] CMD1 ARGS -- [NAME=VALUE...] CMD2 ARGS -- ...
//   e.g. /tmp/spawn-ab 300 /bin/true -- target/x86_64-unknown-linux-musl/release/rexec /bin/true
//
// Leading NAME=VALUE words of a candidate are set in its environment only (as env(1) would,
// without starting env: e.g. two rexec candidates with different REXEC_CONTROL sockets).
// The candidates run round-robin (RUNS rounds after 3 warm-up rounds), so load drifts hit all
// alike; stdin/stdout/stderr on /dev/null; paths as given (posix_spawn, no PATH search);
// CMD_NET_ADDR / OFFLOAD_KEY_FILE come from the environment. Prints per candidate the median,
// p25, min and mean in ms and the number of runs with a non-zero status.
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static int cmpd(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s RUNS CMD ARGS [-- CMD ARGS]...\n", argv[0]);
        return 2;
    }
    int runs = atoi(argv[1]);
    char **cmds[32];
    int nc = 0;
    cmds[nc++] = &argv[2];
    for (int i = 2; i < argc && nc < 32; i++) {
        if (!strcmp(argv[i], "--")) {
            argv[i] = NULL;
            cmds[nc++] = &argv[i + 1];
        }
    }
    // Per-candidate environment: this one's NAME=VALUE words first, then ours.
    char **envs[32];
    size_t nenv = 0;
    while (environ[nenv]) nenv++;
    for (int c = 0; c < nc; c++) {
        int k = 0;
        while (cmds[c][k] && strchr(cmds[c][k], '=') && cmds[c][k][0] != '/') k++;
        envs[c] = malloc(sizeof(char *) * (nenv + k + 1));
        memcpy(envs[c], cmds[c], sizeof(char *) * k);
        memcpy(envs[c] + k, environ, sizeof(char *) * (nenv + 1));
        cmds[c] += k;
        if (!cmds[c][0]) {
            fprintf(stderr, "candidate %d: no command\n", c + 1);
            return 2;
        }
    }
    double *t[32];
    int fails[32] = {0};
    for (int c = 0; c < nc; c++) t[c] = malloc(sizeof(double) * runs);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    for (int r = -3; r < runs; r++) {
        for (int c = 0; c < nc; c++) {
            struct timespec a, b;
            pid_t p;
            int st;
            clock_gettime(CLOCK_MONOTONIC, &a);
            if (posix_spawn(&p, cmds[c][0], &fa, NULL, cmds[c], envs[c])) {
                perror(cmds[c][0]);
                return 1;
            }
            waitpid(p, &st, 0);
            clock_gettime(CLOCK_MONOTONIC, &b);
            if (r < 0) continue; /* warm-up */
            if (st) fails[c]++;
            t[c][r] = (b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) / 1e6;
        }
    }
    for (int c = 0; c < nc; c++) {
        double s = 0;
        for (int r = 0; r < runs; r++) s += t[c][r];
        qsort(t[c], runs, sizeof(double), cmpd);
        printf("median %6.3f  p25 %6.3f  min %6.3f  mean %6.3f  fails %d  |", t[c][runs / 2],
               t[c][runs / 4], t[c][0], s / runs, fails[c]);
        for (char **a = envs[c]; *a && a < envs[c] + 8 && *a != environ[0]; a++) printf(" %s", *a);
        for (char **a = cmds[c]; *a; a++) printf(" %s", *a);
        printf("\n");
    }
    return 0;
}
