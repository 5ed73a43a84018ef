/* A tiny file tool for preopen tests:
 *   files read PATH          print the file on stdout
 *   files write PATH TEXT    create/truncate PATH and write TEXT
 *   files list DIR           print the names in DIR, one per line (unsorted)
 *   files readlink PATH      print the target of the symlink PATH
 *   files mkdir PATH         create the directory PATH
 * Exits 0 on success; on failure prints "error: <strerror>" on stderr and exits 1. */
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>

static int fail(const char *what) {
    fprintf(stderr, "error: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: files read|write|list PATH [TEXT]\n");
        return 2;
    }
    const char *cmd = argv[1], *path = argv[2];
    if (strcmp(cmd, "read") == 0) {
        FILE *f = fopen(path, "rb");
        if (f == NULL) return fail(path);
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, n, stdout);
        fclose(f);
        return 0;
    }
    if (strcmp(cmd, "write") == 0 && argc > 3) {
        FILE *f = fopen(path, "wb");
        if (f == NULL) return fail(path);
        if (fputs(argv[3], f) < 0 || fclose(f) != 0) return fail(path);
        return 0;
    }
    if (strcmp(cmd, "list") == 0) {
        DIR *d = opendir(path);
        if (d == NULL) return fail(path);
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) puts(e->d_name);
        }
        closedir(d);
        return 0;
    }
    if (strcmp(cmd, "readlink") == 0) {
        char buf[4096];
        ssize_t n = readlink(path, buf, sizeof buf - 1);
        if (n < 0) return fail(path);
        buf[n] = 0;
        puts(buf);
        return 0;
    }
    if (strcmp(cmd, "mkdir") == 0) {
        if (mkdir(path, 0755) != 0) return fail(path);
        return 0;
    }
    fprintf(stderr, "unknown command %s\n", cmd);
    return 2;
}
