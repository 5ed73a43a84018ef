/* The demo's Wasm "app": reads a greeting from its own rootfs and prints it with its argv
 * and one variable of its environment. Built with: clang --target=wasm32-wasi -O2 app.c */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    FILE *f = fopen("/etc/greeting.txt", "r");
    if (f == NULL) {
        perror("app: /etc/greeting.txt");
        return 2;
    }
    char line[256];
    if (fgets(line, sizeof line, f) == NULL) {
        fclose(f);
        fprintf(stderr, "app: empty greeting\n");
        return 3;
    }
    fclose(f);
    line[strcspn(line, "\n")] = '\0';
    const char *who = getenv("POD_NAME");
    printf("%s (pod %s, %d args:", line, who ? who : "?", argc);
    for (int i = 0; i < argc; i++) printf(" %s", argv[i]);
    printf(")\n");
    return 0;
}
